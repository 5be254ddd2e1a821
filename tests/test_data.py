import json
from pathlib import Path

import pytest

from kefu_triage.cli import main as cli_main
from kefu_triage.data import DataValidationError, check_splits, load_splits, read_examples
from kefu_triage.taxonomy import load_taxonomy

FIX = Path(__file__).parent / "fixtures" / "data"
TAX = load_taxonomy()


def test_good_jsonl_is_normalised():
    rows = read_examples(FIX / "good.jsonl", TAX)
    assert [r["intent"] for r in rows] == ["logistics", "return_refund", "address_change"]
    assert rows[0]["context"] == [] and rows[2]["context"][0]["role"] == "agent"
    assert rows[1]["refund_recoverable"] == 1 and rows[0]["refund_recoverable"] is None


@pytest.mark.parametrize(
    "name,line,match",
    [
        ("unknown_intent.jsonl", 1, "intent: unknown intent 'shipping'"),
        ("missing_text.jsonl", 1, "text: missing"),
        ("empty_text.jsonl", 1, "text: empty"),
        ("urgent_out_of_range.jsonl", 1, "urgent: must be 0 or 1, got 2"),
        ("refund_out_of_range.jsonl", 1, "refund_recoverable: must be 0 or 1, got 5"),
        ("refund_on_non_refund.jsonl", 1, "refund_recoverable: must be null for intent 'logistics'"),
        ("refund_missing.jsonl", 1, "refund_recoverable: missing; intent 'return_refund'"),
        ("invalid_json.jsonl", 2, "invalid JSON"),
        ("bad_context.jsonl", 1, "context: turn 0: role must be"),
        ("wrong_encoding.jsonl", 2, "not valid UTF-8"),
        ("bad.csv", 3, "urgent: must be 0 or 1, got 'yes'"),
    ],
)
def test_each_problem_names_file_line_and_field(name, line, match):
    with pytest.raises(DataValidationError) as err:
        read_examples(FIX / name, TAX)
    problems = err.value.problems
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{FIX / name}:{line}: ") and match in problems[0], problems[0]


def test_all_problems_reported_at_once(tmp_path):
    p = tmp_path / "many.jsonl"
    p.write_text((FIX / "unknown_intent.jsonl").read_text() + (FIX / "empty_text.jsonl").read_text() + "{\n")
    with pytest.raises(DataValidationError) as err:
        read_examples(p, TAX)
    assert [x.split(":")[1] for x in err.value.problems] == ["1", "2", "3"]


def test_drop_invalid_counts_and_logs(tmp_path, capsys):
    p = tmp_path / "mixed.jsonl"
    p.write_text((FIX / "good.jsonl").read_text() + (FIX / "unknown_intent.jsonl").read_text())
    log = tmp_path / "dropped.jsonl"
    rows = read_examples(p, TAX, drop_invalid=True, log_path=log)
    assert len(rows) == 3
    assert "dropped 1 invalid row(s) of 4" in capsys.readouterr().err
    dropped = [json.loads(x) for x in log.read_text().splitlines()]
    assert dropped[0]["line"] == 4 and "unknown intent" in dropped[0]["problems"][0]


def test_csv_and_parquet_load_like_jsonl(tmp_path):
    rows = read_examples(FIX / "good.csv", TAX)
    assert [r["urgent"] for r in rows] == [0, 1, 0] and rows[2]["context"] == [{"role": "agent", "text": "您好"}]
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"text": ["快递到哪了", "退款"], "intent": ["logistics", "return_refund"], "urgent": [0, 1],
                      "refund_recoverable": [None, 0]})
    pq.write_table(table, tmp_path / "d.parquet")
    rows = read_examples(tmp_path / "d.parquet", TAX)
    assert rows[1]["refund_recoverable"] == 0 and rows[0]["refund_recoverable"] is None


def test_unsupported_suffix(tmp_path):
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DataValidationError, match="unsupported file type"):
        read_examples(tmp_path / "d.txt", TAX)


def test_duplicates_and_leakage_are_reported():
    a = {"text": "快递到哪了", "intent": "logistics", "urgent": 0, "refund_recoverable": None}
    b = {**a, "text": "在吗"}
    report = check_splits({"train": [a, a, b], "dev": [dict(a, text=" 快递到哪了 ")], "test": [b]})
    assert report.duplicates["train"] == 1
    assert report.leakage == {"train->dev": 1, "train->test": 1, "dev->test": 0}
    assert report.has_leakage


def test_load_splits_masks_refund_and_fails_on_leakage_when_asked(tmp_path):
    good = FIX / "good.jsonl"
    cfg = {"train_file": str(good), "dev_file": str(good), "test_file": None}
    ds = load_splits(cfg, TAX)
    assert set(ds) == {"train", "dev"}
    assert ds["train"]["refund_recoverable"] == [-1, 1, -1]
    assert ds["train"]["intent_id"][0] == TAX.intent_id("logistics")
    with pytest.raises(DataValidationError, match="leakage"):
        load_splits({**cfg, "fail_on_leakage": True}, TAX)
    with pytest.raises(DataValidationError, match="run `make data`"):
        load_splits({"train_file": str(tmp_path / "none.jsonl"), "dev_file": str(good)}, TAX)


def test_validate_cli_exit_codes(capsys):
    assert cli_main(["validate", str(FIX / "good.jsonl"), str(FIX / "good.csv")]) == 0
    assert "3 rows ok" in capsys.readouterr().out
    assert cli_main(["validate", str(FIX / "unknown_intent.jsonl")]) == 1
    assert "unknown intent" in capsys.readouterr().err
