"""The model's three heads: their names, the ONNX/PyTorch output names, and what their probabilities mean.

The one home of these names: training, evaluation, export and the torch-free runtime all import them.
numpy only.
"""

from __future__ import annotations

import numpy as np

HEADS = ("intent", "urgent", "refund_recoverable")
# Output name of each head's logits, in the order the ONNX graph returns them.
LOGIT_KEYS = {
    "intent": "intent_logits",
    "urgent": "urgent_logit",
    "refund_recoverable": "refund_recoverable_logit",
}
OUTPUT_NAMES = tuple(LOGIT_KEYS[h] for h in HEADS)
# Extra graph output: the pooled encoder state the heads read (novelty scoring, kefu_triage.core.novelty).
# Not in OUTPUT_NAMES: artifacts exported before it existed lack it, and consumers of the logits ignore it.
POOLED_OUTPUT = "pooled"


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def sigmoid(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(np.asarray(logits, dtype=np.float64) / temperature, -50, 50)))


def probabilities(logits: dict[str, np.ndarray], temperatures: dict[str, float]) -> dict[str, np.ndarray]:
    """Calibrated head probabilities: intent [N, K], urgent [N], refund_recoverable [N] (logits / T)."""
    return {
        head: (softmax if head == "intent" else sigmoid)(
            logits[LOGIT_KEYS[head]], temperatures.get(head, 1.0)
        )
        for head in HEADS
    }
