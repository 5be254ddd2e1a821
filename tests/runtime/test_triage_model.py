"""The torch-free runtime: artifact checks, odd inputs, thread safety, and properties over arbitrary input."""

import json
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kefu_triage.core.policy import HUMAN_REASONS
from kefu_triage.runtime.model import ArtifactError, TriageModel

FIELDS = {
    "intent",
    "intent_prob",
    "margin",
    "top_intents",
    "urgent_prob",
    "refund_recoverable_prob",
    "novelty",
    "route",
    "reason",
}


@pytest.fixture(scope="module")
def runtime(smoke):
    return TriageModel.load(smoke["artifact"], precision="int8", threads=1)


def test_runtime_imports_no_torch():
    code = (
        "import sys, kefu_triage.runtime.model, kefu_triage.runtime.predict, kefu_triage.cli;"
        "bad = [m for m in ('torch', 'transformers', 'datasets', 'hydra', 'sklearn', 'yaml') if m in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_predict_output_contract(runtime):
    out = runtime.predict(["快递三天没动了，急用！", "我要退货", "发票怎么开"])
    assert len(out) == 3 and all(set(o) == FIELDS for o in out)
    for o in out:
        assert o["route"] in ("bot", "human") and 0 <= o["urgent_prob"] <= 1
        assert [t["intent"] for t in o["top_intents"]][0] == o["intent"] and len(o["top_intents"]) == 3
        assert (o["refund_recoverable_prob"] is None) == (o["intent"] != "return_refund")


def test_contexts_are_used_and_validated(runtime):
    ctx = [[{"role": "agent", "text": "亲 请提供新的收货地址哦"}], None]
    with_ctx = runtime.score(["[地址x]", "[地址x]"], ctx)
    assert not np.allclose(with_ctx["intent_logits"][0], with_ctx["intent_logits"][1])
    with pytest.raises(ValueError, match=r"texts\[0\]: context turn 0: role"):
        runtime.predict(["x"], [[{"role": "bot", "text": "hi"}]])
    with pytest.raises(ValueError, match="one entry"):
        runtime.predict(["x", "y"], [None])


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "😀😀😀",
        "\x00\x01\x02 控制字符",
        "Mixed 中文 English ١٢٣ русский",
        "急" * 100_000,
        "[表情]" * 50,
    ],
)
def test_odd_inputs_get_a_defined_result(runtime, text):
    t0 = time.time()
    out = runtime.predict([text])
    assert len(out) == 1 and set(out[0]) == FIELDS
    assert time.time() - t0 < 10  # a 100k-character message is truncated, not tokenised whole


@pytest.mark.parametrize("bad", [[None], [3], [b"bytes"], [["nested"]]])
def test_non_string_is_a_clear_value_error(runtime, bad):
    with pytest.raises(ValueError, match=r"texts\[0\]: text must be a string"):
        runtime.predict(bad)
    with pytest.raises(ValueError, match="list of strings"):
        runtime.predict(42)


@pytest.mark.parametrize("precision,tol", [("fp32", 1e-5), ("int8", 0.05)])
def test_batching_and_order_do_not_change_results(smoke, precision, tol):
    # fp32 is exact; dynamic int8 quantises activations with a per-batch scale, so batch-mates move
    # probabilities slightly (README documents it)
    model = TriageModel.load(smoke["artifact"], precision=precision, batch_size=8)
    texts = ["在吗", "物流三天没动了 怎么回事", "好的谢谢", "我要投诉你们 12315", "能换个大一码吗"] * 7
    one_by_one = [model.predict([t])[0] for t in texts[:5]]
    batched = model.predict(texts)
    for a, b in zip(one_by_one, batched[:5], strict=True):
        assert (
            abs(a["urgent_prob"] - b["urgent_prob"]) < tol and abs(a["intent_prob"] - b["intent_prob"]) < tol
        )


def test_length_groups_cap_batch_size_and_padding(smoke):
    model = TriageModel.load(smoke["artifact"], precision="fp32", batch_size=4)
    lengths = [5, 6, 6, 7, 7, 9, 30, 31, 80, 90]
    groups = model._length_groups(lengths)
    assert groups[0][0] == 0 and groups[-1][1] == len(lengths)
    assert all(
        a[1] == b[0] for a, b in zip(groups[:-1], groups[1:], strict=True)
    )  # contiguous: every message scored once
    for start, end in groups:
        assert end - start <= 4 and lengths[end - 1] <= 2 * lengths[start] + 8
    assert groups[:2] == [(0, 4), (4, 6)]  # short messages share a batch; 30 tokens start a new one
    assert model._length_groups([]) == []


def test_concurrent_predict_matches_serial(runtime):
    texts = ["快递到哪了", "我要退款 东西坏了", "转人工", "有优惠券吗", "地址写错了能改吗", "什么时候发货"]
    expected = runtime.predict(texts)
    errors, mismatches = [], []
    stop = time.time() + 3.0

    def worker():
        try:
            while time.time() < stop:
                if runtime.predict(texts) != expected:
                    mismatches.append(1)
        except Exception as exc:  # noqa: BLE001 - any error fails the test
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and not mismatches


def _copy(smoke, tmp_path):
    dst = tmp_path / "artifact"
    shutil.copytree(smoke["artifact"], dst)
    return dst


def test_changed_file_fails_hash_check(smoke, tmp_path):
    art = _copy(smoke, tmp_path)
    with open(art / "model.int8.onnx", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ArtifactError, match=r"model.int8.onnx: sha256 does not match"):
        TriageModel.load(art)


def test_missing_file_and_manifest(smoke, tmp_path):
    art = _copy(smoke, tmp_path)
    (art / "tokenizer.json").unlink()
    with pytest.raises(ArtifactError, match=r"tokenizer.json: missing"):
        TriageModel.load(art)
    (art / "triage.json").unlink()
    with pytest.raises(ArtifactError, match="triage.json: missing"):
        TriageModel.load(art)


def test_wrong_schema_version_and_other_taxonomy(smoke, tmp_path):
    art = _copy(smoke, tmp_path)
    with pytest.raises(ArtifactError, match="taxonomy intents differ"):
        TriageModel.load(art, expected_intents=["a", "b"])
    manifest = json.loads((art / "triage.json").read_text())
    manifest["schema_version"] = 99
    (art / "triage.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="schema_version 99"):
        TriageModel.load(art)


def test_bad_load_arguments(smoke):
    with pytest.raises(ValueError, match="precision"):
        TriageModel.load(smoke["artifact"], precision="fp16")
    with pytest.raises(ValueError, match="threads"):
        TriageModel.load(smoke["artifact"], threads=0)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="workers"):
            TriageModel.load(smoke["artifact"], workers=bad)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(st.text(max_size=300), min_size=0, max_size=12))
def test_property_predict_over_arbitrary_unicode(runtime, texts):
    out = runtime.predict(texts)
    assert len(out) == len(texts)
    for o in out:
        assert 0.0 <= o["intent_prob"] <= 1.0 and 0.0 <= o["urgent_prob"] <= 1.0
        probs = [t["prob"] for t in o["top_intents"]]
        assert probs == sorted(probs, reverse=True) and o["intent_prob"] == probs[0]
        # the route follows the policy: every human reason routes to a human, the others to the bot
        human = o["reason"] in HUMAN_REASONS  # includes "unfamiliar" (the novelty gate)
        assert (o["route"] == "human") == human
        if o["urgent_prob"] >= runtime.thresholds.urgent:
            assert o["reason"] == "urgent"
