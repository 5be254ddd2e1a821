import numpy as np
import pytest

from kefu_triage.core.policy import PolicyError, Thresholds, TriagePolicy

# three intents: 0 bot, 1 human, 2 refund_triage
ROUTES = ["bot", "human", "refund_triage"]
T = Thresholds(urgent=0.5, recoverable=0.6, confidence=0.5, margin=0.1)


def decide(intent, urgent, refund, thresholds=T):
    d = TriagePolicy(ROUTES, thresholds).decide(np.array([intent]), np.array([urgent]), np.array([refund]))
    return d.route[0], d.reason[0]


@pytest.mark.parametrize(
    "intent,urgent,refund,expected",
    [
        ([0.9, 0.05, 0.05], 0.1, np.nan, ("bot", "bot_intent")),
        ([0.05, 0.9, 0.05], 0.1, np.nan, ("human", "human_intent")),
        ([0.9, 0.05, 0.05], 0.7, np.nan, ("human", "urgent")),
        ([0.05, 0.05, 0.9], 0.1, 0.8, ("human", "recoverable_refund")),
        ([0.05, 0.05, 0.9], 0.1, 0.3, ("bot", "refund_self_service")),
        ([0.45, 0.3, 0.25], 0.1, np.nan, ("human", "low_confidence")),  # top prob below τ_conf
        ([0.52, 0.46, 0.02], 0.1, np.nan, ("human", "low_confidence")),  # margin 0.06 below τ_margin
        # precedence: urgent beats every other reason; human intent beats low confidence
        ([0.05, 0.9, 0.05], 0.9, np.nan, ("human", "urgent")),
        ([0.4, 0.45, 0.15], 0.1, np.nan, ("human", "human_intent")),
        ([0.05, 0.05, 0.9], 0.9, 0.9, ("human", "urgent")),
    ],
)
def test_each_reason(intent, urgent, refund, expected):
    assert decide(intent, urgent, refund) == expected


def test_refund_probability_ignored_for_non_refund_intents():
    assert decide([0.9, 0.05, 0.05], 0.1, 0.99) == ("bot", "bot_intent")


def test_thresholds_are_applied_inclusively():
    assert decide([0.9, 0.05, 0.05], 0.5, np.nan)[1] == "urgent"  # urgent >= τ
    assert decide([0.5, 0.3, 0.2], 0.1, np.nan)[1] == "bot_intent"  # confidence == τ is confident enough


@pytest.mark.parametrize(
    "bad", [{"urgent": 1.5}, {"confidence": -0.1}, {"margin": "high"}, {"recoverable": True}]
)
def test_threshold_validation(bad):
    with pytest.raises(PolicyError, match=list(bad)[0]):
        Thresholds.from_mapping(bad)


def test_unknown_threshold_key_named():
    with pytest.raises(PolicyError, match="unknown threshold.*'urgnet'"):
        Thresholds.from_mapping({"urgnet": 0.5})


def test_shape_errors():
    policy = TriagePolicy(ROUTES, T)
    with pytest.raises(PolicyError, match=r"shape \[N, 3\]"):
        policy.decide(np.zeros((2, 4)), np.zeros(2), np.zeros(2))
    with pytest.raises(PolicyError, match="batch size"):
        policy.decide(np.full((2, 3), 1 / 3), np.zeros(3), np.zeros(2))
    with pytest.raises(PolicyError, match="unknown route"):
        TriagePolicy(["bot", "robot"], T)


def test_empty_batch():
    d = TriagePolicy(ROUTES, T).decide(np.zeros((0, 3)), np.zeros(0), np.zeros(0))
    assert len(d.route) == 0


# ---- novelty gate ("unfamiliar") -------------------------------------------------------------------------
TN = Thresholds(urgent=0.5, recoverable=0.6, confidence=0.5, margin=0.1, novelty=0.9)


def decide_novel(intent, urgent, refund, novelty, thresholds=TN):
    d = TriagePolicy(ROUTES, thresholds).decide(
        np.array([intent]), np.array([urgent]), np.array([refund]), np.array([novelty])
    )
    return d.route[0], d.reason[0]


@pytest.mark.parametrize(
    "intent,urgent,refund,novelty,expected",
    [
        ([0.9, 0.05, 0.05], 0.1, np.nan, 0.95, ("human", "unfamiliar")),
        ([0.9, 0.05, 0.05], 0.1, np.nan, 0.9, ("bot", "bot_intent")),  # novelty == τ is familiar enough
        ([0.9, 0.05, 0.05], 0.1, np.nan, np.nan, ("bot", "bot_intent")),  # no novelty score: no gate
        # precedence: urgent > human_intent > recoverable_refund > unfamiliar > low_confidence
        ([0.45, 0.3, 0.25], 0.1, np.nan, 0.99, ("human", "unfamiliar")),
        ([0.05, 0.05, 0.9], 0.1, 0.8, 0.99, ("human", "recoverable_refund")),
        ([0.05, 0.9, 0.05], 0.1, np.nan, 0.99, ("human", "human_intent")),
        ([0.9, 0.05, 0.05], 0.9, np.nan, 0.99, ("human", "urgent")),
    ],
)
def test_unfamiliar_reason_and_precedence(intent, urgent, refund, novelty, expected):
    assert decide_novel(intent, urgent, refund, novelty) == expected


def test_default_novelty_threshold_never_fires():
    assert decide_novel([0.9, 0.05, 0.05], 0.1, np.nan, 0.999999, Thresholds()) == ("bot", "bot_intent")


def test_decisions_carry_the_scores():
    d = TriagePolicy(ROUTES, TN).decide(
        np.array([[0.6, 0.3, 0.1]]), np.array([0.2]), np.array([np.nan]), np.array([0.4])
    )
    assert d.intent_prob[0] == pytest.approx(0.6) and d.margin[0] == pytest.approx(0.3)
    assert d.novelty[0] == pytest.approx(0.4)


def test_novelty_validation():
    with pytest.raises(PolicyError, match="novelty"):
        Thresholds.from_mapping({"novelty": 1.5})
    with pytest.raises(PolicyError, match="novelty has 1 values for 2"):
        TriagePolicy(ROUTES, TN).decide(np.full((2, 3), 1 / 3), np.zeros(2), np.zeros(2), np.zeros(1))
