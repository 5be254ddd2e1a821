import json
import logging
from pathlib import Path

import pytest

from conftest import compose
from kefu_triage.cli import main as cli_main
from kefu_triage.core.taxonomy import load_taxonomy
from kefu_triage.data.records import (
    MAX_LISTED_PROBLEMS,
    DataValidationError,
    check_splits,
    load_splits,
    read_examples,
    validate_examples,
)

FIX = Path(__file__).parents[1] / "fixtures" / "data"
TAX = load_taxonomy()
GOOD_ROW = {"text": "快递到哪了", "intent": "logistics", "urgent": 0, "refund_recoverable": None}


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_good_jsonl_is_normalised_and_keeps_extra_fields(tmp_path):
    rows = read_examples(FIX / "good.jsonl", TAX)
    assert [r["intent"] for r in rows] == ["logistics", "return_refund", "address_change"]
    assert rows[0]["context"] == [] and rows[2]["context"] == [{"role": "agent", "text": "请提供新地址"}]
    assert rows[1]["refund_recoverable"] == 1 and rows[0]["refund_recoverable"] is None
    rows = read_examples(_jsonl(tmp_path / "x.jsonl", [{**GOOD_ROW, "id": "a-1", "source": "crm"}]), TAX)
    assert rows[0]["id"] == "a-1" and rows[0]["source"] == "crm"


def test_bom_and_accepted_label_spellings():
    rows = read_examples(FIX / "bom_and_spellings.jsonl", TAX)
    assert rows[0]["text"] == "在吗" and rows[0]["urgent"] == 1 and rows[0]["refund_recoverable"] is None
    assert rows[1]["urgent"] == 0 and rows[1]["refund_recoverable"] == 0


@pytest.mark.parametrize(
    "name,line,match",
    [
        (
            "unknown_intent.jsonl",
            1,
            "intent: unknown intent 'shipping' (did you mean 'shipping_time'?); known: greeting,",
        ),
        ("missing_text.jsonl", 1, "text: missing"),
        ("empty_text.jsonl", 1, "text: empty"),
        ("text_not_string.jsonl", 1, "text: must be a string, got int"),
        ("invisible_text.jsonl", 1, "text: only control or invisible characters"),
        ("urgent_out_of_range.jsonl", 1, "urgent: must be 0 or 1, got 2"),
        ("refund_out_of_range.jsonl", 1, "refund_recoverable: must be 0, 1 or null, got 5"),
        ("refund_on_non_refund.jsonl", 1, "refund_recoverable: must be null for intent 'logistics'"),
        ("invalid_json.jsonl", 2, "json: invalid JSON"),
        ("not_an_object.jsonl", 1, "record: must be a JSON object, got list"),
        ("bad_context.jsonl", 1, "context: turn 0: role must be 'customer' or 'agent', got 'boss'"),
        ("context_not_list.jsonl", 1, "context: not a JSON list of turns"),
        ("context_text_not_string.jsonl", 1, "context: turn 0: text must be a string"),
        ("wrong_encoding.jsonl", 2, "encoding: not valid UTF-8"),
        ("bad.csv", 3, "urgent: must be 0 or 1, got 'yes'"),
        ("bad_context.csv", 2, "context: not a JSON list of turns"),
        ("ragged.csv", 3, "columns: 5 cells but the header has 4"),
        ("unterminated_quote.csv", 2, "csv: unexpected end of data"),
        ("wrong_encoding.csv", 3, "encoding: not valid UTF-8"),
        ("missing_column.csv", 1, "columns: missing 'intent'"),
    ],
)
def test_each_problem_names_file_line_and_field(name, line, match):
    with pytest.raises(DataValidationError) as err:
        read_examples(FIX / name, TAX)
    problems = err.value.problems
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{FIX / name}:{line}: ") and match in problems[0], problems[0]
    assert problems[0] in str(err.value)


