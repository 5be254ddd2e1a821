"""Dev intent accuracy of trained models, overall and on the messages that context should decide.

The models differ in ``data.context_turns``; train them first, e.g.
    .venv/bin/python -m kefu_triage.train experiment=default experiment_name=default_ctx0 data.context_turns=0
then:
    .venv/bin/python scripts/compare_context_turns.py models/default models/default_ctx0 [--dev FILE]

"Context-dependent" = short replies (≤ 8 characters) that come with previous turns: slot answers such as an
order number or "是的" whose intent the annotation guide ties to the agent's question.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from sklearn.metrics import f1_score

from kefu_triage.data.records import read_examples
from kefu_triage.model.multitask import load_model, predict_logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dirs", nargs="+", type=Path)
    parser.add_argument("--dev", type=Path, default=Path("data/embedded/dev.jsonl"))
    parser.add_argument("--short-chars", type=int, default=8)
    args = parser.parse_args()
    print("| model | context_turns | dev intent acc | macro-F1 | acc, short replies with context (n) | acc, other (n) |")
    print("|---|---|---|---|---|---|")
    for model_dir in args.model_dirs:
        model, tokenizer = load_model(model_dir)
        taxonomy = model.config.get_taxonomy()
        records = read_examples(args.dev, taxonomy)
        pred = predict_logits(model, tokenizer, records)["intent_logits"].argmax(1)
        gold = np.array([taxonomy.intent_id(r["intent"]) for r in records])
        subset = np.array([bool(r.get("context")) and len(r["text"]) <= args.short_chars for r in records])
        right = pred == gold
        print(f"| {model_dir} | {model.config.context_turns} | {right.mean():.4f} | "
              f"{f1_score(gold, pred, average='macro'):.4f} | {right[subset].mean():.4f} ({subset.sum()}) | "
              f"{right[~subset].mean():.4f} ({(~subset).sum()}) |")


if __name__ == "__main__":
    main()
