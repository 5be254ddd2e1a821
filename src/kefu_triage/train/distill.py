"""Distillation: a fine-tuned 12-layer model (the teacher) -> a 3-4 layer student for the serving hot path.

    make distill                                # models/default -> models/default_student
    python -m kefu_triage.train.distill experiment=default distill.layers=3 [distill.unlabeled_file=logs.jsonl]

The student is the teacher with fewer encoder layers: its embeddings, the chosen layers (``distill.layer_init``)
and the three heads are copied, so it starts close to the teacher instead of from scratch. It then learns
the teacher's outputs (temperature-scaled KL on the intent distribution, BCE to the teacher's temperature-
scaled sigmoid on urgent and refund_recoverable) plus the hard labels with ``distill.hard_weight``, on the
transfer set: the training split, noisy copies of it (the generator's label-preserving noise and courtesy
affixes) and, when given, the user's unlabelled messages (soft labels only). The teacher's outputs are
computed once (eval mode) and kept with the checkpoint, so a resumed run does not recompute them.

Resumable (Ctrl-C / SIGTERM / ``distill.stop_after_steps`` save a checkpoint; ``distill.resume=true``
continues to the same result) and deterministic for a seed. The result is an ordinary model directory that
``kefu_triage.evaluate`` and ``kefu_triage.export`` take unchanged; its config.json records
``distilled_from`` (teacher directory, teacher layers, the layers kept).
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from kefu_triage.core.fileio import atomic_directory, atomic_write_json
from kefu_triage.core.heads import OUTPUT_NAMES
from kefu_triage.core.inputs import encode_inputs, pad_encodings
from kefu_triage.core.taxonomy import Taxonomy
from kefu_triage.data.records import DataValidationError, load_split_records
from kefu_triage.evaluate.metrics import dev_metrics
from kefu_triage.model.multitask import (
    KefuTriageConfig,
    KefuTriageModel,
    input_tokenizer,
    load_model,
    predict_logits,
)
from kefu_triage.train.loop import (
    CHECKPOINT_DIR,
    RNG_FILE,
    STATE_FILE,
    LengthGroupedSampler,
    TrainingInterrupted,
    _rng_state,
    _seed_everything,
    _set_rng_state,
    _StopFlag,
    autocast,
    check_lr_schedule,
    finalize_model_dir,
    find_resume_dir,
    new_training_state,
    optimizer_and_schedule,
    resolve_mixed_precision,
    save_weights,
    write_train_log,
)

log = logging.getLogger(__name__)
TARGETS_FILE = "teacher_targets.npz"
WEIGHTS_FILE = "training_state.pt"
_LAYER_KEY = re.compile(r"^encoder\.encoder\.layer\.(\d+)\.(.+)$")


class DistillError(ValueError):
    """A distillation setting or input that cannot work (no teacher, a student as large as the teacher...)."""


# ---------------------------------------------------------------------------------------------------
# The student
# ---------------------------------------------------------------------------------------------------
def select_layers(teacher_layers: int, student_layers: int, how: Any) -> list[int]:
    """Teacher layer indices the student starts from: ``first`` (the bottom N), ``uniform`` (evenly spaced,
    ending with the last layer: 12 -> 4 gives [2, 5, 8, 11]) or an explicit list."""
    if not 1 <= student_layers < teacher_layers:
        raise DistillError(
            f"distill.layers={student_layers}: the student needs 1 to {teacher_layers - 1} layers "
            f"(the teacher has {teacher_layers})"
        )
    if isinstance(how, str) and how == "first":
        return list(range(student_layers))
    if isinstance(how, str) and how == "uniform":
        return [round((i + 1) * teacher_layers / student_layers) - 1 for i in range(student_layers)]
    layers = [int(x) for x in how] if not isinstance(how, str) else None
    if (
        layers is None
        or len(layers) != student_layers
        or sorted(set(layers)) != layers
        or not all(0 <= i < teacher_layers for i in layers)
    ):
        raise DistillError(
            f"distill.layer_init={how!r}: use first, uniform, or {student_layers} increasing teacher "
            f"layer indices in [0, {teacher_layers - 1}]"
        )
    return layers


def make_student(
    teacher: KefuTriageModel, layers: list[int], teacher_dir: str | Path | None = None
) -> KefuTriageModel:
    """The teacher with only ``layers`` of its encoder (embeddings and heads copied)."""
    config = KefuTriageConfig.from_dict(teacher.config.to_dict())
    config.encoder = {**config.encoder, "num_hidden_layers": len(layers)}
    config.distilled_from = {
        "teacher_dir": str(teacher_dir) if teacher_dir else None,
        "teacher_layers": teacher.encoder.config.num_hidden_layers,
        "layers_kept": list(layers),
    }
    student = KefuTriageModel(config)
    position = {t: s for s, t in enumerate(layers)}
    state = {}
    for key, value in teacher.state_dict().items():
        match = _LAYER_KEY.match(key)
        if match is None:
            state[key] = value
        elif int(match.group(1)) in position:
            state[f"encoder.encoder.layer.{position[int(match.group(1))]}.{match.group(2)}"] = value
    student.load_state_dict(state, strict=True)
    return student


# ---------------------------------------------------------------------------------------------------
# The transfer set: training split + noisy copies + unlabelled messages
# ---------------------------------------------------------------------------------------------------
def augment(
    records: list[dict[str, Any]],
    copies: int,
    seed: int,
    noise_rate: float = 1.0,
    affix_rate: float = 0.3,
    taxonomy: Taxonomy | None = None,
) -> list[dict[str, Any]]:
    """``copies`` noisy variants of each record (typos, traditional characters, punctuation, spacing, courtesy
    affixes: the generator's label-preserving surface noise), labels kept; unchanged copies are dropped."""
    if copies <= 0:
        return []
    from kefu_triage.data.generator import add_noise, decorate, load_resources

    lexicon = load_resources(taxonomy=taxonomy).lexicon
    rng = random.Random(seed)
    out, seen = [], {r["text"] for r in records}
    for record in records:
        urgent = bool(record.get("urgent"))
        for _ in range(copies):
            text = decorate(
                add_noise(record["text"], lexicon, rng, noise_rate, urgent), lexicon, rng, affix_rate, urgent
            )
            if text not in seen:
                seen.add(text)
                out.append({**record, "text": text, "origin": "augmented"})
    return out


def generated_rows(
    data_cfg: Any, size: int, fill_seed: int, taxonomy: Taxonomy, train_records: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Fresh labelled rows from the training split's own seeds, templates and dialogues: the data's generator
    run again at ``size`` with the same split seed (so the same groups are training groups) and another
    ``fill_seed``; texts already in the training split or in any held-out file (whole, not capped) are left
    out."""
    from kefu_triage.data.embedded import generator_arguments
    from kefu_triage.data.generator import generate_splits, normalise_text
    from kefu_triage.data.records import read_examples

    g = data_cfg.get("generator")
    if not g:
        raise DistillError(
            f"distill.generated_size={size}: data={data_cfg.get('name')} has no generator settings (only the "
            "embedded dataset can be generated again); set distill.generated_size=0"
        )
    held_out = [
        r
        for split in ("dev", "test", "eval")
        if data_cfg.get(f"{split}_file") and Path(data_cfg[f"{split}_file"]).is_file()
        for r in read_examples(data_cfg[f"{split}_file"], taxonomy, drop_invalid=True)
    ]
    args = {**generator_arguments(g), "size": int(size), "fill_seed": int(fill_seed)}
    rows = generate_splits(**args, taxonomy=taxonomy)["train"]
    leaked = sorted({r["group_id"] for r in rows} & {r.get("group_id") for r in held_out})
    if leaked:  # the data on disk came from another split seed, or from other seeds/templates
        raise DistillError(
            f"distill.generated_size: {leaked[:3]} are training groups for data.generator.seed={g.seed} but "
            f"held-out groups in {data_cfg.dir}; regenerate the data (`make data`) or set "
            "distill.generated_size=0"
        )
    seen = {normalise_text(r["text"]) for r in train_records + held_out}
    out = []
    for r in rows:
        key = normalise_text(r["text"])
        if key not in seen:
            seen.add(key)
            out.append({**r, "origin": "generated"})
    return out


def read_unlabeled(
    path: str | Path,
    max_rows: int | None,
    seed: int,
    exclude_files: list[str] | tuple = (),
    exclude_records: list[dict[str, Any]] | tuple = (),
    drop_invalid: bool = False,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Messages without labels (JSONL/CSV/Parquet with text and optional context) and a report: exact
    duplicates and every text of ``exclude_files`` / ``exclude_records`` (the sets evaluated on) removed, as
    the adaptation reads them (kefu_triage.train.adapt.load_unlabeled); then a seeded sample of ``max_rows``.
    Bad rows are errors naming file and line."""
    from kefu_triage.train.adapt import AdaptationError, load_unlabeled

    settings = {
        "unlabeled_file": str(path),
        "exclude_files": list(exclude_files),
        "drop_invalid": drop_invalid,
    }
    try:
        rows, report = load_unlabeled(settings, list(exclude_records))
    except AdaptationError as exc:
        raise DistillError(f"distill.unlabeled_file: {exc}") from None
    if max_rows and len(rows) > max_rows:
        pick = sorted(np.random.default_rng(seed).choice(len(rows), size=int(max_rows), replace=False))
        rows = [rows[i] for i in pick]
    report["used"] = len(rows)
    unlabeled = [
        {
            "text": r["text"],
            "context": r["context"],
            "intent": None,
            "urgent": None,
            "refund_recoverable": None,
            "origin": "unlabeled",
        }
        for r in rows
    ]
    return unlabeled, report


class TransferSet:
    """Tokenised rows with hard labels (-1 = none) and the teacher's logits for each row."""

    def __init__(
        self,
        records: list[dict[str, Any]],
        taxonomy: Taxonomy,
        tokenizer,
        config: KefuTriageConfig,
        targets: dict[str, np.ndarray],
    ):
        backend = input_tokenizer(tokenizer, config.max_seq_length)
        self.encodings = encode_inputs(
            backend, [r["text"] for r in records], [r.get("context") for r in records], config.context_turns
        )
        self.lengths = [len(e.ids) for e in self.encodings]
        self.pad_id = tokenizer.pad_token_id
        self.names = [
            n for n in ("input_ids", "attention_mask", "token_type_ids") if n in tokenizer.model_input_names
        ]

        def label(r, key):
            return -1 if r.get(key) is None else int(r[key])

        self.labels = {
            "intent_labels": torch.tensor(
                [taxonomy.intent_id(r["intent"]) if r.get("intent") else -1 for r in records]
            ),
            "urgent_labels": torch.tensor([label(r, "urgent") for r in records]),
            "refund_labels": torch.tensor([label(r, "refund_recoverable") for r in records]),
        }
        self.targets = {k: torch.from_numpy(np.asarray(targets[k], dtype=np.float32)) for k in OUTPUT_NAMES}

    def __len__(self) -> int:
        return len(self.encodings)

    def batch(self, idx: list[int]) -> dict[str, torch.Tensor]:
        feed = pad_encodings([self.encodings[i] for i in idx], self.pad_id, self.names)
        index = torch.tensor(idx)
        return {
            **{k: torch.from_numpy(v) for k, v in feed.items()},
            **{k: v[index] for k, v in self.labels.items()},
            **{f"teacher_{k}": v[index] for k, v in self.targets.items()},
        }


# ---------------------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------------------
def distill_loss(
    student: KefuTriageModel,
    out,
    batch: dict[str, torch.Tensor],
    temperature: float,
    hard_weight: float,
    refund_ids: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, float]]:
    """soft (teacher) + hard_weight * hard (labels, where known). Soft terms are scaled by T^2 (Hinton et al.
    2015) so their gradients keep their size whatever the temperature; head weights are the model's own."""
    w, t = student.config.loss_weights, temperature
    t_intent = batch["teacher_intent_logits"]
    soft_intent = (
        F.kl_div(
            F.log_softmax(out.intent_logits / t, -1),
            F.log_softmax(t_intent / t, -1),
            reduction="batchmean",
            log_target=True,
        )
        * t
        * t
    )
    soft_urgent = (
        F.binary_cross_entropy_with_logits(
            out.urgent_logit / t, torch.sigmoid(batch["teacher_urgent_logit"] / t)
        )
        * t
        * t
    )
    # the refund head only matters where the intent is a refund one (the runtime ignores it elsewhere)
    refund_rows = torch.isin(t_intent.argmax(-1), refund_ids) | (batch["refund_labels"] >= 0)
    soft_refund = (
        F.binary_cross_entropy_with_logits(
            out.refund_recoverable_logit[refund_rows] / t,
            torch.sigmoid(batch["teacher_refund_recoverable_logit"][refund_rows] / t),
        )
        * t
        * t
        if refund_rows.any()
        else out.refund_recoverable_logit.sum() * 0.0
    )
    soft = (
        w.get("intent", 1.0) * soft_intent
        + w.get("urgent", 1.0) * soft_urgent
        + w.get("refund_recoverable", 1.0) * soft_refund
    )
    labelled = batch["intent_labels"] >= 0
    if hard_weight > 0 and labelled.any():
        hard = student.compute_loss(
            out.intent_logits[labelled],
            out.urgent_logit[labelled],
            out.refund_recoverable_logit[labelled],
            batch["intent_labels"][labelled],
            batch["urgent_labels"][labelled],
            batch["refund_labels"][labelled],
        )
    else:
        hard = soft.new_zeros(())
    loss = soft + hard_weight * hard
    return loss, {"soft": float(soft.detach()), "hard": float(hard.detach())}


# ---------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------
def teacher_dev_agreement(
    student_logits: dict[str, np.ndarray], teacher_logits: dict[str, np.ndarray]
) -> float:
    return float(
        (student_logits["intent_logits"].argmax(1) == teacher_logits["intent_logits"].argmax(1)).mean()
    )


def _load_teacher(teacher_dir: Path):
    if not (teacher_dir / "config.json").is_file():
        raise DistillError(
            f"distill: no teacher model at {teacher_dir} (train it first: `make train`, or set "
            "distill.teacher_dir=...)"
        )
    return load_model(teacher_dir)


def distill(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Distil ``distill.teacher_dir`` into a smaller student; the best dev epoch is saved into ``run_dir/model``
    and published to ``distill.publish_dir``. Returns a summary (best epoch, dev figures, sizes)."""
    d = cfg.distill
    schedule = check_lr_schedule(d.get("lr_schedule", "linear"), "distill.lr_schedule")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    # teacher scoring, the student's steps and dev scoring run under autocast; weights and optimizer stay float32
    precision = resolve_mixed_precision(d.get("mixed_precision", "no"), "cpu", "distill.mixed_precision")
    if precision != str(d.get("mixed_precision", "no")):
        print(f"mixed precision: {precision} (distill.mixed_precision={d.mixed_precision})")
    _seed_everything(d.seed)
    teacher_dir = Path(d.teacher_dir)
    teacher, tokenizer = _load_teacher(teacher_dir)
    taxonomy = teacher.config.get_taxonomy()
    layers = select_layers(teacher.encoder.config.num_hidden_layers, int(d.layers), d.layer_init)
    student = make_student(teacher, layers, teacher_dir)

    splits = load_split_records(cfg.data, taxonomy)
    if "train" not in splits or "dev" not in splits:
        raise DistillError("distill: data.train_file and data.dev_file are both needed")
    train_records, dev_records, test_records = splits["train"], splits["dev"], splits.get("test", [])
    transfer = [{**r, "origin": "train"} for r in train_records] + augment(
        train_records,
        int(d.augment.copies),
        int(d.augment.seed),
        float(d.augment.noise_rate),
        float(d.augment.affix_rate),
        taxonomy,
    )
    if int(d.get("generated_size") or 0) > 0:
        transfer += generated_rows(
            cfg.data, int(d.generated_size), int(d.augment.seed), taxonomy, train_records
        )
    unlabeled_report = None
    if d.get("unlabeled_file"):
        held_out = [r for name, rows in splits.items() if name != "train" for r in rows]
        unlabeled, unlabeled_report = read_unlabeled(
            d.unlabeled_file,
            d.get("max_unlabeled_rows"),
            int(d.seed),
            d.get("exclude_files") or [],
            held_out,
            bool(d.get("drop_invalid", False)),
        )
        transfer += unlabeled
    origins = {
        o: sum(r["origin"] == o for r in transfer) for o in ("train", "augmented", "generated", "unlabeled")
    }

    state = new_training_state()
    ckpt_dir = run_dir / CHECKPOINT_DIR
    resume_from = None
    if d.resume:
        resume_from = find_resume_dir(
            OmegaConf.create({"trainer": {"resume_dir": d.get("resume_dir")}}), run_dir
        )
        if resume_from is None:
            print("distill.resume=true but no checkpoint found: starting from scratch", file=sys.stderr)
    if resume_from is not None:
        stored = np.load(resume_from / TARGETS_FILE)
        targets = {k: stored[k] for k in stored.files}
        if len(targets["intent_logits"]) != len(transfer) + len(dev_records) + len(test_records):
            raise DistillError(
                f"{resume_from}: the checkpoint was made on other data ({len(targets['intent_logits'])} "
                f"rows, now {len(transfer) + len(dev_records) + len(test_records)}); start without "
                "distill.resume"
            )
    else:  # the teacher's outputs, once, on the transfer set, dev and test (eval mode: no dropout)
        print(
            f"teacher outputs on {len(transfer)} transfer ({origins}) + {len(dev_records)} dev + "
            f"{len(test_records)} test messages"
        )
        with autocast(precision):
            targets = predict_logits(
                teacher,
                tokenizer,
                transfer + dev_records + test_records,
                batch_size=int(d.teacher_batch_size),
                progress="teacher outputs" if d.progress_bar else None,
            )
    n_transfer, n_dev = len(transfer), len(dev_records)
    teacher_dev = {k: v[n_transfer : n_transfer + n_dev] for k, v in targets.items()}
    teacher_test = {k: v[n_transfer + n_dev :] for k, v in targets.items()}
    data = TransferSet(
        transfer, taxonomy, tokenizer, student.config, {k: v[:n_transfer] for k, v in targets.items()}
    )
    del teacher

    sampler = LengthGroupedSampler(data.lengths, int(d.batch_size), int(d.seed))
    total_steps = max(len(sampler) * int(d.epochs), 1)
    optimizer, scheduler = optimizer_and_schedule(
        student, d.lr, d.weight_decay, schedule, d.warmup_ratio, total_steps
    )
    refund_ids = torch.tensor([taxonomy.intent_id(n) for n in taxonomy.refund_intents], dtype=torch.long)
    if resume_from is not None:
        saved = torch.load(resume_from / WEIGHTS_FILE, weights_only=False)
        student.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state = json.loads((resume_from / STATE_FILE).read_text())
        _set_rng_state(torch.load(resume_from / RNG_FILE, weights_only=False))
        if resume_from.parent != run_dir and (resume_from.parent / "best").is_dir():
            shutil.copytree(resume_from.parent / "best", run_dir / "best", dirs_exist_ok=True)
        print(f"resumed from {resume_from} at epoch {state['epoch']} batch {state['batch_in_epoch']}")

    def save_checkpoint() -> None:
        with atomic_directory(ckpt_dir) as tmp:
            torch.save(
                {
                    "model": student.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                },
                tmp / WEIGHTS_FILE,
            )
            torch.save(_rng_state(), tmp / RNG_FILE)
            np.savez(tmp / TARGETS_FILE, **targets)
            atomic_write_json(tmp / STATE_FILE, state)

    started = time.time()
    with _StopFlag() as stop:
        for epoch in range(state["epoch"], int(d.epochs)):
            sampler.use_epoch(epoch)
            student.train()
            batches = sampler.batches()
            bar = tqdm(
                batches[state["batch_in_epoch"] :],
                total=len(batches),
                initial=state["batch_in_epoch"],
                desc=f"distil {epoch + 1}/{d.epochs}",
                disable=not d.progress_bar,
                dynamic_ncols=True,
            )
            seen, t0 = 0, time.time()
            for idx in bar:
                batch = data.batch(idx)
                with autocast(precision):
                    out = student(**{k: batch[k] for k in data.names})
                for k in OUTPUT_NAMES:  # the losses in float32, against float32 teacher targets
                    out[k] = out[k].float()
                loss, parts = distill_loss(
                    student, out, batch, float(d.temperature), float(d.hard_weight), refund_ids
                )
                loss.backward()
                torch.nn.utils.clip_grad_norm_(student.parameters(), float(d.max_grad_norm))
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
                state["batch_in_epoch"] += 1
                state["global_step"] += 1
                state["epoch_loss_sum"] += float(loss.detach())
                state["epoch_batches"] += 1
                seen += len(idx)
                bar.set_postfix(
                    loss=f"{loss.item():.3f}",
                    soft=f"{parts['soft']:.3f}",
                    ex_s=f"{seen / max(time.time() - t0, 1e-6):.0f}",
                )
                if stop.signal is not None or (
                    d.stop_after_steps and state["global_step"] >= d.stop_after_steps
                ):
                    save_checkpoint()
                    raise TrainingInterrupted(
                        f"stopped at epoch {epoch + 1} batch {state['batch_in_epoch']}: checkpoint saved in {ckpt_dir}; "
                        "continue with distill.resume=true"
                    )
                if d.checkpoint_every_steps and state["global_step"] % d.checkpoint_every_steps == 0:
                    save_checkpoint()
            # ---- end of epoch: dev figures (labels and agreement with the teacher), best student
            with autocast(precision):
                dev_logits = predict_logits(
                    student, tokenizer, dev_records, batch_size=int(d.eval_batch_size)
                )
            dev = dev_metrics(dev_logits, dev_records, taxonomy, OmegaConf.to_container(d.selection_weights))
            dev["teacher_agreement"] = teacher_dev_agreement(dev_logits, teacher_dev)
            entry = {
                "epoch": epoch + 1,
                "global_step": state["global_step"],
                "train_loss": round(state["epoch_loss_sum"] / max(state["epoch_batches"], 1), 4),
                "lr": float(f"{scheduler.get_last_lr()[0]:.4g}"),
                "examples_per_s": round(seen / max(time.time() - t0, 1e-6), 1),
                **{f"dev_{k}": round(v, 4) for k, v in dev.items()},
            }
            state["history"].append(entry)
            print(" ".join(f"{k}={v}" for k, v in entry.items()))
            write_train_log(run_dir, state["history"])
            if dev["score"] > state["best_score"]:
                state.update(best_score=dev["score"], best_epoch=epoch + 1)
                save_weights(student, tokenizer, run_dir / "best")
            state.update(epoch=epoch + 1, batch_in_epoch=0, epoch_loss_sum=0.0, epoch_batches=0)
            save_checkpoint()

    weights = OmegaConf.to_container(d.selection_weights)
    summary = {
        "best_epoch": state["best_epoch"],
        "best_dev": state["history"][state["best_epoch"] - 1],
        "teacher_dev": {
            f"dev_{k}": round(v, 4)
            for k, v in dev_metrics(teacher_dev, dev_records, taxonomy, weights).items()
        },
        "epochs_run": len(state["history"]),
        "distill_seconds": round(time.time() - started, 1),
        "mixed_precision": precision,
        "teacher_dir": str(teacher_dir),
        "layers_kept": layers,
        "transfer_rows": origins,
        "unlabeled": unlabeled_report,
        "parameters": sum(p.numel() for p in student.parameters()),
    }
    # the best student against the teacher on test (raw logits; `make eval` tunes the student's own policy)
    if test_records:
        best = KefuTriageModel.from_pretrained(run_dir / "best")
        student_test = predict_logits(best, tokenizer, test_records, batch_size=int(d.eval_batch_size))
        summary["test"] = {
            "teacher": {
                k: round(v, 4) for k, v in dev_metrics(teacher_test, test_records, taxonomy, weights).items()
            },
            "student": {
                k: round(v, 4) for k, v in dev_metrics(student_test, test_records, taxonomy, weights).items()
            },
            "intent_agreement": round(teacher_dev_agreement(student_test, teacher_test), 4),
        }
        t, s = summary["test"]["teacher"], summary["test"]["student"]
        print(
            f"test intent macro-F1: teacher {t['intent_macro_f1']:.4f}, student {s['intent_macro_f1']:.4f}; "
            f"urgent AUC {t['urgent_auc']:.4f} vs {s['urgent_auc']:.4f}; intent agreement "
            f"{summary['test']['intent_agreement']:.4f}"
        )
    finalize_model_dir(
        cfg,
        run_dir,
        taxonomy,
        splits,
        state,
        summary,
        cfg.distill.get("publish_dir"),
        summary_key="distillation",
    )
    if not d.get("keep_checkpoint", False):
        consumed = [ckpt_dir, run_dir / "best"]
        if resume_from is not None and resume_from.parent != run_dir and resume_from.name == CHECKPOINT_DIR:
            consumed.append(resume_from)
        for path in consumed:
            shutil.rmtree(path, ignore_errors=True)
    return summary


def main() -> None:
    """`make distill` / `python -m kefu_triage.train.distill [overrides]` (Hydra entry point)."""
    import hydra
    from hydra.core.hydra_config import HydraConfig

    @hydra.main(version_base="1.3", config_path="../../../configs", config_name="distill")
    def run(cfg: DictConfig) -> float:
        try:
            summary = distill(cfg, HydraConfig.get().runtime.output_dir)
        except TrainingInterrupted as exc:
            print(str(exc), file=sys.stderr)
            sys.exit(130)
        except (DistillError, DataValidationError) as exc:
            print(f"distill failed: {exc}", file=sys.stderr)
            sys.exit(1)
        return summary["best_dev"]["dev_score"]

    run()


if __name__ == "__main__":
    main()