def test_every_problem_of_every_row_is_reported_at_once(tmp_path):
    p = tmp_path / "many.jsonl"
    p.write_text(
        (FIX / "unknown_intent.jsonl").read_text()
        + "\n"
        + (FIX / "empty_text.jsonl").read_text()
        + "{\n"
        + json.dumps({"text": 1, "intent": "x", "urgent": 3})
        + "\n",
        encoding="utf-8",
    )
    with pytest.raises(DataValidationError) as err:
        read_examples(p, TAX)
    found = [(x.split(":")[1], x.split(": ")[1].split(":")[0]) for x in err.value.problems]
    assert found == [
        ("1", "intent"),
        ("3", "text"),
        ("4", "json"),
        ("5", "text"),
        ("5", "intent"),
        ("5", "urgent"),
    ]


def test_long_problem_lists_are_capped_in_the_message_but_kept_in_full(tmp_path):
    p = _jsonl(tmp_path / "bad.jsonl", [{**GOOD_ROW, "urgent": 7}] * (MAX_LISTED_PROBLEMS + 7))
    with pytest.raises(DataValidationError) as err:
        read_examples(p, TAX)
    assert len(err.value.problems) == MAX_LISTED_PROBLEMS + 7
    assert "... and 7 more" in str(err.value) and f"{p}:{MAX_LISTED_PROBLEMS + 1}:" not in str(err.value)


def test_drop_invalid_counts_logs_and_writes_the_dropped_rows(tmp_path, caplog):
    p = tmp_path / "mixed.jsonl"
    p.write_text(
        (FIX / "good.jsonl").read_text() + (FIX / "unknown_intent.jsonl").read_text() + "{oops\n",
        encoding="utf-8",
    )
    log = tmp_path / "dropped.jsonl"
    with caplog.at_level(logging.WARNING, logger="kefu_triage.data.records"):
        rows = read_examples(p, TAX, drop_invalid=True, log_path=log)
    assert len(rows) == 3
    assert f"{p}: dropped 2 invalid row(s) of 5" in caplog.text and "unknown intent" in caplog.text
    dropped = [json.loads(x) for x in log.read_text(encoding="utf-8").splitlines()]
    assert [d["line"] for d in dropped] == [4, 5]
    assert dropped[0]["row"]["intent"] == "shipping" and "unknown intent" in dropped[0]["problems"][0]
    assert dropped[1]["raw"] == "{oops" and "invalid JSON" in dropped[1]["problems"][0]


def test_a_file_with_no_valid_rows_is_an_error_even_when_dropping(tmp_path):
    with pytest.raises(DataValidationError, match="no valid examples"):
        read_examples(FIX / "empty_text.jsonl", TAX, drop_invalid=True)
    with pytest.raises(DataValidationError, match="file not found"):
        read_examples(tmp_path / "nope.jsonl", TAX)
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DataValidationError, match="unsupported file type '.txt'"):
        read_examples(tmp_path / "d.txt", TAX)


def test_csv_loads_like_jsonl_with_physical_line_numbers(tmp_path):
    rows = read_examples(FIX / "good.csv", TAX)
    assert [r["urgent"] for r in rows] == [0, 1, 0] and rows[2]["context"] == [
        {"role": "agent", "text": "您好"}
    ]
    assert rows[1]["refund_recoverable"] == 1 and rows[0]["refund_recoverable"] is None
    # a record is reported at the line it starts on, also when a quoted cell spans lines; "NA" stays text
    p = tmp_path / "multi.csv"
    p.write_text(
        'text,intent,urgent,refund_recoverable\n"两行\n的文本",logistics,2,\nNA,greting,0,\n',
        encoding="utf-8",
    )
    with pytest.raises(DataValidationError) as err:
        read_examples(p, TAX)
    assert [x.split(": ")[0] for x in err.value.problems] == [f"{p}:2", f"{p}:4"]
    assert "unknown intent 'greting' (did you mean 'greeting'?)" in err.value.problems[1]
    p.write_text(
        'text,intent,urgent,refund_recoverable\n"两行\n的文本",logistics,0,\nNA,greeting,0,\n',
        encoding="utf-8",
    )
    assert [r["text"] for r in read_examples(p, TAX)] == ["两行\n的文本", "NA"]


