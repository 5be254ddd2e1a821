"""How much of the fine-tuning to keep: score trained models at several ``trainer.wise_alpha`` values (WiSE-FT,
docs/model-and-training.md) on real and synthetic sets, without training again.

The models must have been published without interpolation (``trainer.wise_alpha=1``; the script refuses others,
which would be interpolated twice). With ``--soup`` the models are first averaged element-wise (a uniform model
soup; they must share one architecture and start encoder), and the sweep runs on the average.

    .venv/bin/python -m kefu_triage.train experiment=default experiment_name=a1 trainer.wise_alpha=1
    .venv/bin/python -m kefu_triage.train experiment=default experiment_name=a1s7 trainer.wise_alpha=1 trainer.seed=7
    .venv/bin/python scripts/sweep_wise_alpha.py models/a1 models/a1s7 --alphas 1,0.9,0.8,0.75 [--soup]

Sets: ``--sets FILE ...`` (default: real_gold_dev.jsonl and jddc_intents_silver.jsonl from ../shared/data/real
when present, read at run time, plus data/embedded/test.jsonl). Per set: intent accuracy, accuracy on
``difficulty: hard`` rows, urgent ROC-AUC where urgent labels exist.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from sklearn.metrics import roc_auc_score

from kefu_triage.data.records import read_examples
from kefu_triage.model.encoders import load_encoder
from kefu_triage.model.multitask import load_model, predict_logits
from kefu_triage.train.loop import check_wise_alpha, interpolate_encoder
from kefu_triage.train.soup import average_models

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "data" / "real"


def scores(model, tokenizer, sets: dict[str, list[dict]]) -> dict[str, dict[str, float]]:
    taxonomy = model.config.get_taxonomy()
    out = {}
    for name, records in sets.items():
        logits = predict_logits(model, tokenizer, records)
        right = logits["intent_logits"].argmax(1) == np.array(
            [taxonomy.intent_id(r["intent"]) for r in records]
        )
        hard = np.array([r.get("difficulty") == "hard" for r in records])
        row = {"acc": round(float(right.mean()), 4)}
        if hard.any():
            row["needs_context_acc"] = round(float(right[hard].mean()), 4)
        known = [i for i, r in enumerate(records) if r.get("urgent") is not None]
        labels = [int(records[i]["urgent"]) for i in known]
        if 0 < sum(labels) < len(labels):
            row["urgent_auc"] = round(
                float(roc_auc_score(labels, logits["urgent_logit"][known].reshape(-1))), 4
            )
        out[name] = row
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dirs", nargs="+", type=Path)
    ap.add_argument("--alphas", default="1,0.9,0.8,0.75")
    ap.add_argument("--soup", action="store_true", help="average the models first")
    ap.add_argument("--sets", nargs="*", type=Path)
    ap.add_argument(
        "--start",
        type=Path,
        help="the encoder training started from, if not the model's own config "
        "(a domain-adapted encoder: its directory under <cache_dir>/adapted/)",
    )
    args = ap.parse_args(argv)
    alphas = [check_wise_alpha(float(a)) for a in args.alphas.split(",")]
    default_sets = [REAL / "real_gold_dev.jsonl", REAL / "jddc_intents_silver.jsonl"]
    if args.sets is None and not REAL.is_dir():
        print(f"{REAL} not found: real sets skipped", file=sys.stderr)
    files = args.sets or [f for f in default_sets if f.is_file()] + [ROOT / "data/embedded/test.jsonl"]
    configs = []
    for d in args.model_dirs:
        if not (d / "train_config.yaml").is_file():
            ap.error(f"{d}: no train_config.yaml; pass model directories written by training")
        configs.append(cfg := OmegaConf.load(d / "train_config.yaml"))
        if float(cfg.trainer.get("wise_alpha", 1.0)) != 1.0:
            ap.error(
                f"{d}: published with trainer.wise_alpha={cfg.trainer.wise_alpha}; train with trainer.wise_alpha=1"
            )
    if args.soup:
        models = [average_models(args.model_dirs)]
    else:
        models = [load_model(d) for d in args.model_dirs]
    model = models[0][0]
    sets = {f.stem: read_examples(f, model.config.get_taxonomy()) for f in files}
    cfg = configs[0]
    if args.start:
        from transformers import AutoModel

        start = AutoModel.from_pretrained(args.start).state_dict()
    else:
        start = load_encoder(cfg.model, cache_dir=cfg.paths.cache_dir)[0].state_dict()
    start = {k: v for k, v in start.items() if k in model.encoder.state_dict()}  # the model has no pooler
    for (trained, tok), name in zip(
        models, ["soup"] if args.soup else [str(d) for d in args.model_dirs], strict=True
    ):
        for alpha in alphas:
            m = copy.deepcopy(trained)
            with torch.no_grad():
                interpolate_encoder(m, start, alpha)
            print(
                json.dumps({"model": name, "alpha": alpha, **scores(m, tok, sets)}, ensure_ascii=False),
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
