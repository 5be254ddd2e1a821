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
    "validate": ("kefu_triage.data.records", "run_validate"),
    "regress": ("kefu_triage.evaluate.regress", "run_regress"),
    "build-encoder": ("kefu_triage.model.encoders", "run_build_encoder"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kefu-triage", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("predict", help="score messages with an ONNX artifact (no torch needed)")
    p.add_argument("texts", nargs="*", help="messages to score (or use --input)")
    p.add_argument("--artifact", required=True, help="artifact directory (holds triage.json)")
    p.add_argument("--input", help="JSONL file with a 'text' field (optional 'context') per line")
    p.add_argument("--output", help="JSONL file for the predictions (default: stdout)")
    p.add_argument("--errors", help="JSONL file for lines that could not be scored (default: OUTPUT.errors.jsonl)")
    p.add_argument("--precision", choices=["int8", "fp32"], default="int8")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: all cores)")
    p.add_argument("--batch-size", type=int, default=32)

    p = sub.add_parser("validate", help="validate labelled data files (JSONL, CSV, Parquet) against the taxonomy")
    p.add_argument("files", nargs="+")
    p.add_argument("--taxonomy", default=None, help="taxonomy YAML (default: the packaged ecommerce_zh)")

    p = sub.add_parser("regress", help="compare a run's metrics.json with a baseline; exit 1 on regression")
    p.add_argument("--baseline", required=True)
    p.add_argument("--current", required=True)
    p.add_argument("--tolerances", default=None, help="YAML/JSON of per-metric tolerances (default: built in)")

    p = sub.add_parser("build-encoder", help="build (and cache) an encoder from configs/model/NAME.yaml offline")
    p.add_argument("name", nargs="?", default="e5_small_zh")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--force", action="store_true", help="rebuild even if a valid cached copy exists")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module_name, func_name = COMMANDS[args.command]
    func = getattr(importlib.import_module(module_name), func_name)
    try:
        return int(func(args) or 0)
    except (ValueError, FileNotFoundError) as exc:  # our errors carry file/line/field in the message
        print(f"kefu-triage {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
