import numpy as np
import pytest

from kefu_triage.core.policy import Thresholds
from kefu_triage.evaluate.metrics import (
    Gold,
    binary_metrics,
    intent_metrics,
    risk_coverage_curve,
    triage_metrics,
    tune_thresholds,
)

ROUTES = np.array(["bot", "human", "refund_triage"], dtype=object)


def _gold(intent, urgent, refund):
    return Gold(np.array(intent), np.array(urgent), np.array(refund), ROUTES)


def test_triage_metrics_by_hand():
    # 6 messages: bot-able ok, bot-able urgent, human intent, recoverable refund, firm refund, bot-able
    gold = _gold([0, 0, 1, 2, 2, 0], [0, 1, 0, 0, 0, 0], [-1, -1, -1, 1, 0, -1])
    route_human = np.array([False, False, True, False, False, True])
    pred_intent = np.array([0, 0, 1, 2, 2, 0])
    m = triage_metrics(route_human, pred_intent, gold, {"messages_per_hour": 3600, "handling_time_seconds": 60,
                                                          "agent_occupancy": 1.0})
    assert m["coverage"] == pytest.approx(4 / 6)
    # bot took 4: the urgent one and the recoverable refund should have gone to a human
    assert m["risk"] == pytest.approx(2 / 4)
    assert m["bot_resolved_share"] == pytest.approx(4 / 6 * 0.5)
    assert m["urgent_recall"] == 0.0 and m["recoverable_capture"] == 0.0
    assert m["agents_needed"] == pytest.approx(3600 * (2 / 6) * 60 / 3600)


def test_wrong_intent_on_bot_counts_as_risk():
    gold = _gold([0, 0], [0, 0], [-1, -1])
    m = triage_metrics(np.array([False, False]), np.array([0, 2]), gold)
    assert m["risk"] == 0.5


def test_head_metrics_known_cases():
    probs = np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.6, 0.4, 0.0]])
    m = intent_metrics(np.array([0, 1, 1]), probs, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(2 / 3)
    assert m["per_class"]["b"]["recall"] == 0.5 and m["confusion_matrix"][1] == [1, 1, 0]
    b = binary_metrics(np.array([0, 0, 1, 1]), np.array([0.1, 0.6, 0.7, 0.9]), 0.5)
    assert b["roc_auc"] == 1.0 and b["precision"] == pytest.approx(2 / 3) and b["recall"] == 1.0


def _synthetic(n=3000, seed=0):
    rng = np.random.default_rng(seed)
    intent = rng.choice(3, n, p=[0.6, 0.2, 0.2])
    urgent = (rng.random(n) < 0.15).astype(int)
    refund = np.where(intent == 2, (rng.random(n) < 0.5).astype(int), -1)
    logits = rng.normal(0, 1, (n, 3))
    logits[np.arange(n), intent] += rng.normal(3, 1.5, n)  # mostly right, sometimes not
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    p_urgent = np.clip(0.75 * urgent + rng.normal(0.15, 0.15, n), 0, 1)
    p_refund = np.clip(0.6 * (refund == 1) + rng.normal(0.2, 0.15, n), 0, 1)
    return {"intent": probs, "urgent": p_urgent, "refund_recoverable": p_refund}, _gold(intent, urgent, refund)


def test_tuning_meets_feasible_constraints():
    probs, gold = _synthetic()
    op = {"max_bot_risk": 0.08, "min_urgent_recall": 0.9, "min_recoverable_capture": 0.85}
    best = tune_thresholds(probs, gold, list(ROUTES), op)
    assert best["constraints_met"]
    m = best["dev_metrics"]
    assert m["risk"] <= 0.08 and m["urgent_recall"] >= 0.9 and m["recoverable_capture"] >= 0.85
    assert m["coverage"] > 0.3


def test_tuning_reports_infeasible_constraints():
    probs, gold = _synthetic()
    best = tune_thresholds(probs, gold, list(ROUTES), {"max_bot_risk": 0.0, "min_urgent_recall": 1.0,
                                                       "min_recoverable_capture": 1.0})
    # with zero allowed risk the only safe policy sends (nearly) everything to a human
    assert best["constraints_met"] or best["dev_metrics"]["coverage"] < 0.2
    if not best["constraints_met"]:
        assert sum(best["shortfall"].values()) > 0


def test_risk_coverage_curve_is_monotone_in_coverage():
    probs, gold = _synthetic()
    rc = risk_coverage_curve(probs, gold, list(ROUTES), Thresholds(urgent=0.5, recoverable=0.5, confidence=0.5))
    cov = np.array(rc["curve"]["coverage"])
    assert np.all(np.diff(cov) <= 1e-12)  # raising τ_conf never raises coverage
    assert 0 <= rc["aurc"] <= 1 and rc["coverage_at_risk_2"] <= rc["coverage_at_risk_10"]
