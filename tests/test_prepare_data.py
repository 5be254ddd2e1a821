import json

from conftest import compose
from kefu_triage.prepare_data import prepare_data


def _run(tmp_path, name):
    cfg = compose("prepare_data", [f"paths.root_dir={tmp_path}", f"data.dir={tmp_path / name}", "data.generator.size=800"])
    return prepare_data(cfg), tmp_path / name


def test_make_data_writes_splits_and_stats_deterministically(tmp_path):
    stats, out = _run(tmp_path, "a")
    _, again = _run(tmp_path, "b")
    for split in ("train", "dev", "test"):
        text = (out / f"{split}.jsonl").read_text(encoding="utf-8")
        assert text == (again / f"{split}.jsonl").read_text(encoding="utf-8")
        rows = [json.loads(x) for x in text.splitlines()]
        assert len(rows) == stats["splits"][split]["rows"] > 0
        assert set(rows[0]) >= {"text", "context", "intent", "urgent", "refund_recoverable", "group_id"}
    assert json.loads((out / "stats.json").read_text())["splits"]["train"]["intents"]["logistics"] > 0
    md = (out / "stats.md").read_text(encoding="utf-8")
    assert "| logistics | bot |" in md and "urgent rate" in md
