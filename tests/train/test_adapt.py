"""Learning from unlabelled turns: domain-adaptive MLM pretraining (cache, resume, masking) and self-training."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SMOKE_OVERRIDES, compose
from kefu_triage.core.taxonomy import load_taxonomy
from kefu_triage.model.encoders import build_tiny_tokenizer, load_encoder
from kefu_triage.train import adapt as A
from kefu_triage.train.self_training import LOG_FILE, select_pseudo_labels

# Invented messages (no real third-party text): enough variety for a tiny MLM run.
HEADS = [
    "我的快递",
    "这个订单",
    "买的耳机",
    "退款申请",
    "发票",
    "收货地址",
    "优惠券",
    "洗衣机",
    "手机壳",
    "会员积分",
]
TAILS = [
    "怎么还没到啊",
    "能不能帮我查一下",
    "什么时候发货",
    "坏了怎么办",
    "想退货可以吗",
    "为什么还没有退款",
    "可以改一下吗",
    "用不了了",
    "急用麻烦快点处理",
    "多少钱",
    "iPhone 15 能用吗",
]
AGENT = ["您好，请问有什么可以帮您？", "亲，请提供一下订单号哦"]


def write_unlabeled(path: Path, n: int = 72, seed: int = 0) -> Path:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        context = [] if i % 3 == 0 else [{"role": "agent", "text": rng.choice(AGENT)}]
        rows.append({"text": rng.choice(HEADS) + rng.choice(TAILS), "context": context})
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _cfg(root: Path, unlabeled: Path, *extra: str):
    return compose(
        "train",
        SMOKE_OVERRIDES
        + [
            f"paths.root_dir={root}",
            f"paths.cache_dir={root / 'cache'}",
            f"data.dir={root / 'data'}",
            f"adapt.unlabeled_file={unlabeled}",
            "adapt.mlm.epochs=2",
            "adapt.mlm.batch_size=16",
            "adapt.mlm.lr=1e-3",
            "adapt.mlm.checkpoint_every_steps=0",
            *extra,
            *([] if any("head_warmup" in e for e in extra) else ["adapt.mlm.head_warmup_ratio=0"]),
        ],
    )


def _encoder_weights(encoder) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in encoder.state_dict().items() if not k.startswith("pooler")}


def test_dapt_changes_the_encoder_caches_and_resumes_exactly(tmp_path):
    unlabeled = write_unlabeled(tmp_path / "turns.jsonl", n=56)
    cfg = _cfg(tmp_path / "a", unlabeled)
    base, _ = load_encoder(cfg.model)
    builds = A.BUILD_COUNT
    enc, tok, manifest = A.adapt_encoder(cfg)
    assert manifest["built"] and A.BUILD_COUNT == builds + 1
    stats = manifest["stats"]
    assert stats["steps"] > 0 and stats["train_rows"] + stats["eval_rows"] == stats["data"]["kept"]
    assert stats["mlm_loss_after"] < stats["mlm_loss_before"]  # it learnt something about these turns
    adapted, original = _encoder_weights(enc), _encoder_weights(base)
    assert adapted.keys() == original.keys()
    assert not torch.equal(
        adapted["embeddings.word_embeddings.weight"], original["embeddings.word_embeddings.weight"]
    )
    assert not torch.equal(
        adapted["encoder.layer.0.attention.self.query.weight"],
        original["encoder.layer.0.attention.self.query.weight"],
    )
    assert tok("我的快递")["input_ids"] == load_encoder(cfg.model)[1]("我的快递")["input_ids"]

    # second call: a verified cache hit with the same weights
    enc2, _, manifest2 = A.adapt_encoder(cfg)
    assert not manifest2["built"] and A.BUILD_COUNT == builds + 1
    assert all(torch.equal(v, _encoder_weights(enc2)[k]) for k, v in adapted.items())
    # other settings, another entry
    _, _, manifest3 = A.adapt_encoder(_cfg(tmp_path / "a", unlabeled, "adapt.mlm.mlm_probability=0.3"))
    assert manifest3["built"] and manifest3["path"] != manifest["path"]
    # a damaged cache entry is detected by its manifest and rebuilt
    weights = Path(manifest["path"]) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    assert A.adapt_encoder(cfg)[2]["built"]

    # interrupted after 3 steps, then continued: the same weights as the uninterrupted run
    cfg_b = _cfg(tmp_path / "b", unlabeled, "adapt.mlm.stop_after_steps=2")
    with pytest.raises(A.AdaptationInterrupted, match="checkpoint saved"):
        A.adapt_encoder(cfg_b)
    state = json.loads(
        (
            A._checkpoint_dir(A.adapted_path(cfg_b, manifest["key"]))
            .parent.parent.glob(".*.partial")
            .__next__()
            / A.CHECKPOINT
            / A.STATE_FILE
        ).read_text()
    )
    assert state["step"] == 2 and state["epoch"] == 0
    resumed, _, manifest_b = A.adapt_encoder(_cfg(tmp_path / "b", unlabeled))
    assert manifest_b["built"] and manifest_b["key"] == manifest["key"]
    assert all(torch.allclose(v, _encoder_weights(resumed)[k], atol=1e-5) for k, v in adapted.items())
    assert not list((tmp_path / "b" / "cache" / "adapted").glob(".*.partial"))  # the checkpoint is consumed


def test_head_warmup_trains_the_head_and_leaves_the_encoder_alone(tmp_path):
    unlabeled = write_unlabeled(tmp_path / "turns.jsonl", n=56)
    cfg = _cfg(tmp_path, unlabeled, "adapt.mlm.head_warmup_ratio=0.99")  # all 8 steps of this run
    base = _encoder_weights(load_encoder(cfg.model)[0])
    enc, _, manifest = A.adapt_encoder(cfg)
    assert manifest["spec"]["settings"]["head_warmup_ratio"] == 0.99  # part of the cache key
    assert manifest["stats"]["mlm_loss_after"] < manifest["stats"]["mlm_loss_before"]  # the head learnt
    assert all(torch.equal(v, _encoder_weights(enc)[k]) for k, v in base.items())  # tied embeddings too
    # a short warm-up: the encoder learns after it
    enc2, _, _ = A.adapt_encoder(_cfg(tmp_path, unlabeled, "adapt.mlm.head_warmup_ratio=0.25"))
    assert not torch.equal(
        _encoder_weights(enc2)["encoder.layer.0.attention.self.query.weight"],
        base["encoder.layer.0.attention.self.query.weight"],
    )
    with pytest.raises(A.AdaptationError, match="adapt.mlm.head_warmup_ratio"):
        A.adapt_encoder(_cfg(tmp_path, unlabeled, "adapt.mlm.head_warmup_ratio=1.5"))


def test_masking_keeps_words_and_cjk_runs_whole():
    tok = build_tiny_tokenizer(64)
    records = [{"text": "我的快递 iphone 怎么还没到啊", "context": [{"role": "agent", "text": "您好"}]}]
    ex = A.prepare_examples(records, tok, context_turns=1, max_length=64)[0]
    tokens = tok.convert_ids_to_tokens(ex["input_ids"])
    words = A.word_ids(ex, np.random.default_rng(0), max_span=3)
    by_token = dict(zip(tokens, words, strict=False))
    # the pieces of an English word share one id; specials have none
    letters = [w for t, w in zip(tokens, words, strict=True) if t.lstrip("#") in "iphone" and t != "[SEP]"]
    assert len(set(letters)) == 1 and by_token["[CLS]"] == -1
    # CJK characters are grouped in runs of at most max_span; the two segments never share a run
    cjk_ids = [w for w, c in zip(words, ex["cjk"], strict=True) if c]
    assert max(np.bincount(cjk_ids)) <= 3 and len(set(cjk_ids)) < len(cjk_ids)
    assert by_token["您"] != by_token["啊"]
    singles = A.word_ids(ex, np.random.default_rng(0), max_span=1)
    assert len({w for w, c in zip(singles, ex["cjk"], strict=True) if c}) == sum(ex["cjk"])

    masker = A.SpanMasker(tok, mlm_probability=0.5, max_span=3)
    for key in range(5):
        batch = masker([ex], key)
        labels, inputs = batch["labels"][0], batch["input_ids"][0]
        masked = labels != -100
        assert masked.any()
        assert (inputs[masked] == tok.mask_token_id).all() and (
            labels[masked] == torch.tensor(ex["input_ids"])[masked]
        ).all()
        assert not masked[torch.tensor(ex["special"])].any()
        # whole groups: rebuild the groups this key drew and check every group is all-or-nothing
        groups = A.word_ids(ex, np.random.default_rng(key), 3)
        for w in set(groups) - {-1}:
            members = [masked[i].item() for i, g in enumerate(groups) if g == w]
            assert all(members) or not any(members)
    assert torch.equal(masker([ex], 7)["labels"], masker([ex], 7)["labels"])  # deterministic per key


def test_unlabeled_turns_exclude_evaluation_texts(tmp_path):
    unlabeled = write_unlabeled(tmp_path / "turns.jsonl", n=40)
    texts = [json.loads(x)["text"] for x in unlabeled.read_text().splitlines()]
    gold = tmp_path / "gold.jsonl"
    gold.write_text(json.dumps({"text": texts[0], "intent": "order_status"}, ensure_ascii=False) + "\n")
    kept, report = A.load_unlabeled(
        {"unlabeled_file": str(unlabeled), "exclude_files": [str(gold)]}, exclude_records=[{"text": texts[1]}]
    )
    assert (
        report["overlap"][str(gold)] == texts.count(texts[0])
        and report["overlap"]["labelled dev/test/eval splits"]
    )
    assert not {texts[0], texts[1]} & {r["text"] for r in kept}
    assert report["kept"] == len(kept) == len({(r["text"], json.dumps(r["context"])) for r in kept})
    with pytest.raises(A.AdaptationError, match="file not found"):
        A.load_unlabeled({"unlabeled_file": str(tmp_path / "missing.jsonl")})
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "好的"}\n{"context": []}\n')
    with pytest.raises(A.AdaptationError, match=r"bad.jsonl:2: text: missing"):
        A.load_unlabeled({"unlabeled_file": str(bad)})


def test_self_training_keeps_only_confident_consistent_turns():
    taxonomy = load_taxonomy()
    names = taxonomy.intent_names
    refund = taxonomy.refund_intents[0]
    other = next(n for n in names if taxonomy.route_of(n) != "refund_triage")
    c_ref, c_other = names.index(refund), names.index(other)

    def onehot(c, p):
        v = np.full(len(names), (1 - p) / (len(names) - 1))
        v[c] = p
        return v

    det = np.stack([onehot(c_ref, 0.97), onehot(c_other, 0.95), onehot(c_other, 0.6), onehot(c_ref, 0.95)])
    mc = np.stack([det.copy() for _ in range(3)])
    mc[1, 3] = onehot(c_other, 0.9)  # row 3: one dropout pass disagrees
    probs = {
        "intent": det,
        "mc_intent": mc,
        "urgent": np.array([0.99, 0.5, 0.9, 0.1]),
        "refund": np.array([0.02, 0.99, 0.5, 0.5]),
    }
    records = [{"text": f"消息{i}", "context": []} for i in range(4)]
    st = {"confidence": 0.9, "min_agreement": 1.0, "binary_confidence": 0.9, "max_per_intent": None}
    rows, figures = select_pseudo_labels(probs, records, taxonomy, st, round_no=1)
    assert [r["text"] for r in rows] == ["消息0", "消息1"]  # 2: not confident, 3: inconsistent
    assert rows[0]["intent"] == refund and rows[0]["urgent"] == 1 and rows[0]["refund_recoverable"] == 0
    assert rows[1]["intent"] == other and rows[1]["urgent"] is None and rows[1]["refund_recoverable"] is None
    assert figures["kept"] == 2 and figures["pool"] == 4 and figures["intents"] == {refund: 1, other: 1}
    assert figures["passed_confidence"] == 2 and figures["passed_agreement"] == 3
    # a looser agreement keeps the inconsistent row; a cap per intent keeps the most confident
    loose = {**st, "min_agreement": 0.6, "confidence": 0.62}
    rows, _ = select_pseudo_labels(probs, records, taxonomy, loose, 1)
    assert [r["text"] for r in rows] == ["消息0", "消息1", "消息3"]
    rows, _ = select_pseudo_labels(probs, records, taxonomy, {**loose, "max_per_intent": 1}, 1)
    assert sorted(r["text"] for r in rows) == ["消息0", "消息1"]


def test_self_training_keep_fraction_ranks_the_pool_and_settings_are_checked():
    taxonomy = load_taxonomy()
    n, c = len(taxonomy.intent_names), 0
    det = np.full((10, n), 0.01)
    det[:, c] = np.linspace(0.2, 0.65, 10)  # never above 0.7, like the real model on real turns
    probs = {"intent": det, "mc_intent": np.stack([det, det]), "urgent": np.full(10, 0.5)}
    probs["refund"] = np.full(10, 0.5)
    records = [{"text": f"消息{i}", "context": []} for i in range(10)]
    st = {"confidence": None, "keep_fraction": 0.3, "min_agreement": 1.0, "binary_confidence": 0.9}
    rows, figures = select_pseudo_labels(probs, records, taxonomy, st, 1)
    assert [r["text"] for r in rows] == ["消息7", "消息8", "消息9"]  # the 30% most confident
    assert figures["kept"] == 3 and figures["confidence_quantiles"]["0.5"] < 0.5
    rows, _ = select_pseudo_labels(probs, records, taxonomy, {**st, "confidence": 0.64}, 1)
    assert [r["text"] for r in rows] == ["消息9"]  # both filters apply
    rows, _ = select_pseudo_labels(
        probs, records, taxonomy, {**st, "confidence": 0.9, "keep_fraction": None}, 1
    )
    assert rows == []
    with pytest.raises(A.AdaptationError, match="set confidence, keep_fraction or both"):
        _settings_of("adapt.self_training.confidence=null", "adapt.self_training.keep_fraction=null")
    with pytest.raises(A.AdaptationError, match=r"keep_fraction must be in \(0, 1\]"):
        _settings_of("adapt.self_training.keep_fraction=0")


def _settings_of(*overrides):
    from kefu_triage.train.self_training import _settings

    return _settings(compose("train", ["experiment=smoke", *overrides]))


def test_self_training_that_keeps_nothing_stops_with_the_quantiles(tmp_path):
    from kefu_triage.train.loop import ensure_data, train

    root = tmp_path / "root"
    cfg = _cfg(
        root,
        write_unlabeled(tmp_path / "turns.jsonl", n=32, seed=2),
        "adapt.mlm.enabled=false",
        "adapt.self_training.rounds=1",
        "adapt.self_training.confidence=1.0",
        "adapt.self_training.keep_fraction=null",
        "adapt.self_training.mc_passes=1",
        "data.max_train_examples=64",
        "data.max_dev_examples=32",
        "trainer.max_epochs=1",
        "trainer.checkpoint_every_steps=0",
    )
    ensure_data(cfg)
    with pytest.raises(
        A.AdaptationError,
        match=r"round 1: no unlabelled turn passed the filter.*quantiles.*lower adapt.self_training.confidence "
        r"\(now 1.0\) or adapt.self_training.min_agreement \(now .*\), or set keep_fraction",
    ):
        train(cfg, root / "run")


def test_dapt_and_self_training_compose_with_smoke_training(tmp_path):
    from kefu_triage.train.loop import ensure_data, train

    root = tmp_path / "root"
    unlabeled = write_unlabeled(tmp_path / "turns.jsonl", n=96, seed=1)
    cfg = _cfg(
        root,
        unlabeled,
        "adapt.mlm.epochs=1",
        "adapt.self_training.rounds=1",
        "adapt.self_training.confidence=0.0",  # a tiny model is never sure: test the agreement filter
        "adapt.self_training.keep_fraction=null",
        "adapt.self_training.mc_passes=2",
        "adapt.self_training.min_agreement=0.5",
        "data.max_train_examples=192",
        "data.max_dev_examples=64",
        "trainer.max_epochs=1",
        "trainer.checkpoint_every_steps=0",
        f"trainer.publish_dir={root / 'pub'}",
    )
    ensure_data(cfg)
    builds = A.BUILD_COUNT
    summary = train(cfg, root / "run")
    assert A.BUILD_COUNT == builds + 1  # round 1 fine-tunes from the cached adapted encoder
    log = [json.loads(x) for x in (root / "run" / LOG_FILE).read_text().splitlines()]
    assert [e["round"] for e in log] == [0, 1] == [e["round"] for e in summary["self_training"]]
    assert log[0]["kept"] == 0 and 0 < log[1]["kept"] == log[1]["passed_agreement"] <= log[1]["pool"]
    assert sum(log[1]["intents"].values()) == log[1]["kept"]
    assert all("dev_intent_accuracy" in e and "dev_score" in e for e in log)
    pseudo_file = root / "run" / "round1" / "train_with_pseudo_labels.jsonl"
    rows = [json.loads(x) for x in pseudo_file.read_text().splitlines()]
    assert len(rows) == 192 + log[1]["kept"] and sum("pseudo_label" in r for r in rows) == log[1]["kept"]
    for d in (root / "run" / "model", root / "pub"):
        assert (d / "model.safetensors").is_file() and (d / LOG_FILE).is_file()
    data_summary = json.loads((root / "pub" / "data_summary.json").read_text())
    assert data_summary["splits"]["train"]["rows"] == 192 + log[1]["kept"]


def test_dapt_under_bf16_is_its_own_cache_entry_and_still_learns(tmp_path):
    unlabeled = write_unlabeled(tmp_path / "turns.jsonl", n=56)
    _, _, plain = A.adapt_encoder(_cfg(tmp_path, unlabeled))
    enc, _, bf16 = A.adapt_encoder(_cfg(tmp_path, unlabeled, "trainer.mixed_precision=bf16"))
    assert plain["spec"]["settings"]["mixed_precision"] == "no"
    assert bf16["built"] and bf16["spec"]["settings"]["mixed_precision"] == "bf16"
    assert bf16["key"] != plain["key"]  # a float32 encoder is never served for a bf16 request, or back
    assert bf16["stats"]["mlm_loss_after"] < bf16["stats"]["mlm_loss_before"]
    assert all(v.dtype == torch.float32 for v in _encoder_weights(enc).values() if v.is_floating_point())


def test_pseudo_labelling_passes_follow_the_precision():
    from kefu_triage.model.multitask import KefuTriageConfig, KefuTriageModel
    from kefu_triage.train.self_training import mc_probabilities

    taxonomy = load_taxonomy()
    encoder, tokenizer = load_encoder(compose("train", SMOKE_OVERRIDES).model)
    torch.manual_seed(0)
    model = KefuTriageModel.from_encoder(
        encoder,
        KefuTriageConfig(
            intent_labels=taxonomy.intent_names, intent_routes=taxonomy.routes, encoder_name="tiny"
        ),
    )
    records = [
        {"text": t, "context": []}
        for t in ("这双鞋我想退掉换个码", "昨天下的单怎么还没发", "能开个公司抬头的票吗")
    ]
    fp32 = mc_probabilities(model, tokenizer, records, passes=2, seed=3)
    again = mc_probabilities(model, tokenizer, records, passes=2, seed=3)
    bf16 = mc_probabilities(model, tokenizer, records, passes=2, seed=3, precision="bf16")
    assert np.array_equal(fp32["mc_intent"], again["mc_intent"])  # deterministic for a seed
    assert bf16["intent"].dtype == np.float32 and bf16["intent"].shape == fp32["intent"].shape
    assert not np.array_equal(bf16["intent"], fp32["intent"])  # really computed in bfloat16
    assert np.allclose(bf16["intent"], fp32["intent"], atol=0.05)
