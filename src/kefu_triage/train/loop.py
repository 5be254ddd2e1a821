"""Fine-tuning loop (plain functions; ``kefu_triage.train`` is the thin Hydra entry point).

accelerate handles devices, mixed precision, gradient accumulation and data-parallel runs
(``accelerate launch --num_processes 2 --cpu -m kefu_triage.train ...`` on CPU with gloo).
Batches are dynamically padded and grouped by length (customer messages are short).
Ctrl-C / SIGTERM / ``trainer.stop_after_steps`` save a resumable checkpoint; ``trainer.resume=true``
continues from it to the same result as an uninterrupted run.
"""

from __future__ import annotations

import copy
import csv
import io
import itertools
import json
import logging
import math
import random
import re
import shutil
import signal
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

from kefu_triage.core.fileio import atomic_directory, atomic_write_json, atomic_write_text
from kefu_triage.core.taxonomy import Taxonomy, taxonomy_from_config
from kefu_triage.data.records import load_split_records, summarize, to_dataset
from kefu_triage.evaluate.metrics import dev_metrics
from kefu_triage.model.encoders import load_encoder
from kefu_triage.model.multitask import (
    KefuTriageConfig,
    KefuTriageModel,
    encode,
    load_model,
    predict_logits,
)

log = logging.getLogger(__name__)
CHECKPOINT_DIR = "checkpoint"
RNG_FILE = "rng_state.pt"
EMA_FILE = "ema_state.pt"
STATE_FILE = "trainer_state.json"
# learning-rate schedules after warm-up (transformers.get_scheduler names)
LR_SCHEDULES = ("linear", "cosine", "constant_with_warmup")


def check_lr_schedule(name: Any, key: str) -> str:
    """``name`` if it is one of LR_SCHEDULES; a ValueError naming the config key otherwise."""
    if str(name) not in LR_SCHEDULES:
        raise ValueError(f"{key} must be one of {list(LR_SCHEDULES)}, got {name!r}")
    return str(name)


MIXED_PRECISION = ("no", "bf16", "fp16", "auto")


def native_cpu_bf16() -> bool:
    """True when this CPU multiplies bfloat16 in hardware (AVX-512 BF16 or AMX). Elsewhere autocast to bf16 is
    emulated and no faster than float32."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private in torch.cpu: absent -> False
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def resolve_mixed_precision(value: Any, device: str, key: str = "trainer.mixed_precision") -> str:
    """The precision a run uses: ``auto`` is bf16 on a CPU with native bfloat16 (else no) and on a GPU that has
    it (else fp16); other values are kept. A ValueError naming ``key`` for anything else."""
    value = "no" if value is False or value is None else str(value)  # YAML 1.1 reads a bare no as false
    if value not in MIXED_PRECISION:
        raise ValueError(f"{key} must be one of {list(MIXED_PRECISION)}, got {value!r}")
    if value != "auto":
        return value
    if device == "cpu" or not torch.cuda.is_available():
        return "bf16" if native_cpu_bf16() else "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def trainer_precision(cfg: DictConfig) -> str:
    """The precision ``cfg.trainer`` asks for, resolved on this machine (training, DAPT, pseudo-labelling)."""
    return resolve_mixed_precision(cfg.trainer.get("mixed_precision", "no"), str(cfg.trainer.device))


def autocast(precision: str, device_type: str = "cpu"):
    """torch.autocast for a resolved precision (bf16 or fp16); a context that does nothing for "no". For the
    loops that run without accelerate (distillation, domain adaptation, pseudo-labelling, bench-train)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device_type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


# "encoder.encoder.layer.7.attention..." -> 7 (BERT-style layer stacks)
LAYER_INDEX = re.compile(r"\.layer\.(\d+)\.")


def encoder_depth(name: str, num_layers: int) -> int:
    """How many layers a parameter sits below the top of the encoder: 0 for the top transformer layer (and
    for everything outside the layer stack, such as the heads or a pooler), ``num_layers`` for the embeddings."""
    match = LAYER_INDEX.search(name)
    if match:
        return num_layers - 1 - int(match.group(1))
    return num_layers if ".embeddings." in f".{name}" else 0


