from __future__ import annotations

import argparse
import codecs
import errno
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kefu_triage.cli import main as cli_main
from kefu_triage.core.artifact import MANIFEST
from kefu_triage.runtime import predict as predict_mod
from kefu_triage.runtime.model import TriageModel

SUMMARY = re.compile(r"(\d+) line\(s\) read = (\d+) scored \+ (\d+) error\(s\) \+ (\d+) blank")


def _strict(name):
    raise AssertionError(f"{name} in output: not JSON")


def strict_lines(path: Path) -> list:
    """Every line valid UTF-8 and strict JSON (no NaN/Infinity)."""
    if not path.exists():
        return []
    return [json.loads(raw.decode("utf-8"), parse_constant=_strict) for raw in path.read_bytes().splitlines()]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
        encoding="utf-8",
    )
    return path


@pytest.fixture(scope="module")
def artifact(smoke):
    return str(smoke["artifact"])


@pytest.fixture(scope="module")
def model(artifact):
    return TriageModel.load(artifact)


def test_predict_texts_prints_json(artifact, capsys):
    assert cli_main(["predict", "--artifact", artifact, "快递三天没动了，急用！", "在吗"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["text"] for x in lines] == ["快递三天没动了，急用！", "在吗"]
    assert all(x["route"] in ("bot", "human") for x in lines)


def test_predict_workers_give_the_same_lines(artifact, tmp_path, capsys):
    texts = ["快递三天没动了，急用！", "在吗", "发票抬头写错了能重开吗", "我要投诉", "衣服小了想换大一码"] * 3
    assert cli_main(["predict", "--artifact", artifact, *texts]) == 0
    serial = capsys.readouterr().out
    assert cli_main(["predict", "--artifact", artifact, "--workers", "2", "--threads", "1", *texts]) == 0
    assert capsys.readouterr().out == serial
    with pytest.raises(SystemExit):
        cli_main(["predict", "--artifact", artifact, "--workers", "0", "在吗"])


def test_predict_file_accounts_for_every_line_in_order(artifact, tmp_path, capsys):
    turns = [
        {"role": "customer", "text": "在吗"},
        {"role": "agent", "text": "您好"},
        {"role": "boss", "text": "?"},
    ]
    src = write_jsonl(
        tmp_path / "in.jsonl",
        [
            {"text": "快递到哪了", "id": 7},
            {"text": "退款", "context": turns},  # line 2: a bad (last) context turn
            "{broken",  # line 3: a parse error after a scoring error: the errors file must stay in line order
            "",
            {"x": 1},
            '{"text": "hi", "score": NaN}',  # would be echoed as invalid JSON
            '{"text": "\\ud800 在吗", "context": [{"role": "agent", "text": "\\udfff"}]}',  # lone surrogates, escaped
            {"text": "在吗", "context": [{"role": "agent", "text": "您好"}]},
            "   ",
        ],
    )
    out = tmp_path / "out.jsonl"
    assert cli_main(["predict", "--artifact", artifact, "--input", str(src), "--output", str(out)]) == 0
    rows = strict_lines(out)
    assert [r["text"] for r in rows] == ["快递到哪了", "\ud800 在吗", "在吗"] and rows[0]["id"] == 7
    assert all("route" in r for r in rows)
    bad = strict_lines(tmp_path / "out.jsonl.errors.jsonl")  # errors default next to the output
    assert [b["line"] for b in bad] == [2, 3, 5, 6]
    assert "context turn 2" in bad[0]["error"] and "NaN" in bad[3]["error"]
    assert SUMMARY.search(capsys.readouterr().err).groups() == ("9", "3", "4", "2")


def test_context_error_index_counts_in_the_whole_list(artifact, model, tmp_path, capsys):
    if model.context_turns < 1:
        pytest.skip("the artifact reads no context")
    turns = [{"role": "customer", "text": str(i)} for i in range(5)] + [{"role": "boss", "text": "?"}]
    assert (
        cli_main(
            [
                "predict",
                "--artifact",
                artifact,
                "--input",
                str(write_jsonl(tmp_path / "in.jsonl", [{"text": "在吗", "context": turns}])),
            ]
        )
        == 1
    )
    assert "context turn 5:" in capsys.readouterr().err


def test_output_resolving_to_the_input_is_refused(artifact, tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "在吗"}])
    before = src.read_bytes()
    os.link(src, tmp_path / "hard.jsonl")
    for out in (str(src), f"{tmp_path}/./in.jsonl", str(tmp_path / "hard.jsonl")):
        assert cli_main(["predict", "--artifact", artifact, "--input", str(src), "--output", out]) == 2
        assert "is the input file" in capsys.readouterr().err
        assert src.read_bytes() == before
    assert (
        cli_main(
            [
                "predict",
                "--artifact",
                artifact,
                "--input",
                str(src),
                "--errors",
                str(src),
                "--output",
                str(tmp_path / "o.jsonl"),
            ]
        )
        == 2
    )
    assert src.read_bytes() == before
    named = write_jsonl(
        tmp_path / "out.jsonl.errors.jsonl", [{"text": "在吗"}]
    )  # the default errors file of out.jsonl
    assert (
        cli_main(
            [
                "predict",
                "--artifact",
                artifact,
                "--input",
                str(named),
                "--output",
                str(tmp_path / "out.jsonl"),
            ]
        )
        == 2
    )
    assert "is the input file" in capsys.readouterr().err and named.read_text(encoding="utf-8").startswith(
        '{"text"'
    )


