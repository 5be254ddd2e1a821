import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoConfig, AutoModel

from kefu_triage.core.resources import packaged_config
from kefu_triage.core.taxonomy import load_taxonomy
from kefu_triage.model.encoders import load_encoder
from kefu_triage.model.multitask import KefuTriageConfig, KefuTriageModel, encode, load_model, predict_logits

TAX = load_taxonomy()
TINY = OmegaConf.load(packaged_config("model", "tiny"))


@pytest.fixture(scope="module")
def model_and_tokenizer():
    encoder, tokenizer = load_encoder(TINY)
    cfg = KefuTriageConfig(
        intent_labels=TAX.intent_names,
        intent_routes=TAX.routes,
        taxonomy=TAX.to_dict(),
        context_turns=2,
        max_seq_length=64,
        encoder_name="tiny",
        head_dropout=0.0,
    )
    torch.manual_seed(0)
    return KefuTriageModel.from_encoder(
        encoder, cfg
    ).eval(), tokenizer  # eval: no dropout noise in loss comparisons


def _batch(tokenizer, n=4):
    texts = ["快递到哪了", "我要退货", "转人工！！", "发票怎么开"][:n]
    ctx = [None, [{"role": "agent", "text": "您好"}], None, None][:n]
    return encode(tokenizer, texts, ctx, 2, 64, padding=True, return_tensors="pt")


def test_forward_shapes_and_context_segment(model_and_tokenizer):
    model, tok = model_and_tokenizer
    batch = _batch(tok)
    assert batch["token_type_ids"][1].max() == 1 and batch["token_type_ids"][0].max() == 0
    out = model(**batch)
    assert out.intent_logits.shape == (4, 17) and out.urgent_logit.shape == (4,)
    assert out.refund_recoverable_logit.shape == (4,) and out.loss is None


def test_refund_loss_is_masked_not_a_fake_zero(model_and_tokenizer):
    model, tok = model_and_tokenizer
    batch = _batch(tok)
    labels = dict(intent_labels=torch.tensor([6, 10, 15, 9]), urgent_labels=torch.tensor([0, 0, 1, 0]))
    model.zero_grad()
    masked = model(**batch, **labels, refund_labels=torch.full((4,), -1))
    masked.loss.backward()
    assert model.refund_head.weight.grad is None or torch.all(model.refund_head.weight.grad == 0)
    base = model(**batch, **labels).loss
    assert torch.isclose(masked.loss, base)  # no refund label -> no refund loss at all
    with_label = model(**batch, **labels, refund_labels=torch.tensor([-1, 1, -1, -1])).loss
    assert with_label > base


def test_unknown_urgent_label_is_masked(model_and_tokenizer):
    """Partial labels: urgent -1 = unknown. That row's urgent label value cannot change the loss, its urgent
    logit gets no gradient, and a batch with no urgent label at all leaves the urgent head untouched."""
    model, tok = model_and_tokenizer
    batch = _batch(tok)
    intent = dict(intent_labels=torch.tensor([6, 10, 15, 9]), refund_labels=torch.full((4,), -1))
    losses = []
    for value in (-1, -1.0, -7):  # any negative value is "unknown"
        out = model(**batch, **intent, urgent_labels=torch.tensor([0, value, 1, 0]).long())
        losses.append(out.loss)
    known_only = model(**batch, **intent, urgent_labels=torch.tensor([0, 0, 1, 0])).loss
    assert torch.isclose(losses[0], losses[1]) and torch.isclose(losses[0], losses[2])
    assert not torch.isclose(losses[0], known_only)  # the masked row is out of the mean, not a fake 0

    out = model(**batch, **intent, urgent_labels=torch.tensor([0, -1, 1, 0]))
    out.urgent_logit.retain_grad()
    out.loss.backward()
    assert out.urgent_logit.grad[1] == 0 and torch.all(out.urgent_logit.grad[[0, 2, 3]] != 0)

    model.zero_grad()
    none = model(**batch, **intent, urgent_labels=torch.full((4,), -1))
    none.loss.backward()
    assert torch.isclose(none.loss, model(**batch, **intent).loss)
    assert model.urgent_head.weight.grad is None or torch.all(model.urgent_head.weight.grad == 0)
    model.zero_grad()


def test_class_weights_change_the_intent_loss(model_and_tokenizer):
    model, tok = model_and_tokenizer
    batch = _batch(tok)
    labels = dict(intent_labels=torch.tensor([6, 10, 15, 9]))
    plain = model(**batch, **labels).loss
    model.intent_class_weights[6] = 10.0
    try:
        assert not torch.isclose(model(**batch, **labels).loss, plain)
    finally:
        model.intent_class_weights[6] = 1.0


