"""`kefu-triage score`: bulk-score JSONL/Parquet files (or directories of them) into Parquet, with the
predictions (``pred_*`` columns) beside the input columns, bad rows in an errors file, nothing dropped.

    kefu-triage score --artifact artifacts/default --input logs/2025-06/ --output scored/2025-06 [--engine ray]

Engines: ``local`` streams through one in-process model (onnxruntime uses every core); ``ray`` runs Ray Data
``map_batches`` over a pool of actors, each lazily loading its own model on its first batch, on a local Ray
(started here) or on the cluster named by RAY_ADDRESS (``pip install 'kefu-triage[scale]'``).

Input rows are read by the driver (so every bad JSONL line is reported with file:line and the input schema is
unified across files); the scoring, the expensive part, is what Ray distributes. JSONL fields become columns:
numbers, strings and booleans keep their type, nested values (``context``) and fields whose type varies
between rows are stored as JSON text. ``errors`` lines: {"file", "line" (the JSONL line or the 1-based Parquet
row), "error"}.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

try:
    import pyarrow as pa
    import pyarrow.parquet as pq
except ImportError as exc:
    raise ImportError(
        f"`kefu-triage score` needs pyarrow: pip install 'kefu-triage[scale]' ({exc})"
    ) from None

from kefu_triage.core.fileio import atomic_directory, atomic_write_jsonl
from kefu_triage.runtime.model import TriageModel

SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".pq": "parquet"}
SOURCE, LINE = "__source", "__line"  # provenance columns carried to the scorer (for errors), not written
PREFIX = "pred_"  # prediction columns: pred_<key of TriageModel.predict>, beside the input columns
TOP_INTENTS = pa.list_(pa.struct([("intent", pa.string()), ("prob", pa.float64())]))


def prediction_fields(model: TriageModel) -> pa.Schema:
    """The pred_* columns, from the keys of one prediction (so new runtime fields appear without a change
    here): strings stay strings, numbers (or None) are float64, anything else is JSON text."""
    fields = []
    for key, value in model.predict(["在吗"])[0].items():
        if key == "top_intents":
            t = TOP_INTENTS
        elif isinstance(value, bool):
            t = pa.bool_()
        elif value is None or isinstance(value, (int, float)):
            t = pa.float64()
        else:
            t = pa.string()
        fields.append(pa.field(PREFIX + key, t))
    return pa.schema(fields)


# ---- input --------------------------------------------------------------------------------------------
def list_inputs(path: str | Path) -> list[Path]:
    path = Path(path)
    if path.is_file():
        if path.suffix.lower() not in SUFFIXES:
            raise ValueError(f"--input {path}: not a .jsonl or .parquet file")
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"--input {path}: no such file or directory")
    files = sorted(
        p
        for p in path.rglob("*")
        if p.is_file()
        and p.suffix.lower() in SUFFIXES
        and not any(part.startswith((".", "_")) for part in p.relative_to(path).parts)
    )
    if not files:
        raise ValueError(f"--input {path}: no .jsonl or .parquet files in the directory")
    return files


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
    """(line number, row or None, problem or None) for each non-blank line."""
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError:
                yield lineno, None, "not valid UTF-8"
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                yield lineno, None, f"invalid JSON: {exc.msg}"
                continue
            if not isinstance(obj, dict):
                yield lineno, None, f"a line must be a JSON object, got {type(obj).__name__}"
            elif not isinstance(obj.get("text"), str):
                yield lineno, None, "needs a string field 'text'"
            elif SOURCE in obj or LINE in obj:
                yield lineno, None, f"reserved field name {SOURCE!r} or {LINE!r}"
            else:
                yield lineno, obj, None


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int" if -(1 << 63) <= value < (1 << 63) else "json"
    return {float: "float", str: "str"}.get(type(value), "json")


def _arrow_type(kinds: set[str]) -> pa.DataType:
    if kinds == {"bool"}:
        return pa.bool_()
    if kinds == {"int"}:
        return pa.int64()
    if kinds and kinds <= {"int", "float"}:
        return pa.float64()
    return pa.string()  # strings, nested values and mixed types (as JSON text), or always null


def input_schema(files: list[Path]) -> pa.Schema:
    """One schema for all inputs: Parquet schemas as written, JSONL columns inferred from every row."""
    kinds: dict[str, set[str]] = {}
    schemas = []
    for f in files:
        if SUFFIXES[f.suffix.lower()] == "parquet":
            try:
                schemas.append(pq.read_schema(f))
            except (pa.ArrowException, OSError) as exc:
                raise ValueError(f"{f}: not a readable Parquet file ({exc})") from None
            continue
        for _, row, _ in _jsonl_rows(f):
            for k, v in (row or {}).items():
                kinds.setdefault(k, set())
                if v is not None:
                    kinds[k].add(_kind(v))
    if kinds:
        schemas.insert(0, pa.schema([(k, _arrow_type(v)) for k, v in kinds.items()]))
    try:
        schema = pa.unify_schemas(schemas, promote_options="permissive")
    except (pa.ArrowException, TypeError) as exc:
        raise ValueError(f"--input: the files' columns have incompatible types ({exc})") from None
    if "text" not in schema.names:
        raise ValueError("--input: no 'text' column in the input files")
    for name in schema.names:
        if name in (SOURCE, LINE) or name.startswith(PREFIX):
            raise ValueError(
                f"--input: column name {name!r} is reserved for the output (pred_* columns: already scored?)"
            )
    return schema


def _conform(table: pa.Table, schema: pa.Schema, source: str) -> pa.Table:
    columns = [
        table.column(f.name) if f.name in table.column_names else pa.nulls(len(table), f.type) for f in schema
    ]
    try:
        return pa.Table.from_arrays(
            columns,
            schema=pa.schema([pa.field(f.name, c.type) for f, c in zip(schema, columns, strict=True)]),
        ).cast(schema)
    except (pa.ArrowException, TypeError) as exc:
        raise ValueError(f"{source}: columns do not fit the other input files' types ({exc})") from None


def read_chunks(
    files: list[Path], schema: pa.Schema, errors: list[dict[str, Any]], chunk_rows: int = 4096
) -> Iterator[pa.Table]:
    """Input as Arrow tables of ``schema`` + provenance columns; unreadable JSONL lines go to ``errors``."""
    json_cols = {f.name for f in schema if pa.types.is_string(f.type)}
    for f in files:
        src = str(f)
        if SUFFIXES[f.suffix.lower()] == "parquet":
            offset = 0
            for batch in pq.ParquetFile(f).iter_batches(batch_size=chunk_rows):
                table = _conform(pa.Table.from_batches([batch]), schema, src)
                n = len(table)
                table = table.append_column(SOURCE, pa.array([src] * n, pa.string()))
                yield table.append_column(LINE, pa.array(range(offset + 1, offset + n + 1), pa.int64()))
                offset += n
            continue
        rows: list[dict[str, Any]] = []
        for lineno, row, problem in _jsonl_rows(f):
            if problem is not None:
                errors.append({"file": src, "line": lineno, "error": problem})
                continue
            out = {}
            for k, v in row.items():
                out[k] = (
                    json.dumps(v, ensure_ascii=False)
                    if k in json_cols and v is not None and not isinstance(v, str)
                    else v
                )
            out[SOURCE], out[LINE] = src, lineno
            rows.append(out)
            if len(rows) >= chunk_rows:
                yield _jsonl_table(rows, schema, src)
                rows = []
        if rows:
            yield _jsonl_table(rows, schema, src)


def _jsonl_table(rows: list[dict[str, Any]], schema: pa.Schema, src: str) -> pa.Table:
    full = schema.append(pa.field(SOURCE, pa.string())).append(pa.field(LINE, pa.int64()))
    try:
        return pa.Table.from_pylist(rows, schema=full)
    except (pa.ArrowException, TypeError, OverflowError) as exc:  # cannot happen with the inferred schema
        raise ValueError(f"{src}: rows do not fit the inferred column types ({exc})") from None


# ---- scoring ------------------------------------------------------------------------------------------
def output_schema(schema: pa.Schema, preds: pa.Schema) -> pa.Schema:
    return pa.schema(list(schema) + list(preds))


def score_table(
    model: TriageModel, table: pa.Table, pred_schema: pa.Schema
) -> tuple[pa.Table, list[dict[str, Any]]]:
    """(input columns + pred_* for the rows that scored, error records for the others)."""
    n = len(table)
    texts = table.column("text").to_pylist()
    contexts = table.column("context").to_pylist() if "context" in table.column_names else [None] * n
    sources, lines = table.column(SOURCE).to_pylist(), table.column(LINE).to_pylist()
    errors, good = [], []
    for i in range(n):
        if not isinstance(texts[i], str):
            errors.append({"file": sources[i], "line": lines[i], "error": "text is missing (null)"})
            continue
        if isinstance(contexts[i], str):  # JSON text (JSONL nested values, or a string column)
            try:
                contexts[i] = json.loads(contexts[i])
            except json.JSONDecodeError as exc:
                errors.append(
                    {"file": sources[i], "line": lines[i], "error": f"context: invalid JSON ({exc.msg})"}
                )
                continue
        good.append(i)
    try:
        preds = model.predict([texts[i] for i in good], [contexts[i] for i in good]) if good else []
        scored = list(zip(good, preds, strict=True))
    except ValueError:  # one bad context in the batch: score row by row to isolate it
        scored = []
        for i in good:
            try:
                scored.append((i, model.predict([texts[i]], [contexts[i]])[0]))
            except ValueError as exc:
                errors.append(
                    {"file": sources[i], "line": lines[i], "error": str(exc).removeprefix("texts[0]: ")}
                )
    keep = [i for i, _ in scored]
    out = table.take(pa.array(keep, pa.int64())).drop_columns([SOURCE, LINE])
    p = [pred for _, pred in scored]
    for f in pred_schema:
        key = f.name.removeprefix(PREFIX)
        values = [x.get(key) for x in p]
        if pa.types.is_string(f.type):
            values = [
                v if v is None or isinstance(v, str) else json.dumps(v, ensure_ascii=False) for v in values
            ]
        out = out.append_column(f, pa.array(values, f.type))
    return out, errors


class RayScorer:
    """A Ray Data actor: the model is created lazily on the actor's first batch (one per actor, never
    pickled from the driver); rows that cannot be scored are appended to this actor's own errors file."""

    def __init__(self, artifact: str, precision: str, threads: int | None, batch_size: int, errors_dir: str):
        self.args = (artifact, precision, threads, batch_size)
        self.model: TriageModel | None = None
        self.errors_path = Path(errors_dir) / f"part-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"

    def __call__(self, table: pa.Table) -> pa.Table:
        if self.model is None:
            artifact, precision, threads, batch_size = self.args
            self.model = TriageModel.load(
                artifact, precision=precision, threads=threads, batch_size=batch_size
            )
            self.preds = prediction_fields(self.model)
        out, errors = score_table(self.model, table, self.preds)
        if errors:
            with self.errors_path.open("a", encoding="utf-8") as fh:
                fh.writelines(json.dumps(e, ensure_ascii=False) + "\n" for e in errors)
        return out


