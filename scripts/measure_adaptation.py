"""Does learning from unlabelled real turns help? baseline vs DAPT vs DAPT + self-training (issue 15).

    .venv/bin/python scripts/measure_adaptation.py                 # all variants, ~15-25 min of 2 cores each
    .venv/bin/python scripts/measure_adaptation.py --variants dapt,dapt_st --baseline-model models/seeds2
    .venv/bin/python scripts/measure_adaptation.py --dry-run       # print the commands and the overlap only

Every variant is the default recipe (``experiment=default``) plus its ``adapt`` overrides; each trains with
``nice -n 10`` into models/adapt_<variant> and is scored on ../shared/data/real/real_gold_dev.jsonl and
jddc_intents_silver.jsonl (intent accuracy and macro-F1). Those two evaluation sets are passed as
``adapt.exclude_files``, so none of their texts is used as unlabelled training data (the overlap is printed).
``--baseline-model DIR`` reuses an existing default model as the baseline when its recorded config matches
the default recipe (it is trained otherwise). The table goes to stdout and reports/adaptation/measure.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "baseline": [],
    "dapt": ["adapt.unlabeled_file={U}", "adapt.exclude_files=[{G},{S}]"],
    "st": [
        "adapt.unlabeled_file={U}",
        "adapt.exclude_files=[{G},{S}]",
        "adapt.mlm.enabled=false",
        "adapt.self_training.rounds={R}",
    ],
    "dapt_st": [
        "adapt.unlabeled_file={U}",
        "adapt.exclude_files=[{G},{S}]",
        "adapt.self_training.rounds={R}",
    ],
}
# config keys a reused baseline must share with the recipe (paths, names and resume settings may differ)
IGNORED = {"experiment_name", "paths", "adapt", "hydra"}
IGNORED_TRAINER = {
    "publish_dir",
    "resume",
    "resume_dir",
    "progress_bar",
    "stop_after_steps",
    "keep_checkpoint",
}


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=overrides)


def _file_identity(value):
    """A data setting as compared between runs: a path becomes its file's sha256 (or its name if absent)."""
    if not (isinstance(value, str) and "/" in value):
        return value
    path = Path(value) if Path(value).is_absolute() else ROOT / value
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    return Path(value).name


def recipe_matches(model_dir: Path) -> tuple[bool, str]:
    """Whether ``model_dir`` was trained with the default recipe (what differs, if not)."""
    import yaml
    from omegaconf import OmegaConf

    path = model_dir / "train_config.yaml"
    if not path.is_file():
        return False, f"{path} missing"
    theirs = yaml.safe_load(path.read_text(encoding="utf-8"))
    ours = OmegaConf.to_container(compose(["experiment=default", f"paths.root_dir={ROOT}"]), resolve=True)
    if (theirs.get("adapt") or {}).get("unlabeled_file"):
        return False, "it was trained with adapt.unlabeled_file"
    diffs = []
    for key in sorted(set(ours) | set(theirs)):
        if key in IGNORED:
            continue
        a, b = ours.get(key), theirs.get(key)
        if key == "trainer":
            a = {k: v for k, v in (a or {}).items() if k not in IGNORED_TRAINER}
            b = {k: v for k, v in (b or {}).items() if k not in IGNORED_TRAINER}
        if key == "data":  # the same file contents, wherever they live
            a = {k: _file_identity(v) for k, v in (a or {}).items() if k not in ("dir", "log_dir")}
            b = {k: _file_identity(v) for k, v in (b or {}).items() if k not in ("dir", "log_dir")}
        if a != b:
            diffs.append(key)
    return not diffs, ("differs in " + ", ".join(diffs)) if diffs else "matches the default recipe"


def text_overlap(unlabeled: Path, eval_files: list[Path]) -> dict[str, int]:
    from kefu_triage.core.inputs import clean_text

    pool = {
        clean_text(json.loads(x)["text"])
        for x in unlabeled.read_text(encoding="utf-8").splitlines()
        if x.strip()
    }
    out = {}
    for f in eval_files:
        texts = {
            clean_text(json.loads(x)["text"]) for x in f.read_text(encoding="utf-8").splitlines() if x.strip()
        }
        out[f.name] = len(pool & texts)
    return out


