"""Labelled data: the example format, validation with file/line errors, and loading splits with ``datasets``.

A labelled example is one JSON line::

    {"text": "...", "context": [{"role": "customer"|"agent", "text": "..."}], "intent": "logistics",
     "urgent": 0, "refund_recoverable": null}

``context`` is optional (previous turns, oldest first); ``refund_recoverable`` is 0/1 exactly when the
intent routes to ``refund_triage`` and null otherwise. CSV and Parquet files carry the same columns (in
CSV, ``context`` is a JSON string).
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kefu_triage.fileio import atomic_write_jsonl
from kefu_triage.taxonomy import Taxonomy, load_taxonomy
from kefu_triage.textproc import clean_text

MAX_LISTED_PROBLEMS = 50
SUPPORTED_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


class DataValidationError(ValueError):
    """One or more problems in a data file; ``problems`` holds each as 'path:line: field: problem'."""

    def __init__(self, problems: list[str], source: str = ""):
        self.problems = problems
        shown = problems[:MAX_LISTED_PROBLEMS]
        more = len(problems) - len(shown)
        head = f"{len(problems)} problem(s) in {source}" if source else f"{len(problems)} data problem(s)"
        text = "\n  ".join(shown) + (f"\n  ... and {more} more" if more > 0 else "")
        super().__init__(f"{head}:\n  {text}")


# ---------------------------------------------------------------------------------------------------
# Reading raw rows (with the line number a user sees in an editor)
# ---------------------------------------------------------------------------------------------------
def _iter_jsonl(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    """(line number, parsed object or None, problem or None) for every non-blank line."""
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                yield lineno, None, f"not valid UTF-8 (byte {exc.start}); save the file as UTF-8"
                continue
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line), None
            except json.JSONDecodeError as exc:
                yield lineno, None, f"invalid JSON: {exc.msg} (column {exc.colno})"


def _iter_table(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    """CSV / Parquet rows through ``datasets``; CSV line = row index + 2 (header is line 1)."""
    import datasets

    offset = 2 if path.suffix == ".csv" else 1
    if path.suffix == ".csv":
        try:
            path.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            line = path.read_bytes()[: exc.start].count(b"\n") + 1
            yield line, None, "not valid UTF-8; save the file as UTF-8"
            return
        import csv

        with path.open(encoding="utf-8-sig", newline="") as fh:
            header = next(csv.reader(fh), [])
        # every column a string: "0"/"1"/"" are parsed by the validator, not guessed by the CSV reader
        features = datasets.Features({name: datasets.Value("string") for name in header})
        ds = datasets.Dataset.from_csv(str(path), features=features, encoding="utf-8-sig")
    else:
        try:
            ds = datasets.Dataset.from_parquet(str(path))
        except Exception as exc:  # pyarrow raises several types for a damaged file
            raise DataValidationError([f"{path}: cannot read Parquet: {exc}"], str(path)) from None
    for i, row in enumerate(ds):
        yield i + offset, row, None


def _iter_rows(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    if path.suffix in (".jsonl", ".json"):
        return _iter_jsonl(path)
    if path.suffix in (".csv", ".parquet"):
        return _iter_table(path)
    raise DataValidationError([f"{path}: unsupported file type {path.suffix!r}; use one of {SUPPORTED_SUFFIXES}"])


# ---------------------------------------------------------------------------------------------------
# Validating one record
# ---------------------------------------------------------------------------------------------------
def _as_binary(value: Any) -> int | None | str:
    """0/1 (also true/false, "0"/"1"), None for null/empty, or a problem string."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "null", "none", "nan")):
        return None
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)) and value in (0, 1):
        return int(value)
    if isinstance(value, str) and value.strip().lower() in ("0", "1", "true", "false"):
        return 1 if value.strip().lower() in ("1", "true") else 0
    if isinstance(value, float) and value != value:  # NaN from a table
        return None
    return f"must be 0 or 1, got {value!r}"


def _check_context(value: Any) -> tuple[list[dict[str, str]], str | None]:
    if value is None or value == "":
        return [], None
    if isinstance(value, str):  # CSV cell
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            return [], f"not a JSON list ({exc.msg})"
    if not isinstance(value, list):
        return [], f"must be a list of {{role, text}} turns, got {type(value).__name__}"
    turns = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict):
            return [], f"turn {i} must be an object with role and text"
        if turn.get("role") not in ("customer", "agent"):
            return [], f"turn {i}: role must be 'customer' or 'agent', got {turn.get('role')!r}"
        if not isinstance(turn.get("text"), str):
            return [], f"turn {i}: text must be a string"
        turns.append({"role": turn["role"], "text": turn["text"]})
    return turns, None


