import json

import pytest

from kefu_triage.cli import main as cli_main


def test_predict_texts_prints_json(smoke, capsys):
    assert cli_main(["predict", "--artifact", str(smoke["artifact"]), "快递三天没动了，急用！", "在吗"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["text"] for x in lines] == ["快递三天没动了，急用！", "在吗"]
    assert all(x["route"] in ("bot", "human") for x in lines)


def test_predict_file_streams_and_keeps_going_past_bad_lines(smoke, tmp_path):
    src = tmp_path / "in.jsonl"
    good = {"text": "快递到哪了", "id": 7}
    src.write_text("\n".join([json.dumps(good, ensure_ascii=False), "{broken", json.dumps({"x": 1}),
                              json.dumps({"text": "退款", "context": [{"role": "boss", "text": "?"}]}, ensure_ascii=False),
                              json.dumps({"text": "在吗", "context": [{"role": "agent", "text": "您好"}]}, ensure_ascii=False)])
                   + "\n", encoding="utf-8")
    out, errors = tmp_path / "out.jsonl", tmp_path / "bad.jsonl"
    assert cli_main(["predict", "--artifact", str(smoke["artifact"]), "--input", str(src), "--output", str(out),
                     "--errors", str(errors)]) == 0
    rows = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert [r["text"] for r in rows] == ["快递到哪了", "在吗"] and rows[0]["id"] == 7 and "route" in rows[0]
    bad = [json.loads(x) for x in errors.read_text(encoding="utf-8").splitlines()]
    assert sorted(b["line"] for b in bad) == [2, 3, 4]
    assert any("role" in b["error"] for b in bad)


def test_predict_bad_artifact_is_a_clear_error(tmp_path, capsys):
    assert cli_main(["predict", "--artifact", str(tmp_path), "hi"]) == 2
    assert "triage.json: missing" in capsys.readouterr().err


def test_predict_needs_input(smoke):
    with pytest.raises(SystemExit):
        cli_main(["predict"])
