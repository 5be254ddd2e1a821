"""int8 results do not depend on batch mates: dynamic int8 picks activation scales per onnxruntime call, so
the runtime scores int8 one message per call by default (exact), and fp32 batches freely."""

from __future__ import annotations

import numpy as np

from kefu_triage.runtime.model import TriageModel

TEXTS = [
    "在吗",
    "物流三天没动了 怎么回事？？",
    "好的谢谢",
    "我要投诉你们 12315！！！",
    "能换个大一码吗",
    "退款申请提交了为什么还没到账，都一个星期了",
    "发票怎么开",
]


def test_int8_scores_are_exactly_the_same_alone_and_in_any_batch(smoke):
    model = TriageModel.load(smoke["artifact"], precision="int8", batch_size=32)
    alone = [model.score([t]) for t in TEXTS]
    # the same messages among other (longer, shorter, repeated) ones, in another order
    mates = TEXTS[::-1] + ["我的订单号是多少来着，帮我查一下物流到哪了，急用" * 2] + TEXTS
    batched = model.score(mates)
    for i, t in enumerate(TEXTS):
        j = len(TEXTS) - 1 - i
        for k, v in alone[i].items():
            assert np.array_equal(v[0], batched[k][j]), (t, k)
            assert np.array_equal(v[0], batched[k][len(TEXTS) + 1 + i]), (t, k)
    assert [p["route"] for p in model.predict(mates)[: len(TEXTS)]] == [
        model.predict([t])[0]["route"] for t in TEXTS[::-1]
    ]


def test_batched_int8_is_an_explicit_choice_and_fp32_batches(smoke):
    assert TriageModel.load(smoke["artifact"], precision="int8").batch_size == 1
    assert (
        TriageModel.load(
            smoke["artifact"], precision="int8", batch_size=16, batch_independent=False
        ).batch_size
        == 16
    )
    fp32 = TriageModel.load(smoke["artifact"], precision="fp32", batch_size=16)
    assert fp32.batch_size == 16
    alone = np.concatenate([fp32.score([t])["intent_logits"] for t in TEXTS])
    np.testing.assert_allclose(fp32.score(TEXTS)["intent_logits"], alone, atol=1e-5)


def test_side_by_side_workers_return_the_same_scores_in_input_order(smoke):
    serial = TriageModel.load(smoke["artifact"], precision="int8", threads=1)
    parallel = TriageModel.load(smoke["artifact"], precision="int8", threads=1, workers=3)
    texts = TEXTS * 5 + ["我的订单号是多少来着，帮我查一下物流到哪了，急用" * 2]
    want, got = serial.score(texts), parallel.score(texts)
    assert parallel._pool is not None  # the calls really ran on the pool
    for k, v in want.items():
        assert np.array_equal(v, got[k]), k
    assert parallel.predict(texts) == serial.predict(texts)
