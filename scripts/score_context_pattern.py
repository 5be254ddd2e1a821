"""Intent accuracy of trained models on the labelled items whose recent previous turns match a pattern, beside
the accuracy on all other items: a check of one error source (e.g. a "转人工" turn read as human_agent).

    .venv/bin/python scripts/score_context_pattern.py models/ema models/default --pattern 转人工
    .venv/bin/python scripts/score_context_pattern.py models/default --pattern '\\*\\*\\*' --turns 3 --file F

``--file`` defaults to ../shared/data/real/real_gold_dev.jsonl next to the repository, read at run time (never
copied). ``--turns``: how many of the last previous turns are searched (the model reads 3 by default).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from kefu_triage.data.records import read_examples
from kefu_triage.model.multitask import load_model, predict_logits

REAL_DEV = Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / "real_gold_dev.jsonl"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", help="model directories (models/<experiment>)")
    ap.add_argument("--pattern", required=True, help="regular expression searched in the previous turns")
    ap.add_argument("--turns", type=int, default=3, help="last previous turns searched (default 3)")
    ap.add_argument("--file", type=Path, default=REAL_DEV, help="labelled JSONL/CSV/Parquet file")
    args = ap.parse_args(argv)
    if not args.file.is_file():
        print(f"{args.file}: not found (pass --file)", file=sys.stderr)
        return 2
    try:
        pattern = re.compile(args.pattern)
    except re.error as exc:
        print(f"--pattern {args.pattern!r}: {exc}", file=sys.stderr)
        return 2
    for model_dir in args.models:
        model, tokenizer = load_model(model_dir)
        taxonomy = model.config.get_taxonomy()
        records = read_examples(args.file, taxonomy)
        pred = predict_logits(model, tokenizer, records)["intent_logits"].argmax(1)
        gold = np.array([taxonomy.intent_id(r["intent"]) for r in records])
        match = np.array(
            [any(pattern.search(t["text"]) for t in (r.get("context") or [])[-args.turns :]) for r in records]
        )
        right = pred == gold
        wrong_as = Counter(taxonomy.intent_names[i] for i in pred[match & ~right])
        print(
            f"{model_dir}: matching {int(match.sum())} items, accuracy {right[match].mean():.3f} "
            f"(others {right[~match].mean():.3f}); wrong answers on them: {dict(wrong_as.most_common())}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
