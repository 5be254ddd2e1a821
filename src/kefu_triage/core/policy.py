"""Triage policy: from the three heads' probabilities to ``route`` (bot/human) and a ``reason``.

numpy only: the ONNX runtime applies exactly this code. Thresholds come from config (training/eval)
or from the artifact's ``triage.json`` (serving), never from constants here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

# Reasons, in the order they take precedence when several apply.
REASONS = ("urgent", "human_intent", "recoverable_refund", "low_confidence", "refund_self_service", "bot_intent")
HUMAN_REASONS = frozenset({"urgent", "human_intent", "recoverable_refund", "low_confidence"})


class PolicyError(ValueError):
    """Invalid thresholds or inputs for the triage policy."""


@dataclass(frozen=True)
class Thresholds:
    """τ values of the policy. A message goes to a human when any rule fires."""

    urgent: float = 0.5  # urgent probability >= this -> human (reason "urgent")
    recoverable: float = 0.5  # refund intent and recoverable probability >= this -> retention desk
    confidence: float = 0.5  # top intent probability < this -> human (reason "low_confidence")
    margin: float = 0.0  # top1 - top2 intent probability < this -> human (reason "low_confidence")

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= float(value) <= 1.0:
                raise PolicyError(f"threshold {name!r} must be a number in [0, 1], got {value!r}")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], source: str = "thresholds") -> Thresholds:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise PolicyError(f"{source}: unknown threshold(s) {sorted(unknown)}; known: {list(cls.__dataclass_fields__)}")
        try:
            return cls(**{k: float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v for k, v in data.items()})
        except PolicyError as exc:
            raise PolicyError(f"{source}: {exc}") from None

    def to_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class Decisions:
    """Vectorised policy output for N messages."""

    route: np.ndarray  # "bot" / "human", dtype object
    reason: np.ndarray  # one of REASONS, dtype object
    intent_id: np.ndarray  # argmax intent, int

    @property
    def to_human(self) -> np.ndarray:
        return self.route == "human"


class TriagePolicy:
    """Applies the contract's routes plus thresholds to head probabilities."""

    def __init__(self, intent_routes: Sequence[str], thresholds: Thresholds):
        self.intent_routes = np.asarray(list(intent_routes), dtype=object)
        if not len(self.intent_routes):
            raise PolicyError("the policy needs the route of every intent")
        bad = sorted(set(self.intent_routes) - {"bot", "human", "refund_triage"})
        if bad:
            raise PolicyError(f"unknown route(s) {bad}")
        self.thresholds = thresholds

    @classmethod
    def from_taxonomy(cls, taxonomy: Any, thresholds: Thresholds) -> TriagePolicy:
        return cls(taxonomy.routes, thresholds)

    def decide(self, intent_probs: np.ndarray, urgent_prob: np.ndarray, refund_prob: np.ndarray) -> Decisions:
        """intent_probs [N, K]; urgent_prob and refund_prob [N] (refund_prob may hold NaN where undefined)."""
        intent_probs = np.asarray(intent_probs, dtype=np.float64)
        if intent_probs.ndim != 2 or intent_probs.shape[1] != len(self.intent_routes):
            raise PolicyError(
                f"intent_probs must have shape [N, {len(self.intent_routes)}], got {list(intent_probs.shape)}"
            )
        n = intent_probs.shape[0]
        urgent_prob = np.asarray(urgent_prob, dtype=np.float64).reshape(-1)
        refund_prob = np.asarray(refund_prob, dtype=np.float64).reshape(-1)
        if urgent_prob.shape[0] != n or refund_prob.shape[0] != n:
            raise PolicyError(f"head outputs disagree on batch size: {n}, {urgent_prob.shape[0]}, {refund_prob.shape[0]}")
        t = self.thresholds
        intent_id = intent_probs.argmax(axis=1) if n else np.zeros(0, dtype=int)
        if intent_probs.shape[1] >= 2 and n:
            top2 = -np.sort(-intent_probs, axis=1)[:, :2]
            top1, margin = top2[:, 0], top2[:, 0] - top2[:, 1]
        else:
            top1, margin = intent_probs.max(axis=1) if n else np.zeros(0), np.ones(n)
        route_of_intent = self.intent_routes[intent_id] if n else np.zeros(0, dtype=object)

        is_urgent = urgent_prob >= t.urgent
        is_human_intent = route_of_intent == "human"
        is_refund = route_of_intent == "refund_triage"
        is_recoverable = is_refund & (np.nan_to_num(refund_prob, nan=0.0) >= t.recoverable)
        is_unsure = (top1 < t.confidence) | (margin < t.margin)

        reason = np.where(is_refund, "refund_self_service", "bot_intent").astype(object)
        # Later assignments win, so apply from lowest to highest precedence.
        for mask, name in ((is_unsure, "low_confidence"), (is_recoverable, "recoverable_refund"),
                           (is_human_intent, "human_intent"), (is_urgent, "urgent")):
            reason[mask] = name
        route = np.where(np.isin(reason, list(HUMAN_REASONS)), "human", "bot").astype(object)
        return Decisions(route=route, reason=reason, intent_id=intent_id)