def test_parquet_loads_like_jsonl_and_bad_parquet_is_named(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "text": ["快递到哪了", "退款", "在吗"],
            "intent": ["logistics", "return_refund", "greeting"],
            "urgent": [0, 1, 0],
            "refund_recoverable": [None, 0, None],
            "context": [[], [], [{"role": "agent", "text": "您好"}]],
        }
    )
    pq.write_table(table, tmp_path / "d.parquet")
    rows = read_examples(tmp_path / "d.parquet", TAX)
    assert [r["refund_recoverable"] for r in rows] == [None, 0, None]
    assert rows[2]["context"] == [{"role": "agent", "text": "您好"}] and rows[0]["context"] == []
    pq.write_table(table.drop(["urgent"]), tmp_path / "no_urgent.parquet")  # urgent unknown on every row
    assert [r["urgent"] for r in read_examples(tmp_path / "no_urgent.parquet", TAX)] == [None, None, None]
    pq.write_table(table.drop(["intent"]), tmp_path / "no_intent.parquet")
    with pytest.raises(DataValidationError, match="columns: missing 'intent'"):
        read_examples(tmp_path / "no_intent.parquet", TAX)
    pq.write_table(table.set_column(2, "urgent", pa.array([0, 5, 0])), tmp_path / "bad.parquet")
    with pytest.raises(DataValidationError, match=r"bad.parquet:2: urgent: must be 0 or 1, got 5"):
        read_examples(tmp_path / "bad.parquet", TAX)
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataValidationError, match="broken.parquet: parquet: cannot read"):
        read_examples(tmp_path / "broken.parquet", TAX)


def test_labels_follow_a_user_taxonomy(tmp_path):
    tax = tmp_path / "mine.yaml"
    tax.write_text("intents: {ask: {route: bot}, money_back: {route: refund_triage}}", encoding="utf-8")
    mine = load_taxonomy(tax)
    ok = validate_examples(
        [{"text": "退钱", "intent": "money_back", "urgent": 0, "refund_recoverable": 1}], mine
    )
    assert ok[0]["refund_recoverable"] == 1
    assert (
        validate_examples([{"text": "退钱", "intent": "money_back", "urgent": 0}], mine)[0][
            "refund_recoverable"
        ]
        is None
    )
    with pytest.raises(
        DataValidationError, match=r"mem:1: refund_recoverable: must be null for intent 'ask'"
    ):
        validate_examples(
            [{"text": "在吗", "intent": "ask", "urgent": 0, "refund_recoverable": 0}], mine, "mem"
        )


def test_duplicates_conflicts_and_leakage_are_reported():
    a = {**GOOD_ROW, "context": []}
    ctx = {**a, "context": [{"role": "agent", "text": "请提供订单号"}]}
    b = {**a, "text": "在吗", "intent": "greeting"}
    report = check_splits(
        {
            "train": [a, dict(a, text="快递到哪了 \u200b"), ctx, b, dict(b, urgent=1)],
            "dev": [dict(a, text=" 快递到哪了 ")],
            "test": [b],
        }
    )
    # the same text after another agent question is a different example, not a duplicate
    assert report.duplicates == {"train": 2, "dev": 0, "test": 0}
    assert report.conflicts == {"train": 1, "dev": 0, "test": 0} and report.examples["conflict:train"] == [
        "在吗"
    ]
    assert report.leakage == {"train->dev": 1, "train->test": 1, "dev->test": 0}
    assert report.examples["train->dev"] == ["快递到哪了"] and report.has_leakage
    assert "train->test: 1 leaked text(s)" in report.summary()
    clean = check_splits({"train": [a], "dev": [b]})
    assert not clean.has_findings and clean.summary().startswith("no duplicates")


