"""Distillation on the smoke model: a smaller loadable student, learning, exact resume, determinism."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import compose
from kefu_triage.core.taxonomy import taxonomy_from_config
from kefu_triage.data.generator import normalise_text
from kefu_triage.data.records import read_examples
from kefu_triage.model.multitask import load_model, predict_logits
from kefu_triage.train.distill import (
    DistillError,
    distill,
    generated_rows,
    make_student,
    read_unlabeled,
    select_layers,
)
from kefu_triage.train.loop import TrainingInterrupted


def _cfg(root, smoke, *extra):
    return compose(
        "distill",
        [
            "experiment=smoke",
            f"paths.root_dir={root}",
            f"data.dir={smoke['data_dir']}",
            "data.max_train_examples=160",
            "data.max_dev_examples=64",
            "data.max_test_examples=64",
            f"distill.teacher_dir={smoke['model_dir']}",
            f"distill.publish_dir={root / 'student'}",
            "distill.epochs=2",
            "distill.progress_bar=false",
            *extra,
        ],
    )


def _weights(model_dir):
    return load_file(str(model_dir / "model.safetensors"))


def test_layer_selection():
    assert select_layers(12, 4, "first") == [0, 1, 2, 3]
    assert select_layers(12, 4, "uniform") == [2, 5, 8, 11]
    assert select_layers(12, 3, "uniform") == [3, 7, 11]
    assert select_layers(12, 2, [0, 11]) == [0, 11]
    for layers, how in ((12, "first"), (0, "first"), (2, [3, 1]), (2, "every_other")):
        with pytest.raises(DistillError):
            select_layers(12, layers, how)


def test_student_starts_as_the_teacher_cut(smoke):
    teacher, _ = load_model(smoke["model_dir"])
    student = make_student(teacher, [1], smoke["model_dir"])
    assert student.encoder.config.num_hidden_layers == 1
    t, s = teacher.state_dict(), student.state_dict()
    assert torch.equal(
        s["encoder.encoder.layer.0.attention.self.query.weight"],
        t["encoder.encoder.layer.1.attention.self.query.weight"],
    )
    for key in ("encoder.embeddings.word_embeddings.weight", "intent_head.weight", "urgent_head.bias"):
        assert torch.equal(s[key], t[key])
    assert student.config.distilled_from["layers_kept"] == [1]


def test_distill_gives_a_smaller_model_that_learns_and_loads(smoke, tmp_path):
    summary = distill(_cfg(tmp_path, smoke), tmp_path / "run")
    student_dir = tmp_path / "student"
    student, tokenizer = load_model(student_dir)
    teacher, _ = load_model(smoke["model_dir"])
    assert student.encoder.config.num_hidden_layers == 1 < teacher.encoder.config.num_hidden_layers
    assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in teacher.parameters())
    history = [json.loads(x) for x in (student_dir / "train_log.jsonl").read_text().splitlines()]
    assert len(history) == 2 and history[-1]["train_loss"] < history[0]["train_loss"]
    assert 0.0 <= history[-1]["dev_teacher_agreement"] <= 1.0
    data_summary = json.loads((student_dir / "data_summary.json").read_text())
    assert data_summary["distillation"]["transfer_rows"]["augmented"] > 0
    assert json.loads((student_dir / "config.json").read_text())["distilled_from"]["teacher_layers"] == 2
    assert summary["best_dev"]["dev_score"] == max(h["dev_score"] for h in history)
    logits = predict_logits(student, tokenizer, [{"text": "我的快递三天没动了", "context": None}])
    assert logits["intent_logits"].shape == (1, student.config.num_intents)
    assert not (tmp_path / "run" / "checkpoint").exists()  # a finished run drops its resumable state

    # the student is an ordinary model directory: the exporter takes it unchanged
    from kefu_triage.export.build import export

    manifest = export(
        compose(
            "export",
            [
                f"paths.root_dir={tmp_path}",
                f"data.dir={smoke['data_dir']}",
                f"model_dir={student_dir}",
                f"output_dir={tmp_path / 'artifact'}",
            ],
        )
    )
    assert manifest["encoder"]["layers"] == 1 and manifest["encoder"]["role"] == "student"
    assert manifest["encoder"]["distilled_from"]["layers_kept"] == [0]


def test_same_seed_same_student_and_exact_resume(smoke, tmp_path):
    distill(_cfg(tmp_path / "a", smoke), tmp_path / "a" / "run")
    distill(_cfg(tmp_path / "b", smoke), tmp_path / "b" / "run")
    reference = _weights(tmp_path / "a" / "student")
    assert all(torch.equal(v, _weights(tmp_path / "b" / "student")[k]) for k, v in reference.items())

    # stop mid-epoch (like SIGTERM), then resume from that run's checkpoint: same weights as no interruption
    with pytest.raises(TrainingInterrupted):
        distill(_cfg(tmp_path / "c", smoke, "distill.stop_after_steps=4"), tmp_path / "c" / "run1")
    assert (tmp_path / "c" / "run1" / "checkpoint" / "teacher_targets.npz").is_file()
    distill(_cfg(tmp_path / "c", smoke, "distill.resume=true"), tmp_path / "c" / "run2")
    resumed = _weights(tmp_path / "c" / "student")
    assert all(torch.equal(v, resumed[k]) for k, v in reference.items())
    assert not (tmp_path / "c" / "run1" / "checkpoint").exists()  # the consumed checkpoint is gone


def test_unlabeled_messages_join_the_transfer_set(smoke, tmp_path):
    pool = tmp_path / "logs.jsonl"
    rows = [{"text": f"请问订单{i}什么时候发货", "context": None} for i in range(30)]
    rows += [{"text": "请问订单0什么时候发货", "context": None}]  # an exact duplicate is dropped
    held_out = [{"text": "请问订单1什么时候发货"}]  # a text evaluated on never becomes transfer data
    pool.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    sample, report = read_unlabeled(pool, max_rows=10, seed=0)
    assert len(sample) == 10 and report["duplicates"] == 1
    kept, report = read_unlabeled(pool, None, 0, exclude_records=held_out)
    assert len(kept) == 29 and "请问订单1什么时候发货" not in {r["text"] for r in kept}
    summary = distill(
        _cfg(tmp_path, smoke, f"adapt.unlabeled_file={pool}", "distill.epochs=1", "distill.augment.copies=0"),
        tmp_path / "run",
    )
    assert summary["transfer_rows"] == {"train": 160, "augmented": 0, "generated": 0, "unlabeled": 30}

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "好的"}\n{"txt": "oops"}\n', encoding="utf-8")
    with pytest.raises(DistillError, match=r"bad.jsonl:2: text: missing"):
        read_unlabeled(bad, None, 0)


def test_generated_rows_come_from_training_groups_and_repeat_no_held_out_text(smoke, tmp_path):
    cfg = _cfg(tmp_path, smoke, "distill.generated_size=1300", "distill.epochs=1", "distill.augment.copies=0")
    taxonomy = taxonomy_from_config(cfg.taxonomy)
    splits = {s: read_examples(cfg.data[f"{s}_file"], taxonomy) for s in ("train", "dev", "test")}
    rows = generated_rows(cfg.data, 1300, 7, taxonomy, splits["train"][:160])  # as distill caps it
    assert rows and all(r["origin"] == "generated" and r["intent"] for r in rows)
    for split in ("dev", "test"):
        assert not {r["group_id"] for r in rows} & {r["group_id"] for r in splits[split]}
    known = {normalise_text(r["text"]) for rs in splits.values() for r in rs if rs is not splits["train"]}
    known |= {normalise_text(r["text"]) for r in splits["train"][:160]}
    assert not known & {normalise_text(r["text"]) for r in rows}
    # the data on disk was generated with split seed 13: with another seed some groups would leak
    other = cfg.data.copy()
    other.generator.seed = 14
    with pytest.raises(DistillError, match="held-out groups.*regenerate the data"):
        generated_rows(other, 1300, 7, taxonomy, splits["train"])
    summary = distill(cfg, tmp_path / "run")
    assert summary["transfer_rows"]["generated"] == len(rows)


def test_missing_teacher_is_a_clear_error(smoke, tmp_path):
    with pytest.raises(DistillError, match="no teacher model"):
        distill(_cfg(tmp_path, smoke, f"distill.teacher_dir={tmp_path / 'nope'}"), tmp_path / "run")


def test_distill_follows_the_lr_schedule_setting(smoke, tmp_path):
    with pytest.raises(ValueError, match="distill.lr_schedule"):
        distill(_cfg(tmp_path / "bad", smoke, "distill.lr_schedule=wavy"), tmp_path / "bad" / "run")
    lrs = {}
    for schedule in ("linear", "constant_with_warmup"):
        root = tmp_path / schedule
        cfg = _cfg(root, smoke, f"distill.lr_schedule={schedule}")
        distill(cfg, root / "run")
        lrs[schedule] = [
            json.loads(x)["lr"] for x in (root / "run" / "train_log.jsonl").read_text().splitlines()
        ]
    # after the last epoch a linear schedule has decayed to 0; a constant one is still at the peak rate
    assert lrs["linear"][-1] == 0.0
    assert lrs["constant_with_warmup"] == [float(cfg.distill.lr)] * len(lrs["constant_with_warmup"])


def test_bf16_distillation_learns_and_keeps_float32_weights(smoke, tmp_path):
    plain = distill(_cfg(tmp_path / "p", smoke), tmp_path / "p" / "run")
    bf16 = distill(_cfg(tmp_path / "b", smoke, "distill.mixed_precision=bf16"), tmp_path / "b" / "run")
    assert plain["mixed_precision"] == "no" and bf16["mixed_precision"] == "bf16"
    history = [
        json.loads(x) for x in (tmp_path / "b" / "student" / "train_log.jsonl").read_text().splitlines()
    ]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    student, reference = _weights(tmp_path / "b" / "student"), _weights(tmp_path / "p" / "student")
    assert all(w.dtype == torch.float32 for w in student.values() if w.is_floating_point())
    assert any(not torch.allclose(student[k], reference[k], atol=1e-4) for k in reference)
    with pytest.raises(ValueError, match="distill.mixed_precision"):
        distill(_cfg(tmp_path / "x", smoke, "distill.mixed_precision=half"), tmp_path / "x" / "run")