def optimizer_and_schedule(
    model: torch.nn.Module,
    lr: float,
    weight_decay: float,
    schedule: str,
    warmup_ratio: float,
    total_steps: int,
    head_lr_scale: float = 1.0,
    layer_lr_decay: float = 1.0,
):
    """AdamW (no decay on biases and norms) and the warm-up + ``schedule`` learning-rate schedule, as
    fine-tuning and distillation both use them. The three heads learn at ``head_lr_scale`` x ``lr``: they
    start from random weights on top of pooled states that differ little between messages, so at the
    encoder's rate their logits stay small for the whole run (an under-fitted, under-confident model).
    With ``layer_lr_decay`` < 1 each encoder layer learns at that factor times the rate of the layer above
    it (the embeddings one step below the first layer): the lower layers, which hold most of what
    pretraining learnt about real text, move least (layer-wise learning-rate decay)."""
    from transformers import get_scheduler

    if not float(head_lr_scale) > 0:
        raise ValueError(f"trainer.head_lr_scale must be > 0, got {head_lr_scale!r}")
    if (
        isinstance(layer_lr_decay, bool)
        or not isinstance(layer_lr_decay, (int, float))
        or not 0 < layer_lr_decay <= 1
    ):
        raise ValueError(f"trainer.layer_lr_decay must be in (0, 1], got {layer_lr_decay!r}")
    no_decay = ("bias", "LayerNorm.weight", "layer_norm", "ln")
    heads = tuple(f"{name}." for name in KefuTriageModel.HEAD_MODULES)
    named = list(model.named_parameters())
    layers = [int(m.group(1)) for n, _ in named if (m := LAYER_INDEX.search(n))]
    num_layers = max(layers) + 1 if layers else 0
    groups: dict[tuple[float, bool], list] = {}
    for n, p in named:
        if n.startswith(heads):
            rate = float(lr) * float(head_lr_scale)
        else:
            rate = float(lr) * float(layer_lr_decay) ** encoder_depth(n, num_layers)
        groups.setdefault((rate, not any(x in n for x in no_decay)), []).append(p)
    params = [
        {"params": group, "weight_decay": float(weight_decay) if decay else 0.0, "lr": rate}
        for (rate, decay), group in groups.items()
    ]
    optimizer = torch.optim.AdamW(params, lr=float(lr))
    scheduler = get_scheduler(
        schedule,
        optimizer,
        num_warmup_steps=int(float(warmup_ratio) * total_steps),
        num_training_steps=total_steps,
    )
    return optimizer, scheduler


def new_training_state() -> dict[str, Any]:
    """The resumable progress of a training or distillation run (saved as JSON beside each checkpoint)."""
    return {
        "epoch": 0,
        "batch_in_epoch": 0,
        "global_step": 0,
        "best_score": -1.0,
        "best_epoch": -1,
        "bad_epochs": 0,
        "epoch_loss_sum": 0.0,
        "epoch_batches": 0,
        "history": [],
    }


class TrainingInterrupted(RuntimeError):
    """Raised after a resumable checkpoint was saved because of a signal or ``stop_after_steps``."""


# ---------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------
def tokenize_split(
    records: list[dict[str, Any]], taxonomy: Taxonomy, tokenizer, context_turns: int, max_length: int
):
    """A ``datasets.Dataset`` of token ids + labels (unpadded; the collator pads per batch)."""
    ds = to_dataset(records, taxonomy)

    def tokenize(batch):
        enc = encode(tokenizer, batch["text"], batch["context"], context_turns, max_length)
        enc["length"] = [len(x) for x in enc["input_ids"]]
        return enc

    ds = ds.map(tokenize, batched=True, batch_size=512, desc="tokenize", load_from_cache_file=False)
    ds = ds.rename_columns(
        {"intent_id": "intent_labels", "urgent": "urgent_labels", "refund_recoverable": "refund_labels"}
    )
    keep = [
        c
        for c in (
            "input_ids",
            "attention_mask",
            "token_type_ids",
            "intent_labels",
            "urgent_labels",
            "refund_labels",
            "length",
        )
        if c in ds.column_names
    ]
    return ds.select_columns(keep)


