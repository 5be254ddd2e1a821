"""Labelled data: the example format, validation with file/line errors, and loading splits with ``datasets``.

A labelled example is one JSON line::

    {"text": "...", "context": [{"role": "customer"|"agent", "text": "..."}], "intent": "logistics",
     "urgent": 0, "refund_recoverable": null}

``context`` is optional (previous turns, oldest first). ``refund_recoverable`` is only defined for
intents that route to ``refund_triage``: 0/1 there, or null when nobody labelled it; on any other intent it
must be null (not applicable). ``urgent`` is 0/1, or null/absent when unknown (teams often have intent
labels from ticket categories and nothing else). An unknown label is kept as None: training masks that
head's loss for the row and evaluation skips the row for that head; a label that contradicts the contract
is still an error. Extra fields (``id``, ``source``, ``difficulty``...) are kept. CSV and Parquet files carry
the same columns (in CSV, ``context`` is a JSON string).
"""

from __future__ import annotations

import csv
import difflib
import json
import logging
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kefu_triage.core.fileio import atomic_write_jsonl
from kefu_triage.core.inputs import clean_text
from kefu_triage.core.taxonomy import Taxonomy, load_taxonomy

log = logging.getLogger(__name__)

MAX_LISTED_PROBLEMS = 50
SUPPORTED_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
LABEL_FIELDS = ("text", "context", "intent", "urgent", "refund_recoverable")
REQUIRED_COLUMNS = (
    "text",
    "intent",
)  # context, urgent and refund_recoverable may be absent (empty / unknown)
ROLES = ("customer", "agent")
SPLIT_ORDER = ("train", "dev", "test", "eval")

# (line number, parsed row or None, problem or None); unparseable rows carry {"_raw": line} for the drop log
Row = tuple[int, Any, "str | None"]


class DataValidationError(ValueError):
    """One or more problems in a data file; ``problems`` holds each as 'path:line: field: problem'."""

    def __init__(self, problems: list[str], source: str = "", hint: str = ""):
        self.problems = list(problems)
        self.source = source
        shown = self.problems[:MAX_LISTED_PROBLEMS]
        more = len(self.problems) - len(shown)
        head = (
            f"{len(self.problems)} problem(s) in {source}"
            if source
            else f"{len(self.problems)} data problem(s)"
        )
        text = "\n  ".join(shown) + (f"\n  ... and {more} more" if more > 0 else "")
        super().__init__(f"{head}:\n  {text}" + (f"\n{hint}" if hint else ""))


# ---------------------------------------------------------------------------------------------------
# Reading raw rows, each with the line number a user sees in an editor
# ---------------------------------------------------------------------------------------------------
def _iter_jsonl(path: Path) -> Iterator[Row]:
    """Every non-blank line, decoded on its own so one bad byte names its line and the rest is still checked."""
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                yield (
                    lineno,
                    None,
                    f"encoding: not valid UTF-8 (byte {exc.start} of the line); save the file as UTF-8",
                )
                continue
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line), None
            except json.JSONDecodeError as exc:
                yield (
                    lineno,
                    {"_raw": line.rstrip("\r\n")},
                    f"json: invalid JSON: {exc.msg} (column {exc.colno})",
                )


def _check_columns(
    path: Path, columns: list[str], line: int | None, required: Sequence[str] = REQUIRED_COLUMNS
) -> None:
    missing = [c for c in required if c not in columns]
    if missing:
        where = f"{path}:{line}" if line else str(path)
        optional = "urgent, refund_recoverable, context" if "intent" in required else "context"
        raise DataValidationError(
            [
                f"{where}: columns: missing {', '.join(map(repr, missing))}; found {columns}; expected "
                f"{', '.join(required)} (+ optional {optional})"
            ],
            str(path),
        )