def validate_record(row: Any, taxonomy: Taxonomy) -> tuple[dict[str, Any] | None, list[str]]:
    """(normalised record, []) or (None, ["field: problem", ...])."""
    if not isinstance(row, dict):
        return None, [f"record: must be a JSON object, got {type(row).__name__}"]
    problems = []
    text = row.get("text")
    if "text" not in row or text is None:
        problems.append("text: missing")
    elif not isinstance(text, str):
        problems.append(f"text: must be a string, got {type(text).__name__}")
    elif not text.strip():
        problems.append("text: empty")
    intent = row.get("intent")
    if intent is None or intent == "":
        problems.append("intent: missing")
    elif intent not in taxonomy.intent2id:
        problems.append(f"intent: unknown intent {intent!r}; known: {', '.join(taxonomy.intent_names)}")
    urgent = _as_binary(row.get("urgent"))
    if urgent is None:
        problems.append("urgent: missing (0 or 1)")
    elif isinstance(urgent, str):
        problems.append(f"urgent: {urgent}")
    refund = _as_binary(row.get("refund_recoverable"))
    if isinstance(refund, str):
        problems.append(f"refund_recoverable: {refund}")
    elif intent in taxonomy.intent2id:
        is_refund = taxonomy.route_of(intent) == "refund_triage"
        if is_refund and refund is None:
            problems.append(f"refund_recoverable: missing; intent {intent!r} routes to refund_triage and needs 0 or 1")
        if not is_refund and refund is not None:
            problems.append(f"refund_recoverable: must be null for intent {intent!r} (only refund_triage intents have it)")
    context, ctx_problem = _check_context(row.get("context"))
    if ctx_problem:
        problems.append(f"context: {ctx_problem}")
    if problems:
        return None, problems
    record = {k: v for k, v in row.items() if k not in ("text", "context", "intent", "urgent", "refund_recoverable")}
    record.update(text=text, context=context, intent=intent, urgent=int(urgent), refund_recoverable=refund)
    return record, []


def validate_records(
    rows: Iterable[tuple[int, Any, str | None]], taxonomy: Taxonomy, source: str, drop_invalid: bool = False,
    log_path: str | Path | None = None,
) -> list[dict[str, Any]]:
    records, problems, dropped = [], [], []
    for lineno, row, parse_problem in rows:
        issues = [parse_problem] if parse_problem else validate_record(row, taxonomy)[1]
        if not issues:
            records.append(validate_record(row, taxonomy)[0])
            continue
        problems.extend(f"{source}:{lineno}: {p}" for p in issues)
        dropped.append({"line": lineno, "problems": issues, "row": row if isinstance(row, dict) else None})
    if problems and not drop_invalid:
        raise DataValidationError(problems, source)
    if dropped:
        msg = f"{source}: dropped {len(dropped)} invalid row(s) of {len(dropped) + len(records)} (data.drop_invalid=true)"
        if log_path:
            atomic_write_jsonl(log_path, dropped)
            msg += f"; details in {log_path}"
        print(msg, file=sys.stderr)
    return records


def read_examples(path: str | Path, taxonomy: Taxonomy | None = None, drop_invalid: bool = False,
                  log_path: str | Path | None = None) -> list[dict[str, Any]]:
    """Validated, normalised records from a JSONL/CSV/Parquet file.

    Raises DataValidationError listing every problem as ``path:line: field: problem``; with
    ``drop_invalid`` the bad rows are dropped instead, their count printed and written to ``log_path``.
    """
    path = Path(path)
    taxonomy = taxonomy or load_taxonomy()
    if not path.is_file():
        raise DataValidationError([f"{path}: file not found"], str(path))
    records = validate_records(_iter_rows(path), taxonomy, str(path), drop_invalid, log_path)
    if not records:
        raise DataValidationError([f"{path}: no valid examples"], str(path))
    return records


# ---------------------------------------------------------------------------------------------------
# Duplicates and leakage between splits
# ---------------------------------------------------------------------------------------------------
@dataclass
class SplitReport:
    duplicates: dict[str, int] = field(default_factory=dict)  # split -> rows whose text repeats an earlier row
    leakage: dict[str, int] = field(default_factory=dict)  # "train->dev" -> texts of dev also in train
    examples: dict[str, list[str]] = field(default_factory=dict)  # a few leaked texts per pair

    @property
    def has_leakage(self) -> bool:
        return any(self.leakage.values())

    def summary(self) -> str:
        parts = [f"{s}: {n} duplicate text(s)" for s, n in self.duplicates.items() if n]
        parts += [f"{pair}: {n} leaked text(s), e.g. {self.examples[pair][:3]}" for pair, n in self.leakage.items() if n]
        return "; ".join(parts) or "no duplicates, no leakage"


