"""Extra labelled sets (``eval.extra_sets``), e.g. the real customer turns in ``../shared/data/real``, measured
with the temperatures and policy each scorer got on synthetic dev, applied as-is (nothing is tuned on them).

Labels may be partial: a head without a label on a row skips that row (the counts say how many rows each
head had). Unknown urgent / refund labels count as 0 in the triage figures (bot risk, urgent recall), so on
an intent-only set the bot risk counts only wrong intents and human intents; route agreement is measured only
on rows whose gold route the labels decide.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig
from sklearn.metrics import f1_score, recall_score

from kefu_triage.core.heads import POOLED_OUTPUT, probabilities
from kefu_triage.core.inputs import clean_text
from kefu_triage.core.policy import REASONS, TriagePolicy
from kefu_triage.core.taxonomy import Taxonomy
from kefu_triage.data.records import read_examples
from kefu_triage.evaluate.metrics import (
    Gold,
    binary_metrics,
    expected_calibration_error,
    head_confidence,
    reliability_curve,
    triage_metrics,
)
from kefu_triage.evaluate.tuning import risk_coverage_curve, safety_metrics

TOP_CONFUSIONS = 10


def resolve_extra_sets(cfg: DictConfig) -> tuple[dict[str, Path], list[str], Path]:
    """(name -> file, names skipped because ``paths.shared_dir/data/real`` is absent, that folder).

    A set disabled with ``extra_sets.<name>=null`` is left out; a missing file anywhere else is an error."""
    real_dir = Path(cfg.paths.shared_dir) / "data" / "real"
    shared = Path(cfg.paths.shared_dir).resolve()
    sets: dict[str, Path] = {}
    skipped: list[str] = []
    for name, path in (cfg.get("extra_sets") or {}).items():
        if not path:
            continue
        path = Path(str(path))
        if path.is_file():
            sets[str(name)] = path
        elif path.resolve().is_relative_to(shared) and not real_dir.is_dir():
            skipped.append(str(name))  # CI and users' machines have no ../shared
        else:
            raise ValueError(f"eval: extra_sets.{name}: file not found: {path}")
    return sets, skipped, real_dir


def load_extra_set(name: str, path: Path, taxonomy: Taxonomy, cfg: DictConfig) -> list[dict[str, Any]]:
    records = read_examples(path, taxonomy, drop_invalid=bool(cfg.data.get("drop_invalid") or False))
    limit = cfg.get("extra_sets_max_rows")
    return records[: int(limit)] if limit else records


def gold_route_known(gold: Gold) -> np.ndarray:
    """Rows whose gold route (bot / human) the labels decide: a human intent or urgent=1 decides alone;
    otherwise urgent must be known, and on a refund_triage intent the refund label too."""
    route = gold.intent_routes[gold.intent]
    settled_human = (route == "human") | (gold.urgent == 1) | (gold.refund == 1)
    return settled_human | ((gold.urgent == 0) & ((route != "refund_triage") | (gold.refund == 0)))


def top_confusions(
    gold: np.ndarray, pred: np.ndarray, names: list[str], k: int = TOP_CONFUSIONS
) -> list[dict[str, Any]]:
    """The k most frequent (gold, predicted) pairs among the mistakes."""
    pairs = Counter((int(g), int(p)) for g, p in zip(gold, pred, strict=True) if g != p)
    return [{"gold": names[g], "pred": names[p], "count": n} for (g, p), n in pairs.most_common(k)]


def set_metrics(
    probs: dict[str, np.ndarray], gold: Gold, records: list[dict[str, Any]], taxonomy: Taxonomy, thresholds
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metrics of one scorer on one set, curves for the plots). ``probs`` are temperature-scaled already."""
    names = taxonomy.intent_names
    pred = probs["intent"].argmax(axis=1)
    correct = pred == gold.intent
    present = sorted(set(gold.intent.tolist()))  # macro-F1 over the intents the set has (silver lacks some)
    recall = recall_score(gold.intent, pred, labels=present, average=None, zero_division=0)
    support = Counter(gold.intent.tolist())
    confidence = probs["intent"].max(axis=1)
    intent = {
        "accuracy": float(correct.mean()),
        "macro_f1": float(f1_score(gold.intent, pred, labels=present, average="macro", zero_division=0)),
        "intents_present": len(present),
        "per_intent_recall": {
            names[i]: {"recall": float(r), "support": int(support[i])}
            for i, r in zip(present, recall, strict=True)
        },
        "top_confusions": top_confusions(gold.intent, pred, names),
        "mean_confidence": float(confidence.mean()),
        "confidence_minus_accuracy": float(confidence.mean() - correct.mean()),
    }
    difficulty = [r.get("difficulty") for r in records]
    by_difficulty = {
        str(level): {
            "accuracy": float(correct[[d == level for d in difficulty]].mean()),
            "n": int(sum(d == level for d in difficulty)),
        }
        for level in sorted({d for d in difficulty if d is not None}, key=str)
    }
    out: dict[str, Any] = {"intent": intent, "by_difficulty": by_difficulty}
    conf, ok = head_confidence("intent", probs["intent"], gold.intent)
    calibration = {"intent_ece": expected_calibration_error(conf, ok)}
    reliability = {"intent": reliability_curve(conf, ok)}
    for head, labels, threshold in (
        ("urgent", gold.urgent, thresholds.urgent),
        ("refund_recoverable", gold.refund, thresholds.recoverable),
    ):
        known = labels >= 0
        out[head] = binary_metrics(labels[known], probs[head][known], threshold) if known.any() else {"n": 0}
        if known.any():
            conf, ok = head_confidence(head, probs[head][known], labels[known])
            calibration[f"{head}_ece"] = expected_calibration_error(conf, ok)
    out["calibration"] = calibration
    d = TriagePolicy(taxonomy.routes, thresholds).decide_heads(probs)
    rc = risk_coverage_curve(probs, gold, taxonomy.routes, thresholds)
    routed = gold_route_known(gold)
    out["triage"] = {
        **triage_metrics(d.to_human, d.intent_id, gold),
        "route_agreement": float((d.to_human[routed] == gold.should_reach_human[routed]).mean())
        if routed.any()
        else float("nan"),
        "route_rows": int(routed.sum()),
        "aurc": rc["aurc"],
        **{k: v for k, v in rc.items() if k.startswith("coverage_at_risk")},
    }
    out["reasons"] = {r: int((d.reason == r).sum()) for r in REASONS}
    safety = safety_metrics(probs, gold, taxonomy.routes, thresholds)  # confidence vs novelty vs both
    out["safety"] = {k: {f: v for f, v in m.items() if f != "curve"} for k, m in safety.items()}
    return out, {
        "curve": rc["curve"],
        "reliability": reliability,
        "operating": (out["triage"]["coverage"], out["triage"]["risk"]),
    }