def test_failed_run_leaves_existing_output_untouched(artifact, tmp_path, capsys, monkeypatch):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "在吗"}, "{bad"])
    out = tmp_path / "out.jsonl"
    out.write_text("OLD\n")
    # errors folder missing: refused before anything is written
    assert (
        cli_main(
            [
                "predict",
                "--artifact",
                artifact,
                "--input",
                str(src),
                "--output",
                str(out),
                "--errors",
                str(tmp_path / "no" / "such" / "e.jsonl"),
            ]
        )
        == 2
    )
    assert "does not exist" in capsys.readouterr().err and out.read_text() == "OLD\n"

    # disk full when the output is made durable: one line naming the path, old output kept, no temp file left
    def full(_fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    assert cli_main(["predict", "--artifact", artifact, "--input", str(src), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == f"kefu-triage predict: error: --output {out}: no space left on device"
    assert out.read_text() == "OLD\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]


def test_os_errors_are_one_named_line(artifact, tmp_path, capsys, monkeypatch):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "在吗"}])
    (tmp_path / "dir").mkdir()
    assert (
        cli_main(["predict", "--artifact", artifact, "--input", str(src), "--output", str(tmp_path / "dir")])
        == 2
    )
    assert (
        capsys.readouterr().err.strip()
        == f"kefu-triage predict: error: --output {tmp_path / 'dir'}: is a directory"
    )
    assert cli_main(["predict", "--artifact", artifact, "--input", str(tmp_path / "dir")]) == 2
    assert "is a directory" in capsys.readouterr().err

    def denied(*_a, **_k):  # a read-only folder (tests may run as root, where chmod would not stop a write)
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    assert (
        cli_main(
            [
                "predict",
                "--artifact",
                artifact,
                "--input",
                str(src),
                "--output",
                str(tmp_path / "ro" / "o.jsonl"),
            ]
        )
        == 2
    )
    (tmp_path / "ro").mkdir()
    assert (
        cli_main(
            [
                "predict",
                "--artifact",
                artifact,
                "--input",
                str(src),
                "--output",
                str(tmp_path / "ro" / "o.jsonl"),
            ]
        )
        == 2
    )
    assert (
        capsys.readouterr()
        .err.strip()
        .splitlines()[-1]
        .endswith(f"{tmp_path / 'ro' / 'o.jsonl'}: Permission denied")
    )


