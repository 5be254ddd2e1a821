import numpy as np

from kefu_triage.core.taxonomy import load_taxonomy
from kefu_triage.data.generator import generate_splits
from kefu_triage.evaluate.peers import KeywordRuleBaseline, TfidfLogRegBaseline

TAX = load_taxonomy()


def test_tfidf_baseline_learns_the_generated_task():
    data = generate_splits(seed=1, size=2500)
    peer = TfidfLogRegBaseline(TAX.num_intents).fit(data["train"], TAX)
    out = peer.predict_logits(data["test"])
    assert out["intent_logits"].shape == (len(data["test"]), TAX.num_intents)
    gold = np.array([TAX.intent_id(r["intent"]) for r in data["test"]])
    acc = (out["intent_logits"].argmax(1) == gold).mean()
    assert acc > 3 / TAX.num_intents  # far above chance
    assert np.allclose(np.exp(out["intent_logits"]).sum(1), 1.0)


def test_keyword_rules():
    peer = KeywordRuleBaseline(TAX.intent_names)
    out = peer.predict_logits([{"text": "转人工"}, {"text": "我要投诉你们 12315"}, {"text": "今天天气真好"}])
    names = [TAX.intent_names[i] for i in out["intent_logits"].argmax(1)]
    assert names == ["human_agent", "complaint", "other"]
    assert out["urgent_logit"][1] > 0 > out["urgent_logit"][2]
