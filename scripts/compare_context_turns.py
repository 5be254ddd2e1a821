"""Intent accuracy of trained models that differ in ``data.context_turns``: on real_gold_dev (overall and on its
context-dependent items, ``difficulty == "hard"``) and on the synthetic dev split; picks a default.

Train the models first (one per context_turns value; the lead runs these), e.g.
    for k in 1 2 3 4; do
      .venv/bin/python -m kefu_triage.train experiment=default experiment_name=default_ctx$k data.context_turns=$k
    done
then:
    .venv/bin/python scripts/compare_context_turns.py models/default_ctx1 models/default_ctx2 \\
        models/default_ctx3 models/default_ctx4 [--real FILE] [--dev FILE] [--json OUT]

``--real`` defaults to ../shared/data/real/real_gold_dev.jsonl next to the repository, read at run time (never
copied); when it is absent the real table is skipped with one line. ``--dev`` defaults to
data/embedded/dev.jsonl; on it "context-dependent" = dialogue snippets (source ``dialogue``) or, in data
without that column, short replies (<= ``--short-chars`` characters) that come with previous turns.

The default is chosen on real_gold_dev's hard items: the fewest turns whose accuracy is within one standard
error of the best (fewer turns = shorter inputs, faster serving). 147 hard items give a standard error of
about 4 points: differences smaller than that are noise.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import f1_score

from kefu_triage.core.fileio import atomic_write_json
from kefu_triage.data.records import read_examples
from kefu_triage.model.multitask import load_model, predict_logits

ROOT = Path(__file__).resolve().parents[1]
REAL_DEV = ROOT.parent / "shared" / "data" / "real" / "real_gold_dev.jsonl"


def _acc(right: np.ndarray, mask: np.ndarray) -> dict[str, Any]:
    n = int(mask.sum())
    acc = float(right[mask].mean()) if n else float("nan")
    se = math.sqrt(acc * (1 - acc) / n) if n else float("nan")
    return {"acc": round(acc, 4), "se": round(se, 4), "n": n}


def score(model, tokenizer, taxonomy, path: Path, short_chars: int) -> dict[str, Any]:
    """Accuracy overall, on context-dependent and on stand-alone items, and macro-F1, of one model on one file."""
    records = read_examples(path, taxonomy)
    pred = predict_logits(model, tokenizer, records)["intent_logits"].argmax(1)
    gold = np.array([taxonomy.intent_id(r["intent"]) for r in records])
    right = pred == gold
    if any("difficulty" in r for r in records):  # hand-labelled: the annotator said whether context decides
        hard = np.array([r.get("difficulty") == "hard" for r in records])
    elif any("source" in r for r in records):  # generated: dialogue snippets are the context-decided rows
        hard = np.array([r.get("source") == "dialogue" for r in records])
    else:
        hard = np.array([bool(r.get("context")) and len(r["text"]) <= short_chars for r in records])
    return {
        "all": _acc(right, np.ones_like(right)),
        "context": _acc(right, hard),
        "alone": _acc(right, ~hard),
        "macro_f1": round(float(f1_score(gold, pred, average="macro")), 4),
    }


def _cell(a: dict[str, Any]) -> str:
    return f"{a['acc']:.4f} ± {a['se']:.3f} ({a['n']})" if a["n"] else "-"


def choose(results: list[dict[str, Any]], key: str) -> dict[str, Any] | None:
    """The fewest context turns within one standard error of the best accuracy on ``key``'s hard items."""
    scored = [r for r in results if key in r and r[key]["context"]["n"]]
    if not scored:
        return None
    best = max(scored, key=lambda r: r[key]["context"]["acc"])
    floor = best[key]["context"]["acc"] - best[key]["context"]["se"]
    return min(
        (r for r in scored if r[key]["context"]["acc"] >= floor),
        key=lambda r: (r["context_turns"], r["model"]),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument(
        "model_dirs", nargs="+", type=Path, help="trained model directories (kefu_triage.train)"
    )
    parser.add_argument(
        "--real", type=Path, default=REAL_DEV, help="hand-labelled real turns with difficulty"
    )
    parser.add_argument(
        "--dev", type=Path, default=ROOT / "data" / "embedded" / "dev.jsonl", help="synthetic dev split"
    )
    parser.add_argument("--short-chars", type=int, default=8)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    missing = [str(d) for d in args.model_dirs if not d.is_dir()]
    if missing:
        parser.error(f"model directory not found: {', '.join(missing)}")
    sets = {"real": args.real, "dev": args.dev}
    for name, path in list(sets.items()):
        if not path.is_file():
            print(f"{name}: {path} not found, skipped")
            del sets[name]
    if not sets:
        print("nothing to measure", file=sys.stderr)
        return 1

    results = []
    for model_dir in args.model_dirs:
        model, tokenizer = load_model(model_dir)
        taxonomy = model.config.get_taxonomy()
        row: dict[str, Any] = {"model": str(model_dir), "context_turns": int(model.config.context_turns)}
        for name, path in sets.items():
            row[name] = score(model, tokenizer, taxonomy, path, args.short_chars)
        results.append(row)

    for name, path in sets.items():
        what = "hard (needs context)" if name == "real" else "context-dependent"
        print(f"\n{name}: {path}\n")
        print(
            f"| model | context_turns | intent acc | macro-F1 | acc, {what} (n) | acc, answerable alone (n) |"
        )
        print("|---|---:|---|---:|---|---|")
        for r in sorted(results, key=lambda r: (r["context_turns"], r["model"])):
            s = r[name]
            print(
                f"| {r['model']} | {r['context_turns']} | {_cell(s['all'])} | {s['macro_f1']:.4f} | "
                f"{_cell(s['context'])} | {_cell(s['alone'])} |"
            )
    key = "real" if "real" in sets else "dev"
    pick = choose(results, key)
    if pick is not None:
        print(
            f"\nchoice (fewest turns within one standard error of the best {key} context-dependent accuracy): "
            f"context_turns={pick['context_turns']} ({pick['model']})"
        )
    if args.json:
        choice = pick and {"context_turns": pick["context_turns"], "model": pick["model"], "on": key}
        atomic_write_json(
            args.json, {"sets": {k: str(v) for k, v in sets.items()}, "results": results, "choice": choice}
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