class LengthGroupedSampler(Sampler[list[int]]):
    """Batches of similar length: shuffle, cut into mega-batches, sort each by length, shuffle the batches.

    Deterministic for a (seed, epoch) pair, which resume relies on. The epoch is set with ``use_epoch``, not
    ``set_epoch``: accelerate calls ``set_epoch`` with its own iteration counter, which restarts at 0 for the
    loader a resumed run builds.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int, mega_batch_mult: int = 50):
        self.lengths, self.batch_size, self.seed, self.mult = lengths, batch_size, seed, mega_batch_mult
        self.epoch = 0

    def use_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self) -> list[list[int]]:
        rng = random.Random(self.seed * 1000 + self.epoch)
        idx = list(range(len(self.lengths)))
        rng.shuffle(idx)
        mega = self.batch_size * self.mult
        out: list[list[int]] = []
        for s in range(0, len(idx), mega):
            chunk = sorted(idx[s : s + mega], key=lambda i: self.lengths[i], reverse=True)
            out.extend(chunk[b : b + self.batch_size] for b in range(0, len(chunk), self.batch_size))
        rng.shuffle(out)
        return out

    def __iter__(self):
        return iter(self.batches())

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)


def make_collator(tokenizer):
    def collate(features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        labels = {
            k: torch.tensor([f[k] for f in features])
            for k in ("intent_labels", "urgent_labels", "refund_labels")
        }
        inputs = [
            {k: f[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in f} for f in features
        ]
        batch = tokenizer.pad(inputs, return_tensors="pt")
        return {**dict(batch), **labels}

    return collate


# ---------------------------------------------------------------------------------------------------
# Metrics used for model selection (the full report lives in kefu_triage.evaluate.metrics)
# ---------------------------------------------------------------------------------------------------
# ---------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------
def weight_average(model: torch.nn.Module, decay: float | None):
    """An exponential moving average of the weights (torch's AveragedModel), or None when ``decay`` is null/0.

    Why: a single fine-tuning run lands wherever its last steps left it; averaging the last few hundred steps
    gives flatter, less seed-dependent weights, which matters for text unlike the training data."""
    if not decay:
        return None
    if not 0.0 < float(decay) < 1.0:
        raise ValueError(f"trainer.ema_decay must be in (0, 1) or null, got {decay!r}")
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(float(decay)), use_buffers=True)


def check_wise_alpha(alpha: Any) -> float:
    if (
        isinstance(alpha, bool)
        or not isinstance(alpha, (int, float))
        or not math.isfinite(alpha)
        or not 0 < alpha <= 1
    ):
        raise ValueError(f"trainer.wise_alpha must be a number in (0, 1] (1 = off), got {alpha!r}")
    return float(alpha)


def interpolate_encoder(model: torch.nn.Module, start_encoder: dict[str, torch.Tensor], alpha: float) -> None:
    """WiSE-FT (Wortsman et al., CVPR 2022), in place: every floating-point encoder weight becomes
    ``alpha * fine-tuned + (1 - alpha) * start`` (the encoder the fine-tuning began from: pretrained, or
    domain-adapted); the heads stay as trained.

    Why: fine-tuning on generated messages pulls the encoder towards that distribution; on real customer text
    the interpolation is right more often (docs/model-and-training.md), at some cost on generated text."""
    state = model.encoder.state_dict()
    for name, start in start_encoder.items():
        if name not in state or state[name].shape != start.shape:
            found = tuple(state[name].shape) if name in state else "absent"
            raise ValueError(
                f"start encoder does not match the model: {name} is {tuple(start.shape)} there, {found} in the "
                "model (was the model trained from another encoder build?)"
            )
    with torch.no_grad():
        for name, start in start_encoder.items():
            tuned = state[name]
            if tuned.is_floating_point():
                tuned.copy_(alpha * tuned + (1.0 - alpha) * start.to(tuned.dtype))


def class_weights(records: list[dict[str, Any]], taxonomy: Taxonomy, power: float) -> list[float]:
    """(N / count)^power per intent, normalised to mean 1; power 0 = unweighted, 0.5 = inverse sqrt."""
    counts = Counter(r["intent"] for r in records)
    raw = np.array([(len(records) / max(counts.get(n, 0), 1)) ** power for n in taxonomy.intent_names])
    return (raw / raw.mean()).round(4).tolist()


def build_model(
    cfg: DictConfig, taxonomy: Taxonomy, train_records: list[dict[str, Any]], encoder_and_tokenizer=None
):
    encoder, tokenizer = encoder_and_tokenizer or load_encoder(cfg.model, cache_dir=cfg.paths.cache_dir)
    urgent = [r["urgent"] for r in train_records if r.get("urgent") is not None]  # unknown labels are masked
    urgent_rate = max(float(np.mean(urgent)) if urgent else 0.5, 1e-3)
    refund = [r["refund_recoverable"] for r in train_records if r["refund_recoverable"] is not None]
    refund_rate = float(np.mean(refund)) if refund else 0.5
    m = cfg.trainer
    config = KefuTriageConfig(
        encoder_name=cfg.model.name,
        intent_labels=taxonomy.intent_names,
        intent_routes=taxonomy.routes,
        taxonomy=taxonomy.to_dict(),
        pooling=m.pooling,
        head_dropout=m.head_dropout,
        loss_weights=OmegaConf.to_container(m.loss_weights),
        intent_class_weights=class_weights(train_records, taxonomy, m.class_weight_power),
        # pos_weight^power balances positives vs negatives (power 0 = off)
        urgent_pos_weight=float(((1 - urgent_rate) / urgent_rate) ** m.class_weight_power),
        refund_pos_weight=float(((1 - refund_rate) / max(refund_rate, 1e-3)) ** m.class_weight_power),
        focal_gamma=m.focal_gamma,
        label_smoothing=m.label_smoothing,
        context_turns=cfg.data.context_turns,
        max_seq_length=cfg.model.max_length,
    )
    return KefuTriageModel.from_encoder(encoder, config), tokenizer


class _StopFlag:
    """Turns SIGTERM/SIGINT into a checkpoint at the next step boundary instead of a dead process."""

    def __init__(self):
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # second signal: give up immediately
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(rng: dict[str, Any]) -> None:
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])


def _seed_everything(seed: int) -> None:
    from accelerate.utils import set_seed

    set_seed(seed)
    torch.use_deterministic_algorithms(False)


def find_resume_dir(cfg: DictConfig, run_dir: Path) -> Path | None:
    """The checkpoint to resume: trainer.resume_dir, or the newest run of this experiment that has one."""
    if cfg.trainer.get("resume_dir"):
        ckpt = Path(cfg.trainer.resume_dir)
        ckpt = ckpt / CHECKPOINT_DIR if (ckpt / CHECKPOINT_DIR).is_dir() else ckpt
        if not (ckpt / STATE_FILE).is_file():
            raise FileNotFoundError(
                f"trainer.resume_dir={cfg.trainer.resume_dir}: no resumable checkpoint there"
            )
        return ckpt
    runs = sorted(run_dir.parent.glob(f"*/{CHECKPOINT_DIR}/{STATE_FILE}"), key=lambda p: p.stat().st_mtime)
    runs = [p for p in runs if p.parent.parent != run_dir] + [p for p in runs if p.parent.parent == run_dir]
    return runs[-1].parent if runs else None


def continued_run_dir(cfg: DictConfig, run_dir: Path, part: str) -> Path:
    """Where a training made of several runs (self-training rounds, soup ingredients) keeps them: this run, or
    with trainer.resume the run being continued (trainer.resume_dir, else the newest other run holding ``part``)."""
    t = cfg.trainer
    if not t.get("resume"):
        return run_dir
    if t.get("resume_dir"):
        return Path(t.resume_dir)
    earlier = sorted(
        (p.parent for p in run_dir.parent.glob(f"*/{part}") if p.parent != run_dir),
        key=lambda p: p.stat().st_mtime,
    )
    return earlier[-1] if earlier else run_dir


def part_config(cfg: DictConfig, updates: dict[str, Any]) -> DictConfig:
    """A copy of ``cfg`` for one run of a training made of several (a self-training round, a soup ingredient):
    it publishes nothing itself, and ``updates`` (dotted keys) override the rest."""
    c = copy.deepcopy(cfg)
    for key, value in {"trainer.publish_dir": None, **updates}.items():
        OmegaConf.update(c, key, value, merge=False, force_add=True)
    return c


def train_part(cfg: DictConfig, part_dir: Path, updates: dict[str, Any]) -> dict[str, Any]:
    """Train one run of a training made of several (a self-training round, a soup ingredient) in ``part_dir``
    with ``updates`` (see :func:`part_config`); returns its summary. With trainer.resume, a finished part is
    reused as it is and an interrupted one continues from its own checkpoint; any other part trains from scratch
    (never from another part's checkpoint)."""
    resume = bool(cfg.trainer.get("resume"))
    done = part_dir / "model" / "data_summary.json"
    if resume and done.is_file():
        return json.loads(done.read_text(encoding="utf-8"))["training"]
    interrupted = resume and (part_dir / CHECKPOINT_DIR / STATE_FILE).is_file()
    continued = {"trainer.resume": interrupted, "trainer.resume_dir": str(part_dir) if interrupted else None}
    return train(part_config(cfg, {**updates, **continued}), part_dir)


def save_weights(model: torch.nn.Module, tokenizer, directory: Path) -> None:
    """``model`` + ``tokenizer`` written atomically into ``directory`` (save_pretrained)."""
    with atomic_directory(directory) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def save_and_score(
    model: torch.nn.Module,
    tokenizer,
    directory: Path,
    dev_records: list[dict[str, Any]],
    taxonomy: Taxonomy,
    score_weights: dict[str, float],
    batch_size: int,
) -> dict[str, float]:
    """Write ``model`` + ``tokenizer`` atomically into ``directory`` and return the model's dev metrics (rounded):
    weights a training publishes in place of its best checkpoint (WiSE-FT, a model soup)."""
    save_weights(model, tokenizer, directory)
    return score_on_dev(model, tokenizer, dev_records, taxonomy, score_weights, batch_size)


def published_dev(summary: dict[str, Any]) -> dict[str, float]:
    """Dev figures of the weights a training published: after its last adjustment (class-weight bias, WiSE-FT),
    else its best epoch's."""
    for key in ("class_weight_bias", "wise_ft"):
        if summary.get(key):
            return summary[key]["dev"]
    return summary["best_dev"]


def score_on_dev(
    model: torch.nn.Module,
    tokenizer,
    dev_records: list[dict[str, Any]],
    taxonomy: Taxonomy,
    score_weights: dict[str, float],
    batch_size: int,
) -> dict[str, float]:
    """The dev metrics (rounded) of weights a training may publish."""
    dev = dev_metrics(
        predict_logits(model, tokenizer, dev_records, batch_size=batch_size),
        dev_records,
        taxonomy,
        score_weights,
    )
    return {k: round(v, 4) for k, v in dev.items()}


def check_rdrop_alpha(alpha: Any) -> float:
    if alpha is None:
        return 0.0
    if (
        isinstance(alpha, bool)
        or not isinstance(alpha, (int, float))
        or not math.isfinite(alpha)
        or alpha < 0
    ):
        raise ValueError(f"trainer.rdrop_alpha must be a number >= 0 (0 = off), got {alpha!r}")
    return float(alpha)


def rdrop_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], alpha: float):
    """R-Drop (Liang et al., NeurIPS 2021): the batch runs twice (as one doubled batch) under different dropout
    masks; the loss is the supervised loss of both passes plus ``alpha`` times the symmetric KL between their
    intent distributions and between their urgent probabilities. Returns (loss, output of the doubled batch).

    Why: the penalty asks for predictions that do not hinge on any one feature, one of the recipes issue 14
    lists for text that differs from the training distribution."""
    import torch.nn.functional as F

    def symmetric_kl(log_probs: torch.Tensor) -> torch.Tensor:  # between the two halves of the doubled batch
        p, q = log_probs.chunk(2)
        kl = F.kl_div(p, q, log_target=True, reduction="batchmean")
        return 0.5 * (kl + F.kl_div(q, p, log_target=True, reduction="batchmean"))

    out = model(**{k: torch.cat([v, v]) for k, v in batch.items()})
    u = out.urgent_logit.float()
    kl = symmetric_kl(out.intent_logits.float().log_softmax(-1)) + symmetric_kl(
        torch.stack([F.logsigmoid(u), F.logsigmoid(-u)], -1)  # Bernoulli as a 2-class distribution
    )
    return out.loss + alpha * kl, out


