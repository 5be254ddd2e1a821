import numpy as np
import pytest

from kefu_triage.evaluate.metrics import Gold, binary_metrics, intent_metrics, triage_metrics

ROUTES = np.array(["bot", "human", "refund_triage"], dtype=object)


def _gold(intent, urgent, refund):
    return Gold(np.array(intent), np.array(urgent), np.array(refund), ROUTES)


def test_triage_metrics_by_hand():
    # 6 messages: bot-able ok, bot-able urgent, human intent, recoverable refund, firm refund, bot-able
    gold = _gold([0, 0, 1, 2, 2, 0], [0, 1, 0, 0, 0, 0], [-1, -1, -1, 1, 0, -1])
    route_human = np.array([False, False, True, False, False, True])
    pred_intent = np.array([0, 0, 1, 2, 2, 0])
    m = triage_metrics(
        route_human,
        pred_intent,
        gold,
        {"messages_per_hour": 3600, "handling_time_seconds": 60, "agent_occupancy": 1.0},
    )
    assert m["coverage"] == pytest.approx(4 / 6)
    # bot took 4: the urgent one and the recoverable refund should have gone to a human
    assert m["risk"] == pytest.approx(2 / 4)
    assert m["bot_resolved_share"] == pytest.approx(4 / 6 * 0.5)
    assert m["urgent_recall"] == 0.0 and m["recoverable_capture"] == 0.0
    assert m["agents_needed"] == pytest.approx(3600 * (2 / 6) * 60 / 3600)


def test_wrong_intent_on_bot_counts_as_risk():
    gold = _gold([0, 0], [0, 0], [-1, -1])
    m = triage_metrics(np.array([False, False]), np.array([0, 2]), gold)
    assert m["risk"] == 0.5


def test_head_metrics_known_cases():
    probs = np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.6, 0.4, 0.0]])
    m = intent_metrics(np.array([0, 1, 1]), probs, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(2 / 3)
    assert m["per_class"]["b"]["recall"] == 0.5 and m["confusion_matrix"][1] == [1, 1, 0]
    b = binary_metrics(np.array([0, 0, 1, 1]), np.array([0.1, 0.6, 0.7, 0.9]), 0.5)
    assert b["roc_auc"] == 1.0 and b["precision"] == pytest.approx(2 / 3) and b["recall"] == 1.0