def check_splits(splits: dict[str, list[dict[str, Any]]]) -> SplitReport:
    """Exact-text duplicates within each split and leakage from earlier splits (train before dev before test)."""
    report = SplitReport()
    seen: dict[str, set[str]] = {}
    for name, records in splits.items():
        texts = [clean_text(r["text"]) for r in records]
        report.duplicates[name] = len(texts) - len(set(texts))
        for earlier, earlier_texts in seen.items():
            leaked = sorted(set(texts) & earlier_texts)
            report.leakage[f"{earlier}->{name}"] = len(leaked)
            report.examples[f"{earlier}->{name}"] = leaked[:5]
        seen[name] = set(texts)
    return report


# ---------------------------------------------------------------------------------------------------
# Loading splits for training / evaluation
# ---------------------------------------------------------------------------------------------------
def to_dataset(records: list[dict[str, Any]], taxonomy: Taxonomy):
    """A ``datasets.Dataset`` with the columns the model uses (refund_recoverable -1 where masked)."""
    import datasets

    features = datasets.Features({
        "text": datasets.Value("string"),
        "context": datasets.List({"role": datasets.Value("string"), "text": datasets.Value("string")}),
        "intent": datasets.Value("string"),
        "intent_id": datasets.Value("int64"),
        "urgent": datasets.Value("int64"),
        "refund_recoverable": datasets.Value("int64"),
    })
    columns = {
        "text": [r["text"] for r in records],
        "context": [r.get("context") or [] for r in records],
        "intent": [r["intent"] for r in records],
        "intent_id": [taxonomy.intent_id(r["intent"]) for r in records],
        "urgent": [int(r["urgent"]) for r in records],
        "refund_recoverable": [-1 if r["refund_recoverable"] is None else int(r["refund_recoverable"]) for r in records],
    }
    return datasets.Dataset.from_dict(columns, features=features)


def _cfg_get(cfg: Any, key: str, default: Any = None) -> Any:
    value = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
    return default if value is None else value


def load_split_records(data_cfg: Any, taxonomy: Taxonomy) -> dict[str, list[dict[str, Any]]]:
    """{split: validated records} for train/dev/test (test and eval optional), leakage checked."""
    drop = bool(_cfg_get(data_cfg, "drop_invalid", False))
    log_dir = _cfg_get(data_cfg, "log_dir")
    splits: dict[str, list[dict[str, Any]]] = {}
    for split in ("train", "dev", "test", "eval"):
        path = _cfg_get(data_cfg, f"{split}_file")
        if not path:
            continue
        if not Path(path).is_file():
            hint = " (run `make data` to generate the embedded dataset)" if split != "eval" else ""
            raise DataValidationError([f"data.{split}_file: file not found: {path}{hint}"], f"data.{split}_file")
        log = Path(log_dir) / f"dropped_{split}.jsonl" if (drop and log_dir) else None
        splits[split] = read_examples(path, taxonomy, drop_invalid=drop, log_path=log)
        limit = _cfg_get(data_cfg, f"max_{split}_examples")
        if limit:
            splits[split] = splits[split][: int(limit)]
    report = check_splits({k: v for k, v in splits.items() if k != "eval"})
    if report.has_leakage:
        msg = f"data leakage between splits: {report.summary()}"
        if _cfg_get(data_cfg, "fail_on_leakage", False):
            raise DataValidationError([msg], "splits")
        print(f"warning: {msg}", file=sys.stderr)
    return splits


def load_splits(data_cfg: Any, taxonomy: Taxonomy):
    """``datasets.DatasetDict`` of the configured splits (see ``to_dataset`` for the columns)."""
    import datasets

    records = load_split_records(data_cfg, taxonomy)
    return datasets.DatasetDict({name: to_dataset(recs, taxonomy) for name, recs in records.items()})


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts a stats table and a model card need."""
    n = len(records)
    refund = Counter(r["refund_recoverable"] for r in records if r["refund_recoverable"] is not None)
    return {
        "rows": n,
        "intents": dict(sorted(Counter(r["intent"] for r in records).items(), key=lambda kv: -kv[1])),
        "urgent_rate": round(sum(r["urgent"] for r in records) / n, 4) if n else 0.0,
        "refund_recoverable": int(refund.get(1, 0)),
        "refund_firm": int(refund.get(0, 0)),
        "mean_chars": round(sum(len(r["text"]) for r in records) / n, 1) if n else 0.0,
        "with_context": round(sum(bool(r.get("context")) for r in records) / n, 4) if n else 0.0,
    }


def run_validate(args: Any) -> int:
    """`kefu-triage validate FILE... [--taxonomy T]`: summary per file, or every problem; exit 1 on errors."""
    taxonomy = load_taxonomy(args.taxonomy)
    failed = False
    for path in args.files:
        try:
            records = read_examples(path, taxonomy)
        except DataValidationError as exc:
            print(str(exc), file=sys.stderr)
            failed = True
            continue
        s = summarize(records)
        print(f"{path}: {s['rows']} rows ok; urgent rate {s['urgent_rate']:.1%}; refund recoverable/firm "
              f"{s['refund_recoverable']}/{s['refund_firm']}; intents {s['intents']}")
    return 1 if failed else 0
