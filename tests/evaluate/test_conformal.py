"""kefu_triage.evaluate.conformal: Learn then Test for the bot's error rate, conformal risk control for missed urgent messages."""

import numpy as np
import pytest

from kefu_triage.core.policy import Thresholds
from kefu_triage.evaluate.conformal import (
    ConformalError,
    calibrate_policy,
    conformal_lambda,
    learn_then_test,
    ltt_min_sample_size,
    min_sample_size,
)
from kefu_triage.evaluate.metrics import Gold

ROUTES = np.array(["bot", "human", "refund_triage"], dtype=object)


def _sample(n, rng):
    """Messages whose intent is wrong with probability (1 - top1) / 3 (a known error rate at every confidence),
    with a novelty score that also tracks errors; 10% urgent."""
    top1 = rng.uniform(0.5, 1.0, n)
    gold = rng.choice([0, 2], n)  # bot / refund intents only: the bot may take any of them
    wrong = rng.random(n) < (1 - top1) / 3
    pred = np.where(wrong, 2 - gold, gold)
    probs = np.full((n, 3), 0.0)
    probs[np.arange(n), pred] = top1
    probs[np.arange(n), 1] = 1 - top1  # the runner-up is the human intent
    novelty = np.clip(0.5 * (1 - top1) + 0.5 * rng.random(n), 0, 1)
    urgent = (rng.random(n) < 0.1).astype(int)
    p_urgent = np.clip(0.7 * urgent + rng.normal(0.15, 0.12, n), 0, 1)
    p = {"intent": probs, "urgent": p_urgent, "refund_recoverable": np.zeros(n), "novelty": novelty}
    return p, Gold(gold, urgent, np.where(gold == 2, 0, -1), ROUTES)


def _bot_wrong(p, gold, th):
    from kefu_triage.core.policy import TriagePolicy

    d = TriagePolicy(list(ROUTES), th).decide_heads(p)
    return ~d.to_human & (gold.should_reach_human | (d.intent_id != gold.intent)), ~d.to_human


def test_bot_risk_certified_with_probability_one_minus_delta_over_many_draws():
    rng = np.random.default_rng(0)
    alpha, delta, exceed, coverage, urgent_miss = 0.1, 0.1, [], [], []
    base = Thresholds(urgent=0.5, recoverable=0.5, confidence=0.5)
    for _ in range(200):
        p_cal, g_cal = _sample(500, rng)
        rep = calibrate_policy(p_cal, g_cal, list(ROUTES), base, alpha, min_urgent_recall=0.9, delta=delta)
        th = Thresholds.from_mapping(rep["thresholds"])
        p_new, g_new = _sample(4000, rng)
        wrong, bot = _bot_wrong(p_new, g_new, th)
        risk = wrong.sum() / max(bot.sum(), 1)  # error rate among the messages the bot takes
        exceed.append(risk > alpha)
        coverage.append(bot.mean())
        if "threshold" in rep["urgent"] and not rep["urgent"].get("kept_synthetic"):
            urgent_miss.append((p_new["urgent"][g_new.urgent == 1] < th.urgent).mean())
    # the guarantee: P(risk > α) <= δ over calibration draws (allow Monte-Carlo error on 200 draws)
    assert np.mean(exceed) <= delta + 3 * np.sqrt(delta * (1 - delta) / len(exceed))
    assert np.mean(coverage) > 0.2  # and not by sending everything to people
    assert urgent_miss and np.mean(urgent_miss) <= 0.1


def test_too_small_sample_refused():
    rng = np.random.default_rng(1)
    assert ltt_min_sample_size(0.1, 0.1) == 22  # 0.9 ** 22 <= 0.1 < 0.9 ** 21
    p, g = _sample(21, rng)
    with pytest.raises(ConformalError, match="21 rows cannot certify bot risk 0.1.*at least 22"):
        calibrate_policy(p, g, list(ROUTES), Thresholds(), 0.1, delta=0.1)
    p, g = _sample(22, rng)
    calibrate_policy(p, g, list(ROUTES), Thresholds(), 0.1, delta=0.1)  # the smallest size that can try


def test_learn_then_test_fallback_levels():
    # strictest first: (bot messages, wrong ones); p = P(Binomial(m, 0.1) <= k); 4 testable λs -> δ/4 each
    n_bot = np.array([5, 60, 60, 200, 300])
    n_wrong = np.array([0, 0, 10, 5, 40])
    # λ0 untestable (< 22 messages); λ1: p = 0.9^60 = 0.0018 <= 0.025 (rejected, carries 0.025);
    # λ2: p(<=10 | 60) ≈ 0.96 > 0.05 (kept, level resets); λ3: p(<=5 | 200) ≈ 1e-5 <= 0.025 (rejected);
    # λ4: p(<=40 | 300) ≈ 0.97 > 0.05 -> the loosest certified λ is λ3
    assert learn_then_test(n_bot, n_wrong, 0.1, 0.1) == 3
    assert learn_then_test(n_bot, n_wrong, 0.1, 1e-6) is None
    assert learn_then_test(np.array([10, 20]), np.array([0, 0]), 0.1, 0.1) is None  # nothing testable
    assert min_sample_size(0.1) == 9  # conformal risk control (urgent misses) needs B/α - 1


def test_conformal_lambda_rule():
    losses = np.array([[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]] * 10, dtype=float)  # n = 40
    # bounds: 40/41 * [0.75, 0.25, 0, 0] + 1/41 -> first <= 0.3 is column 1
    assert conformal_lambda(losses, 0.3) == 1
    assert conformal_lambda(losses, 0.03) == 2
    with pytest.raises(ConformalError, match="must not increase"):
        conformal_lambda(losses[:, ::-1], 0.3)


def test_urgent_threshold_kept_when_too_few_urgent_messages():
    rng = np.random.default_rng(2)
    p, g = _sample(60, rng)  # ~6 urgent messages: cannot certify 90% recall (needs 9)
    rep = calibrate_policy(p, g, list(ROUTES), Thresholds(urgent=0.37), 0.2, min_urgent_recall=0.9)
    assert rep["urgent"]["kept_synthetic"] and rep["thresholds"]["urgent"] == 0.37
    assert (
        "rows" in rep
        and "guarantee" in rep
        and rep["coverage_cost"]
        == pytest.approx(rep["synthetic_policy_coverage"] - rep["calibration_coverage"])
    )
