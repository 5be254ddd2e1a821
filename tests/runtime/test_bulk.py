"""`kefu-triage score`: bulk scoring of JSONL + Parquet to Parquet, local engine and Ray (local mode); every
input row ends in the output or in the errors file."""

from __future__ import annotations

import json

import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from kefu_triage.cli import main as cli_main  # noqa: E402
from kefu_triage.runtime.model import TriageModel  # noqa: E402

TEXTS = [
    "快递三天没动了，急用！",
    "在吗",
    "我要退货",
    "发票怎么开",
    "优惠券用不了",
    "能便宜点吗",
    "什么时候发货",
]
CTX = [{"role": "customer", "text": "鞋子尺码不对"}, {"role": "agent", "text": "可以换货哦"}]


@pytest.fixture
def inputs(tmp_path):
    """A directory with a JSONL file (good rows, bad lines) and a Parquet file (good rows, a null text)."""
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    lines = [
        json.dumps(
            {
                "id": i,
                "text": TEXTS[i % len(TEXTS)],
                "context": CTX if i % 4 == 0 else None,
                "channel": "app" if i % 2 else 7,
            },
            ensure_ascii=False,
        )
        for i in range(40)
    ]
    lines[5] = "{broken"
    lines[9] = json.dumps({"id": 9, "txt": "no text field"})
    lines[13] = json.dumps(
        {"id": 13, "text": "退款", "context": [{"role": "boss", "text": "?"}]}, ensure_ascii=False
    )
    lines.insert(20, "")  # blank lines are not rows
    (src / "a.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    pq.write_table(
        pa.table(
            {
                "id": list(range(100, 130)),
                "text": [None if i == 3 else TEXTS[i % len(TEXTS)] for i in range(30)],
                "channel": ["web"] * 30,
            }
        ),
        src / "sub" / "b.parquet",
    )
    (src / "notes.txt").write_text("ignored", encoding="utf-8")
    return src


def _run(smoke, inputs, tmp_path, *extra):
    out, errors = tmp_path / "out", tmp_path / "errors.jsonl"
    assert (
        cli_main(
            [
                "score",
                "--artifact",
                str(smoke["artifact"]),
                "--input",
                str(inputs),
                "--output",
                str(out),
                "--errors",
                str(errors),
                "--batch-size",
                "16",
                *extra,
            ]
        )
        == 0
    )
    table = pq.ParquetDataset(str(out)).read()
    bad = [json.loads(x) for x in errors.read_text(encoding="utf-8").splitlines()]
    return table, bad


def _check(smoke, table, bad, inputs):
    ids = sorted(table.column("id").to_pylist())
    # 40 JSONL rows (3 bad) + 30 Parquet rows (1 bad): each one either scored or reported, once
    assert ids == sorted(set(range(40)) - {5, 9, 13}) + sorted(set(range(100, 130)) - {103})
    assert sorted((b["file"].rsplit("/", 1)[1], b["line"]) for b in bad) == [
        ("a.jsonl", 6),
        ("a.jsonl", 10),
        ("a.jsonl", 14),
        ("b.parquet", 4),
    ]
    assert any("role" in b["error"] for b in bad)
    rows = sorted(table.to_pylist(), key=lambda r: r["id"])
    model = TriageModel.load(smoke["artifact"])
    first = rows[0]  # id 0: JSONL row with context, stored as JSON text beside the predictions
    assert json.loads(first["context"]) == CTX
    expected = model.predict([first["text"]], [CTX])[0]
    assert (first["pred_intent"], first["pred_route"], first["pred_reason"]) == (
        expected["intent"],
        expected["route"],
        expected["reason"],
    )
    assert first["pred_intent_prob"] == pytest.approx(expected["intent_prob"], abs=1e-5)
    assert {r["channel"] for r in rows} == {"app", "7", "web"}  # a field of mixed type is kept as text
    assert all(r["pred_route"] in ("bot", "human") and len(r["pred_top_intents"]) == 3 for r in rows)


def test_score_local(smoke, inputs, tmp_path):
    table, bad = _run(smoke, inputs, tmp_path)
    _check(smoke, table, bad, inputs)


def test_score_refuses_input_without_text(smoke, tmp_path, capsys):
    f = tmp_path / "x.parquet"
    pq.write_table(pa.table({"msg": ["a"]}), f)
    assert (
        cli_main(
            [
                "score",
                "--artifact",
                str(smoke["artifact"]),
                "--input",
                str(f),
                "--output",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "no 'text' column" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_score_ray_local_mode(smoke, inputs, tmp_path):
    pytest.importorskip("ray.data")
    table, bad = _run(smoke, inputs, tmp_path, "--engine", "ray", "--num-workers", "2")
    _check(smoke, table, bad, inputs)
