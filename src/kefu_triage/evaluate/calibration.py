"""Temperature scaling per head (fitted on dev) and expected calibration error.

numpy + scipy only. What a temperature means at run time is :func:`kefu_triage.core.heads.probabilities`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kefu_triage.core.heads import HEADS, LOGIT_KEYS, sigmoid, softmax
from kefu_triage.evaluate.metrics import expected_calibration_error, head_confidence, reliability_curve


def _nll(logits: np.ndarray, labels: np.ndarray, temperature: float, multiclass: bool) -> float:
    eps = 1e-12
    if multiclass:
        p = softmax(logits, temperature)[np.arange(len(labels)), labels]
        return float(-np.log(p + eps).mean())
    p = sigmoid(logits, temperature)
    return float(-(labels * np.log(p + eps) + (1 - labels) * np.log(1 - p + eps)).mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray, multiclass: bool) -> float:
    """The T in [0.05, 20] minimising dev NLL (1.0 when there is nothing to fit on)."""
    from scipy.optimize import minimize_scalar

    labels = np.asarray(labels).astype(int)
    if len(labels) < 2 or len(np.unique(labels)) < 2:
        return 1.0
    res = minimize_scalar(
        lambda log_t: _nll(logits, labels, float(np.exp(log_t)), multiclass),
        bounds=(np.log(0.05), np.log(20.0)),
        method="bounded",
    )
    return float(np.exp(res.x))


def calibrate(
    logits: dict[str, np.ndarray],
    labels: dict[str, np.ndarray],
    min_temperature: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Fit a temperature per head on dev; ECE before and after. The binary heads' labels use -1 for rows
    without a label (those rows are ignored). ``min_temperature`` floors a head's temperature: synthetic dev
    is easier than real traffic, and a T < 1 fitted on it sharpens an already overconfident model."""
    temps, ece, curves = {}, {}, {}
    for head in HEADS:
        lg, y = logits[LOGIT_KEYS[head]], np.asarray(labels[head])
        if head != "intent":  # -1: unknown urgent / undefined or unknown refund label, skipped
            keep = y >= 0
            lg, y = lg[keep], y[keep]
        multiclass = head == "intent"
        temps[head] = max(fit_temperature(lg, y, multiclass), float((min_temperature or {}).get(head) or 0.0))
        prob = softmax if multiclass else sigmoid
        before = head_confidence(head, prob(lg, 1.0), y)
        after = head_confidence(head, prob(lg, temps[head]), y)
        ece[head] = {
            "before": expected_calibration_error(*before),
            "after": expected_calibration_error(*after),
        }
        curves[head] = {"before": reliability_curve(*before), "after": reliability_curve(*after)}
    return {"temperatures": temps, "ece": ece, "reliability": curves}


def fit_novelty(
    predict,
    train_records: list[dict[str, Any]],
    reference_records: list[dict[str, Any]],
    taxonomy,
    max_rows: int = 3000,
    seed: int = 0,
):
    """Novelty statistics (kefu_triage.core.novelty) of a model: class means and shared covariance of the
    pooled state on a fixed random sample of at most ``max_rows`` training messages (by gold intent), and
    the novelty scale from the held-out ``reference_records`` (dev). ``predict(records)`` returns a dict
    with the pooled state under ``"pooled"`` (e.g. predict_logits(..., pooled=True))."""
    from kefu_triage.core.heads import POOLED_OUTPUT
    from kefu_triage.core.novelty import NoveltyModel

    rng = np.random.default_rng(seed)
    pick = sorted(rng.choice(len(train_records), size=min(max_rows, len(train_records)), replace=False))
    train = [train_records[i] for i in pick]
    labels = np.array([taxonomy.intent_id(r["intent"]) for r in train])
    pick = sorted(
        rng.choice(len(reference_records), size=min(max_rows, len(reference_records)), replace=False)
    )
    reference = predict([reference_records[i] for i in pick])[POOLED_OUTPUT]
    return NoveltyModel.fit(predict(train)[POOLED_OUTPUT], labels, reference)
