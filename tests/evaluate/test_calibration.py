import numpy as np

from kefu_triage.core.heads import probabilities, softmax
from kefu_triage.evaluate.calibration import calibrate, fit_temperature
from kefu_triage.evaluate.metrics import expected_calibration_error


def _overconfident(n=4000, k=5, true_t=3.0, seed=0):
    """Logits whose calibrated temperature is true_t: labels drawn from softmax(z / true_t)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 4, size=(n, k))
    p = softmax(z, true_t)
    y = np.array([rng.choice(k, p=row) for row in p])
    return z, y


def test_fit_temperature_recovers_known_temperature():
    z, y = _overconfident()
    assert abs(fit_temperature(z, y, multiclass=True) - 3.0) < 0.3


def test_binary_temperature_and_degenerate_labels():
    rng = np.random.default_rng(1)
    z = rng.normal(0, 5, 5000)
    y = (rng.random(5000) < 1 / (1 + np.exp(-z / 2.0))).astype(int)
    assert abs(fit_temperature(z, y, multiclass=False) - 2.0) < 0.25
    assert fit_temperature(z[:10], np.ones(10), multiclass=False) == 1.0  # one class: nothing to fit


def test_calibration_lowers_ece_and_ignores_masked_refund_rows():
    z, y = _overconfident()
    rng = np.random.default_rng(2)
    urgent = rng.normal(0, 6, len(y))
    refund = rng.normal(0, 6, len(y))
    labels = {
        "intent": y,
        "urgent": (rng.random(len(y)) < 1 / (1 + np.exp(-urgent / 3))).astype(int),
        "refund_recoverable": np.where(np.arange(len(y)) % 2 == 0, -1, (refund > 0).astype(int)),
    }
    out = calibrate({"intent_logits": z, "urgent_logit": urgent, "refund_recoverable_logit": refund}, labels)
    assert out["ece"]["intent"]["after"] < out["ece"]["intent"]["before"] / 2
    assert out["ece"]["urgent"]["after"] < out["ece"]["urgent"]["before"]
    assert out["temperatures"]["intent"] > 2


def test_ece_known_values():
    assert abs(expected_calibration_error(np.array([0.9, 0.9]), np.array([1, 1])) - 0.1) < 1e-9
    assert expected_calibration_error(np.array([0.75, 0.75, 0.75, 0.75]), np.array([1, 1, 1, 0])) == 0.0


def test_probabilities_apply_temperatures():
    p = probabilities(
        {
            "intent_logits": np.array([[2.0, 0.0]]),
            "urgent_logit": np.array([2.0]),
            "refund_recoverable_logit": np.array([0.0]),
        },
        {"intent": 2.0, "urgent": 2.0},
    )
    assert np.isclose(p["intent"][0, 0], 1 / (1 + np.exp(-1)))
    assert np.isclose(p["urgent"][0], 1 / (1 + np.exp(-1))) and p["refund_recoverable"][0] == 0.5
