"""Metrics of the three heads and of the triage decision, and threshold tuning for an operating point.

Standard metrics come from scikit-learn (``evaluate.load`` fetches metric scripts from the hub, which is
unreachable offline). Triage metrics are resolution-rate proxies:

- coverage: share of messages the bot takes (containment proxy); human share = 1 - coverage;
- risk: share of bot-routed messages that should not have gone to the bot (gold route human, gold urgent,
  or gold recoverable refund) or whose predicted intent is wrong;
- bot-resolved share = coverage x (1 - risk);
- urgent recall: share of gold-urgent messages routed to a human;
- recoverable capture: share of gold recoverable refunds routed to a human (the retention desk).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    precision_score,
    recall_score,
    roc_auc_score,
)


@dataclass(frozen=True)
class Gold:
    """Gold labels of N messages, aligned with the head outputs."""

    intent: np.ndarray  # int ids
    urgent: np.ndarray  # 0/1, -1 where unknown (partial labels: that head skips the row)
    refund: np.ndarray  # 0/1, -1 where undefined or unknown
    intent_routes: np.ndarray  # route of every intent id (object array)

    @classmethod
    def from_records(cls, records: list[dict[str, Any]], taxonomy) -> Gold:
        return cls(
            intent=np.array([taxonomy.intent_id(r["intent"]) for r in records], dtype=int),
            urgent=np.array(
                [-1 if r.get("urgent") is None else int(r["urgent"]) for r in records], dtype=int
            ),
            refund=np.array(
                [
                    -1 if r.get("refund_recoverable") is None else int(r["refund_recoverable"])
                    for r in records
                ],
                dtype=int,
            ),
            intent_routes=np.asarray(taxonomy.routes, dtype=object),
        )

    def __len__(self) -> int:
        return len(self.intent)

    @property
    def should_reach_human(self) -> np.ndarray:
        return (self.intent_routes[self.intent] == "human") | (self.urgent == 1) | (self.refund == 1)

    @property
    def recoverable(self) -> np.ndarray:
        return self.refund == 1


# ---------------------------------------------------------------------------------------------------
# Heads
# ---------------------------------------------------------------------------------------------------
def macro_f1(gold: np.ndarray, pred: np.ndarray, num_labels: int) -> float:
    """Intent macro-F1 over every label of the contract (a label absent from both counts as 0)."""
    return float(f1_score(gold, pred, labels=list(range(num_labels)), average="macro", zero_division=0))


def intent_metrics(gold: np.ndarray, probs: np.ndarray, labels: list[str]) -> dict[str, Any]:
    pred = probs.argmax(axis=1)
    ids = list(range(len(labels)))
    p, r, f, s = precision_recall_fscore_support(gold, pred, labels=ids, zero_division=0)
    return {
        "accuracy": float(accuracy_score(gold, pred)),
        "macro_f1": macro_f1(gold, pred, len(labels)),
        "per_class": {
            labels[i]: {
                "precision": float(p[i]),
                "recall": float(r[i]),
                "f1": float(f[i]),
                "support": int(s[i]),
            }
            for i in ids
        },
        "confusion_matrix": confusion_matrix(gold, pred, labels=ids).tolist(),
    }


def binary_metrics(gold: np.ndarray, prob: np.ndarray, threshold: float) -> dict[str, float]:
    gold, prob = np.asarray(gold).astype(int), np.asarray(prob, dtype=float)
    pred = (prob >= threshold).astype(int)
    two = len(np.unique(gold)) == 2
    return {
        "roc_auc": float(roc_auc_score(gold, prob)) if two else float("nan"),
        "pr_auc": float(average_precision_score(gold, prob)) if two else float("nan"),
        "threshold": float(threshold),
        "precision": float(precision_score(gold, pred, zero_division=0)),
        "recall": float(recall_score(gold, pred, zero_division=0)),
        "f1": float(f1_score(gold, pred, zero_division=0)),
        "accuracy": float((gold == pred).mean()) if len(gold) else float("nan"),
        "positives": int(gold.sum()),
        "n": int(len(gold)),
    }


# ---------------------------------------------------------------------------------------------------
# Triage
# ---------------------------------------------------------------------------------------------------
def triage_metrics(
    route_human: np.ndarray, pred_intent: np.ndarray, gold: Gold, traffic: dict[str, float] | None = None
) -> dict[str, float]:
    n = len(gold)
    bot = ~route_human
    bot_error = bot & (gold.should_reach_human | (pred_intent != gold.intent))
    coverage = float(bot.mean()) if n else 0.0
    risk = float(bot_error.sum() / bot.sum()) if bot.any() else 0.0
    urgent = gold.urgent == 1
    out = {
        "coverage": coverage,
        "risk": risk,
        "bot_resolved_share": coverage * (1 - risk),
        "human_share": 1 - coverage,
        "urgent_recall": float(route_human[urgent].mean()) if urgent.any() else float("nan"),
        "recoverable_capture": float(route_human[gold.recoverable].mean())
        if gold.recoverable.any()
        else float("nan"),
        "human_needed_recall": float(route_human[gold.should_reach_human].mean())
        if gold.should_reach_human.any()
        else float("nan"),
    }
    if traffic:
        per_hour = float(traffic["messages_per_hour"]) * out["human_share"]
        agents = (
            per_hour
            * float(traffic["handling_time_seconds"])
            / 3600.0
            / float(traffic.get("agent_occupancy", 1.0))
        )
        out["human_messages_per_hour"] = per_hour
        out["agents_needed"] = agents
    return out


def dev_metrics(
    logits: dict[str, np.ndarray], records: list[dict[str, Any]], taxonomy, weights: dict[str, float]
) -> dict[str, float]:
    """The per-epoch dev figures of training (raw logits, threshold 0) and their weighted ``score``."""
    intent_true = np.array([taxonomy.intent_id(r["intent"]) for r in records])
    intent_pred = logits["intent_logits"].argmax(1)
    urgent_known = np.array([r.get("urgent") is not None for r in records], dtype=bool)  # partial labels
    urgent_true = np.array([r["urgent"] for r in records], dtype=object)[urgent_known].astype(int)
    urgent_pred = (logits["urgent_logit"][urgent_known] > 0).astype(int)
    refund_mask = np.array([r["refund_recoverable"] is not None for r in records])
    m = {
        "intent_accuracy": float((intent_true == intent_pred).mean()),
        "intent_macro_f1": macro_f1(intent_true, intent_pred, taxonomy.num_intents),
        "urgent_f1": float(f1_score(urgent_true, urgent_pred, zero_division=0)),
        "urgent_auc": float(roc_auc_score(urgent_true, logits["urgent_logit"][urgent_known]))
        if len(set(urgent_true)) > 1
        else 0.5,
    }
    if refund_mask.any():
        rt = np.array([r["refund_recoverable"] for r in records])[refund_mask].astype(int)
        rl = logits["refund_recoverable_logit"][refund_mask]
        m["refund_f1"] = float(f1_score(rt, (rl > 0).astype(int), zero_division=0))
        m["refund_auc"] = float(roc_auc_score(rt, rl)) if len(set(rt)) > 1 else 0.5
    else:
        m["refund_f1"] = m["refund_auc"] = 0.0
    total = sum(weights.values())
    m["score"] = float(sum(w * m[k] for k, w in weights.items()) / total)
    return m


# ---------------------------------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------------------------------
def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, n_bins: int = 15) -> float:
    """ECE with equal-width bins: sum over bins of |accuracy - mean confidence| weighted by bin size."""
    confidence, correct = np.asarray(confidence, dtype=float), np.asarray(correct, dtype=float)
    if not len(confidence):
        return 0.0
    bins = np.minimum((confidence * n_bins).astype(int), n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        m = bins == b
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - confidence[m].mean())
    return float(ece)


def reliability_curve(
    confidence: np.ndarray, correct: np.ndarray, n_bins: int = 10
) -> dict[str, list[float]]:
    confidence, correct = np.asarray(confidence, dtype=float), np.asarray(correct, dtype=float)
    bins = np.minimum((confidence * n_bins).astype(int), n_bins - 1)
    out: dict[str, list[float]] = {"confidence": [], "accuracy": [], "count": []}
    for b in range(n_bins):
        m = bins == b
        if m.any():
            out["confidence"].append(float(confidence[m].mean()))
            out["accuracy"].append(float(correct[m].mean()))
            out["count"].append(int(m.sum()))
    return out


def head_confidence(head: str, probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(confidence of the predicted class, whether it is right) for ECE and reliability diagrams."""
    if head == "intent":
        return probs.max(axis=1), (probs.argmax(axis=1) == labels)
    pred = probs >= 0.5
    return np.where(pred, probs, 1 - probs), (pred == (labels == 1))
