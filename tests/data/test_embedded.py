import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

import kefu_triage.data.embedded as prepare_module
from conftest import compose
from kefu_triage.data.embedded import prepare_data
from kefu_triage.data.records import DataValidationError

SRC = Path(__file__).resolve().parents[2] / "src"


def _cfg(tmp_path, name, *extra):
    return compose(
        "prepare_data",
        [f"paths.root_dir={tmp_path}", f"data.dir={tmp_path / name}", "data.generator.size=800", *extra],
    )


def _rows(path):
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def test_make_data_writes_splits_and_stats_deterministically(tmp_path):
    stats = prepare_data(_cfg(tmp_path, "a"))
    prepare_data(_cfg(tmp_path, "b"))
    prepare_data(_cfg(tmp_path, "c", "data.generator.seed=14"))
    out = tmp_path / "a"
    for split in ("train", "dev", "test"):
        text = (out / f"{split}.jsonl").read_text(encoding="utf-8")
        assert text == (tmp_path / "b" / f"{split}.jsonl").read_text(encoding="utf-8")
        rows = _rows(out / f"{split}.jsonl")
        s = stats["splits"][split]
        # the stats describe the files as written
        assert len(rows) == s["rows"] > 0
        assert sum(s["intents"].values()) == s["rows"]
        assert s["urgent_rate"] == round(sum(r["urgent"] for r in rows) / len(rows), 4)
        assert s["refund_firm"] == sum(r["refund_recoverable"] == 0 for r in rows)
        assert s["groups"] == len({r["group_id"] for r in rows})
        assert list(rows[0]) == [
            "id",
            "text",
            "context",
            "intent",
            "urgent",
            "refund_recoverable",
            "group_id",
            "source",
        ]
    assert (out / "train.jsonl").read_text() != (tmp_path / "c" / "train.jsonl").read_text()
    assert json.loads((out / "stats.json").read_text(encoding="utf-8")) == stats
    assert stats["split_check"]["leakage"] == {"train->dev": 0, "train->test": 0, "dev->test": 0}
    md = (out / "stats.md").read_text(encoding="utf-8")
    assert "| logistics | bot |" in md and "| urgent rate |" in md and "seed / template groups" in md
    assert "| dialogue rows |" in md and stats["generator"]["dialogue_share"] == 0.2
    assert (
        stats["generator"]["report"]["dialogue_rows"]["train"]
        == stats["splits"]["train"]["sources"]["dialogue"]
        > 0
    )


def _fake_generator(bad=None, leak=False):
    def generate(seed, size, dev_fraction, test_fraction, taxonomy, **options):
        row = {
            "context": [],
            "intent": "logistics",
            "urgent": 0,
            "refund_recoverable": None,
            "source": "template",
        }
        out = {
            s: [
                {**row, "id": f"{s}-{i}", "text": f"{s} 快递到哪了 {i}", "group_id": f"tpl:{s}:{i % 2}"}
                for i in range(3)
            ]
            for s in ("train", "dev", "test")
        }
        if bad:
            out["dev"][1].update(bad)
        if leak:
            out["test"][0]["text"] = out["train"][2]["text"]
        return {**out, "stats": {"dropped_duplicates": {}, "dropped_leaked": {}}}

    return generate


def test_generated_rows_go_through_the_validator(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_module, "generate_splits", _fake_generator(bad={"intent": "refund"}))
    with pytest.raises(DataValidationError, match=r"generated dev:2: intent: unknown intent 'refund'"):
        prepare_data(_cfg(tmp_path, "out"))
    assert not (tmp_path / "out").exists()  # nothing half written


def test_generated_leakage_warns_or_fails(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(prepare_module, "generate_splits", _fake_generator(leak=True))
    with pytest.raises(DataValidationError, match="train->test: 1 leaked"):
        prepare_data(_cfg(tmp_path, "strict", "data.fail_on_leakage=true"))
    with caplog.at_level(logging.WARNING, logger="kefu_triage.data.records"):
        stats = prepare_data(_cfg(tmp_path, "out"))
    assert "train->test: 1 leaked text(s)" in caplog.text
    assert stats["split_check"]["leakage"]["train->test"] == 1 and stats["splits"]["dev"]["groups"] == 2


def test_custom_data_has_no_generator(tmp_path):
    with pytest.raises(ValueError, match="data=custom has no generator"):
        prepare_data(compose("prepare_data", [f"paths.root_dir={tmp_path}", "data=custom"]))


def test_make_data_entry_point(tmp_path):
    """What `make data` runs: the Hydra program, with an override, into a temporary root."""
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(
        [sys.executable, "-m", "kefu_triage.data", f"paths.root_dir={tmp_path}", "data.generator.size=500"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| rows |" in proc.stdout
    assert {p.name for p in (tmp_path / "data" / "embedded").iterdir()} == {
        "train.jsonl",
        "dev.jsonl",
        "test.jsonl",
        "stats.md",
        "stats.json",
    }
    assert list((tmp_path / "outputs" / "prepare_data").glob("*/prepare_data.log"))