def test_save_and_reload_give_identical_outputs(model_and_tokenizer, tmp_path):
    model, tok = model_and_tokenizer
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    records = [{"text": "快递到哪了"}, {"text": "退款", "context": [{"role": "customer", "text": "在吗"}]}]
    again, tok2 = load_model(tmp_path)
    a, b = predict_logits(model.eval(), tok, records), predict_logits(again, tok2, records)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-6)
    assert isinstance(AutoModel.from_pretrained(tmp_path), KefuTriageModel)
    assert AutoConfig.from_pretrained(tmp_path).get_taxonomy().intent_names == TAX.intent_names


def test_reloaded_model_keeps_its_class_weights_and_loss(model_and_tokenizer, tmp_path):
    """The class weights are a non-persistent buffer: reloading must rebuild them from the config, not leave
    uninitialised memory (which gave a NaN loss in one test session)."""
    model, tok = model_and_tokenizer
    weights = [0.5 + 0.1 * i for i in range(len(TAX.intent_names))]
    model.config.intent_class_weights = weights
    model._set_class_weights()
    try:
        model.save_pretrained(tmp_path)
        tok.save_pretrained(tmp_path)
        again, _ = load_model(tmp_path)
        auto = AutoModel.from_pretrained(tmp_path)
        for m in (again, auto):
            np.testing.assert_allclose(m.intent_class_weights.numpy(), weights, rtol=1e-6)
        batch = _batch(tok)
        batch.update(intent_labels=torch.tensor([1, 2, 3, 4]), urgent_labels=torch.tensor([0, 0, 1, 0]))
        with torch.no_grad():
            assert again.eval()(**batch).loss.item() == pytest.approx(
                model.eval()(**batch).loss.item(), abs=1e-5
            )
    finally:
        model.config.intent_class_weights = None
        model._set_class_weights()


def test_predict_logits_keeps_input_order(model_and_tokenizer):
    model, tok = model_and_tokenizer
    recs = [{"text": "好"}, {"text": "快递三天没动了，急用！我明天要出差"}, {"text": "在吗"}]
    full = predict_logits(model.eval(), tok, recs, batch_size=2)
    one = predict_logits(model, tok, [recs[1]])
    np.testing.assert_allclose(full["intent_logits"][1], one["intent_logits"][0], atol=1e-5)


def test_predict_logits_progress_bar_counts_batches_and_changes_nothing(model_and_tokenizer, capsys):
    model, tok = model_and_tokenizer
    recs = [{"text": t} for t in ("您好呀亲", "请问在不在线", "快递到哪了", "这件我想退掉", "开发票的事找谁")]
    quiet = predict_logits(model.eval(), tok, recs, batch_size=2)
    assert "teacher outputs" not in capsys.readouterr().err
    shown = predict_logits(model, tok, recs, batch_size=2, progress="teacher outputs")
    bar = capsys.readouterr().err
    assert "teacher outputs" in bar and "3/3" in bar  # 5 records in batches of 2
    np.testing.assert_allclose(shown["intent_logits"], quiet["intent_logits"], atol=1e-6)


def test_pooling_validated():
    with pytest.raises(ValueError, match="pooling"):
        KefuTriageConfig(pooling="max")


def test_token_type_ids_are_optional(model_and_tokenizer):
    model, tok = model_and_tokenizer
    batch = encode(tok, ["快递到哪了", "我要退货"], None, 2, 64, padding=True, return_tensors="pt")
    with_types = model(**batch)
    without = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    torch.testing.assert_close(with_types.intent_logits, without.intent_logits)  # all-zero types == absent


def test_focal_loss_down_weights_the_intent_loss(model_and_tokenizer):
    model, tok = model_and_tokenizer
    batch = _batch(tok)
    labels = dict(intent_labels=torch.tensor([6, 10, 15, 9]))
    plain = model(**batch, **labels).loss
    model.config.focal_gamma = 2.0
    try:
        focal = model(**batch, **labels).loss
    finally:
        model.config.focal_gamma = 0.0
    assert 0 < focal < plain


def test_class_weights_follow_training_counts():
    from kefu_triage.train.loop import class_weights

    names = TAX.intent_names
    records = [{"intent": names[0]}] * 90 + [{"intent": names[1]}] * 10 + [{"intent": n} for n in names[2:]]
    w = class_weights(records, TAX, power=0.5)
    assert len(w) == TAX.num_intents and abs(np.mean(w) - 1) < 1e-3
    assert w[1] / w[0] == pytest.approx(3.0, rel=1e-3)  # inverse sqrt frequency: sqrt(90 / 10)
    assert class_weights(records, TAX, power=0.0) == [1.0] * TAX.num_intents
