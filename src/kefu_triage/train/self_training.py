"""Self-training on your own unlabelled turns: the fine-tuned model labels them, the confident and
consistent labels join the labelled data, and a model is trained again (``adapt.self_training.rounds``).

    python -m kefu_triage.train adapt.unlabeled_file=/data/turns.jsonl adapt.self_training.rounds=1

Round 0 is the ordinary training (with domain-adaptive pretraining when ``adapt.mlm`` is on: every round
fine-tunes from the same cached adapted encoder). Round r (1..rounds) takes the model of round r-1 as the
teacher and, for every unlabelled turn:

- scores it once in eval mode (the teacher's answer) and ``mc_passes`` times with dropout on (MC dropout);
- keeps it when at least ``min_agreement`` of the passes pick the same intent and the mean intent probability
  of the teacher's answer across the dropout passes (its soft label) ranks in the top ``keep_fraction`` of
  the pool (and is >= ``confidence`` when that is set). A rank rather than a fixed probability by default:
  the fine-tuned model's probabilities on real turns are far from calibrated (the default model's top
  intent probability stays below 0.7 on real JD turns, so a 0.9 threshold kept nothing);
- labels it with that intent; urgent and refund_recoverable only where the teacher is ``binary_confidence``
  sure (else unknown, which the loss masks); the soft label (top probabilities) is kept in the file for
  inspection, training uses the hard label (the filter leaves only near-one-hot soft labels).

The student trains from the (adapted) encoder on labelled + pseudo-labelled turns; per-round figures (kept
count, intent distribution of the kept turns, dev metrics) go to ``self_training.jsonl`` in the run and in
the model directory. The last round's model is the result (``run_dir/model``, published like any training).
Turns whose text is in ``adapt.exclude_files`` or in the data's dev/test/eval splits are never labelled.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from kefu_triage.core.fileio import atomic_directory, atomic_write_jsonl, atomic_write_text
from kefu_triage.core.taxonomy import Taxonomy, taxonomy_from_config
from kefu_triage.data.records import load_split_records
from kefu_triage.model.multitask import length_ordered_batches, load_model
from kefu_triage.train.adapt import AdaptationError, adapt_settings, load_unlabeled
from kefu_triage.train.loop import autocast, trainer_precision

LOG_FILE = "self_training.jsonl"
DEFAULTS = {
    "rounds": 0,
    "confidence": None,
    "keep_fraction": 0.3,
    "mc_passes": 5,
    "min_agreement": 1.0,
    "binary_confidence": 0.9,
    "max_per_intent": None,
    "batch_size": 64,
}


def _settings(cfg: DictConfig) -> dict[str, Any]:
    st = {**DEFAULTS, **(adapt_settings(cfg).get("self_training") or {})}
    if not isinstance(st["rounds"], int) or st["rounds"] < 0:
        raise AdaptationError(
            f"adapt.self_training.rounds must be 0 or a positive integer, got {st['rounds']!r}"
        )
    if not isinstance(st["mc_passes"], int) or st["mc_passes"] < 1:
        raise AdaptationError(f"adapt.self_training.mc_passes must be >= 1, got {st['mc_passes']!r}")
    for name in ("confidence", "min_agreement", "binary_confidence"):
        if st[name] is not None and not 0 <= float(st[name]) <= 1:
            raise AdaptationError(f"adapt.self_training.{name} must be in [0, 1], got {st[name]!r}")
    if st["keep_fraction"] is not None and not 0 < float(st["keep_fraction"]) <= 1:
        raise AdaptationError(
            f"adapt.self_training.keep_fraction must be in (0, 1], got {st['keep_fraction']!r}"
        )
    if st["confidence"] is None and st["keep_fraction"] is None:
        raise AdaptationError("adapt.self_training: set confidence, keep_fraction or both")
    return st


@torch.no_grad()
def mc_probabilities(
    model,
    tokenizer,
    records: list[dict[str, Any]],
    passes: int,
    batch_size: int = 64,
    seed: int = 0,
    progress: str | None = None,
    precision: str = "no",
) -> dict[str, np.ndarray]:
    """Eval-mode probabilities and ``passes`` dropout-on passes: {"intent": [N, C], "urgent": [N],
    "refund": [N], "mc_intent": [passes, N, C]} (deterministic for a seed); ``progress`` labels a bar;
    ``precision`` "bf16"/"fp16" runs the passes under autocast (half the time on a CPU with native bf16)."""
    det = {"intent": [], "urgent": [], "refund": []}
    mc: list[list[np.ndarray]] = [[] for _ in range(passes)]
    inverse, batches = length_ordered_batches(model, tokenizer, records, batch_size, progress)
    device_type = next(model.parameters()).device.type
    with torch.random.fork_rng(devices=[]), autocast(precision, device_type):
        torch.manual_seed(int(seed))
        for batch in batches:
            model.eval()
            out = model(**batch)
            det["intent"].append(torch.softmax(out.intent_logits.float(), -1).cpu().numpy())
            det["urgent"].append(torch.sigmoid(out.urgent_logit.float()).cpu().numpy())
            det["refund"].append(torch.sigmoid(out.refund_recoverable_logit.float()).cpu().numpy())
            model.train()  # dropout on: the consistency check
            for p in range(passes):
                mc[p].append(torch.softmax(model(**batch).intent_logits.float(), -1).cpu().numpy())
    model.eval()
    result = {k: np.concatenate(v)[inverse] for k, v in det.items()}
    result["mc_intent"] = np.stack([np.concatenate(m)[inverse] for m in mc])
    return result


def select_pseudo_labels(
    probs: dict[str, np.ndarray],
    records: list[dict[str, Any]],
    taxonomy: Taxonomy,
    st: dict[str, Any],
    round_no: int,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The confident, consistent turns as labelled records, and the round's figures."""
    top = probs["intent"].argmax(1)
    mean = probs["mc_intent"].mean(0)
    confidence = mean[np.arange(len(top)), top]
    agreement = (probs["mc_intent"].argmax(2) == top[None, :]).mean(0)
    threshold = st.get("confidence")
    confident = confidence >= float(threshold) if threshold is not None else np.ones(len(top), bool)
    keep = np.flatnonzero(confident & (agreement >= float(st["min_agreement"]) - 1e-9))
    if st.get("keep_fraction") is not None:  # the most confident share of the whole pool, at most
        room = int(np.ceil(float(st["keep_fraction"]) * len(top)))
        keep = np.sort(keep[np.argsort(-confidence[keep], kind="stable")][:room])
    if st.get("max_per_intent"):
        capped = []
        for c in np.unique(top[keep]):
            members = keep[top[keep] == c]
            capped.extend(
                members[np.argsort(-confidence[members], kind="stable")][: int(st["max_per_intent"])]
            )
        keep = np.array(sorted(capped), dtype=int)
    bc = float(st["binary_confidence"])

    def binary(p: float) -> int | None:
        return 1 if p >= bc else 0 if p <= 1 - bc else None  # unsure: unknown, the loss masks it

    rows = []
    names = taxonomy.intent_names
    for i in keep:
        intent = names[int(top[i])]
        refund = binary(float(probs["refund"][i])) if taxonomy.route_of(intent) == "refund_triage" else None
        best = np.argsort(-mean[i])[:3]
        rows.append(
            {
                "text": records[i]["text"],
                "context": records[i].get("context") or [],
                "intent": intent,
                "urgent": binary(float(probs["urgent"][i])),
                "refund_recoverable": refund,
                "pseudo_label": {
                    "round": round_no,
                    "confidence": round(float(confidence[i]), 4),
                    "agreement": round(float(agreement[i]), 3),
                    "soft": {names[int(c)]: round(float(mean[i][c]), 4) for c in best},
                },
            }
        )
    figures = {
        "round": round_no,
        "pool": len(records),
        "kept": len(rows),
        "kept_fraction": round(len(rows) / max(len(records), 1), 4),
        "passed_confidence": int(confident.sum()),
        "confidence_quantiles": {
            q: round(float(np.quantile(confidence, float(q))), 4) for q in ("0.5", "0.9", "0.99")
        }
        if len(confidence)
        else None,
        "passed_agreement": int((agreement >= float(st["min_agreement"]) - 1e-9).sum()),
        "mean_confidence_kept": round(float(confidence[keep].mean()), 4) if len(keep) else None,
        "urgent_labelled": sum(r["urgent"] is not None for r in rows),
        "intents": dict(Counter(r["intent"] for r in rows).most_common()),
    }
    return rows, figures


