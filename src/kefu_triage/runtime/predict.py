"""`kefu-triage predict`: score messages given on the command line or stream a JSONL file. Torch-free.

No line is lost: every input line is scored, reported as an error (with its line number) or counted as
blank, and ``read = scored + errors + blank`` is printed at the end. Output and errors files are written to
a temporary file in their folder and renamed when complete, so an existing file is never half replaced.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import sys
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, BinaryIO

from kefu_triage.core.fileio import _UMASK  # read once there: os.umask can only be read by setting it
from kefu_triage.core.inputs import InputError, build_input
from kefu_triage.runtime.model import TriageModel

CHUNK = 256  # lines scored per call: constant memory however long the input file is
JSON_WHITESPACE = " \t\r\n"
BROKEN_PIPE_EXIT = 141  # 128 + SIGPIPE, what a shell reports for a Unix filter whose reader went away

# (number, parsed object or None, problem or None); neither object nor problem: a blank line
Item = tuple[int, "dict[str, Any] | None", "str | None"]


class PredictError(ValueError):
    """A bad argument, or an OS error on a named path (the CLI prints it as one line and exits 2)."""


def _os_error(what: str, exc: OSError) -> PredictError:
    if exc.errno == errno.ENOSPC:
        return PredictError(f"{what}: no space left on device")
    return PredictError(f"{what}: {exc.strerror or exc}")


@dataclass
class Counts:
    read: int = 0
    scored: int = 0
    errors: int = 0
    blank: int = 0


# ---- input ---------------------------------------------------------------------------------------------
def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_line(raw: bytes, first: bool = False) -> tuple[dict[str, Any] | None, str | None]:
    """(object, None) for a usable line, (None, problem) for a bad one, (None, None) for a blank one."""
    try:
        line = raw.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError as exc:
        return None, f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})"
    if not line.strip(JSON_WHITESPACE):
        return None, None
    try:  # NaN/Infinity are refused: echoed, they would make the output line invalid JSON
        obj = json.loads(line, parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        return None, f"invalid JSON: {exc.msg} (column {exc.colno})"
    except ValueError as exc:  # NaN/Infinity, an integer of more than 4300 digits
        return None, f"invalid JSON: {exc}"
    except RecursionError:
        return None, "invalid JSON: nested too deeply"
    if not isinstance(obj, dict):
        return None, f"must be a JSON object with a string field 'text', got {type(obj).__name__}"
    if not isinstance(obj.get("text"), str):
        got = "no 'text'" if "text" not in obj else f"'text' of type {type(obj['text']).__name__}"
        return None, f"needs a string field 'text', got {got}"
    return obj, None


def read_jsonl(fh: BinaryIO, what: str) -> Iterator[Item]:
    lines = enumerate(fh, 1)
    while True:
        try:
            n, raw = next(lines)
        except StopIteration:
            return
        except OSError as exc:
            raise _os_error(what, exc) from None
        yield n, *parse_line(raw, first=n == 1)


def read_arguments(texts: Iterable[str]) -> Iterator[Item]:
    for n, text in enumerate(texts, 1):
        try:  # argv holds undecodable bytes as lone surrogates (surrogateescape): name them, never echo them
            text = os.fsencode(text).decode("utf-8")
        except UnicodeError as exc:
            yield n, None, f"not valid UTF-8 (position {exc.start + 1})"
            continue
        yield n, {"text": text}, None


# ---- output --------------------------------------------------------------------------------------------
def dump_line(record: dict[str, Any]) -> bytes:
    """One strict JSON line (no NaN/Infinity) in UTF-8. Lone surrogates (``"\\ud800"`` escapes in the
    input) cannot be UTF-8: that line is written with every non-ASCII character escaped instead."""
    text = json.dumps(record, ensure_ascii=False, allow_nan=False)
    try:
        return (text + "\n").encode("utf-8")
    except UnicodeEncodeError:
        return (json.dumps(record, ensure_ascii=True, allow_nan=False) + "\n").encode("ascii")


class Sink:
    """JSON lines to a stream (stdout, stderr) or to a file that appears only when complete: a temporary
    file in the target's folder, renamed over the target by :meth:`publish`. A device or FIFO (``/dev/null``)
    is written in place: renaming over it would replace the device."""

    def __init__(self, what: str, path: str | Path | None = None, stream: Any = None):
        self.what, self.lines, self.tmp, self.text = what, 0, None, False
        if path is None:
            stream.flush()  # earlier text must come first: lines go to the byte buffer under it
            self.path, self.fh = None, getattr(stream, "buffer", None) or stream
            self.text = self.fh is stream  # a text-only stream (io.StringIO)
            return
        try:
            try:
                mode = os.stat(path).st_mode
            except FileNotFoundError:
                mode = None
            if mode is not None and stat.S_ISDIR(mode):
                raise IsADirectoryError(errno.EISDIR, "is a directory")
            if mode is not None and not stat.S_ISREG(
                mode
            ):  # /dev/null, /dev/stdout, a FIFO: written in place
                self.path, self.fh = Path(path), open(path, "wb")  # noqa: SIM115 - closed by finish/discard
                return
            self.path = Path(os.path.realpath(path))  # a symlink is kept: its target is replaced
            if not self.path.parent.is_dir():
                raise PredictError(f"{what}: folder {self.path.parent} does not exist")
            fd, self.tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
            self.fh = os.fdopen(fd, "wb")
        except OSError as exc:
            raise _os_error(what, exc) from None

    def write(self, line: bytes) -> None:
        try:
            self.fh.write(line.decode("utf-8") if self.text else line)
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise _os_error(self.what, exc) from None
        self.lines += 1

    def flush(self) -> None:
        try:
            self.fh.flush()
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise _os_error(self.what, exc) from None

    def finish(self) -> None:
        """Flush everything to disk (a full disk shows here); the target is not touched yet."""
        self.flush()
        if self.path is None:
            return
        try:
            if self.tmp is not None:
                os.fsync(self.fh.fileno())
            self.fh.close()
        except OSError as exc:
            raise _os_error(self.what, exc) from None

    def publish(self, keep_empty: bool = True) -> bool:
        """Rename the finished file over the target; with ``keep_empty=False`` an empty file is not created
        (an existing one is still replaced, so it never describes an older run). Returns whether it was."""
        if self.tmp is None:
            return self.path is not None or self.lines > 0
        try:
            if not self.lines and not keep_empty and not self.path.exists():
                os.unlink(self.tmp)
                self.tmp = None
                return False
            mode = stat.S_IMODE(self.path.stat().st_mode) if self.path.exists() else 0o666 & ~_UMASK
            os.chmod(self.tmp, mode)
            os.replace(self.tmp, self.path)
            self.tmp = None
            return True
        except OSError as exc:
            raise _os_error(self.what, exc) from None

    def discard(self) -> None:
        if self.path is None:
            return
        with contextlib.suppress(OSError):
            self.fh.close()
        if self.tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.tmp)
            self.tmp = None


# ---- scoring -------------------------------------------------------------------------------------------
def score_chunk(model: TriageModel, chunk: list[Item]) -> list[tuple[int, bytes | None, str | None]]:
    """(number, output line or None, error or None) for every item of ``chunk``, in order; both None for a
    blank line."""
    results: dict[int, tuple[bytes | None, str | None]] = {}
    good = []
    for n, obj, problem in chunk:
        if obj is None:
            results[n] = (None, problem)
            continue
        try:  # checked one by one so that one bad context does not fail its chunk mates
            build_input(obj["text"], obj.get("context"), model.context_turns)
        except InputError as exc:
            results[n] = (None, str(exc))
            continue
        good.append((n, obj))
    try:
        preds = (
            model.predict([o["text"] for _, o in good], [o.get("context") for _, o in good]) if good else []
        )
    except ValueError:  # not expected after the checks above; isolate the line rather than lose the chunk
        preds = []
        for n, obj in good:
            try:
                preds.append(model.predict([obj["text"]], [obj.get("context")])[0])
            except ValueError as exc:
                preds.append(None)
                results[n] = (None, str(exc))
    for (n, obj), pred in zip(good, preds, strict=True):
        if pred is None:
            continue
        try:
            results[n] = (dump_line({**obj, **pred}), None)
        except (ValueError, RecursionError) as exc:
            results[n] = (None, f"cannot be written as JSON: {exc}")
    return [(n, *results[n]) for n, _, _ in chunk]


def score_stream(
    model: TriageModel, items: Iterable[Item], out: Sink, err: Sink, key: str = "line", bar: Any = None
) -> Counts:
    """Score ``items`` into ``out``; bad ones go to ``err`` as ``{key: number, "error": ...}``, in order."""
    counts = Counts()
    items = iter(items)
    while chunk := list(islice(items, CHUNK)):
        for n, line, error in score_chunk(model, chunk):
            counts.read = n
            if line is not None:
                out.write(line)
                counts.scored += 1
            elif error is not None:
                err.write(dump_line({key: n, "error": error}))
                counts.errors += 1
            else:
                counts.blank += 1
        out.flush()
        err.flush()
        if bar is not None:
            bar.update(len(chunk))
    if counts.read != counts.scored + counts.errors + counts.blank:  # the promise of this module
        raise RuntimeError(f"line accounting is broken: {counts}")
    return counts


def _progress(desc: str, enabled: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # serving installs need not have tqdm: no progress bar then
        return contextlib.nullcontext(None)
    return tqdm(desc=desc, unit=" line", disable=not enabled, file=sys.stderr)


def _same_file(a: str | Path, b: str | Path) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)  # hard links
    except OSError:
        return False


def _check_args(args: Any, out: str | None, errors: str | None) -> None:
    """Refuse bad arguments before anything is opened; ``out``/``errors`` are the files that will be written."""
    batch_size = getattr(args, "batch_size", 32)
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise PredictError(f"--batch-size must be an integer >= 1, got {batch_size!r}")
    texts, src = getattr(args, "texts", None) or [], getattr(args, "input", None)
    if src and texts:
        raise PredictError(
            f"give messages to score or --input FILE, not both ({len(texts)} message(s) and --input {src})"
        )
    if not src and not texts:
        raise PredictError("give messages to score, or --input FILE.jsonl (--input - reads stdin)")
    if src and src != "-" and os.path.isfile(src):
        for flag, path in (("--output", out), ("--errors", errors)):
            if path and _same_file(path, src):
                raise PredictError(f"{flag} {path} is the input file; it would be overwritten")
    if out and errors and os.path.realpath(out) == os.path.realpath(errors):
        raise PredictError(f"--errors {errors} is the --output file; give two different files")


def _default_errors(out_path: str | None) -> str | None:
    """OUTPUT.errors.jsonl beside a regular output file; stderr (None) for stdout or a device like /dev/stdout."""
    if out_path is None:
        return None
    try:
        mode = os.stat(out_path).st_mode
    except OSError:
        mode = None
    return f"{out_path}.errors.jsonl" if mode is None or stat.S_ISREG(mode) else None


def run_predict(args: Any) -> int:
    src = getattr(args, "input", None)
    out_path = None if getattr(args, "output", None) in (None, "-") else args.output
    errors_path = getattr(args, "errors", None) or _default_errors(out_path)
    _check_args(args, out_path, errors_path)
    sinks: list[Sink] = []
    with contextlib.ExitStack() as stack:
        if src and src != "-":
            path = Path(src)
            if path.is_dir():
                raise PredictError(f"--input {src}: is a directory")
            if not path.exists():
                raise PredictError(f"--input {src}: file not found")
            try:
                fh = stack.enter_context(open(path, "rb"))  # noqa: SIM115
            except OSError as exc:
                raise _os_error(f"--input {src}", exc) from None
            items, key, desc = read_jsonl(fh, f"--input {src}"), "line", f"scoring {path.name}"
        elif src == "-":
            items, key, desc = read_jsonl(sys.stdin.buffer, "--input - (stdin)"), "line", "scoring stdin"
        else:
            items, key, desc = read_arguments(args.texts), "argument", ""
        try:
            out = Sink(f"--output {out_path}", out_path) if out_path else Sink("stdout", stream=sys.stdout)
            sinks.append(out)
            err = (
                Sink(f"--errors {errors_path}", errors_path)
                if errors_path
                else Sink("stderr", stream=sys.stderr)
            )
            sinks.append(err)
            model = TriageModel.load(
                args.artifact,
                precision=args.precision,
                threads=args.threads,
                batch_size=args.batch_size,
                workers=args.workers,
            )
            progress = bool(src) and out_path is not None
            with _progress(desc, progress) as bar:
                counts = score_stream(model, items, out, err, key, bar)
            out.finish()  # both complete on disk before either replaces its target
            err.finish()
            out.publish()
            wrote_errors = err.publish(keep_empty=False)
        except BrokenPipeError:
            return _broken_pipe()
        finally:
            for sink in sinks:
                sink.discard()
    if src:
        where = f"; predictions in {out_path}" if out_path else ""
        if counts.errors:
            where += f"; errors in {errors_path}" if wrote_errors and errors_path else "; errors on stderr"
        print(
            f"kefu-triage predict: {counts.read} line(s) read = {counts.scored} scored + {counts.errors} "
            f"error(s) + {counts.blank} blank{where}",
            file=sys.stderr,
        )
    elif counts.errors:
        print(
            f"kefu-triage predict: {counts.errors} of {counts.read} message(s) could not be scored",
            file=sys.stderr,
        )
    return 0 if counts.scored or not counts.errors else 1


def _broken_pipe() -> int:
    """The reader of stdout went away (``| head``): stop quietly, as Unix filters do."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        # stdout's buffer still holds lines; point fd 1 at /dev/null so the interpreter's final flush is silent
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    return BROKEN_PIPE_EXIT
