"""Temperature scaling per head (fitted on dev) and expected calibration error.

numpy + scipy only. What a temperature means at run time is :func:`kefu_triage.core.heads.probabilities`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kefu_triage.core.heads import HEADS, LOGIT_KEYS, sigmoid, softmax


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
    res = minimize_scalar(lambda log_t: _nll(logits, labels, float(np.exp(log_t)), multiclass),
                          bounds=(np.log(0.05), np.log(20.0)), method="bounded")
    return float(np.exp(res.x))


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


def reliability_curve(confidence: np.ndarray, correct: np.ndarray, n_bins: int = 10) -> dict[str, list[float]]:
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


def calibrate(logits: dict[str, np.ndarray], labels: dict[str, np.ndarray]) -> dict[str, Any]:
    """Fit a temperature per head on dev; ECE before and after. ``labels['refund_recoverable']`` uses -1
    for rows without a refund label (those rows are ignored)."""
    temps, ece, curves = {}, {}, {}
    for head in HEADS:
        lg, y = logits[LOGIT_KEYS[head]], np.asarray(labels[head])
        if head == "refund_recoverable":
            keep = y >= 0
            lg, y = lg[keep], y[keep]
        multiclass = head == "intent"
        temps[head] = fit_temperature(lg, y, multiclass)
        prob = (softmax if multiclass else sigmoid)
        before = head_confidence(head, prob(lg, 1.0), y)
        after = head_confidence(head, prob(lg, temps[head]), y)
        ece[head] = {"before": expected_calibration_error(*before), "after": expected_calibration_error(*after)}
        curves[head] = {"before": reliability_curve(*before), "after": reliability_curve(*after)}
    return {"temperatures": temps, "ece": ece, "reliability": curves}