def self_train(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Round 0 = ordinary training, then ``rounds`` rounds of pseudo-labelling + retraining; the summary of
    the last round with ``self_training`` (the per-round figures)."""
    from kefu_triage.train.loop import continued_run_dir, train_part

    run_dir = Path(run_dir)
    st = _settings(cfg)
    adapt = adapt_settings(cfg)
    if not adapt.get("unlabeled_file"):
        raise AdaptationError(
            "adapt.self_training.rounds > 0 needs adapt.unlabeled_file (the turns to pseudo-label)"
        )
    taxonomy = taxonomy_from_config(cfg.taxonomy)
    splits = load_split_records(cfg.data, taxonomy)
    pool, pool_report = load_unlabeled(adapt, [r for s in ("dev", "test", "eval") for r in splits.get(s, [])])
    base = continued_run_dir(cfg, run_dir, "round0")
    history: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    for r in range(st["rounds"] + 1):
        rd = base / f"round{r}"
        updates: dict[str, Any] = {}
        figures: dict[str, Any] = {"round": r, "pool": len(pool), "kept": 0, "pool_report": pool_report}
        if r > 0:
            teacher, tokenizer = load_model(base / f"round{r - 1}" / "model")
            probs = mc_probabilities(
                teacher,
                tokenizer,
                pool,
                int(st["mc_passes"]),
                int(st["batch_size"]),
                seed=int(cfg.trainer.seed) + r,
                precision=trainer_precision(cfg),
                progress=f"round {r}: pseudo-labelling ({1 + int(st['mc_passes'])} passes)"
                if cfg.trainer.get("progress_bar", True)
                else None,
            )
            pseudo, figures = select_pseudo_labels(probs, pool, taxonomy, st, r)
            del teacher
            if not pseudo:  # another training on the labelled data alone would only cost time
                loosen = [
                    f"adapt.self_training.{name} (now {st[name]})"
                    for name in ("confidence", "min_agreement")
                    if st.get(name)
                ]
                raise AdaptationError(
                    f"self-training round {r}: no unlabelled turn passed the filter (confidence "
                    f"{st['confidence']}, min_agreement {st['min_agreement']}, keep_fraction "
                    f"{st.get('keep_fraction')}); the teacher's confidence quantiles on the pool are "
                    f"{figures['confidence_quantiles']}: lower {' or '.join(loosen) or 'nothing (no filter set)'}"
                    + ("" if st.get("keep_fraction") else ", or set keep_fraction")
                )
            train_file = rd / "train_with_pseudo_labels.jsonl"
            atomic_write_jsonl(train_file, [*splits["train"], *pseudo])
            updates.update({"data.train_file": str(train_file), "data.max_train_examples": None})
        summary = train_part(cfg, rd, {"adapt.self_training.rounds": 0, **updates})
        figures.update(
            {k: v for k, v in summary["best_dev"].items() if k.startswith("dev_")},
            best_epoch=summary["best_epoch"],
            train_seconds=summary["train_seconds"],
        )
        history.append(figures)
        print(
            "self-training "
            + " ".join(
                f"{k}={v}"
                for k, v in figures.items()
                if k not in ("intents", "pool_report")
                and not k.startswith("dev_")
                or k in ("dev_intent_accuracy", "dev_score")
            )
        )
        if r > 0:
            print(f"self-training round {r} kept intents: {figures['intents']}")
        atomic_write_text(
            run_dir / LOG_FILE, "".join(json.dumps(h, ensure_ascii=False) + "\n" for h in history)
        )

    final = base / f"round{st['rounds']}" / "model"
    with atomic_directory(run_dir / "model") as tmp:
        shutil.copytree(final, tmp, dirs_exist_ok=True)
        shutil.copy2(run_dir / LOG_FILE, tmp / LOG_FILE)
    publish = cfg.trainer.get("publish_dir")
    if publish:
        with atomic_directory(publish) as tmp:
            shutil.copytree(run_dir / "model", tmp, dirs_exist_ok=True)
        print(f"model published to {publish}")
    return {**summary, "self_training": history}