def test_errors_never_beside_the_input_and_only_when_needed(artifact, tmp_path, capsys):
    src_dir = tmp_path / "inputs"
    src_dir.mkdir()
    src = write_jsonl(src_dir / "in.jsonl", [{"text": "在吗"}, "{bad"])
    # stdout mode: predictions on stdout, errors on stderr, nothing created beside the input
    assert cli_main(["predict", "--artifact", artifact, "--input", str(src)]) == 0
    captured = capsys.readouterr()
    assert [json.loads(x)["text"] for x in captured.out.splitlines()] == ["在吗"]
    assert '{"line": 2, "error": "invalid JSON' in captured.err
    assert sorted(p.name for p in src_dir.iterdir()) == ["in.jsonl"]
    # file mode without a bad line: no errors file; a stale one from an earlier run is emptied
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": "在吗"}])
    out = tmp_path / "out.jsonl"
    assert cli_main(["predict", "--artifact", artifact, "--input", str(good), "--output", str(out)]) == 0
    assert not (tmp_path / "out.jsonl.errors.jsonl").exists()
    (tmp_path / "out.jsonl.errors.jsonl").write_text('{"line": 9, "error": "stale"}\n')
    assert cli_main(["predict", "--artifact", artifact, "--input", str(good), "--output", str(out)]) == 0
    assert (tmp_path / "out.jsonl.errors.jsonl").read_text() == ""


def test_argument_checks_and_stdin(artifact, tmp_path, capsys, monkeypatch):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "在吗"}, "", {"text": "退款"}])
    for bad in ("0", "-3"):
        with pytest.raises(SystemExit):
            cli_main(["predict", "--artifact", artifact, "--batch-size", bad, "在吗"])
    with pytest.raises(ValueError, match="batch-size"):  # the API path checks it too
        predict_mod.run_predict(
            argparse.Namespace(batch_size=0, texts=["x"], input=None, output=None, errors=None)
        )
    capsys.readouterr()
    assert cli_main(["predict", "--artifact", artifact, "--input", str(src), "在吗"]) == 2
    assert "not both" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["predict"])
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(src.read_bytes()), encoding="utf-8"))
    out = tmp_path / "out.jsonl"
    assert cli_main(["predict", "--artifact", artifact, "--input", "-", "--output", str(out)]) == 0
    assert [r["text"] for r in strict_lines(out)] == ["在吗", "退款"]
    assert SUMMARY.search(capsys.readouterr().err).groups() == ("3", "2", "0", "1")


def test_invalid_utf8_argument_is_named_not_echoed(artifact):
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    proc = subprocess.run(
        [sys.executable, "-m", "kefu_triage.cli", "predict", "--artifact", artifact, b"\xff\xfe bad", "在吗"],
        env=env,
        capture_output=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(x, parse_constant=_strict) for x in proc.stdout.decode("utf-8").splitlines()]
    assert [r["text"] for r in rows] == ["在吗"]
    assert '{"argument": 1, "error": "not valid UTF-8' in proc.stderr.decode("utf-8")