def _iter_csv(path: Path, required: Sequence[str] = REQUIRED_COLUMNS) -> Iterator[Row]:
    """CSV records with the physical line each starts on (header = line 1; quoted cells may span lines).

    The stdlib reader rather than pandas (behind ``Dataset.from_csv``): it reports the physical line of
    every record, rejects ragged rows instead of shifting cells into an index column, and keeps text such
    as "NA" or "null" as text. The splits are ``datasets`` objects all the same (``load_splits``).
    """
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataValidationError(
            [f"{path}:{line}: encoding: not valid UTF-8; save the file as UTF-8"], str(path)
        ) from None
    lines = text.splitlines(keepends=True)
    reader = csv.reader(lines, strict=True)
    try:
        header = next(reader, None)
        if header is None:
            raise DataValidationError([f"{path}:1: columns: empty file (no header row)"], str(path))
        header = [h.strip() for h in header]
        _check_columns(path, header, 1, required)
        start = reader.line_num + 1
        for cells in reader:
            lineno, start = start, reader.line_num + 1
            if not any(c.strip() for c in cells):
                continue
            if len(cells) != len(header):
                raw = "".join(lines[lineno - 1 : reader.line_num]).rstrip("\r\n")
                yield (
                    lineno,
                    {"_raw": raw},
                    (
                        f"columns: {len(cells)} cells but the header has {len(header)} "
                        "(quote cells that contain a comma)"
                    ),
                )
                continue
            yield lineno, dict(zip(header, cells, strict=True)), None
    except csv.Error as exc:
        raise DataValidationError([f"{path}:{reader.line_num}: csv: {exc}"], str(path)) from None


def _iter_parquet(path: Path, required: Sequence[str] = REQUIRED_COLUMNS) -> Iterator[Row]:
    """Parquet rows through ``datasets``; the line number is the row number (1-based)."""
    import datasets

    try:
        ds = datasets.Dataset.from_parquet(str(path))
    except Exception as exc:  # pyarrow/datasets raise several types for a damaged or non-Parquet file
        raise DataValidationError(
            [f"{path}: parquet: cannot read the file ({type(exc).__name__}: {exc})"], str(path)
        ) from None
    _check_columns(path, list(ds.column_names), None, required)
    for i, row in enumerate(ds):
        yield i + 1, row, None


