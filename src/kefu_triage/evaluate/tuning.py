"""Choosing the policy's thresholds on dev: a risk-coverage curve and a grid search for an operating point.

Both run the policy's own rules (kefu_triage.core.policy.TriagePolicy.rules), so a tuned operating point
means the same thing in evaluation, export and the runtime.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

from kefu_triage.core.policy import Thresholds, TriagePolicy
from kefu_triage.evaluate.metrics import Gold, triage_metrics


def risk_coverage_curve(
    probs: dict[str, np.ndarray],
    gold: Gold,
    intent_routes: list[str],
    thresholds: Thresholds,
    points: int = 101,
) -> dict[str, Any]:
    """Coverage and risk as the confidence threshold sweeps 0..1 (other thresholds fixed); AURC and
    coverage at risk 2/5/10%."""
    curve = {"threshold": [], "coverage": [], "risk": []}
    for tau in np.linspace(0.0, 1.0, points):
        d = TriagePolicy(
            intent_routes, Thresholds(**{**thresholds.to_dict(), "confidence": float(tau)})
        ).decide_heads(probs)
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
    at = {
        f"coverage_at_risk_{int(x * 100)}": float(cov[risk <= x].max()) if (risk <= x).any() else 0.0
        for x in (0.02, 0.05, 0.10)
    }
    return {"curve": curve, "aurc": aurc, **at}


def tune_thresholds(
    probs: dict[str, np.ndarray],
    gold: Gold,
    intent_routes: list[str],
    operating_point: dict[str, float],
    margin: float = 0.0,
    grid: int = 21,
    novelty_grid: int = 11,
) -> dict[str, Any]:
    """Grid search on dev: maximise coverage s.t. risk <= max_bot_risk, urgent recall >= min_urgent_recall,
    recoverable capture >= min_recoverable_capture. Confidence, urgent and recoverable thresholds sweep
    ``grid`` quantiles each; when ``probs`` has ``"novelty"``, the novelty gate sweeps ``novelty_grid``
    values from "off" (1.0) down to the 50th percentile of held-out messages, jointly. When no point meets all,
    the one with the smallest total shortfall (then the largest coverage) is returned with
    ``constraints_met: False`` and the shortfalls. With ``urgent_first_slack`` > 0 in ``operating_point``, the
    point returned is, among those within that much coverage of the best, the one with the highest dev urgent
    recall (an urgent customer left to the bot is the worst error)."""
    max_risk = float(operating_point["max_bot_risk"])
    min_urgent = float(operating_point["min_urgent_recall"])
    min_capture = float(operating_point["min_recoverable_capture"])
    slack = operating_point.get("urgent_first_slack", 0.0)
    if isinstance(slack, bool) or not isinstance(slack, (int, float)) or not 0 <= slack <= 1:
        raise ValueError(
            f"policy.operating_point.urgent_first_slack must be a number in [0, 1], got {slack!r}"
        )
    qs = np.linspace(0, 1, grid)

    def candidates(values: np.ndarray) -> np.ndarray:
        vals = np.unique(np.concatenate([np.quantile(values, qs) if len(values) else [], [0.5]]))
        return np.clip(vals, 0.0, 1.0)

    novelty = probs.get("novelty")
    has_novelty = novelty is not None and np.isfinite(novelty).any()
    # novelty is a quantile of held-out in-domain messages: gating below its median would refuse ordinary text
    nov_grid = (
        np.unique(np.concatenate([[1.0], np.linspace(0.5, 1.0, novelty_grid)])) if has_novelty else np.ones(1)
    )
    refund_rows = probs["refund_recoverable"][gold.refund >= 0]
    base = TriagePolicy(intent_routes, Thresholds(margin=margin)).rules(
        probs["intent"], probs["urgent"], probs["refund_recoverable"], novelty
    )
    conf_grid = candidates(base.top1)
    # For fixed urgent/recoverable thresholds a message goes to the bot iff no rule forces it to a human, it is
    # not unfamiliar and its top intent probability clears τ_conf. Sorted by top1 once, every τ_conf is a
    # prefix: cumulative sums give all [novelty, confidence] points of one (τ_urgent, τ_recoverable) at once.
    order = np.argsort(-base.top1, kind="stable")
    prefix = len(order) - np.searchsorted(np.sort(base.top1), conf_grid, side="left")  # rows with top1 >= τ
    error = (gold.should_reach_human | (base.intent_id != gold.intent))[order]
    urgent, recoverable = (gold.urgent == 1)[order], gold.recoverable[order]
    familiar = ~(np.nan_to_num(base.novelty, nan=0.0)[order][None, :] > nov_grid[:, None])  # [V, N]
    n = max(len(gold), 1)

    def at_prefix(mask: np.ndarray) -> np.ndarray:  # [V, N] -> [V, C] counts among the first prefix rows
        csum = np.concatenate([np.zeros((mask.shape[0], 1)), np.cumsum(mask, axis=1)], axis=1)
        return csum[:, prefix]

    points = []  # per (τ_urgent, τ_recoverable): its best point
    for tu, tr in itertools.product(candidates(probs["urgent"]), candidates(refund_rows)):
        policy = TriagePolicy(
            intent_routes, Thresholds(urgent=float(tu), recoverable=float(tr), confidence=0.0, margin=margin)
        )
        rules = policy.rules(probs["intent"], probs["urgent"], probs["refund_recoverable"])
        bot = (~rules.forced_human & ~rules.unsure_margin)[order][None, :] & familiar
        n_bot = at_prefix(bot)
        coverage = n_bot / n
        risk = np.where(n_bot > 0, at_prefix(bot & error) / np.maximum(n_bot, 1), 0.0)
        urgent_recall = 1 - at_prefix(bot & urgent) / urgent.sum() if urgent.any() else np.ones_like(coverage)
        capture = (
            1 - at_prefix(bot & recoverable) / recoverable.sum()
            if recoverable.any()
            else np.ones_like(coverage)
        )
        shortfall = (
            np.maximum(0, risk - max_risk)
            + np.maximum(0, min_urgent - urgent_recall)
            + np.maximum(0, min_capture - capture)
        ).round(6)
        # smallest shortfall, then largest coverage, then the loosest novelty gate (largest τ_novelty)
        nov_rank = np.broadcast_to(-nov_grid[:, None], shortfall.shape)
        flat = int(np.lexsort((nov_rank.ravel(), -coverage.ravel(), shortfall.ravel()))[0])
        v, i = np.unravel_index(flat, shortfall.shape)
        points.append(
            (
                float(shortfall[v, i]),
                float(coverage[v, i]),
                float(urgent_recall[v, i]),
                float(risk[v, i]),
                float(capture[v, i]),
                Thresholds(
                    urgent=float(tu),
                    recoverable=float(tr),
                    confidence=float(conf_grid[i]),
                    margin=margin,
                    novelty=float(nov_grid[v]),
                ),
            )
        )
    # smallest shortfall, then the largest coverage; with urgent_first_slack > 0, among the points within that
    # much coverage of the largest, the one that escalates the most urgent messages (then the largest coverage)
    least = min(p[0] for p in points)
    feasible = [p for p in points if p[0] == least]
    top = max(p[1] for p in feasible)
    near = [p for p in feasible if p[1] >= top - slack - 1e-12]
    shortfall_v, _, recall_v, risk_v, capture_v, th = max(
        near, key=lambda p: (p[2], p[1]) if slack > 0 else (p[1],)
    )
    d = TriagePolicy(intent_routes, th).decide_heads(probs)
    best = {
        "thresholds": th,
        "dev_metrics": triage_metrics(d.to_human, d.intent_id, gold),
        "shortfall": {
            "risk": max(0.0, risk_v - max_risk),
            "urgent_recall": max(0.0, min_urgent - recall_v),
            "recoverable_capture": max(0.0, min_capture - capture_v),
        },
    }
    best["constraints_met"] = shortfall_v == 0
    return best


# ---------------------------------------------------------------------------------------------------
# Which score ranks the bot's mistakes: confidence, novelty, or both
# ---------------------------------------------------------------------------------------------------
TRUST_SCORES = ("confidence", "novelty", "combined")


def trust_scores(top1: np.ndarray, novelty: np.ndarray | None) -> dict[str, np.ndarray]:
    """Higher = safer for the bot. ``combined`` = min(top1, 1 - novelty): the policy's two gates moved together
    (τ_conf = λ, τ_novelty = 1 - λ), so its sweep is a path the runtime thresholds can express."""
    out = {"confidence": np.asarray(top1, dtype=np.float64)}
    if novelty is not None and np.isfinite(novelty).all():
        out["novelty"] = 1.0 - np.asarray(novelty, dtype=np.float64)
        out["combined"] = np.minimum(out["confidence"], out["novelty"])
    return out


def selective_curve(
    trust: np.ndarray, error: np.ndarray, eligible: np.ndarray, points: int = 101
) -> dict[str, Any]:
    """Risk-coverage of "the bot takes the eligible messages with trust >= τ" as τ falls: the curve (at
    ``points`` coverage steps), AURC (mean selective risk over every cutoff, Geifman & El-Yaniv) and coverage
    at risk 2/5/10%. Coverage is over all messages, risk over those the bot takes."""
    idx = np.flatnonzero(eligible)
    order = idx[np.argsort(-trust[idx], kind="stable")]
    k = np.arange(1, len(order) + 1)
    risk = np.cumsum(error[order]) / k if len(order) else np.zeros(0)
    coverage = k / max(len(trust), 1)
    pick = (
        np.unique(np.linspace(0, len(order) - 1, points).round().astype(int))
        if len(order)
        else np.zeros(0, int)
    )
    at = {
        f"coverage_at_risk_{int(x * 100)}": float(coverage[risk <= x].max()) if (risk <= x).any() else 0.0
        for x in (0.02, 0.05, 0.10)
    }
    return {
        "aurc": float(risk.mean()) if len(risk) else float("nan"),
        **at,
        "curve": {"coverage": coverage[pick].tolist(), "risk": risk[pick].tolist()},
    }


def safety_metrics(
    probs: dict[str, np.ndarray], gold: Gold, intent_routes: list[str], thresholds: Thresholds
) -> dict[str, Any]:
    """For each trust score (confidence, novelty, combined): AUROC for "the intent is wrong" (all messages)
    and the risk-coverage curve of the bot's share (messages no other rule sends to a person); plus urgent
    escalation at ``thresholds``: precision and recall of "urgent -> human", and the traffic share it costs."""
    from sklearn.metrics import roc_auc_score

    r = TriagePolicy(intent_routes, thresholds).rules(
        probs["intent"], probs["urgent"], probs["refund_recoverable"], probs.get("novelty")
    )
    wrong = r.intent_id != gold.intent
    error = gold.should_reach_human | wrong
    eligible = ~r.forced_human & ~r.unsure_margin
    out: dict[str, Any] = {}
    for name, trust in trust_scores(r.top1, probs.get("novelty")).items():
        auroc = float(roc_auc_score(wrong, -trust)) if 0 < wrong.sum() < len(wrong) else float("nan")
        out[name] = {"auroc_intent_error": auroc, **selective_curve(trust, error, eligible)}
    known = gold.urgent >= 0
    flagged = r.urgent
    tp = int((flagged & (gold.urgent == 1)).sum())
    out["urgent"] = {
        "labelled": int(known.sum()),
        "precision": tp / int((flagged & known).sum()) if (flagged & known).any() else float("nan"),
        "recall": tp / int((gold.urgent == 1).sum()) if (gold.urgent == 1).any() else float("nan"),
        "traffic_share": float(flagged.mean()) if len(flagged) else 0.0,
    }
    return out
