"""kefu_triage.evaluate.tuning: threshold search for an operating point and the risk-coverage curve."""

import numpy as np
import pytest

from kefu_triage.core.policy import Thresholds
from kefu_triage.evaluate.metrics import Gold
from kefu_triage.evaluate.tuning import risk_coverage_curve, tune_thresholds

ROUTES = np.array(["bot", "human", "refund_triage"], dtype=object)


def _gold(intent, urgent, refund):
    return Gold(np.array(intent), np.array(urgent), np.array(refund), ROUTES)


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
    return {"intent": probs, "urgent": p_urgent, "refund_recoverable": p_refund}, _gold(
        intent, urgent, refund
    )


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
    best = tune_thresholds(
        probs,
        gold,
        list(ROUTES),
        {"max_bot_risk": 0.0, "min_urgent_recall": 1.0, "min_recoverable_capture": 1.0},
    )
    # with zero allowed risk the only safe policy sends (nearly) everything to a human
    assert best["constraints_met"] or best["dev_metrics"]["coverage"] < 0.2
    if not best["constraints_met"]:
        assert sum(best["shortfall"].values()) > 0


def test_risk_coverage_curve_is_monotone_in_coverage():
    probs, gold = _synthetic()
    rc = risk_coverage_curve(
        probs, gold, list(ROUTES), Thresholds(urgent=0.5, recoverable=0.5, confidence=0.5)
    )
    cov = np.array(rc["curve"]["coverage"])
    assert np.all(np.diff(cov) <= 1e-12)  # raising τ_conf never raises coverage
    assert 0 <= rc["aurc"] <= 1 and rc["coverage_at_risk_2"] <= rc["coverage_at_risk_10"]


def test_tuning_uses_the_novelty_gate_when_it_helps():
    probs, gold = _synthetic()
    wrong = probs["intent"].argmax(1) != gold.intent
    rng = np.random.default_rng(3)
    # a novelty score that flags most wrong answers: the gate should be switched on and raise coverage
    probs_n = {
        **probs,
        "novelty": np.clip(np.where(wrong, 0.97, 0.5) + rng.normal(0, 0.02, len(wrong)), 0, 1),
    }
    op = {"max_bot_risk": 0.03, "min_urgent_recall": 0.9, "min_recoverable_capture": 0.85}
    without, with_ = (
        tune_thresholds(probs, gold, list(ROUTES), op),
        tune_thresholds(probs_n, gold, list(ROUTES), op),
    )
    assert without["thresholds"].novelty == 1.0
    assert with_["thresholds"].novelty < 1.0
    assert with_["dev_metrics"]["coverage"] > without["dev_metrics"]["coverage"]
    assert with_["dev_metrics"]["risk"] <= 0.03


def test_safety_metrics_rank_novelty():
    from kefu_triage.evaluate.tuning import safety_metrics

    probs, gold = _synthetic()
    wrong = probs["intent"].argmax(1) != gold.intent
    probs["novelty"] = np.where(wrong, 0.9, 0.1)
    s = safety_metrics(probs, gold, list(ROUTES), Thresholds())
    assert s["novelty"]["auroc_intent_error"] == 1.0
    assert s["combined"]["aurc"] <= s["confidence"]["aurc"]
    assert 0 <= s["urgent"]["traffic_share"] <= 1 and s["urgent"]["recall"] > 0.5


def test_urgent_first_slack_trades_a_little_coverage_for_urgent_escalation():
    probs, gold = _synthetic()
    op = {"max_bot_risk": 0.2, "min_urgent_recall": 0.5, "min_recoverable_capture": 0.5}
    plain = tune_thresholds(probs, gold, list(ROUTES), op)
    first = tune_thresholds(probs, gold, list(ROUTES), {**op, "urgent_first_slack": 0.02})
    p, f = plain["dev_metrics"], first["dev_metrics"]
    # loose constraints: coverage alone picks a high urgent threshold; the slack buys urgent recall back
    assert f["urgent_recall"] > p["urgent_recall"]
    assert f["coverage"] >= p["coverage"] - 0.02 - 1e-9 and f["coverage"] <= p["coverage"]
    assert first["thresholds"].urgent <= plain["thresholds"].urgent
    assert first["constraints_met"] and plain["constraints_met"]
    # no slack (the key absent or 0) is the plain coverage-first choice
    assert tune_thresholds(probs, gold, list(ROUTES), {**op, "urgent_first_slack": 0.0}) == plain
    with pytest.raises(ValueError, match="urgent_first_slack must be a number in"):
        tune_thresholds(probs, gold, list(ROUTES), {**op, "urgent_first_slack": -0.1})
