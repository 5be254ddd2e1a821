"""Thresholds from a small labelled sample of the user's own traffic, by conformal risk control.

Angelopoulos, Bates, Fisch, Lei, Schuster (2022), "Conformal Risk Control": for losses L_i(λ) in [0, B] that
do not increase as λ grows stricter, λ̂ = the least strict λ with (n/(n+1))·R̂_n(λ) + B/(n+1) <= α gives
E[L_{n+1}(λ̂)] <= α for a new message exchangeable with the n calibration messages.

Two uses here, urgent first:
- urgent threshold: loss = "an urgent message below τ_urgent" over the urgent calibration messages, so the
  share of urgent customers left to the bot is <= 1 - min_urgent_recall;
- bot risk, the share of bot-routed messages that are wrong (wrong intent, or they should reach a person),
  is a ratio, which conformal risk control does not bound. It is set by Learn then Test (Angelopoulos,
  Bates, Candès, Jordan, Lei 2021): λ moves the confidence and novelty gates together (τ_conf = λ,
  τ_novelty = 1 - λ); for each λ the bot-routed calibration messages are a binomial sample of the bot's
  errors, p(λ) = P(Binomial(m, α) <= k) tests "risk(λ) > α", and fixed-sequence testing from the strictest λ
  keeps the loosest rejected λ (fallback procedure: family-wise error <= δ). With probability >= 1 - δ over the
  calibration sample, the bot's error rate on new traffic at that λ is <= α.

Labels may be partial: every row needs an intent; unknown urgent / refund labels count as "no" (as in the
other triage figures), and only rows with an urgent label enter the urgent calibration.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import numpy as np

from kefu_triage.core.policy import Thresholds, TriagePolicy
from kefu_triage.evaluate.metrics import Gold, triage_metrics


class ConformalError(ValueError):
    """The calibration sample cannot support the requested risk."""


def min_sample_size(alpha: float, bound: float = 1.0) -> int:
    """Smallest n for which even the strictest λ (loss 0 on every row) meets B/(n+1) <= α."""
    return max(0, math.ceil(bound / alpha - 1 - 1e-12))


def conformal_lambda(losses: np.ndarray, alpha: float, bound: float = 1.0) -> int:
    """Index of λ̂ among the columns of ``losses`` [n, L] (columns ordered from least to most strict, losses
    non-increasing along them): the first column with (n/(n+1))·mean + B/(n+1) <= α."""
    losses = np.asarray(losses, dtype=np.float64)
    n = losses.shape[0]
    if not 0 < alpha < 1:
        raise ConformalError(f"the target risk must be in (0, 1), got {alpha}")
    if n < min_sample_size(alpha, bound):
        raise ConformalError(
            f"{n} calibration rows cannot certify risk {alpha:g}: conformal risk control needs at "
            f"least {min_sample_size(alpha, bound)} (n >= B/α - 1); label more messages or allow "
            "a larger risk"
        )
    if np.any(np.diff(losses, axis=1) > 1e-12):
        raise ConformalError("losses must not increase as λ grows stricter")
    ok = n / (n + 1) * losses.mean(0) + bound / (n + 1) <= alpha
    if not ok.any():
        raise ConformalError(f"no λ meets risk {alpha:g} on {n} rows, not even the strictest one")
    return int(np.argmax(ok))


def ltt_min_sample_size(alpha: float, delta: float) -> int:
    """Smallest number of bot-routed messages with no error that rejects "risk > α" at level δ."""
    if not 0 < alpha < 1 or not 0 < delta < 1:
        raise ConformalError(f"risk and δ must be in (0, 1), got {alpha}, {delta}")
    return math.ceil(math.log(delta) / math.log(1.0 - alpha) - 1e-12)


def learn_then_test(n_bot: np.ndarray, n_wrong: np.ndarray, alpha: float, delta: float) -> int | None:
    """Index of the loosest λ certified "bot error rate <= α" with probability >= 1 - δ, or None.

    ``n_bot`` / ``n_wrong`` [L]: bot-routed and wrong calibration messages per λ, strictest λ first. The
    binomial p-value P(Binomial(m, α) <= k) tests each null "risk(λ) > α"; the fallback procedure (Wiens 2003)
    walks from the strictest λ, gives each testable λ δ/L and carries the level of a rejected λ forward, so
    the family-wise error stays <= δ and one early non-rejection does not end the search. A λ whose bot
    takes too few messages to reject at any error count is not testable; which λs those are depends on the
    model's scores only, never on the labels."""
    from scipy.stats import binom

    n_bot, n_wrong = np.asarray(n_bot), np.asarray(n_wrong)
    testable = n_bot >= ltt_min_sample_size(alpha, delta)
    if not testable.any():
        return None
    share, level, chosen = delta / int(testable.sum()), 0.0, None
    for j in np.flatnonzero(testable):
        level += share
        if binom.cdf(int(n_wrong[j]), int(n_bot[j]), alpha) <= level:
            chosen = int(j)  # rejected: its level carries forward to the next λ
        else:
            level = 0.0
    return chosen