def score(model_dir: Path, eval_files: list[Path]) -> dict[str, dict[str, float]]:
    """Per file: intent accuracy and macro-F1, plus accuracy on ``difficulty: hard`` rows when it has them."""
    import numpy as np
    from sklearn.metrics import f1_score

    from kefu_triage.data.records import read_examples
    from kefu_triage.model.multitask import load_model, predict_logits

    model, tokenizer = load_model(model_dir)
    taxonomy = model.config.get_taxonomy()
    out = {}
    for f in eval_files:
        records = read_examples(f, taxonomy)
        pred = predict_logits(model, tokenizer, records)["intent_logits"].argmax(1)
        true = np.array([taxonomy.intent_id(r["intent"]) for r in records])
        hard = np.array([r.get("difficulty") == "hard" for r in records])
        out[f.name] = {
            "n": len(records),
            "intent_accuracy": round(float((pred == true).mean()), 4),
            "intent_macro_f1": round(float(f1_score(true, pred, average="macro", zero_division=0)), 4),
            "needs_context_accuracy": round(float((pred == true)[hard].mean()), 4) if hard.any() else None,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--shared", default=str(ROOT.parent / "shared"), help="the shared folder (data/real inside)"
    )
    ap.add_argument(
        "--variants", default="baseline,dapt,dapt_st", help=f"comma-separated of {list(VARIANTS)}"
    )
    ap.add_argument("--rounds", type=int, default=1, help="self-training rounds for st / dapt_st")
    ap.add_argument(
        "--baseline-model", default=None, help="reuse this default model as the baseline if it matches"
    )
    ap.add_argument(
        "--dry-run", action="store_true", help="print the overlap and the commands, train nothing"
    )
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra Hydra override for every adapted variant (e.g. adapt.mlm.epochs=1); repeatable",
    )
    ap.add_argument("--output", default=str(ROOT / "reports" / "adaptation" / "measure.json"))
    args = ap.parse_args(argv)
    real = Path(args.shared) / "data" / "real"
    unlabeled, gold, silver = (
        real / "jddc_customer_turns_unlabeled.jsonl",
        real / "real_gold_dev.jsonl",
        real / "jddc_intents_silver.jsonl",
    )
    missing = [str(p) for p in (unlabeled, gold, silver) if not p.is_file()]
    if missing:
        print(f"error: needs the shared real data; missing {', '.join(missing)}", file=sys.stderr)
        return 2
    eval_files = [gold, silver]
    overlap = text_overlap(unlabeled, eval_files)
    print(f"overlap of evaluation texts with {unlabeled.name} (excluded from adaptation data): {overlap}")
    fill = {"U": unlabeled, "G": gold, "S": silver, "R": args.rounds}
    results: dict[str, dict] = {}
    for variant in [v.strip() for v in args.variants.split(",") if v.strip()]:
        if variant not in VARIANTS:
            print(f"error: unknown variant {variant!r}; known: {', '.join(VARIANTS)}", file=sys.stderr)
            return 2
        name = f"adapt_{variant}"
        model_dir = ROOT / "models" / name
        if variant == "baseline" and args.baseline_model:
            ok, why = recipe_matches(Path(args.baseline_model))
            print(f"baseline {args.baseline_model}: {why}")
            if ok:
                results[variant] = {"model_dir": args.baseline_model, "wall_s": None, "reused": True}
                continue
        overrides = ["experiment=default", f"experiment_name={name}"] + [
            o.format(**fill) for o in VARIANTS[variant]
        ]
        if variant != "baseline":
            overrides += args.set
        cmd = ["nice", "-n", "10", sys.executable, "-m", "kefu_triage.train", *overrides]
        print("$ " + " ".join(cmd), flush=True)
        if args.dry_run:
            continue
        start = time.time()
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        proc = subprocess.run(cmd, cwd=ROOT, env=env)
        if proc.returncode:
            print(f"error: {variant} training failed (exit {proc.returncode})", file=sys.stderr)
            return proc.returncode
        results[variant] = {
            "model_dir": str(model_dir),
            "wall_s": round(time.time() - start, 1),
            "reused": False,
        }
    if args.dry_run:
        return 0
    for r in results.values():
        r["scores"] = score(Path(r["model_dir"]), eval_files)
    base = results.get("baseline")
    base_wall = base["wall_s"] if base and base["wall_s"] is not None else None
    print(f"\n| variant | {gold.name} acc | Δ | {silver.name} acc | Δ | wall min | extra min vs baseline |")
    print("|---|---|---|---|---|---|---|")
    for variant, r in results.items():
        cells = []
        for f in eval_files:
            acc = r["scores"][f.name]["intent_accuracy"]
            delta = acc - base["scores"][f.name]["intent_accuracy"] if base else None
            cells += [f"{acc:.4f}", f"{delta * 100:+.1f} pt" if delta is not None else "-"]
        wall = f"{r['wall_s'] / 60:.1f}" if r["wall_s"] is not None else "reused"
        extra = (
            f"{(r['wall_s'] - base_wall) / 60:+.1f}"
            if base_wall is not None and r["wall_s"] is not None
            else "-"
        )
        print(f"| {variant} | " + " | ".join(cells) + f" | {wall} | {extra} |")
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {"overlap": overlap, "rounds": args.rounds, "overrides": args.set, "results": results}, indent=2
        )
    )
    print(f"\nwritten {out} (wall times were taken on a shared machine unless it was quiet)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
