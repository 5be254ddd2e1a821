"""The ``kefu-triage`` command. Sub-commands import their module lazily, so ``predict`` works in a
runtime-only install (onnxruntime, tokenizers, numpy) and ``--help`` is instant.

Pipelines with many settings (train, evaluate, export, bench, prepare_data) are Hydra programs:
``python -m kefu_triage.train ...``; this command is for the everyday one-liners.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# sub-command -> (module, function); each function takes the parsed args and returns an exit code.
COMMANDS = {
    "predict": ("kefu_triage.runtime.predict", "run_predict"),
    "set-policy": ("kefu_triage.core.artifact", "run_set_policy"),
    "validate": ("kefu_triage.data.records", "run_validate"),
    "regress": ("kefu_triage.evaluate.regress", "run_regress"),
    "build-encoder": ("kefu_triage.model.encoders", "run_build_encoder"),
    "select": ("kefu_triage.data.labelling", "run_select"),
    "import-labels": ("kefu_triage.data.labelling", "run_import_labels"),
    "serve": ("kefu_triage.runtime.server", "run_serve"),
    "score": ("kefu_triage.runtime.bulk", "run_score"),
}


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {n}")
    return n


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kefu-triage", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("predict", help="score messages with an ONNX artifact (no torch needed)")
    p.add_argument("texts", nargs="*", help="messages to score (or use --input)")
    p.add_argument("--artifact", required=True, help="artifact directory (holds triage.json)")
    p.add_argument(
        "--input", help="JSONL file with a 'text' field (optional 'context') per line; - reads stdin"
    )
    p.add_argument("--output", help="JSONL file for the predictions, written atomically (default: stdout)")
    p.add_argument(
        "--errors",
        help="JSONL file for lines that could not be scored, created only if there is one "
        "(default: OUTPUT.errors.jsonl, or stderr when writing to stdout)",
    )
    p.add_argument("--precision", choices=["int8", "fp32"], default="int8")
    p.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        help="onnxruntime intra-op threads (default: all cores)",
    )
    p.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        help="onnxruntime calls run side by side (int8 files: --workers <cores> --threads 1 is fastest)",
    )
    p.add_argument("--batch-size", type=_positive_int, default=32)

    p = sub.add_parser(
        "set-policy", help="change an artifact's thresholds (rewrites and re-hashes triage.json)"
    )
    p.add_argument("--artifact", required=True, help="artifact directory (holds triage.json)")
    for name, what in (
        ("urgent", "urgent probability >= this -> human"),
        ("recoverable", "recoverable-refund probability >= this -> retention desk"),
        ("confidence", "top intent probability < this -> human (low_confidence)"),
        ("margin", "top1 - top2 intent probability < this -> human (low_confidence)"),
    ):
        p.add_argument(f"--{name}", type=float, default=None, help=f"{what} (default: unchanged)")
    p.add_argument(
        "--set", action="append", default=[], metavar="NAME=VALUE", help="any threshold by name (repeatable)"
    )
    p.add_argument("--note", default=None, help="why, recorded in triage.json policy.history")

    p = sub.add_parser(
        "validate", help="validate labelled data files (JSONL, CSV, Parquet) against the taxonomy"
    )
    p.add_argument("files", nargs="+")
    p.add_argument("--taxonomy", default=None, help="taxonomy YAML (default: the packaged ecommerce_zh)")

    p = sub.add_parser("regress", help="compare a run's metrics.json with a baseline; exit 1 on regression")
    p.add_argument("--baseline", required=True)
    p.add_argument("--current", required=True)
    p.add_argument(
        "--tolerances", default=None, help="YAML/JSON of per-metric tolerances (default: built in)"
    )

    p = sub.add_parser(
        "build-encoder", help="build (and cache) an encoder from configs/model/NAME.yaml offline"
    )
    p.add_argument("name", nargs="?", default="e5_small_zh")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--force", action="store_true", help="rebuild even if a valid cached copy exists")

    # choices repeated from kefu_triage.data.labelling (STRATEGIES, FORMATS): importing it would slow --help
    p = sub.add_parser(
        "select", help="choose unlabelled messages worth labelling; write Label Studio or doccano tasks"
    )
    p.add_argument("--artifact", required=True, help="artifact directory (holds triage.json)")
    p.add_argument(
        "--input", required=True, help="unlabelled messages: JSONL/CSV/Parquet with text (+ context)"
    )
    p.add_argument("--n", type=_positive_int, default=200, help="how many messages to choose (default 200)")
    p.add_argument(
        "--strategy", choices=["uncertainty", "diverse", "novelty", "random"], default="uncertainty"
    )
    p.add_argument("--format", choices=["label-studio", "doccano"], default="label-studio")
    p.add_argument("--output", required=True, help="tasks file (+ FILE.label_config.xml or FILE.labels.json)")
    p.add_argument("--seed", type=int, default=0, help="random seed (random, diverse)")
    p.add_argument(
        "--reference",
        nargs="+",
        default=None,
        help="labelled/training file(s): left out of the pool; novelty = distance to them "
        "(default for novelty: the packaged seed messages)",
    )
    p.add_argument("--precision", choices=["int8", "fp32"], default="int8")
    p.add_argument("--drop-invalid", action="store_true", help="skip invalid input rows instead of failing")

    p = sub.add_parser("import-labels", help="convert a Label Studio / doccano export into labelled JSONL")
    p.add_argument("export", help="the tool's export: Label Studio JSON, or doccano JSONL")
    p.add_argument("--format", choices=["label-studio", "doccano"], required=True)
    p.add_argument(
        "--output", required=True, help="labelled JSONL (for data=custom and kefu-triage validate)"
    )
    p.add_argument("--taxonomy", default=None, help="taxonomy YAML (default: the packaged ecommerce_zh)")
    p.add_argument(
        "--drop-invalid",
        action="store_true",
        help="write the good tasks and list the bad ones instead of failing",
    )

    # serve: every option defaults to None so KEFU_<OPTION> environment variables can fill it (runtime/server.py)
    p = sub.add_parser(
        "serve",
        help="serve an artifact over HTTP with micro-batching (needs the 'serve' extra)",
        description="Every option can also be set by an environment variable: KEFU_ARTIFACT, KEFU_HOST, "
        "KEFU_PORT, KEFU_PRECISION, KEFU_MAX_BATCH, KEFU_MAX_WAIT_MS, KEFU_WORKERS, KEFU_THREADS, "
        "KEFU_MAX_QUEUE, KEFU_MAX_BODY_BYTES, KEFU_MAX_MESSAGES, KEFU_MAX_TEXT_CHARS, KEFU_MAX_CONTEXT_TURNS, "
        "KEFU_GRACEFUL_TIMEOUT, KEFU_LOG_LEVEL, KEFU_ACCESS_LOG.",
    )
    p.add_argument("--artifact", help="artifact directory (env KEFU_ARTIFACT)")
    p.add_argument("--host", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="default 8000")
    p.add_argument("--precision", choices=["int8", "fp32"], help="default int8")
    p.add_argument("--max-batch", type=int, help="messages per model call (default 32)")
    p.add_argument(
        "--max-wait-ms", type=float, help="longest wait for a batch to fill (default: 0 for int8, 5 for fp32)"
    )
    p.add_argument(
        "--workers", type=int, help="batches scored at the same time (default: int8 one per core, fp32 1)"
    )
    p.add_argument(
        "--threads", type=int, help="onnxruntime intra-op threads per worker (default: cores / workers)"
    )
    p.add_argument("--max-queue", type=int, help="messages waiting before 503 + Retry-After (default 1024)")
    p.add_argument("--max-body-bytes", type=int, help="request body limit (default 1 MiB)")
    p.add_argument("--max-messages", type=int, help="messages per /v1/triage request (default 64)")
    p.add_argument("--max-text-chars", type=int, help="characters per message or context turn (default 4096)")
    p.add_argument("--max-context-turns", type=int, help="context turns per message (default 20)")
    p.add_argument(
        "--graceful-timeout", type=float, help="seconds SIGTERM waits for in-flight requests (default 30)"
    )
    p.add_argument(
        "--log-level", choices=["critical", "error", "warning", "info", "debug"], help="default info"
    )
    p.add_argument("--access-log", action="store_true", default=None, help="log every request")

    p = sub.add_parser(
        "score", help="bulk-score JSONL/Parquet files or directories to Parquet (local or Ray)"
    )
    p.add_argument("--artifact", required=True, help="artifact directory (holds triage.json)")
    p.add_argument("--input", required=True, help="a .jsonl/.parquet file or a directory of them")
    p.add_argument("--output", required=True, help="output directory of Parquet files (replaced atomically)")
    p.add_argument(
        "--errors", help="JSONL file for rows that could not be scored (default: OUTPUT.errors.jsonl)"
    )
    p.add_argument(
        "--engine",
        choices=["local", "ray"],
        default="local",
        help="ray: Ray Data on a local Ray, or the cluster named by RAY_ADDRESS",
    )
    p.add_argument(
        "--num-workers", type=_positive_int, default=None, help="ray: model actors (default: one per CPU)"
    )
    p.add_argument("--precision", choices=["int8", "fp32"], default="int8")
    p.add_argument("--threads", type=_positive_int, default=None, help="onnxruntime threads per worker")
    p.add_argument("--batch-size", type=_positive_int, default=256, help="rows per scoring batch")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module_name, func_name = COMMANDS[args.command]
    func = getattr(importlib.import_module(module_name), func_name)
    try:
        return int(func(args) or 0)
    except (
        ValueError,
        FileNotFoundError,
        ImportError,
    ) as exc:  # ours name the file/line/field (or the extra)
        print(f"kefu-triage {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