def test_pipe_into_head_exits_quietly(artifact, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": f"快递到哪了 {i}"} for i in range(3000)])
    proc = subprocess.Popen(
        [sys.executable, "-m", "kefu_triage.cli", "predict", "--artifact", artifact, "--input", str(src)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert json.loads(proc.stdout.readline())["text"] == "快递到哪了 0"
    proc.stdout.close()  # what `| head -1` does
    stderr = proc.stderr.read()
    assert proc.wait(timeout=300) == predict_mod.BROKEN_PIPE_EXIT
    assert stderr == b""


def test_artifact_manifest_errors_and_set_policy(artifact, tmp_path, capsys):
    art = tmp_path / "artifact"
    shutil.copytree(artifact, art)
    assert cli_main(["set-policy", "--artifact", str(art), "--urgent", "0.4", "--note", "test"]) == 0
    assert TriageModel.load(art).thresholds.urgent == 0.4
    manifest = json.loads((art / MANIFEST).read_text(encoding="utf-8"))
    assert manifest["policy"]["history"][-1]["note"] == "test"
    for broken, message in (
        (lambda m: m["policy"]["thresholds"].update(urgent=0.9), "manifest_sha256 does not match"),
        (lambda m: m.pop("policy") and None, "field 'policy' is missing"),
        (lambda m: [m], "must be a JSON object, got array"),
    ):
        edited = json.loads(json.dumps(manifest))
        edited = broken(edited) or edited
        (art / MANIFEST).write_text(json.dumps(edited), encoding="utf-8")
        assert cli_main(["predict", "--artifact", str(art), "在吗"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"{art / MANIFEST}: " in err and message in err


# ---- property: no line is ever lost --------------------------------------------------------------------
SURROGATE = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF, categories=["Cs"])
TEXT = st.text(st.one_of(st.characters(), SURROGATE), max_size=30)
SCALAR = st.none() | st.booleans() | st.integers() | st.floats() | TEXT  # floats include NaN and ±Infinity
VALUE = st.recursive(
    SCALAR, lambda c: st.lists(c, max_size=3) | st.dictionaries(TEXT, c, max_size=3), max_leaves=6
)
TURN = st.fixed_dictionaries(
    {"role": st.sampled_from(["customer", "agent", "boss"]) | VALUE, "text": TEXT | VALUE}
)
RECORD = st.fixed_dictionaries(
    {"text": TEXT | TEXT | VALUE}, optional={"context": st.lists(TURN, max_size=4) | VALUE, "id": VALUE}
)


def _json_bytes(obj, ascii_only: bool) -> bytes:
    # ensure_ascii escapes surrogates as \\udXXX (valid JSON); raw, they are invalid UTF-8 (surrogatepass)
    return json.dumps(obj, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


LINE = st.one_of(
    st.builds(_json_bytes, RECORD, st.booleans()),
    st.builds(_json_bytes, RECORD, st.just(True)),
    st.builds(_json_bytes, VALUE, st.booleans()),
    st.binary(max_size=30),
    TEXT.map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.sampled_from([b"", b"  ", b"\t", b"\r", codecs.BOM_UTF8]),
).map(lambda b: b.replace(b"\n", b" "))


def _is_blank(raw: bytes, first: bool) -> bool:
    if first and raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8) :]
    return raw.strip(b" \t\r\n") == b""


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(lines=st.lists(LINE, max_size=25), trailing_newline=st.booleans())
def test_property_every_line_accounted_for(model, capsys, lines, trailing_newline):
    data = b"\n".join(lines) + (b"\n" if trailing_newline and lines else b"")
    raw_lines = data.split(b"\n")
    if raw_lines[-1] == b"":
        raw_lines.pop()
    with (
        tempfile.TemporaryDirectory() as tmp,
        mock.patch.object(TriageModel, "load", return_value=model),
        mock.patch.object(predict_mod, "CHUNK", 4),
    ):  # several chunks per file
        src, out = Path(tmp) / "in.jsonl", Path(tmp) / "out.jsonl"
        src.write_bytes(data)
        capsys.readouterr()
        rc = cli_main(["predict", "--artifact", "unused", "--input", str(src), "--output", str(out)])
        rows, errors = strict_lines(out), strict_lines(Path(tmp) / "out.jsonl.errors.jsonl")
        summary = SUMMARY.search(capsys.readouterr().err)
    blank = sum(_is_blank(raw, i == 0) for i, raw in enumerate(raw_lines))
    assert len(rows) + len(errors) + blank == len(raw_lines)
    assert summary.groups() == tuple(str(n) for n in (len(raw_lines), len(rows), len(errors), blank))
    assert rc == (1 if errors and not rows else 0)
    numbers = [e["line"] for e in errors]
    assert numbers == sorted(set(numbers)) and all(1 <= n <= len(raw_lines) for n in numbers)
    assert all(isinstance(r["text"], str) and r["route"] in ("bot", "human") for r in rows)
    for n, raw in enumerate(
        raw_lines, 1
    ):  # a clean message (valid UTF-8, plain JSON, no context) is never refused
        try:
            obj = json.loads(raw.decode("utf-8"), parse_constant=_strict)
        except (UnicodeDecodeError, ValueError, AssertionError):
            continue
        if isinstance(obj, dict) and isinstance(obj.get("text"), str) and "context" not in obj:
            assert n not in numbers
