"""A uniform model soup (Wortsman et al., "Model soups", ICML 2022): one training per seed in
``trainer.soup_seeds``, all from the same starting weights, and their element-wise average is the model.

Why: runs that differ only in data order and dropout land in one basin, and their average is right more often on
real customer text than either run (docs/model-and-training.md). Every ingredient is an ordinary ``train()`` run
in ``<run>/ingredient<i>/`` (its own checkpoints, resumable); a continued run reuses the finished ones.
``trainer.wise_alpha`` is applied in each ingredient: the interpolation is linear and every ingredient starts
from the same encoder, so the average of interpolated ingredients is the interpolated average.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from kefu_triage.core.taxonomy import taxonomy_from_config
from kefu_triage.data.records import load_split_records
from kefu_triage.model.multitask import load_model


def check_soup_seeds(seeds: Any) -> list[int]:
    values = list(seeds or [])
    if any(isinstance(s, bool) or not isinstance(s, int) for s in values) or len(set(values)) != len(values):
        raise ValueError(
            f"trainer.soup_seeds must be distinct integers (two or more = a soup), got {values!r}"
        )
    return values


def average_models(model_dirs: list[Path]):
    """``(model, tokenizer)``: the element-wise mean of the weights of models with one architecture."""
    models = [load_model(d) for d in model_dirs]
    states = [m.state_dict() for m, _ in models]
    for d, state in zip(model_dirs[1:], states[1:], strict=True):
        if state.keys() != states[0].keys() or any(state[k].shape != v.shape for k, v in states[0].items()):
            raise ValueError(f"{d}: its weights do not match {model_dirs[0]}; a soup needs one architecture")
    soup, tokenizer = copy.deepcopy(models[0][0]), models[0][1]
    with torch.no_grad():
        soup.load_state_dict(
            {
                k: sum(s[k] for s in states) / len(states) if v.is_floating_point() else v
                for k, v in states[0].items()
            }
        )
    return soup, tokenizer


def soup_train(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Train one ingredient per seed, average them into ``run_dir/model`` and publish it; the summary of the
    first ingredient with ``soup`` (per-ingredient dev figures and the soup's)."""
    from kefu_triage.train.loop import (
        continued_run_dir,
        finalize_model_dir,
        published_dev,
        save_and_score,
        train_part,
    )

    run_dir = Path(run_dir)
    t = cfg.trainer
    seeds = check_soup_seeds(t.get("soup_seeds"))
    base = continued_run_dir(cfg, run_dir, "ingredient0")
    summaries = []
    for i, seed in enumerate(seeds):
        updates = {
            "trainer.soup_seeds": [],
            "trainer.seed": seed,
            "trainer.init_seed": seeds[0],  # one start for every ingredient
        }
        print(f"model soup: ingredient {i + 1}/{len(seeds)} (trainer.seed={seed})")
        summaries.append(train_part(cfg, base / f"ingredient{i}", updates))

    taxonomy = taxonomy_from_config(cfg.taxonomy)
    splits = load_split_records(cfg.data, taxonomy)
    soup, tokenizer = average_models([base / f"ingredient{i}" / "model" for i in range(len(seeds))])
    weights_dir = run_dir / "soup"
    score_weights = OmegaConf.to_container(t.selection_weights)
    dev = save_and_score(
        soup, tokenizer, weights_dir, splits["dev"], taxonomy, score_weights, t.eval_batch_size
    )
    figures = [{"seed": s, "dev": published_dev(x)} for s, x in zip(seeds, summaries, strict=True)]
    summary = {**summaries[0], "soup": {"seeds": seeds, "ingredients": figures, "dev": dev}}
    print(
        "model soup of "
        + ", ".join(f"seed {s}" for s in seeds)
        + ": "
        + " ".join(f"dev_{k}={v:.4f}" for k, v in dev.items())
    )
    log = (base / "ingredient0" / "model" / "train_log.jsonl").read_text(encoding="utf-8").splitlines()
    state = {"history": [json.loads(line) for line in log if line]}  # the first ingredient's epochs
    finalize_model_dir(
        cfg, run_dir, taxonomy, splits, state, summary, t.get("publish_dir"), weights_dir=weights_dir
    )
    if not t.get("keep_checkpoint", False):
        shutil.rmtree(weights_dir, ignore_errors=True)
    return summary