def train(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Train, keep the best dev checkpoint, save it into ``run_dir/model`` and publish to ``publish_dir``."""
    from accelerate import Accelerator

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if (cfg.get("adapt") or {}).get("self_training", {}).get("rounds", 0):
        # rounds of train() on labelled + pseudo-labelled turns (docs/adaptation.md)
        from kefu_triage.train.self_training import self_train

        return self_train(cfg, run_dir)
    if len(cfg.trainer.get("soup_seeds") or []) > 1:
        from kefu_triage.train.soup import soup_train  # one run per seed, averaged (a model soup)

        return soup_train(cfg, run_dir)
    t = cfg.trainer
    schedule = check_lr_schedule(t.get("lr_schedule", "linear"), "trainer.lr_schedule")
    rdrop_alpha = check_rdrop_alpha(t.get("rdrop_alpha"))
    wise_alpha = check_wise_alpha(t.get("wise_alpha", 1.0))
    remove_bias = t.get("remove_class_weight_bias", False)
    if not isinstance(remove_bias, bool):
        raise ValueError(f"trainer.remove_class_weight_bias must be true or false, got {remove_bias!r}")
    init_seed = t.get("init_seed")
    if init_seed is not None and (isinstance(init_seed, bool) or not isinstance(init_seed, int)):
        raise ValueError(f"trainer.init_seed must be an integer or null, got {init_seed!r}")
    _seed_everything(t.seed)
    taxonomy = taxonomy_from_config(cfg.taxonomy)
    splits = load_split_records(cfg.data, taxonomy)
    if "train" not in splits or "dev" not in splits:
        raise ValueError("data: both train_file and dev_file are needed for training")
    train_records, dev_records = splits["train"], splits["dev"]

    precision = trainer_precision(cfg)
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state.get("_mixed_precision", precision) != precision:
        # accelerate keeps one precision per process; a later training in the same process (a notebook, the
        # tests) may choose another. The process group (PartialState) is left as it is.
        AcceleratorState._reset_state()
    accelerator = Accelerator(
        cpu=t.device == "cpu",
        mixed_precision=precision,
        gradient_accumulation_steps=t.grad_accum_steps,
    )
    is_main = accelerator.is_main_process
    if is_main and precision != str(t.mixed_precision):
        print(f"mixed precision: {precision} (trainer.mixed_precision={t.mixed_precision})")
    adapted = None
    if cfg.get("adapt") and cfg.adapt.get("unlabeled_file") and cfg.adapt.mlm.enabled:
        from kefu_triage.train.adapt import adapt_encoder  # domain-adaptive MLM on unlabelled turns (cached)

        adapted = adapt_encoder(cfg, [r for s in ("dev", "test", "eval") for r in splits.get(s, [])])[:2]
    if init_seed is not None:
        # the heads' random start from init_seed, the rest of the run (data order, dropout) from seed: runs that
        # differ only in seed then start from the same weights, which averaging them (a model soup) needs
        _seed_everything(init_seed)
    model, tokenizer = build_model(cfg, taxonomy, train_records, adapted)
    if init_seed is not None and init_seed != t.seed:  # with init_seed == seed: exactly the plain run
        _seed_everything(t.seed)
    # the starting encoder, before training or a resumed checkpoint changes it (for trainer.wise_alpha)
    start_encoder = (
        {k: v.detach().clone() for k, v in model.encoder.state_dict().items()} if wise_alpha < 1 else None
    )
    train_ds = tokenize_split(
        train_records, taxonomy, tokenizer, cfg.data.context_turns, cfg.model.max_length
    )
    sampler = LengthGroupedSampler(train_ds["length"], cfg.model.batch_size, t.seed)
    loader = DataLoader(
        train_ds.remove_columns("length"),
        batch_sampler=sampler,
        collate_fn=make_collator(tokenizer),
        num_workers=0,
    )
    # accelerate's prepared scheduler advances num_processes times per optimizer step (each process sees
    # 1/num_processes of the batches), so the schedule is laid out in single-process steps
    total_steps = max(math.ceil(len(sampler) / t.grad_accum_steps) * t.max_epochs, 1)
    optimizer, scheduler = optimizer_and_schedule(
        model,
        cfg.model.lr,
        cfg.model.weight_decay,
        schedule,
        cfg.model.warmup_ratio,
        total_steps,
        head_lr_scale=t.get("head_lr_scale", 1.0),
        layer_lr_decay=t.get("layer_lr_decay", 1.0),
    )
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    # accelerate saves and restores these with the checkpoint (model, optimizer, scheduler, RNGs)
    ema = weight_average(accelerator.unwrap_model(model), t.get("ema_decay"))

    resume_rng = None
    state = new_training_state()
    ckpt_dir = run_dir / CHECKPOINT_DIR
    resume_from = None
    if t.resume:
        resume_from = find_resume_dir(cfg, run_dir)
        if resume_from is None:
            print("trainer.resume=true but no checkpoint found: starting from scratch", file=sys.stderr)
        else:
            accelerator.load_state(str(resume_from / "accelerate"))
            state = json.loads((resume_from / STATE_FILE).read_text())
            resume_rng = torch.load(resume_from / RNG_FILE, weights_only=False)
            if ema is not None:
                ema.load_state_dict(torch.load(resume_from / EMA_FILE, weights_only=True))
            if resume_from.parent != run_dir and (resume_from.parent / "best").is_dir():
                shutil.copytree(resume_from.parent / "best", run_dir / "best", dirs_exist_ok=True)
            print(f"resumed from {resume_from} at epoch {state['epoch']} batch {state['batch_in_epoch']}")

    def save_checkpoint() -> None:
        accelerator.wait_for_everyone()
        if is_main:
            with atomic_directory(ckpt_dir) as tmp:
                accelerator.save_state(str(tmp / "accelerate"), safe_serialization=True)
                torch.save(_rng_state(), tmp / RNG_FILE)
                if ema is not None:
                    torch.save(ema.state_dict(), tmp / EMA_FILE)
                atomic_write_json(tmp / STATE_FILE, state)
        accelerator.wait_for_everyone()

    def published_weights():
        """The weights dev scores and publishes: the running average when trainer.ema_decay is set."""
        return ema.module if ema is not None else accelerator.unwrap_model(model)

    def save_best() -> None:
        if is_main:
            save_weights(published_weights(), tokenizer, run_dir / "best")

    started = time.time()
    stop_after = t.get("stop_after_steps")
    score_weights = OmegaConf.to_container(t.selection_weights)
    with _StopFlag() as stop:
        for epoch in range(state["epoch"], t.max_epochs):
            sampler.use_epoch(epoch)
            model.train()
            skip = state["batch_in_epoch"]
            epoch_loader = accelerator.skip_first_batches(loader, skip) if skip else loader
            iterator = iter(epoch_loader)
            if resume_rng is not None:
                # starting a DataLoader iteration draws from the torch RNG: restore the checkpoint's RNG after the
                # first batch is fetched, so dropout continues exactly where the interrupted run stopped
                first = next(iterator, None)
                _set_rng_state(resume_rng)
                resume_rng = None
                iterator = itertools.chain([] if first is None else [first], iterator)
            bar = tqdm(
                iterator,
                total=len(loader),
                initial=skip,
                desc=f"epoch {epoch + 1}/{t.max_epochs}",
                disable=not is_main or not t.progress_bar,
                dynamic_ncols=True,
            )
            seen, t0 = 0, time.time()
            for batch in bar:
                with accelerator.accumulate(model):
                    if rdrop_alpha:
                        loss, _ = rdrop_loss(model, batch, rdrop_alpha)
                    else:
                        loss = model(**batch).loss
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
                state["batch_in_epoch"] += 1
                # the epoch's mean loss survives a resume: its running sum is part of the checkpoint state
                state["epoch_loss_sum"] = state.get("epoch_loss_sum", 0.0) + loss.item()
                state["epoch_batches"] = state.get("epoch_batches", 0) + 1
                if accelerator.sync_gradients:
                    state["global_step"] += 1
                    if ema is not None:
                        ema.update_parameters(accelerator.unwrap_model(model))
                seen += batch["input_ids"].shape[0] * accelerator.num_processes
                bar.set_postfix(loss=f"{loss.item():.3f}", ex_s=f"{seen / max(time.time() - t0, 1e-6):.0f}")
                flag = accelerator.reduce(torch.tensor(float(stop.signal is not None)), "max").item() > 0
                if flag or (stop_after and state["global_step"] >= stop_after):
                    save_checkpoint()
                    raise TrainingInterrupted(
                        f"stopped at epoch {epoch + 1} batch {state['batch_in_epoch']}: checkpoint saved in {ckpt_dir}; "
                        "continue with trainer.resume=true"
                    )
                if (
                    t.checkpoint_every_steps
                    and state["global_step"] % t.checkpoint_every_steps == 0
                    and accelerator.sync_gradients
                ):
                    save_checkpoint()
            # ---- end of epoch: dev metrics, best checkpoint, early stopping
            dev = dev_metrics(
                predict_logits(published_weights(), tokenizer, dev_records, batch_size=t.eval_batch_size),
                dev_records,
                taxonomy,
                score_weights,
            )
            loss_sum, batches = accelerator.reduce(
                torch.tensor([state["epoch_loss_sum"], float(state["epoch_batches"])], dtype=torch.float64),
                "sum",
            ).tolist()
            entry = {
                "epoch": epoch + 1,
                "global_step": state["global_step"],
                "train_loss": round(loss_sum / max(batches, 1.0), 4),
                "lr": float(f"{scheduler.get_last_lr()[0]:.4g}"),
                "examples_per_s": round(seen / max(time.time() - t0, 1e-6), 1),
                **{f"dev_{k}": round(v, 4) for k, v in dev.items()},
            }
            state["history"].append(entry)
            if is_main:
                print(" ".join(f"{k}={v}" for k, v in entry.items()))
                write_train_log(run_dir, state["history"])
            if dev["score"] > state["best_score"] + t.early_stopping_min_delta:
                state.update(best_score=dev["score"], best_epoch=epoch + 1, bad_epochs=0)
                save_best()
            else:
                state["bad_epochs"] += 1
            state.update(epoch=epoch + 1, batch_in_epoch=0, epoch_loss_sum=0.0, epoch_batches=0)
            save_checkpoint()
            if state["bad_epochs"] >= t.early_stopping_patience:
                print(f"early stopping: no dev improvement for {state['bad_epochs']} epoch(s)")
                break

    summary = {
        "best_epoch": state["best_epoch"],
        "best_dev": state["history"][state["best_epoch"] - 1],
        "epochs_run": len(state["history"]),
        "train_seconds": round(time.time() - started, 1),
        "mixed_precision": precision,
    }
    if is_main:
        weights_dir = run_dir / "best"
        if start_encoder is not None or remove_bias:
            # written beside best/ (never over it), so a resumed finished run adjusts the same weights again
            best, _ = load_model(weights_dir)
            weights_dir = run_dir / "adjusted"

            def score_dev(model):
                return score_on_dev(model, tokenizer, dev_records, taxonomy, score_weights, t.eval_batch_size)

            if start_encoder is not None:
                interpolate_encoder(best, start_encoder, wise_alpha)
                dev = score_dev(best)
                summary["wise_ft"] = {"alpha": wise_alpha, "dev": dev}
                print(
                    f"WiSE-FT: encoder = {wise_alpha:g} x fine-tuned + {1 - wise_alpha:g} x start; "
                    + " ".join(f"dev_{k}={v:.4f}" for k, v in dev.items())
                )
            if remove_bias:
                offsets = best.remove_class_weight_bias()
                dev = score_dev(best)
                summary["class_weight_bias"] = {"removed": offsets, "dev": dev}
                print(
                    "class-weight bias removed from the intent head (logits - log w); "
                    + " ".join(f"dev_{k}={v:.4f}" for k, v in dev.items())
                )
            save_weights(best, tokenizer, weights_dir)
        publish_dir = cfg.trainer.get("publish_dir")
        finalize_model_dir(
            cfg, run_dir, taxonomy, splits, state, summary, publish_dir, weights_dir=weights_dir
        )
        if not t.get("keep_checkpoint", False):
            # finished: the resumable state (weights + optimizer, ~3x the model) is no longer needed, including
            # the interrupted run's checkpoint this run continued; the best weights live on in run_dir/model
            consumed = [ckpt_dir, run_dir / "best", run_dir / "adjusted"]
            if (
                resume_from is not None
                and resume_from.parent != run_dir
                and resume_from.name == CHECKPOINT_DIR
            ):
                consumed.append(resume_from)
            for path in consumed:
                shutil.rmtree(path, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


LOG_COLUMNS = ("epoch", "global_step", "train_loss", "lr", "examples_per_s")


def write_train_log(directory: Path, history: list[dict[str, Any]]) -> None:
    """Per-epoch log as JSON lines (train_log.jsonl) and as a table (train_log.csv), both atomic."""
    atomic_write_text(directory / "train_log.jsonl", "".join(json.dumps(h) + "\n" for h in history))
    columns = list(LOG_COLUMNS) + sorted({k for h in history for k in h} - set(LOG_COLUMNS))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(directory / "train_log.csv", buf.getvalue())


def finalize_model_dir(
    cfg: DictConfig,
    run_dir: Path,
    taxonomy: Taxonomy,
    splits: dict[str, list[dict[str, Any]]],
    state: dict[str, Any],
    summary: dict[str, Any],
    publish_dir: str | Path | None,
    summary_key: str = "training",
    weights_dir: Path | None = None,
) -> Path:
    """run_dir/model = best weights (``weights_dir``, default run_dir/best) + tokenizer + resolved config, label
    maps, train log, data summary (the run's ``summary`` under ``summary_key``); then published atomically to
    ``publish_dir`` (models/<experiment>) when set. Training and distillation both end here."""
    model_dir = run_dir / "model"
    with atomic_directory(model_dir) as tmp:
        for f in (weights_dir or run_dir / "best").iterdir():
            shutil.copy2(f, tmp / f.name)
        atomic_write_text(tmp / "train_config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        atomic_write_json(
            tmp / "label_maps.json",
            {
                "intent": taxonomy.id2intent,
                "intent_routes": dict(zip(taxonomy.intent_names, taxonomy.routes, strict=True)),
                "urgent": {0: "not_urgent", 1: "urgent"},
                "refund_recoverable": {0: "firm", 1: "recoverable"},
            },
        )
        write_train_log(tmp, state["history"])
        atomic_write_json(
            tmp / "data_summary.json",
            {
                "splits": {k: summarize(v) for k, v in splits.items()},
                "files": {k: str(cfg.data.get(f"{k}_file")) for k in splits},
                summary_key: summary,
            },
        )
    if publish_dir:
        with atomic_directory(publish_dir) as tmp:
            shutil.copytree(model_dir, tmp, dirs_exist_ok=True)
        print(f"model published to {publish_dir}")
    return model_dir


def ensure_data(cfg: DictConfig) -> None:
    """Generate the embedded dataset when its files are missing (so `make train` works on a fresh clone)."""
    data = cfg.data
    missing = [
        data.get(f"{s}_file")
        for s in ("train", "dev")
        if data.get(f"{s}_file") and not Path(data.get(f"{s}_file")).is_file()
    ]
    if missing and data.get("generate_if_missing") and data.get("generator"):
        from kefu_triage.data.embedded import prepare_data

        print(
            f"data files missing ({', '.join(map(str, missing))}): generating the embedded dataset into {data.dir}"
        )
        prepare_data(cfg)
