"""`kefu-triage predict`: score messages given on the command line or stream a JSONL file. Torch-free."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

from kefu_triage.runtime.model import TriageModel

CHUNK = 256  # lines scored per call: constant memory however long the input file is


def _parse_lines(path: Path) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
    """(line number, {text, context} or None, problem or None) for every non-blank line."""
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
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                yield lineno, None, "needs a string field 'text'"
                continue
            yield lineno, obj, None


def score_file(model: TriageModel, src: Path, out, errors_path: Path, progress: bool = True) -> tuple[int, int]:
    """Stream ``src`` -> ``out`` (JSONL, input fields + predictions); bad lines go to ``errors_path``."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # serving installs need not have tqdm: no progress bar then
        progress = False

        def tqdm(*_a, **_k):
            return contextlib.nullcontext(type("Bar", (), {"update": lambda self, n: None})())

    n_ok = n_bad = 0
    lines = _parse_lines(src)
    with errors_path.open("w", encoding="utf-8") as err, tqdm(desc=f"scoring {src.name}", unit=" msg",
                                                               disable=not progress, file=sys.stderr) as bar:
        while chunk := list(islice(lines, CHUNK)):
            good = []
            for lineno, obj, problem in chunk:
                if problem is None:
                    good.append((lineno, obj))
                else:
                    err.write(json.dumps({"line": lineno, "error": problem}, ensure_ascii=False) + "\n")
                    n_bad += 1
            try:
                preds = model.predict([o["text"] for _, o in good], [o.get("context") for _, o in good]) if good else []
                pairs = list(zip(good, preds, strict=True))
            except ValueError:  # one bad context in the chunk: score line by line to isolate it
                pairs = []
                for lineno, obj in good:
                    try:
                        pairs.append(((lineno, obj), model.predict([obj["text"]], [obj.get("context")])[0]))
                    except ValueError as exc:
                        err.write(json.dumps({"line": lineno, "error": str(exc)}, ensure_ascii=False) + "\n")
                        n_bad += 1
            for (_lineno, obj), pred in pairs:
                out.write(json.dumps({**obj, **pred}, ensure_ascii=False) + "\n")
                n_ok += 1
            bar.update(len(chunk))
    return n_ok, n_bad


def run_predict(args: Any) -> int:
    model = TriageModel.load(args.artifact, precision=args.precision, threads=args.threads, batch_size=args.batch_size)
    if args.input:
        src = Path(args.input)
        if not src.is_file():
            raise FileNotFoundError(f"--input {src}: file not found")
        errors = Path(args.errors or (f"{args.output}.errors.jsonl" if args.output else f"{src}.errors.jsonl"))
        if args.output:
            with open(args.output, "w", encoding="utf-8") as out:
                n_ok, n_bad = score_file(model, src, out, errors)
        else:
            n_ok, n_bad = score_file(model, src, sys.stdout, errors, progress=False)
        print(f"scored {n_ok} line(s); {n_bad} bad line(s) written to {errors}", file=sys.stderr)
        return 0 if n_ok or not n_bad else 1
    if not args.texts:
        raise ValueError("give messages to score, or --input FILE.jsonl")
    for text, pred in zip(args.texts, model.predict(args.texts), strict=True):
        print(json.dumps({"text": text, **pred}, ensure_ascii=False))
    return 0
