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

import itertools
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

from kefu_triage.core.policy import Thresholds, TriagePolicy


@dataclass(frozen=True)
class Gold:
    """Gold labels of N messages, aligned with the head outputs."""

    intent: np.ndarray  # int ids
    urgent: np.ndarray  # 0/1
    refund: np.ndarray  # 0/1, -1 where undefined
    intent_routes: np.ndarray  # route of every intent id (object array)

    @classmethod
    def from_records(cls, records: list[dict[str, Any]], taxonomy) -> Gold:
        return cls(
            intent=np.array([taxonomy.intent_id(r["intent"]) for r in records], dtype=int),
            urgent=np.array([int(r["urgent"]) for r in records], dtype=int),
            refund=np.array([-1 if r["refund_recoverable"] is None else int(r["refund_recoverable"]) for r in records]),
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
def intent_metrics(gold: np.ndarray, probs: np.ndarray, labels: list[str]) -> dict[str, Any]:
    pred = probs.argmax(axis=1)
    ids = list(range(len(labels)))
    p, r, f, s = precision_recall_fscore_support(gold, pred, labels=ids, zero_division=0)
    return {
        "accuracy": float(accuracy_score(gold, pred)),
        "macro_f1": float(f1_score(gold, pred, labels=ids, average="macro", zero_division=0)),
        "per_class": {labels[i]: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
                      for i in ids},
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
def triage_metrics(route_human: np.ndarray, pred_intent: np.ndarray, gold: Gold,
                   traffic: dict[str, float] | None = None) -> dict[str, float]:
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
        "recoverable_capture": float(route_human[gold.recoverable].mean()) if gold.recoverable.any() else float("nan"),
        "human_needed_recall": float(route_human[gold.should_reach_human].mean()) if gold.should_reach_human.any() else float("nan"),
    }
    if traffic:
        per_hour = float(traffic["messages_per_hour"]) * out["human_share"]
        agents = per_hour * float(traffic["handling_time_seconds"]) / 3600.0 / float(traffic.get("agent_occupancy", 1.0))
        out["human_messages_per_hour"] = per_hour
        out["agents_needed"] = agents
    return out


def decide(probs: dict[str, np.ndarray], intent_routes: list[str], thresholds: Thresholds):
    return TriagePolicy(intent_routes, thresholds).decide(probs["intent"], probs["urgent"], probs["refund_recoverable"])


def risk_coverage_curve(probs: dict[str, np.ndarray], gold: Gold, intent_routes: list[str], thresholds: Thresholds,
                        points: int = 101) -> dict[str, Any]:
    """Coverage and risk as the confidence threshold sweeps 0..1 (other thresholds fixed); AURC and
    coverage at risk 2/5/10%."""
    curve = {"threshold": [], "coverage": [], "risk": []}
    for tau in np.linspace(0.0, 1.0, points):
        d = decide(probs, intent_routes, Thresholds(**{**thresholds.to_dict(), "confidence": float(tau)}))
        m = triage_metrics(d.to_human, d.intent_id, gold)
        curve["threshold"].append(float(tau))
        curve["coverage"].append(m["coverage"])
        curve["risk"].append(m["risk"])
    cov, risk = np.array(curve["coverage"]), np.array(curve["risk"])
    order = np.argsort(cov)
    c_sorted, r_sorted = cov[order], risk[order]
    # area under the risk-coverage curve over the coverage range reached (trapezoid), normalised by it
    span = c_sorted[-1] - c_sorted[0]
    aurc = float(np.trapezoid(r_sorted, c_sorted) / span) if span > 0 else float(r_sorted.mean())
    at = {f"coverage_at_risk_{int(x * 100)}": float(cov[risk <= x].max()) if (risk <= x).any() else 0.0
          for x in (0.02, 0.05, 0.10)}
    return {"curve": curve, "aurc": aurc, **at}


def tune_thresholds(probs: dict[str, np.ndarray], gold: Gold, intent_routes: list[str], operating_point: dict[str, float],
                    margin: float = 0.0, grid: int = 21) -> dict[str, Any]:
    """Grid search on dev: maximise coverage s.t. risk <= max_bot_risk, urgent recall >= min_urgent_recall,
    recoverable capture >= min_recoverable_capture. When no point meets all, the one with the smallest total
    shortfall (then the largest coverage) is returned with ``constraints_met: False`` and the shortfalls."""
    max_risk = float(operating_point["max_bot_risk"])
    min_urgent = float(operating_point["min_urgent_recall"])
    min_capture = float(operating_point["min_recoverable_capture"])
    qs = np.linspace(0, 1, grid)

    def candidates(values: np.ndarray) -> np.ndarray:
        vals = np.unique(np.concatenate([np.quantile(values, qs) if len(values) else [], [0.5]]))
        return np.clip(vals, 0.0, 1.0)

    refund_rows = probs["refund_recoverable"][gold.refund >= 0]
    intent_p = probs["intent"]
    top2 = -np.sort(-intent_p, axis=1)[:, :2] if intent_p.shape[1] > 1 else np.hstack([intent_p, np.zeros_like(intent_p)])
    top1, margin_ok = top2[:, 0], (top2[:, 0] - top2[:, 1]) >= margin
    pred = intent_p.argmax(axis=1)
    pred_route = np.asarray(intent_routes, dtype=object)[pred]
    error = gold.should_reach_human | (pred != gold.intent)  # wrong if the bot takes it
    urgent, recoverable = gold.urgent == 1, gold.recoverable
    conf_grid = candidates(top1)
    best, best_key = None, None
    # For fixed urgent/recoverable thresholds, a message goes to the bot iff no rule forces it to a human and
    # its top intent probability clears τ_conf: sweep all τ_conf at once as a [C, N] matrix.
    for tu, tr in itertools.product(candidates(probs["urgent"]), candidates(refund_rows)):
        forced = (probs["urgent"] >= tu) | (pred_route == "human") | (
            (pred_route == "refund_triage") & (np.nan_to_num(probs["refund_recoverable"]) >= tr))
        bot = (~forced & margin_ok)[None, :] & (top1[None, :] >= conf_grid[:, None])
        n_bot = bot.sum(1)
        coverage = n_bot / max(len(gold), 1)
        risk = np.where(n_bot > 0, (bot & error).sum(1) / np.maximum(n_bot, 1), 0.0)
        urgent_recall = 1 - (bot & urgent).sum(1) / urgent.sum() if urgent.any() else np.ones(len(conf_grid))
        capture = 1 - (bot & recoverable).sum(1) / recoverable.sum() if recoverable.any() else np.ones(len(conf_grid))
        shortfall = (np.maximum(0, risk - max_risk) + np.maximum(0, min_urgent - urgent_recall)
                     + np.maximum(0, min_capture - capture)).round(6)
        i = int(np.lexsort((-coverage, shortfall))[0])
        key = (float(shortfall[i]), -float(coverage[i]))
        if best_key is None or key < best_key:
            th = Thresholds(urgent=float(tu), recoverable=float(tr), confidence=float(conf_grid[i]), margin=margin)
            d = decide(probs, intent_routes, th)
            best_key, best = key, {"thresholds": th, "dev_metrics": triage_metrics(d.to_human, d.intent_id, gold),
                                   "shortfall": {"risk": max(0.0, float(risk[i]) - max_risk),
                                                 "urgent_recall": max(0.0, min_urgent - float(urgent_recall[i])),
                                                 "recoverable_capture": max(0.0, min_capture - float(capture[i]))}}
    assert best is not None
    best["constraints_met"] = best_key[0] == 0
    return best