def iter_rows(path: Path, required: Sequence[str] = REQUIRED_COLUMNS) -> Iterator[Row]:
    """``(line, row or None, parse problem or None)`` of a JSONL, CSV or Parquet file; CSV and Parquet files
    must have the ``required`` columns (labelled data: text and intent; an unlabelled pool: text)."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return _iter_jsonl(path)
    if suffix == ".csv":
        return _iter_csv(path, required)
    if suffix == ".parquet":
        return _iter_parquet(path, required)
    raise DataValidationError(
        [f"{path}: unsupported file type {path.suffix!r}; use one of {SUPPORTED_SUFFIXES}"], str(path)
    )


# ---------------------------------------------------------------------------------------------------
# Validating one record
# ---------------------------------------------------------------------------------------------------
_NULLS = ("", "null", "none", "nan")
_BINARY = {"0": 0, "1": 1, "0.0": 0, "1.0": 1, "true": 1, "false": 0}


def _as_binary(value: Any) -> int | None | str:
    """0/1 (also true/false, "0"/"1", 0.0/1.0), None for null/empty/NaN, or a problem string."""
    if value is None:
        return None
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)):
        if value != value:  # NaN: how tables write a missing number
            return None
        if value in (0, 1):
            return int(value)
    if isinstance(value, str):
        key = value.strip().lower()
        if key in _NULLS:
            return None
        if key in _BINARY:
            return _BINARY[key]
    return f"must be 0 or 1, got {value!r}"


def _check_context(value: Any) -> tuple[list[dict[str, str]], str | None]:
    if value is None or (isinstance(value, str) and not value.strip()):
        return [], None
    if isinstance(value, str):  # CSV cell (or a Parquet string column)
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            return [], f"not a JSON list of turns ({exc.msg})"
    if not isinstance(value, list):
        return [], f"must be a list of {{role, text}} turns (oldest first), got {type(value).__name__}"
    turns = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict):
            return [], f"turn {i} must be an object with role and text, got {type(turn).__name__}"
        if turn.get("role") not in ROLES:
            return [], f"turn {i}: role must be 'customer' or 'agent', got {turn.get('role')!r}"
        if not isinstance(turn.get("text"), str):
            return [], f"turn {i}: text must be a string, got {type(turn.get('text')).__name__}"
        turns.append({"role": turn["role"], "text": turn["text"]})
    return turns, None


def _unknown_intent(intent: str, taxonomy: Taxonomy) -> str:
    close = difflib.get_close_matches(intent, taxonomy.intent_names, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"intent: unknown intent {intent!r}{hint}; known: {', '.join(taxonomy.intent_names)}"


def validate_record(row: Any, taxonomy: Taxonomy) -> tuple[dict[str, Any] | None, list[str]]:
    """(normalised record, []) or (None, ["field: problem", ...]) with every problem of the row."""
    if not isinstance(row, dict):
        hint = " (the file must hold one JSON object per line)" if isinstance(row, list) else ""
        return None, [f"record: must be a JSON object, got {type(row).__name__}{hint}"]
    problems = []
    text = row.get("text")
    if text is None:
        problems.append("text: missing")
    elif not isinstance(text, str):
        problems.append(f"text: must be a string, got {type(text).__name__}")
    elif not text.strip():
        problems.append("text: empty")
    elif not clean_text(text):
        problems.append("text: only control or invisible characters")

    intent = row.get("intent")
    known_intent = isinstance(intent, str) and intent in taxonomy.intent2id
    if intent is None or intent == "":
        problems.append("intent: missing")
    elif not isinstance(intent, str):
        problems.append(f"intent: must be a string, got {type(intent).__name__}")
    elif not known_intent:
        problems.append(_unknown_intent(intent, taxonomy))

    urgent = _as_binary(row.get("urgent"))  # None: unknown (the urgent head skips this row)
    if isinstance(urgent, str):
        problems.append(f"urgent: {urgent}")

    refund = _as_binary(row.get("refund_recoverable"))
    if isinstance(refund, str):
        problems.append(f"refund_recoverable: must be 0, 1 or null, got {row.get('refund_recoverable')!r}")
    elif known_intent:
        route = taxonomy.route_of(intent)  # on a refund_triage intent, None means unknown (the head skips it)
        if route != "refund_triage" and refund is not None:
            problems.append(
                f"refund_recoverable: must be null for intent {intent!r} (route {route}); only "
                f"refund_triage intents ({', '.join(taxonomy.refund_intents) or 'none'}) carry it"
            )

    context, ctx_problem = _check_context(row.get("context"))
    if ctx_problem:
        problems.append(f"context: {ctx_problem}")
    if problems:
        return None, problems
    record = {k: v for k, v in row.items() if k not in LABEL_FIELDS}
    record.update(text=text, context=context, intent=intent, urgent=urgent, refund_recoverable=refund)
    return record, []


def validate_records(
    rows: Iterable[Row],
    taxonomy: Taxonomy,
    source: str,
    drop_invalid: bool = False,
    log_path: str | Path | None = None,
) -> list[dict[str, Any]]:
    """Validate ``(line, row, parse problem or None)`` triples: raise with every problem at once, or (with
    ``drop_invalid``) drop the bad rows, log their count and reasons, and write them to ``log_path``."""
    records, problems, dropped = [], [], []
    total = 0
    for lineno, row, parse_problem in rows:
        total += 1
        record, issues = (None, [parse_problem]) if parse_problem else validate_record(row, taxonomy)
        if record is not None:
            records.append(record)
            continue
        problems.extend(f"{source}:{lineno}: {p}" for p in issues)
        entry: dict[str, Any] = {"file": source, "line": lineno, "problems": issues}
        if isinstance(row, dict) and "_raw" in row:
            entry["raw"] = row["_raw"]
        else:
            entry["row"] = row if isinstance(row, dict) else None
        dropped.append(entry)
    if problems and not drop_invalid:
        raise DataValidationError(
            problems,
            source,
            hint="Fix these rows, or set data.drop_invalid=true to drop them "
            "(the count is printed and the rows logged).",
        )
    if dropped:
        msg = f"{source}: dropped {len(dropped)} invalid row(s) of {total} (data.drop_invalid=true)"
        if log_path:
            atomic_write_jsonl(log_path, dropped)
            msg += f"; rows and reasons in {log_path}"
        log.warning(msg)
        for d in dropped[:MAX_LISTED_PROBLEMS]:
            log.warning("  dropped %s:%s: %s", source, d["line"], "; ".join(d["problems"]))
        if len(dropped) > MAX_LISTED_PROBLEMS:
            log.warning("  ... and %d more dropped row(s)", len(dropped) - MAX_LISTED_PROBLEMS)
    return records


def validate_examples(
    records: Iterable[Any],
    taxonomy: Taxonomy,
    source: str = "<records>",
    drop_invalid: bool = False,
    log_path: str | Path | None = None,
) -> list[dict[str, Any]]:
    """The same checks on in-memory records (e.g. generated data); the 'line' is the 1-based position, which
    is the line in a JSONL file written from ``records``."""
    return validate_records(
        ((i, r, None) for i, r in enumerate(records, start=1)), taxonomy, source, drop_invalid, log_path
    )


def read_examples(
    path: str | Path,
    taxonomy: Taxonomy | None = None,
    drop_invalid: bool = False,
    log_path: str | Path | None = None,
) -> list[dict[str, Any]]:
    """Validated, normalised records from a JSONL/CSV/Parquet file.

    Raises DataValidationError listing every problem as ``path:line: field: problem``; with
    ``drop_invalid`` the bad rows are dropped instead, their count logged and the rows written to ``log_path``.
    """
    path = Path(path)
    taxonomy = taxonomy or load_taxonomy()
    if not path.is_file():
        raise DataValidationError([f"{path}: file not found"], str(path))
    records = validate_records(iter_rows(path), taxonomy, str(path), drop_invalid, log_path)
    if not records:
        raise DataValidationError([f"{path}: no valid examples"], str(path))
    return records


# ---------------------------------------------------------------------------------------------------
# Duplicates, conflicting labels and leakage between splits
# ---------------------------------------------------------------------------------------------------
def _example_key(record: dict[str, Any]) -> str:
    """Normalised text + context: the same words after a different agent question are another example."""
    turns = [(t["role"], clean_text(t["text"])) for t in record.get("context") or []]
    return clean_text(record["text"]) + "\x00" + json.dumps(turns, ensure_ascii=False)


def _labels(record: dict[str, Any]) -> tuple:
    return record["intent"], record.get("urgent"), record.get("refund_recoverable")


@dataclass
class SplitReport:
    """What ``check_splits`` found (texts compared after ``textproc.clean_text``)."""

    duplicates: dict[str, int] = field(
        default_factory=dict
    )  # split -> rows repeating an earlier (text, context)
    conflicts: dict[str, int] = field(
        default_factory=dict
    )  # split -> (text, context)s seen with different labels
    leakage: dict[str, int] = field(default_factory=dict)  # "train->dev" -> distinct dev texts also in train
    examples: dict[str, list[str]] = field(
        default_factory=dict
    )  # up to 5 texts per finding: "dup:train", "train->dev"

    @property
    def has_leakage(self) -> bool:
        return any(self.leakage.values())

    @property
    def has_findings(self) -> bool:
        return self.has_leakage or any(self.duplicates.values()) or any(self.conflicts.values())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        parts = [
            f"{s}: {n} duplicate row(s), e.g. {self.examples[f'dup:{s}'][:3]}"
            for s, n in self.duplicates.items()
            if n
        ]
        parts += [
            f"{s}: {n} text(s) with conflicting labels, e.g. {self.examples[f'conflict:{s}'][:3]}"
            for s, n in self.conflicts.items()
            if n
        ]
        parts += [
            f"{pair}: {n} leaked text(s), e.g. {self.examples[pair][:3]}"
            for pair, n in self.leakage.items()
            if n
        ]
        return "; ".join(parts) or "no duplicates, no conflicting labels, no leakage between splits"


def check_splits(
    splits: dict[str, list[dict[str, Any]]], pairs: Iterable[tuple[str, str]] | None = None
) -> SplitReport:
    """Duplicates and conflicting labels within each split; exact-text leakage between splits.

    Leakage is counted for ``pairs`` of (earlier, later) split names; by default every split against each
    later one in the order given (train->dev, train->test, dev->test). Leakage ignores context: the same
    message text in train and test is a memorisation risk whatever the previous turns were.
    """
    report = SplitReport()
    texts: dict[str, set[str]] = {}
    for name, records in splits.items():
        counts: Counter = Counter()
        labels_by_key: dict[str, set] = defaultdict(set)
        for r in records:
            key = _example_key(r)
            counts[key] += 1
            labels_by_key[key].add(_labels(r))
        report.duplicates[name] = sum(n - 1 for n in counts.values())
        report.examples[f"dup:{name}"] = [k.split("\x00")[0] for k, n in counts.most_common(5) if n > 1]
        conflicting = [k.split("\x00")[0] for k, labels in labels_by_key.items() if len(labels) > 1]
        report.conflicts[name] = len(conflicting)
        report.examples[f"conflict:{name}"] = conflicting[:5]
        texts[name] = {clean_text(r["text"]) for r in records}
    names = list(splits)
    if pairs is None:
        pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
    for earlier, later in pairs:
        leaked = sorted(texts[earlier] & texts[later])
        report.leakage[f"{earlier}->{later}"] = len(leaked)
        report.examples[f"{earlier}->{later}"] = leaked[:5]
    return report


def report_splits(report: SplitReport, fail_on_leakage: bool = False, source: str = "splits") -> None:
    """Log duplicates, conflicting labels and leakage as a warning; leakage raises when ``fail_on_leakage``."""
    if report.has_leakage and fail_on_leakage:
        raise DataValidationError(
            [f"{source}: leakage between splits: {report.summary()}"],
            source,
            hint="data.fail_on_leakage=true: remove the shared texts from one of the splits.",
        )
    if report.has_findings:
        log.warning("%s: %s", source, report.summary())


# ---------------------------------------------------------------------------------------------------
# Loading splits for training / evaluation
# ---------------------------------------------------------------------------------------------------
def label_or_minus_one(value: Any) -> int:
    """A 0/1 label as int, -1 for None (unknown or not applicable): the masked-label code of the loss."""
    return -1 if value is None else int(value)


def to_dataset(records: list[dict[str, Any]], taxonomy: Taxonomy):
    """A ``datasets.Dataset`` with the columns the model uses; -1 marks an unknown or undefined urgent /
    refund_recoverable label (the loss masks it)."""
    import datasets

    features = datasets.Features(
        {
            "text": datasets.Value("string"),
            "context": datasets.List({"role": datasets.Value("string"), "text": datasets.Value("string")}),
            "intent": datasets.Value("string"),
            "intent_id": datasets.Value("int64"),
            "urgent": datasets.Value("int64"),
            "refund_recoverable": datasets.Value("int64"),
        }
    )
    columns = {
        "text": [r["text"] for r in records],
        "context": [r.get("context") or [] for r in records],
        "intent": [r["intent"] for r in records],
        "intent_id": [taxonomy.intent_id(r["intent"]) for r in records],
        "urgent": [label_or_minus_one(r.get("urgent")) for r in records],
        "refund_recoverable": [label_or_minus_one(r.get("refund_recoverable")) for r in records],
    }
    return datasets.Dataset.from_dict(columns, features=features)


def _cfg_get(cfg: Any, key: str, default: Any = None) -> Any:
    """``cfg[key]`` for a dict or DictConfig; a mandatory value left at ``???`` is a clear error."""
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig) and OmegaConf.is_missing(cfg, key):
            raise DataValidationError(
                [f"data.{key}: required but not set (???); e.g. data.{key}=/path/to/file.jsonl"],
                f"data.{key}",
            )
    except ImportError:  # pragma: no cover - a runtime-only install never loads data configs
        pass
    value = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
    return default if value is None else value


def _run_dir() -> Path | None:
    """The Hydra run directory when called inside a Hydra app (dropped rows are logged there by default)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else None
    except Exception:  # noqa: BLE001 - Hydra absent or not inside a Hydra app
        return None


