"""Domain-adaptive pretraining (DAPT): masked-language-model training of the encoder on your own
unlabelled customer turns, before fine-tuning.

    python -m kefu_triage.train adapt.unlabeled_file=/data/turns.jsonl adapt.exclude_files=[/data/gold.jsonl]

The unlabelled file is JSONL/CSV/Parquet with ``text`` and optional ``context`` (labels, if any, are ignored).
Each turn is encoded exactly as fine-tuning encodes it (message + previous turns as a second segment, the
model's ``max_length``), so the encoder adapts to the inputs it will classify.

Masking (Chinese-aware whole-word masking, kept simple):

- a token is masked or kept as a whole: never part of a piece;
- non-CJK words (English, numbers, placeholders) are masked whole: the pieces of one word (SentencePiece
  ``▁`` / WordPiece ``##`` continuations) share one mask decision;
- CJK pieces (the e5_small_zh SentencePiece unigram often keeps a word such as 修改 or 有什么 as one piece)
  are grouped into runs of 1..``max_span`` consecutive pieces (length n drawn with probability ~ 1/n, afresh
  for every batch), and a run is masked as a unit: n-gram masking in the spirit of MacBERT/ERNIE, without a
  word segmenter;
- transformers' ``DataCollatorForLanguageModeling(whole_word_mask=True)`` does the masking itself; its word
  boundaries come from offsets, which for unsegmented Chinese would make a whole sentence one "word", so it
  is fed synthetic offsets that encode the groups above. Whole-word masking in transformers replaces every
  chosen token by the mask token (no 10% random / 10% kept).

The model is transformers' ``BertForMaskedLM`` around the encoder's weights; its prediction head is tied to
the word embeddings (its transform starts from BERT's initialisation: the e5 encoder ships without one).
The loss is computed on the masked positions only (the vocabulary is ~22k pieces: logits for every
position would cost ~300 MB per batch).

The adapted encoder is cached under ``${paths.cache_dir}/adapted/<model>-<key>``, the key hashing the base
encoder's weights and tokenizer, the prepared turns and the settings; a manifest with the sha256 of every
file is written last (a partial or damaged copy is rebuilt). An interrupted adaptation (Ctrl-C, SIGTERM,
``adapt.mlm.stop_after_steps``) leaves a checkpoint beside it that the next run with the same key resumes.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from kefu_triage.core.fileio import atomic_directory, atomic_write_json, sha256_file
from kefu_triage.core.inputs import clean_text, encode_inputs
from kefu_triage.model.encoders import MANIFEST, _build_lock, load_encoder, verify_cached_encoder
from kefu_triage.model.multitask import input_tokenizer
from kefu_triage.train.loop import (
    LengthGroupedSampler,
    TrainingInterrupted,
    _StopFlag,
    autocast,
    trainer_precision,
)

log = logging.getLogger(__name__)
ADAPT_VERSION = 2  # bump when the recipe changes what a cached adapted encoder holds
CHECKPOINT = "checkpoint"
STATE_FILE = "adapt_state.json"
# settings that change the result (the cache key); checkpointing / progress settings do not
RESULT_SETTINGS = (
    "epochs",
    "lr",
    "batch_size",
    "mlm_probability",
    "max_span",
    "warmup_ratio",
    "head_warmup_ratio",
    "weight_decay",
    "max_examples",
    "eval_fraction",
    "eval_max",
    "seed",
)
BUILD_COUNT = 0  # adaptations run in this process (tests tell a cache hit from a rebuild)


class AdaptationInterrupted(TrainingInterrupted):
    """A resumable adaptation checkpoint was saved (signal or ``adapt.mlm.stop_after_steps``)."""


class AdaptationError(ValueError):
    """Bad adapt settings or an unusable unlabelled file (a clear one-line error)."""


# ---------------------------------------------------------------------------------------------------
# Settings and the unlabelled turns
# ---------------------------------------------------------------------------------------------------
def adapt_settings(cfg: DictConfig) -> dict[str, Any]:
    """The ``adapt`` section as a plain dict ({} when the config has none)."""
    section = cfg.get("adapt") if hasattr(cfg, "get") else None
    return OmegaConf.to_container(section, resolve=True) if section is not None else {}


def dapt_enabled(cfg: DictConfig) -> bool:
    a = adapt_settings(cfg)
    return bool(a.get("unlabeled_file")) and bool((a.get("mlm") or {}).get("enabled", True))


def _text_key(text: str) -> str:
    return clean_text(text)


def load_unlabeled(
    adapt: dict[str, Any], exclude_records: list[dict[str, Any]] = ()
) -> tuple[list[dict], dict]:
    """Unlabelled turns (``{"text", "context"}``), without exact duplicates and without any turn whose text is
    in ``adapt.exclude_files`` or ``exclude_records`` (sets you evaluate on); plus a report of what was removed."""
    from kefu_triage.data.labelling import read_pool
    from kefu_triage.data.records import DataValidationError

    path = adapt.get("unlabeled_file")
    if not path:
        raise AdaptationError("adapt.unlabeled_file is not set (a JSONL/CSV/Parquet file with a text column)")
    if not Path(path).is_file():
        raise AdaptationError(f"adapt.unlabeled_file: file not found: {path}")
    try:
        pool = read_pool(path, drop_invalid=bool(adapt.get("drop_invalid", False)))
        excluded: dict[str, set[str]] = {}
        for f in adapt.get("exclude_files") or []:
            if not Path(f).is_file():
                raise AdaptationError(f"adapt.exclude_files: file not found: {f}")
            excluded[str(f)] = {_text_key(r["text"]) for r in read_pool(f, drop_invalid=True)}
    except DataValidationError as exc:
        raise AdaptationError(f"adapt.unlabeled_file: {exc}") from None
    if exclude_records:
        excluded["labelled dev/test/eval splits"] = {_text_key(r["text"]) for r in exclude_records}
    report: dict[str, Any] = {"file": str(path), "rows": len(pool), "overlap": {}, "duplicates": 0}
    for name, texts in excluded.items():
        report["overlap"][name] = sum(_text_key(r["text"]) in texts for r in pool)
    banned = set().union(*excluded.values()) if excluded else set()
    seen: set[str] = set()
    kept = []
    for r in pool:
        key = json.dumps([_text_key(r["text"]), r["context"]], ensure_ascii=False)
        if _text_key(r["text"]) in banned:
            continue
        if key in seen:
            report["duplicates"] += 1
            continue
        seen.add(key)
        kept.append({"text": r["text"], "context": r["context"]})
    report["kept"] = len(kept)
    if not kept:
        raise AdaptationError(f"adapt.unlabeled_file: {path}: no turns left after excluding evaluation texts")
    return kept, report


# ---------------------------------------------------------------------------------------------------
# Tokens, words and masks
# ---------------------------------------------------------------------------------------------------
def _is_cjk(ch: str) -> bool:
    o = ord(ch)
    return 0x4E00 <= o <= 0x9FFF or 0x3400 <= o <= 0x4DBF or 0xF900 <= o <= 0xFAFF or 0x20000 <= o <= 0x2FA1F


def token_units(encoding) -> tuple[list[bool], list[bool], list[bool]]:
    """Per token of a ``tokenizers.Encoding``: (special, starts a new unit, is a CJK piece).

    A unit is a non-CJK word (its continuation pieces join it) or one CJK piece (runs of these are grouped
    per batch by :func:`word_ids`)."""
    special = [bool(s) for s in encoding.special_tokens_mask]
    starts, cjk = [], []
    prev_end, prev_seq, prev_cjk = -1, None, False
    for tok, (start, end), seq, sp in zip(
        encoding.tokens, encoding.offsets, encoding.sequence_ids, special, strict=True
    ):
        body = tok.lstrip("▁")
        body = body[2:] if body.startswith("##") else body
        is_cjk = bool(body) and all(_is_cjk(c) for c in body)
        if sp:
            starts.append(False)
        else:
            new = (
                seq != prev_seq
                or tok.startswith("▁")
                or is_cjk
                or prev_cjk
                or (start != prev_end and not tok.startswith("##"))
            )
            starts.append(new)
            prev_end, prev_seq = end, seq
        cjk.append(is_cjk and not sp)
        prev_cjk = is_cjk and not sp
    return special, starts, cjk


def prepare_examples(
    records: list[dict[str, Any]], tokenizer, context_turns: int, max_length: int
) -> list[dict]:
    """Token ids (as fine-tuning builds them) and the unit marks the masker needs."""
    encodings = encode_inputs(
        input_tokenizer(tokenizer, max_length),
        [r["text"] for r in records],
        [r.get("context") for r in records],
        context_turns,
    )
    out = []
    for e in encodings:
        special, starts, cjk = token_units(e)
        out.append(
            {
                "input_ids": list(e.ids),
                "token_type_ids": list(e.type_ids),
                "special": special,
                "starts": starts,
                "cjk": cjk,
            }
        )
    return out


def span_lengths(max_span: int) -> tuple[np.ndarray, np.ndarray]:
    n = np.arange(1, max(int(max_span), 1) + 1)
    p = 1.0 / n
    return n, p / p.sum()


def word_ids(example: dict[str, Any], rng: np.random.Generator, max_span: int) -> list[int]:
    """Word id per token (-1 = special): units, with consecutive CJK pieces grouped into runs of 1..max_span."""
    lengths, probs = span_lengths(max_span)
    out, wid, left, prev_cjk = [], 0, 0, False
    for special, start, cjk in zip(example["special"], example["starts"], example["cjk"], strict=True):
        if special:
            out.append(-1)
            left, prev_cjk = 0, False
            continue
        if not start:
            out.append(wid)
            continue
        if cjk and prev_cjk and left > 0:
            left -= 1
        else:
            wid += 1
            left = int(rng.choice(lengths, p=probs)) - 1 if cjk else 0
        out.append(wid)
        prev_cjk = cjk
    return out


class SpanMasker:
    """Pads a batch and masks it with ``DataCollatorForLanguageModeling(whole_word_mask=True)``, deterministic
    for a given ``key`` (so a resumed run sees the same masks as an uninterrupted one)."""

    def __init__(self, tokenizer, mlm_probability: float, max_span: int):
        from transformers import DataCollatorForLanguageModeling

        if tokenizer.mask_token_id is None:
            raise AdaptationError(
                "the encoder's tokenizer has no mask token: it cannot do masked-LM adaptation"
            )
        self.collator = DataCollatorForLanguageModeling(
            tokenizer,
            mlm=True,
            whole_word_mask=True,
            mlm_probability=float(mlm_probability),
            mask_replace_prob=1.0,
            random_replace_prob=0.0,
            return_tensors="pt",
        )
        self.pad_id = tokenizer.pad_token_id
        self.max_span = int(max_span)

    def __call__(self, examples: list[dict[str, Any]], key: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng(key)
        width = max(len(e["input_ids"]) for e in examples)
        n = len(examples)
        ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        types = torch.zeros((n, width), dtype=torch.long)
        attention = torch.zeros((n, width), dtype=torch.long)
        special = torch.ones((n, width), dtype=torch.long)
        offsets = torch.zeros((n, width, 2), dtype=torch.long)
        for row, e in enumerate(examples):
            k = len(e["input_ids"])
            ids[row, :k] = torch.tensor(e["input_ids"])
            types[row, :k] = torch.tensor(e["token_type_ids"])
            attention[row, :k] = 1
            special[row, :k] = torch.tensor(e["special"], dtype=torch.long)
            # synthetic offsets: tokens of one word touch (start == previous end), a new word leaves a gap;
            # that is exactly how the collator tells words apart
            for i, w in enumerate(word_ids(e, rng, self.max_span)):
                if w >= 0:
                    offsets[row, i] = torch.tensor([i + w, i + w + 1])
        self.collator.generator = torch.Generator().manual_seed(int(key))
        masked, labels = self.collator.torch_mask_tokens(
            ids, special_tokens_mask=special, offset_mapping=offsets
        )
        return {"input_ids": masked, "attention_mask": attention, "token_type_ids": types, "labels": labels}


def _batch_key(seed: int, epoch: int, batch: int) -> int:
    return (int(seed) * 1_000_003 + epoch * 100_003 + batch) % (2**63)


# ---------------------------------------------------------------------------------------------------
# The masked-LM model around the encoder
# ---------------------------------------------------------------------------------------------------
def mlm_model(encoder, seed: int):
    """``BertForMaskedLM`` holding a copy of ``encoder``'s weights, prediction head tied to the word embeddings."""
    from transformers import BertForMaskedLM

    config = copy.deepcopy(encoder.config)
    config.tie_word_embeddings = True
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = BertForMaskedLM(config)
    missing, _ = model.bert.load_state_dict(
        encoder.state_dict(), strict=False
    )  # the encoder's pooler is unused
    if missing:
        raise AdaptationError(f"encoder weights do not fit BertForMaskedLM: missing {missing[:5]}")
    model.tie_weights()
    head = model.cls.predictions
    if head.decoder.weight.data_ptr() != model.bert.embeddings.word_embeddings.weight.data_ptr():
        raise AdaptationError("BertForMaskedLM did not tie its decoder to the word embeddings")
    return model