def assess_extra_set(
    name: str,
    path: Path,
    records: list[dict[str, Any]],
    scored: list[tuple[dict[str, Any], dict]],
    taxonomy: Taxonomy,
    train_records: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """One extra set, every scorer. ``scored``: (assess() result of the scorer on synthetic dev/test, its logits
    on ``records``); the first is the model. Returns {"metrics": for metrics.json, "plots": curves}."""
    gold = Gold.from_records(records, taxonomy)
    metrics: dict[str, Any] = {
        "file": str(path),
        "rows": len(records),
        "labelled": {
            "intent": len(records),
            "urgent": int((gold.urgent >= 0).sum()),
            "refund_recoverable": int((gold.refund >= 0).sum()),
        },
        "difficulty": dict(Counter(str(r["difficulty"]) for r in records if r.get("difficulty") is not None)),
    }
    if train_records is not None:  # the set must stay unseen: count its texts that also occur in train
        train_texts = {clean_text(r["text"]) for r in train_records}
        metrics["texts_in_train"] = sum(clean_text(r["text"]) in train_texts for r in records)
    plots: dict[str, Any] = {}
    metrics["baselines"] = {}
    for i, (result, logits) in enumerate(scored):
        probs = probabilities(logits, result["temperatures"])
        if result.get("novelty") is not None and POOLED_OUTPUT in logits:
            probs["novelty"] = result["novelty"].score(logits[POOLED_OUTPUT])
        m, curves = set_metrics(probs, gold, records, taxonomy, result["thresholds"])
        if i == 0:
            metrics["model"] = m
        else:
            metrics["baselines"][result["name"]] = m
        plots[result["name"]] = curves
    return {"name": name, "metrics": metrics, "plots": plots}


def summary_line(name: str, m: dict[str, Any]) -> str:
    """One line per set for the console: the model, then the TF-IDF peer when present."""
    model = m["model"]
    parts = [
        f"{name} ({m['rows']} rows): intent acc {model['intent']['accuracy']:.3f} macro-F1 "
        f"{model['intent']['macro_f1']:.3f}"
    ]
    peer = m["baselines"].get("tfidf_lr")
    if peer:
        parts[0] += f" (tfidf_lr {peer['intent']['accuracy']:.3f} / {peer['intent']['macro_f1']:.3f})"
    hard = model["by_difficulty"].get("hard")
    if hard:
        parts.append(f"hard {hard['accuracy']:.3f}")
    if model["urgent"].get("n"):
        parts.append(f"urgent AUC {model['urgent']['roc_auc']:.3f}")
    t = model["triage"]
    parts.append(f"coverage {t['coverage']:.1%} risk {t['risk']:.1%}")
    parts.append(
        f"ECE {model['calibration']['intent_ece']:.3f}, confidence {model['intent']['mean_confidence']:.2f} "
        f"vs accuracy {model['intent']['accuracy']:.2f}"
    )
    return " | ".join(parts)