def load_split_records(data_cfg: Any, taxonomy: Taxonomy) -> dict[str, list[dict[str, Any]]]:
    """{split: validated records} for train/dev/test/eval (each optional); duplicates and leakage checked.

    ``data.eval_file`` (any extra labelled file to evaluate) is checked for leakage against train and dev.
    With ``data.drop_invalid`` the dropped rows go to ``data.log_dir`` (default: the Hydra run directory).
    """
    drop = bool(_cfg_get(data_cfg, "drop_invalid", False))
    log_dir = _cfg_get(data_cfg, "log_dir") or (_run_dir() if drop else None)
    splits: dict[str, list[dict[str, Any]]] = {}
    for split in SPLIT_ORDER:
        path = _cfg_get(data_cfg, f"{split}_file")
        if not path:
            continue
        if not Path(path).is_file():
            hint = " (run `make data` to generate the embedded dataset)" if split != "eval" else ""
            raise DataValidationError(
                [f"data.{split}_file: file not found: {path}{hint}"], f"data.{split}_file"
            )
        drop_log = Path(log_dir) / f"dropped_{split}.jsonl" if (drop and log_dir) else None
        splits[split] = read_examples(path, taxonomy, drop_invalid=drop, log_path=drop_log)
        limit = _cfg_get(data_cfg, f"max_{split}_examples")
        if limit:
            splits[split] = splits[split][: int(limit)]
    names = [s for s in splits if s != "eval"]
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
    pairs += [(s, "eval") for s in ("train", "dev") if s in splits and "eval" in splits]
    report_splits(check_splits(splits, pairs), bool(_cfg_get(data_cfg, "fail_on_leakage", False)))
    return splits