def mlm_loss(model, batch: dict[str, torch.Tensor], train_encoder: bool = True) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over the masked positions (head applied to those only) and their count. With
    ``train_encoder`` False the encoder runs without a graph (head warm-up: only the head learns)."""
    labels = batch["labels"]
    with torch.set_grad_enabled(train_encoder and torch.is_grad_enabled()):
        hidden = model.bert(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            token_type_ids=batch["token_type_ids"],
        ).last_hidden_state
    sel = labels != -100
    n = int(sel.sum())
    if n == 0:  # nothing masked (a very short batch): keep the graph, no signal
        return model.cls(hidden[:, 0]).sum() * 0.0, 0
    logits = model.cls(hidden[sel])
    return torch.nn.functional.cross_entropy(logits, labels[sel]), n


@torch.no_grad()
def evaluate_mlm(
    model, masker: SpanMasker, examples: list[dict], batch_size: int, seed: int, device
) -> float | None:
    """Masked-token cross-entropy on held-out turns with fixed masks (comparable before and after)."""
    if not examples:
        return None
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for b, start in enumerate(range(0, len(examples), batch_size)):
        batch = masker(examples[start : start + batch_size], _batch_key(seed, 10_000, b))
        loss, n = mlm_loss(model, {k: v.to(device) for k, v in batch.items()})
        total, count = total + loss.item() * n, count + n
    model.train(was_training)
    return round(total / max(count, 1), 4)


# ---------------------------------------------------------------------------------------------------
# Cache key, cache directory, checkpoint
# ---------------------------------------------------------------------------------------------------
def encoder_fingerprint(encoder, tokenizer) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(encoder.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    h.update(tokenizer.backend_tokenizer.to_str().encode())
    return h.hexdigest()


def adapted_path(cfg: DictConfig, key: str) -> Path:
    root = Path(str(cfg.paths.cache_dir)).expanduser()
    return root / "adapted" / f"{cfg.model.name}-{key[:16]}"


def _checkpoint_dir(path: Path) -> Path:
    return path.parent / f".{path.name}.partial" / CHECKPOINT


def _load_adapted(path: Path, max_length: int):
    from transformers import AutoModel, AutoTokenizer

    encoder = AutoModel.from_pretrained(path, attn_implementation="eager")
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.model_max_length = int(max_length)
    return encoder, tokenizer


def adapt_encoder(cfg: DictConfig, exclude_records: list[dict[str, Any]] = ()) -> tuple[Any, Any, dict]:
    """``(encoder, tokenizer, manifest)``: the encoder after masked-LM adaptation on ``adapt.unlabeled_file``,
    from the cache when a verified copy with the same key exists (``manifest["built"]`` tells which)."""
    global BUILD_COUNT
    adapt = adapt_settings(cfg)
    mlm = {
        **{
            "epochs": 3,
            "lr": 5e-5,
            "batch_size": 32,
            "mlm_probability": 0.15,
            "max_span": 3,
            "warmup_ratio": 0.1,
            "head_warmup_ratio": 0.0,
            "weight_decay": 0.01,
            "max_examples": None,
            "eval_fraction": 0.05,
            "eval_max": 256,
            "seed": 42,
        },
        **(adapt.get("mlm") or {}),
    }
    for name in ("epochs", "batch_size", "max_span"):
        if not isinstance(mlm[name], int) or mlm[name] < 1:
            raise AdaptationError(f"adapt.mlm.{name} must be a positive integer, got {mlm[name]!r}")
    if not 0 <= float(mlm["head_warmup_ratio"]) < 1:
        raise AdaptationError(
            f"adapt.mlm.head_warmup_ratio must be in [0, 1), got {mlm['head_warmup_ratio']!r}"
        )
    if not 0 < float(mlm["mlm_probability"]) < 1:
        raise AdaptationError(f"adapt.mlm.mlm_probability must be in (0, 1), got {mlm['mlm_probability']!r}")
    records, data_report = load_unlabeled(adapt, exclude_records)
    base, tokenizer = load_encoder(cfg.model, cache_dir=cfg.paths.cache_dir)
    context_turns, max_length = int(cfg.data.context_turns), int(cfg.model.max_length)

    order = list(range(len(records)))
    random.Random(int(mlm["seed"])).shuffle(order)
    if mlm["max_examples"]:
        order = order[: int(mlm["max_examples"])]
    n_eval = (
        min(int(round(float(mlm["eval_fraction"]) * len(order))), int(mlm["eval_max"]))
        if len(order) >= 20
        else 0
    )
    eval_records = [records[i] for i in order[:n_eval]]
    train_records = [records[i] for i in order[n_eval:]]
    # the MLM steps follow trainer.mixed_precision, but only as bf16: fp16 would need a gradient scaler
    precision = "bf16" if trainer_precision(cfg) == "bf16" else "no"
    spec = {
        "adapt_version": ADAPT_VERSION,
        "encoder": {"name": str(cfg.model.name), "fingerprint": encoder_fingerprint(base, tokenizer)},
        "data": {
            "file": data_report["file"],
            "train_rows": len(train_records),
            "eval_rows": len(eval_records),
            "sha256": hashlib.sha256(
                json.dumps([train_records, eval_records], ensure_ascii=False, sort_keys=True).encode()
            ).hexdigest(),
        },
        "settings": {
            **{k: mlm[k] for k in RESULT_SETTINGS},
            "context_turns": context_turns,
            "max_length": max_length,
            "mixed_precision": precision,
        },
    }
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
    path = adapted_path(cfg, key)
    with _build_lock(path):
        problem = verify_cached_encoder(path, key)
        if problem is None:
            manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
            stats = manifest["stats"]
            print(
                f"domain adaptation: cache hit {path} (MLM loss {stats['mlm_loss_before']} -> "
                f"{stats['mlm_loss_after']})"
            )
            return (*_load_adapted(path, max_length), {**manifest, "built": False, "path": str(path)})
        if path.exists():
            log.warning("rebuilding adapted encoder %s: %s", path, problem)
        # a private RNG stream seeded from the settings: dropout is the same in a resumed and an uninterrupted
        # run (the checkpoint restores it), and the caller's RNG is left alone
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(mlm["seed"]))
            stats = _run_mlm(
                cfg, adapt, mlm, base, tokenizer, train_records, eval_records, path, key, precision
            )
        stats["data"] = data_report
        with atomic_directory(path) as tmp:
            base.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            files = {
                f.name: {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
                for f in sorted(tmp.iterdir())
                if f.is_file()
            }
            manifest = {"key": key, "spec": spec, "stats": stats, "files": files}
            atomic_write_json(tmp / MANIFEST, manifest)  # last: its presence marks a complete build
        shutil.rmtree(_checkpoint_dir(path).parent, ignore_errors=True)
        BUILD_COUNT += 1
        print(
            f"domain adaptation: {stats['train_rows']} turns x {mlm['epochs']} epoch(s) in {stats['seconds']} s, "
            f"held-out MLM loss {stats['mlm_loss_before']} -> {stats['mlm_loss_after']}; cached in {path}"
        )
        return (*_load_adapted(path, max_length), {**manifest, "built": True, "path": str(path)})


def _run_mlm(
    cfg: DictConfig,
    adapt: dict,
    mlm: dict,
    encoder,
    tokenizer,
    train_records: list[dict],
    eval_records: list[dict],
    path: Path,
    key: str,
    precision: str = "no",
) -> dict[str, Any]:
    """Train BertForMaskedLM around ``encoder`` (updated in place) with resumable checkpoints; the stats.
    ``precision`` "bf16": the training steps run under autocast (the held-out loss stays float32)."""
    from transformers import get_linear_schedule_with_warmup

    started = time.time()
    seed, bs = int(mlm["seed"]), int(mlm["batch_size"])
    device = torch.device(
        "cuda" if str(cfg.trainer.device).startswith("cuda") and torch.cuda.is_available() else "cpu"
    )
    context_turns, max_length = int(cfg.data.context_turns), int(cfg.model.max_length)
    train_ex = prepare_examples(train_records, tokenizer, context_turns, max_length)
    eval_ex = prepare_examples(eval_records, tokenizer, context_turns, max_length)
    masker = SpanMasker(tokenizer, mlm["mlm_probability"], mlm["max_span"])
    model = mlm_model(encoder, seed).to(device)
    no_decay = ("bias", "LayerNorm.weight")
    params = [
        {
            "params": [p for n, p in model.named_parameters() if not any(x in n for x in no_decay)],
            "weight_decay": float(mlm["weight_decay"]),
        },
        {
            "params": [p for n, p in model.named_parameters() if any(x in n for x in no_decay)],
            "weight_decay": 0.0,
        },
    ]
    optimizer = torch.optim.AdamW(params, lr=float(mlm["lr"]))
    sampler = LengthGroupedSampler([len(e["input_ids"]) for e in train_ex], bs, seed)
    epochs = int(mlm["epochs"])
    total = max(len(sampler) * epochs, 1)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(float(mlm["warmup_ratio"]) * total), total)

    ckpt = _checkpoint_dir(path)
    state = {
        "key": key,
        "epoch": 0,
        "batch": 0,
        "step": 0,
        "loss_sum": 0.0,
        "batches": 0,
        "history": [],
        "seconds_before": 0.0,
        "mlm_loss_before": None,
    }
    if mlm.get("resume", True) and (ckpt / STATE_FILE).is_file():
        saved = json.loads((ckpt / STATE_FILE).read_text())
        if saved.get("key") == key:
            model.load_state_dict(torch.load(ckpt / "model.pt", map_location=device, weights_only=True))
            extra = torch.load(ckpt / "optim.pt", map_location=device, weights_only=False)
            optimizer.load_state_dict(extra["optimizer"])
            scheduler.load_state_dict(extra["scheduler"])
            torch.set_rng_state(extra["torch_rng"])
            state = saved
            print(
                f"domain adaptation: resumed from {ckpt} at epoch {state['epoch'] + 1} batch {state['batch']}"
            )
    if state["mlm_loss_before"] is None:
        state["mlm_loss_before"] = evaluate_mlm(model, masker, eval_ex, bs, seed, device)

    def save_checkpoint() -> None:
        with atomic_directory(ckpt) as tmp:
            torch.save(model.state_dict(), tmp / "model.pt")
            torch.save(
                {
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "torch_rng": torch.get_rng_state(),
                },
                tmp / "optim.pt",
            )
            atomic_write_json(
                tmp / STATE_FILE, {**state, "seconds_before": state["seconds_before"] + time.time() - started}
            )

    # The MLM head starts untrained (the e5 encoders ship without one): for the first head_warmup_ratio of the
    # steps the encoder is frozen, so the head's first, random gradients do not move the representation
    # fine-tuning starts from (docs/adaptation.md).
    head_warmup = math.ceil(float(mlm["head_warmup_ratio"]) * total)
    encoder_params = list(model.bert.parameters())
    stop_after = mlm.get("stop_after_steps")
    every = int(mlm.get("checkpoint_every_steps") or 0)
    show = bool(cfg.trainer.get("progress_bar", True))
    model.train()
    with _StopFlag() as stop:
        for epoch in range(state["epoch"], epochs):
            sampler.use_epoch(epoch)
            batches = sampler.batches()
            bar = tqdm(
                range(state["batch"], len(batches)),
                total=len(batches),
                initial=state["batch"],
                desc=f"adapt (MLM) epoch {epoch + 1}/{epochs}",
                disable=not show,
                dynamic_ncols=True,
            )
            for b in bar:
                batch = masker([train_ex[i] for i in batches[b]], _batch_key(seed, epoch, b))
                head_only = state["step"] < head_warmup
                with autocast(precision, device.type):
                    loss, _ = mlm_loss(model, {k: v.to(device) for k, v in batch.items()}, not head_only)
                loss.backward()
                # the decoder is tied to the word embeddings: during warm-up they stay as they are too
                if head_only:
                    for p in encoder_params:
                        p.grad = None
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
                state.update(
                    batch=b + 1,
                    step=state["step"] + 1,
                    loss_sum=state["loss_sum"] + loss.item(),
                    batches=state["batches"] + 1,
                )
                bar.set_postfix(loss=f"{loss.item():.3f}")
                if stop.signal is not None or (stop_after and state["step"] >= int(stop_after)):
                    save_checkpoint()
                    raise AdaptationInterrupted(
                        f"domain adaptation stopped at epoch {epoch + 1} batch {b + 1}: checkpoint saved in {ckpt}; "
                        "the next run with the same settings resumes it"
                    )
                if every and state["step"] % every == 0:
                    save_checkpoint()
            bar.close()
            entry = {
                "epoch": epoch + 1,
                "step": state["step"],
                "train_mlm_loss": round(state["loss_sum"] / max(state["batches"], 1), 4),
            }
            state["history"].append(entry)
            state.update(epoch=epoch + 1, batch=0, loss_sum=0.0, batches=0)
            print("adapt " + " ".join(f"{k}={v}" for k, v in entry.items()), file=sys.stderr)
            if epoch + 1 < epochs and every:
                save_checkpoint()
    after = evaluate_mlm(model, masker, eval_ex, bs, seed, device)
    model.to("cpu")
    missing, _ = encoder.load_state_dict(model.bert.state_dict(), strict=False)
    if [k for k in missing if not k.startswith("pooler")]:
        raise AdaptationError(f"adapted weights do not fit the encoder: missing {missing[:5]}")
    return {
        "train_rows": len(train_ex),
        "eval_rows": len(eval_ex),
        "epochs": epochs,
        "steps": state["step"],
        "mlm_loss_before": state["mlm_loss_before"],
        "mlm_loss_after": after,
        "history": state["history"],
        "seconds": round(state["seconds_before"] + time.time() - started, 1),
        "device": str(device),
    }