def test_load_splits_columns_and_refund_mask(tmp_path):
    train = _jsonl(
        tmp_path / "train.jsonl",
        [GOOD_ROW, {**GOOD_ROW, "text": "不想要了退掉", "intent": "return_refund", "refund_recoverable": 0}],
    )
    cfg = {"train_file": str(train), "dev_file": str(FIX / "good.jsonl"), "test_file": None}
    ds = load_splits(cfg, TAX)
    assert set(ds) == {"train", "dev"}
    assert ds["train"].column_names == [
        "text",
        "context",
        "intent",
        "intent_id",
        "urgent",
        "refund_recoverable",
    ]
    assert ds["train"]["refund_recoverable"] == [-1, 0] and ds["dev"]["refund_recoverable"] == [-1, 1, -1]
    assert ds["train"]["intent_id"] == [TAX.intent_id("logistics"), TAX.intent_id("return_refund")]
    assert ds["train"]["context"] == [[], []] and ds["dev"]["context"][2][0]["role"] == "agent"


def test_leakage_warns_or_fails_and_eval_file_is_checked_against_train(tmp_path, caplog):
    good = str(FIX / "good.jsonl")
    other = str(_jsonl(tmp_path / "dev.jsonl", [{**GOOD_ROW, "text": "还没发货吗"}]))
    with caplog.at_level(logging.WARNING, logger="kefu_triage.data.records"):
        ds = load_splits({"train_file": good, "dev_file": good}, TAX)
    assert len(ds["dev"]) == 3 and "train->dev: 3 leaked text(s)" in caplog.text
    with pytest.raises(DataValidationError, match="leakage between splits"):
        load_splits({"train_file": good, "dev_file": good, "fail_on_leakage": True}, TAX)
    with pytest.raises(DataValidationError, match="train->eval: 3 leaked"):
        load_splits({"train_file": good, "dev_file": other, "eval_file": good, "fail_on_leakage": True}, TAX)
    train = str(_jsonl(tmp_path / "train.jsonl", [{**GOOD_ROW, "text": "物流不动了"}]))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kefu_triage.data.records"):
        ds = load_splits(
            {"train_file": train, "dev_file": other, "eval_file": good, "max_eval_examples": 2}, TAX
        )
    assert set(ds) == {"train", "dev", "eval"} and len(ds["eval"]) == 2 and "leak" not in caplog.text


def test_load_splits_config_errors_name_the_setting(tmp_path):
    good = str(FIX / "good.jsonl")
    with pytest.raises(DataValidationError, match=r"data.train_file: file not found: .*run `make data`"):
        load_splits({"train_file": str(tmp_path / "none.jsonl"), "dev_file": good}, TAX)
    cfg = compose("train", ["data=custom"])
    with pytest.raises(DataValidationError, match=r"data.train_file: required but not set"):
        load_splits(cfg.data, TAX)


def test_drop_invalid_through_the_data_config_writes_dropped_split_logs(tmp_path):
    mixed = tmp_path / "train.jsonl"
    mixed.write_text(
        (FIX / "good.jsonl").read_text() + (FIX / "refund_on_non_refund.jsonl").read_text(), encoding="utf-8"
    )
    dev = str(_jsonl(tmp_path / "dev.jsonl", [{**GOOD_ROW, "text": "还没发货吗"}]))
    cfg = {"train_file": str(mixed), "dev_file": dev, "drop_invalid": True, "log_dir": str(tmp_path / "logs")}
    assert len(load_splits(cfg, TAX)["train"]) == 3
    dropped = [json.loads(x) for x in (tmp_path / "logs" / "dropped_train.jsonl").read_text().splitlines()]
    assert dropped[0]["line"] == 4 and "refund_recoverable: must be null" in dropped[0]["problems"][0]
    assert not (tmp_path / "logs" / "dropped_dev.jsonl").exists()