def load_splits(data_cfg: Any, taxonomy: Taxonomy):
    """``datasets.DatasetDict`` of the configured splits: text, context ([] when none), intent, intent_id,
    urgent (0/1, -1 where unknown), refund_recoverable (0/1, -1 where null)."""
    import datasets

    records = load_split_records(data_cfg, taxonomy)
    return datasets.DatasetDict({name: to_dataset(recs, taxonomy) for name, recs in records.items()})


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts a stats table and a model card need."""
    n = len(records)
    refund = Counter(r["refund_recoverable"] for r in records if r.get("refund_recoverable") is not None)
    urgent = [r["urgent"] for r in records if r.get("urgent") is not None]
    return {
        "rows": n,
        "intents": dict(
            sorted(Counter(r["intent"] for r in records).items(), key=lambda kv: (-kv[1], kv[0]))
        ),
        "urgent_rate": round(sum(urgent) / len(urgent), 4)
        if urgent
        else 0.0,  # over rows with an urgent label
        "urgent_labelled": len(urgent),
        "refund_recoverable": int(refund.get(1, 0)),
        "refund_firm": int(refund.get(0, 0)),
        "mean_chars": round(sum(len(r["text"]) for r in records) / n, 1) if n else 0.0,
        "with_context": round(sum(bool(r.get("context")) for r in records) / n, 4) if n else 0.0,
    }


def run_validate(args: Any) -> int:
    """`kefu-triage validate FILE... [--taxonomy T]`: a summary per file, or every problem; exit 1 on errors.

    Duplicates and conflicting labels within a file, and texts shared between files (in the order given,
    e.g. train dev test), are printed as warnings; they do not fail the command.
    """
    taxonomy = load_taxonomy(args.taxonomy)
    loaded: dict[str, list[dict[str, Any]]] = {}
    for path in args.files:
        try:
            records = read_examples(path, taxonomy)
        except DataValidationError as exc:
            print(f"{path}: INVALID\n{exc}", file=sys.stderr)
            continue
        loaded[str(path)] = records
        s = summarize(records)
        print(
            f"{path}: OK, {s['rows']} rows\n"
            f"  urgent {s['urgent_rate']:.1%} | refund recoverable {s['refund_recoverable']} / firm "
            f"{s['refund_firm']} | with context {s['with_context']:.1%} | mean {s['mean_chars']} chars\n"
            f"  intents: {', '.join(f'{k} {v}' for k, v in s['intents'].items())}"
        )
    report = check_splits(loaded)
    if report.has_findings:
        print(f"warning: {report.summary()}")
    invalid = len(args.files) - len(loaded)
    print(
        f"{invalid} of {len(args.files)} file(s) invalid"
        if invalid
        else f"all {len(args.files)} file(s) valid"
    )
    return 1 if invalid else 0