def calibrate_policy(
    probs: dict[str, np.ndarray],
    gold: Gold,
    intent_routes: list[str],
    base: Thresholds,
    max_bot_risk: float,
    min_urgent_recall: float | None = None,
    grid: int = 21,
    delta: float = 0.1,
) -> dict[str, Any]:
    """Thresholds for the user's traffic from a labelled calibration sample (``probs`` temperature-scaled, with
    ``"novelty"`` when the model has it). ``base``: the synthetic-dev thresholds (recoverable and margin are
    kept; urgent is kept when the sample has too few urgent messages for ``min_urgent_recall``)."""
    n = len(gold)
    novelty = probs.get("novelty")
    with_novelty = novelty is not None and np.isfinite(novelty).all()
    report: dict[str, Any] = {"rows": n, "method": "conformal risk control (Angelopoulos et al. 2022)"}
    # Fail before anything else when the sample is too small for the bot-risk target.
    if n < ltt_min_sample_size(max_bot_risk, delta):
        raise ConformalError(
            f"calibration sample of {n} rows cannot certify bot risk {max_bot_risk:g} at confidence "
            f"{1 - delta:g}: even with every message answered correctly by the bot it needs at least "
            f"{ltt_min_sample_size(max_bot_risk, delta)} labelled rows (n >= log δ / log(1 - α)); label more "
            "messages or raise policy.max_bot_risk"
        )
    th = base

    # 1. urgent first: the largest τ_urgent whose conformal miss rate on urgent messages is <= 1 - min recall
    positives = probs["urgent"][gold.urgent == 1]
    if min_urgent_recall is not None:
        beta = 1.0 - float(min_urgent_recall)
        taus = np.unique(np.concatenate([[0.0], positives]))[::-1]  # least to most escalation
        urgent = {
            "labelled": int((gold.urgent >= 0).sum()),
            "urgent_rows": len(positives),
            "target_recall": float(min_urgent_recall),
        }
        try:
            miss = positives[:, None] < taus[None, :]
            j = conformal_lambda(miss.astype(float), beta)
            th = replace(th, urgent=float(taus[j]))
            urgent |= {
                "threshold": float(taus[j]),
                "guarantee": f"expected share of urgent messages left to the bot "
                f"<= {beta:g} (finite-sample, {len(positives)} urgent calibration messages)",
            }
        except ConformalError as exc:
            urgent |= {"threshold": float(base.urgent), "kept_synthetic": True, "reason": str(exc)}
        report["urgent"] = urgent

    # 2. bot risk along the path τ_conf = λ, τ_novelty = 1 - λ, by Learn then Test (strictest λ first)
    lambdas = np.linspace(0.0, 1.0, grid)[::-1]
    policy = TriagePolicy(intent_routes, replace(th, confidence=0.0, novelty=1.0))
    r = policy.rules(probs["intent"], probs["urgent"], probs["refund_recoverable"], novelty)
    error = gold.should_reach_human | (r.intent_id != gold.intent)
    eligible = ~r.forced_human & ~r.unsure_margin
    nov = np.nan_to_num(r.novelty, nan=0.0)
    bot = eligible[:, None] & (r.top1[:, None] >= lambdas[None, :])
    if with_novelty:
        bot &= ~(nov[:, None] > 1.0 - lambdas[None, :])
    j = learn_then_test(bot.sum(0), (bot & error[:, None]).sum(0), max_bot_risk, delta)
    report["delta"] = float(delta)
    if j is None:
        th = replace(th, confidence=1.0, novelty=0.0)
        report["warning"] = (
            "no λ short of sending every message to a person is certified at this risk on "
            f"{n} rows: bot coverage 0; label more messages or allow a larger risk"
        )
    else:
        lam = float(lambdas[j])
        th = replace(th, confidence=lam, novelty=(1.0 - lam) if with_novelty else th.novelty)
    d = TriagePolicy(intent_routes, th).decide_heads(probs)
    m = triage_metrics(d.to_human, d.intent_id, gold)
    d0 = TriagePolicy(intent_routes, base).decide_heads(probs)
    m0 = triage_metrics(d0.to_human, d0.intent_id, gold)
    report |= {
        "thresholds": th.to_dict(),
        "max_bot_risk": float(max_bot_risk),
        "guarantee": (
            f"with probability >= {1 - delta:g} over the {n}-row calibration sample, the share of wrong "
            f"answers among the messages the bot takes is <= {max_bot_risk:g} on new traffic like it "
            "(Learn then Test, binomial p-values, fallback procedure)"
        ),
        "calibration_coverage": m["coverage"],
        "calibration_bot_errors_share": float(
            (~d.to_human & (gold.should_reach_human | (d.intent_id != gold.intent))).mean()
        )
        if n
        else 0.0,
        "calibration_risk": m["risk"],
        "calibration_urgent_recall": m["urgent_recall"],
        "synthetic_policy_coverage": m0["coverage"],
        "synthetic_policy_risk": m0["risk"],
        "coverage_cost": m0["coverage"] - m["coverage"],
    }
    return report


def calibration_summary(report: dict[str, Any]) -> str:
    """The report's sentence: guarantee, sample size, the coverage it costs."""
    return (
        f"Calibrated on {report['rows']} labelled messages of your traffic: {report['guarantee']}. Bot coverage "
        f"on the sample {report['calibration_coverage']:.1%} (synthetic-dev policy: "
        f"{report['synthetic_policy_coverage']:.1%}, risk {report['synthetic_policy_risk']:.1%}); measured risk "
        f"among bot messages {report['calibration_risk']:.1%}."
    )