def test_validate_cli_exit_codes_and_output(tmp_path, capsys):
    assert cli_main(["validate", str(FIX / "good.jsonl"), str(FIX / "good.csv")]) == 0
    out = capsys.readouterr().out
    assert f"{FIX / 'good.jsonl'}: OK, 3 rows" in out and "refund recoverable 1 / firm 0" in out
    assert "intents: address_change 1, logistics 1, return_refund 1" in out and "all 2 file(s) valid" in out
    # texts shared between the files are a warning, not a failure
    assert "warning:" in out and "leaked text(s)" in out
    assert cli_main(["validate", str(FIX / "good.jsonl"), str(FIX / "unknown_intent.jsonl")]) == 1
    captured = capsys.readouterr()
    assert "unknown_intent.jsonl:1: intent: unknown intent 'shipping'" in captured.err
    assert "1 of 2 file(s) invalid" in captured.out
    assert cli_main(["validate", str(FIX / "good.jsonl"), "--taxonomy", str(tmp_path / "none.yaml")]) == 2
    assert "taxonomy file not found" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ partial labels
def test_unknown_urgent_and_refund_labels_are_kept_as_none(tmp_path):
    rows = read_examples(
        _jsonl(
            tmp_path / "partial.jsonl",
            [
                {"text": "快递到哪了", "intent": "logistics"},  # no urgent, no refund column
                {
                    "text": "不想要了能退吗",
                    "intent": "return_refund",
                    "urgent": None,
                    "refund_recoverable": None,
                },
                {"text": "东西坏了要退", "intent": "return_refund", "urgent": 1},
                {
                    "text": "在吗",
                    "intent": "greeting",
                    "urgent": 0,
                    "refund_recoverable": None,
                    "difficulty": "easy",
                },
            ],
        ),
        TAX,
    )
    assert [r["urgent"] for r in rows] == [None, None, 1, 0]
    assert [r["refund_recoverable"] for r in rows] == [None, None, None, None]
    assert rows[3]["difficulty"] == "easy"
    assert read_examples(FIX / "refund_missing.jsonl", TAX)[0]["refund_recoverable"] is None


def test_partial_label_csv_without_an_urgent_column(tmp_path):
    path = tmp_path / "intent_only.csv"
    path.write_text("text,intent\n快递到哪了,logistics\n想退货,return_refund\n", encoding="utf-8")
    rows = read_examples(path, TAX)
    assert [(r["intent"], r["urgent"], r["refund_recoverable"]) for r in rows] == [
        ("logistics", None, None),
        ("return_refund", None, None),
    ]


@pytest.mark.parametrize(
    "row,match",
    [
        (
            {"text": "退款", "intent": "logistics", "refund_recoverable": 0},
            "refund_recoverable: must be null for intent",
        ),
        ({"text": "退款", "intent": "return_refund", "urgent": 2}, "urgent: must be 0 or 1, got 2"),
        (
            {"text": "退款", "intent": "return_refund", "urgent": "maybe"},
            "urgent: must be 0 or 1, got 'maybe'",
        ),
        (
            {"text": "退款", "intent": "return_refund", "refund_recoverable": 3},
            "refund_recoverable: must be 0, 1 or null",
        ),
    ],
)
def test_partial_labels_that_contradict_the_contract_are_still_errors(row, match):
    with pytest.raises(DataValidationError, match=match):
        validate_examples([row], TAX)


def test_unknown_labels_become_minus_one_in_the_dataset_and_count_in_the_summary(tmp_path):
    from kefu_triage.data.records import summarize, to_dataset

    rows = validate_examples(
        [
            {"text": "快递到哪了", "intent": "logistics"},
            {"text": "想退货", "intent": "return_refund", "urgent": 1, "refund_recoverable": None},
            {"text": "尺码小了想退", "intent": "return_refund", "urgent": 0, "refund_recoverable": 1},
        ],
        TAX,
    )
    ds = to_dataset(rows, TAX)
    assert ds["urgent"] == [-1, 1, 0] and ds["refund_recoverable"] == [-1, -1, 1]
    s = summarize(rows)
    assert s["urgent_labelled"] == 2 and s["urgent_rate"] == 0.5 and s["refund_recoverable"] == 1
