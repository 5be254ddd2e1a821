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
REASONS = (
    "urgent",
    "human_intent",
    "recoverable_refund",
    "unfamiliar",
    "low_confidence",
    "refund_self_service",
    "bot_intent",
)
HUMAN_REASONS = frozenset({"urgent", "human_intent", "recoverable_refund", "unfamiliar", "low_confidence"})


class PolicyError(ValueError):
    """Invalid thresholds or inputs for the triage policy."""


@dataclass(frozen=True)
class Thresholds:
    """τ values of the policy. A message goes to a human when any rule fires."""

    urgent: float = 0.5  # urgent probability >= this -> human (reason "urgent")
    recoverable: float = 0.5  # refund intent and recoverable probability >= this -> retention desk
    confidence: float = 0.5  # top intent probability < this -> human (reason "low_confidence")
    margin: float = 0.0  # top1 - top2 intent probability < this -> human (reason "low_confidence")
    # novelty (kefu_triage.core.novelty: a quantile of held-out in-domain messages) > this -> human
    # (reason "unfamiliar"); 1.0 never fires, so a policy without a tuned gate behaves as before
    novelty: float = 1.0

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if (
                not isinstance(value, (int, float))
                or isinstance(value, bool)
                or not 0.0 <= float(value) <= 1.0
            ):
                raise PolicyError(f"threshold {name!r} must be a number in [0, 1], got {value!r}")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], source: str = "thresholds") -> Thresholds:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise PolicyError(
                f"{source}: unknown threshold(s) {sorted(unknown)}; known: {list(cls.__dataclass_fields__)}"
            )
        try:
            return cls(
                **{
                    k: float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v
                    for k, v in data.items()
                }
            )
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
    # the scores the rules compared with their thresholds (NaN novelty: no novelty score available)
    intent_prob: np.ndarray | None = None
    margin: np.ndarray | None = None
    novelty: np.ndarray | None = None

    @property
    def to_human(self) -> np.ndarray:
        return self.route == "human"


@dataclass(frozen=True)
class Rules:
    """Per-message outcome of each policy rule (the confidence rule is left open so tuning can sweep it)."""

    intent_id: np.ndarray  # argmax intent
    top1: np.ndarray  # top intent probability
    is_refund: np.ndarray  # predicted intent has route refund_triage
    urgent: np.ndarray
    human_intent: np.ndarray
    recoverable: np.ndarray
    unsure_margin: np.ndarray
    margin: np.ndarray  # top1 - top2 intent probability
    novelty: np.ndarray  # novelty in [0, 1], NaN where unknown (never "unfamiliar")
    unfamiliar: np.ndarray  # novelty > τ_novelty

    @property
    def forced_human(self) -> np.ndarray:
        """Rules that send a message to a person whatever the intent confidence."""
        return self.urgent | self.human_intent | self.recoverable

    def unsure(self, confidence: float) -> np.ndarray:
        return (self.top1 < confidence) | self.unsure_margin

    def novel(self, novelty: float) -> np.ndarray:
        return np.nan_to_num(self.novelty, nan=0.0) > novelty


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

    def rules(
        self,
        intent_probs: np.ndarray,
        urgent_prob: np.ndarray,
        refund_prob: np.ndarray,
        novelty: np.ndarray | None = None,
    ) -> Rules:
        """Which rule fires for each of N messages. intent_probs [N, K]; urgent_prob, refund_prob and novelty
        [N] (refund_prob may hold NaN where undefined; novelty None or NaN where the model has no novelty
        statistics). The one place the policy's rules are written."""
        intent_probs = np.asarray(intent_probs, dtype=np.float64)
        if intent_probs.ndim != 2 or intent_probs.shape[1] != len(self.intent_routes):
            raise PolicyError(
                f"intent_probs must have shape [N, {len(self.intent_routes)}], got {list(intent_probs.shape)}"
            )
        n = intent_probs.shape[0]
        urgent_prob = np.asarray(urgent_prob, dtype=np.float64).reshape(-1)
        refund_prob = np.asarray(refund_prob, dtype=np.float64).reshape(-1)
        if urgent_prob.shape[0] != n or refund_prob.shape[0] != n:
            raise PolicyError(
                f"head outputs disagree on batch size: {n}, {urgent_prob.shape[0]}, {refund_prob.shape[0]}"
            )
        novelty = np.full(n, np.nan) if novelty is None else np.asarray(novelty, dtype=np.float64).reshape(-1)
        if novelty.shape[0] != n:
            raise PolicyError(f"novelty has {novelty.shape[0]} values for {n} messages")
        t = self.thresholds
        intent_id = intent_probs.argmax(axis=1) if n else np.zeros(0, dtype=int)
        if intent_probs.shape[1] >= 2 and n:
            top2 = -np.sort(-intent_probs, axis=1)[:, :2]
            top1, margin = top2[:, 0], top2[:, 0] - top2[:, 1]
        else:
            top1, margin = intent_probs.max(axis=1) if n else np.zeros(0), np.ones(n)
        route_of_intent = self.intent_routes[intent_id] if n else np.zeros(0, dtype=object)
        is_refund = route_of_intent == "refund_triage"
        return Rules(
            intent_id=intent_id,
            top1=top1,
            is_refund=is_refund,
            urgent=urgent_prob >= t.urgent,
            human_intent=route_of_intent == "human",
            recoverable=is_refund & (np.nan_to_num(refund_prob, nan=0.0) >= t.recoverable),
            unsure_margin=margin < t.margin,
            margin=margin,
            novelty=novelty,
            unfamiliar=np.nan_to_num(novelty, nan=0.0) > t.novelty,
        )

    def decide(
        self,
        intent_probs: np.ndarray,
        urgent_prob: np.ndarray,
        refund_prob: np.ndarray,
        novelty: np.ndarray | None = None,
    ) -> Decisions:
        """Route and reason of N messages (see :meth:`rules` for the inputs)."""
        r = self.rules(intent_probs, urgent_prob, refund_prob, novelty)
        reason = np.where(r.is_refund, "refund_self_service", "bot_intent").astype(object)
        # Later assignments win, so apply from lowest to highest precedence.
        for mask, name in (
            (r.unsure(self.thresholds.confidence), "low_confidence"),
            (r.unfamiliar, "unfamiliar"),
            (r.recoverable, "recoverable_refund"),
            (r.human_intent, "human_intent"),
            (r.urgent, "urgent"),
        ):
            reason[mask] = name
        route = np.where(np.isin(reason, list(HUMAN_REASONS)), "human", "bot").astype(object)
        return Decisions(
            route=route,
            reason=reason,
            intent_id=r.intent_id,
            intent_prob=r.top1,
            margin=r.margin,
            novelty=r.novelty,
        )

    def decide_heads(self, probs: Mapping[str, np.ndarray]) -> Decisions:
        """:meth:`decide` on a dict of head probabilities (kefu_triage.core.heads.probabilities)."""
        return self.decide(
            probs["intent"], probs["urgent"], probs["refund_recoverable"], probs.get("novelty")
        )