# ---- engines ------------------------------------------------------------------------------------------
def score_local(
    artifact: str,
    files: list[Path],
    schema: pa.Schema,
    out_dir: Path,
    errors: list[dict[str, Any]],
    precision: str = "int8",
    threads: int | None = None,
    batch_size: int = 256,
) -> int:
    model = TriageModel.load(artifact, precision=precision, threads=threads)
    n_ok = 0
    preds = prediction_fields(model)
    with pq.ParquetWriter(out_dir / "part-00000.parquet", output_schema(schema, preds)) as writer:
        for chunk in read_chunks(files, schema, errors):
            for start in range(0, len(chunk), batch_size):
                out, bad = score_table(model, chunk.slice(start, batch_size), preds)
                writer.write_table(out)
                errors.extend(bad)
                n_ok += len(out)
    return n_ok


def score_ray(
    artifact: str,
    files: list[Path],
    schema: pa.Schema,
    out_dir: Path,
    errors: list[dict[str, Any]],
    precision: str = "int8",
    threads: int | None = None,
    batch_size: int = 256,
    num_workers: int | None = None,
) -> int:
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise ImportError(f"--engine ray needs Ray Data: pip install 'kefu-triage[scale]' ({exc})") from None
    started = not ray.is_initialized()
    if started:  # RAY_ADDRESS (if set) names an existing cluster; otherwise a local Ray starts here
        ray.init(
            address=os.environ.get("RAY_ADDRESS") or None,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
    try:
        workers = num_workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        tables = list(read_chunks(files, schema, errors))
        n_in = sum(len(t) for t in tables)
        errors_dir = out_dir.parent / f".{out_dir.name}.errors-{uuid.uuid4().hex[:8]}"
        errors_dir.mkdir(parents=True)
        try:
            if n_in:
                ds = ray.data.from_arrow(tables).map_batches(
                    RayScorer,
                    fn_constructor_kwargs={
                        "artifact": str(Path(artifact).resolve()),
                        "precision": precision,
                        "threads": threads or 1,
                        "batch_size": 32,
                        "errors_dir": str(errors_dir),
                    },
                    batch_size=batch_size,
                    batch_format="pyarrow",
                    concurrency=workers,
                    num_cpus=1,
                )
                ds.write_parquet(str(out_dir))
            for part in sorted(errors_dir.glob("*.jsonl")):
                errors.extend(
                    json.loads(line) for line in part.read_text(encoding="utf-8").splitlines() if line
                )
        finally:
            for part in errors_dir.glob("*"):
                part.unlink()
            errors_dir.rmdir()
    finally:
        if started:
            ray.shutdown()
    if not any(out_dir.glob("*.parquet")):  # nothing scored: still leave a readable (empty) dataset
        preds = prediction_fields(TriageModel.load(artifact, precision=precision))
        pq.write_table(output_schema(schema, preds).empty_table(), out_dir / "part-00000.parquet")
    return pq.ParquetDataset(str(out_dir)).read(columns=["pred_route"]).num_rows


def run_score(args: Any) -> int:
    files = list_inputs(args.input)
    out_dir = Path(args.output)
    errors_path = Path(args.errors or f"{str(out_dir).rstrip('/')}.errors.jsonl")
    if out_dir.resolve() in [f.resolve() for f in files] or out_dir.resolve() == Path(args.input).resolve():
        raise ValueError(f"--output {out_dir}: must not be the input")
    t0 = time.perf_counter()
    schema = input_schema(files)
    errors: list[dict[str, Any]] = []
    kwargs = {"precision": args.precision, "threads": args.threads, "batch_size": args.batch_size}
    with atomic_directory(out_dir) as tmp:
        if args.engine == "ray":
            n_ok = score_ray(
                args.artifact, files, schema, tmp, errors, num_workers=args.num_workers, **kwargs
            )
        else:
            n_ok = score_local(args.artifact, files, schema, tmp, errors, **kwargs)
    errors.sort(key=lambda e: (e["file"], e["line"]))
    atomic_write_jsonl(errors_path, errors)
    seconds = time.perf_counter() - t0
    print(
        f"scored {n_ok} row(s) from {len(files)} file(s) into {out_dir} in {seconds:.1f} s "
        f"({n_ok / max(seconds, 1e-9):.0f} rows/s, engine {args.engine}); {len(errors)} bad row(s) in {errors_path}",
        file=sys.stderr,
    )
    return 0 if n_ok or not errors else 1
