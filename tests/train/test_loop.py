"""Training loop: outputs, determinism, exact resume, signals, and 2-process data-parallel training."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import SMOKE_OVERRIDES, compose, model_weights, short_train_cfg
from kefu_triage.core.resources import packaged_config
from kefu_triage.train.loop import LengthGroupedSampler, TrainingInterrupted, train

ROOT = Path(__file__).resolve().parents[2]
_cfg, _weights = short_train_cfg, model_weights


def _dev(summary):
    return {k: v for k, v in summary["best_dev"].items() if k != "examples_per_s"}  # all but wall-clock speed


def _stopped_and_resumed(root, smoke, *extra):
    """Train with ``extra``, stopped after 4 steps (like SIGTERM) in root/run, then resumed from that
    checkpoint into root/run2: ``(summary, published weights)`` of the resumed run."""
    with pytest.raises(TrainingInterrupted):
        train(_cfg(root, smoke, *extra, "trainer.stop_after_steps=4"), root / "run")
    summary = train(
        _cfg(root, smoke, *extra, "trainer.resume=true", f"trainer.resume_dir={root / 'run'}"),
        root / "run2",
    )
    return summary, _weights(root / "run2" / "model")


def test_smoke_run_leaves_a_complete_model_dir(smoke):
    model_dir = smoke["model_dir"]
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "train_config.yaml",
        "label_maps.json",
        "train_log.jsonl",
        "train_log.csv",
        "data_summary.json",
    ):
        assert (model_dir / name).is_file(), name
    log = [json.loads(x) for x in (model_dir / "train_log.jsonl").read_text().splitlines()]
    assert {"dev_intent_macro_f1", "dev_urgent_f1", "dev_refund_f1", "dev_score"} <= set(log[0])
    csv_rows = list(csv.DictReader((model_dir / "train_log.csv").open()))
    assert [float(r["dev_score"]) for r in csv_rows] == [e["dev_score"] for e in log]
    # linear decay: the rate falls epoch by epoch and reaches ~0 after the last planned step
    lrs = [e["lr"] for e in log]
    assert lrs == sorted(lrs, reverse=True) and lrs[0] > 0
    if len(log) == smoke["summary"]["epochs_run"] == 8:
        assert lrs[-1] < 1e-3 * lrs[0]
    # a finished run keeps its model but not the bulky resumable state
    assert (smoke["run_dir"] / "model" / "model.safetensors").is_file()
    assert not (smoke["run_dir"] / "checkpoint").exists() and not (smoke["run_dir"] / "best").exists()
    # the smoke model learns something: dev intent accuracy well above chance (1/17)
    assert max(e["dev_intent_accuracy"] for e in log) > 0.25
    assert smoke["summary"]["best_dev"]["dev_score"] == max(e["dev_score"] for e in log)


def test_same_seed_same_metrics_and_exact_resume(smoke, tmp_path):
    a = train(_cfg(tmp_path / "a", smoke), tmp_path / "a" / "run")
    b = train(_cfg(tmp_path / "b", smoke), tmp_path / "b" / "run")
    assert _dev(a) == _dev(b)  # determinism on CPU

    # interrupt mid-epoch 1 (same path as SIGTERM), then resume into a new run dir
    with pytest.raises(TrainingInterrupted, match="checkpoint saved"):
        train(_cfg(tmp_path / "c", smoke, "trainer.stop_after_steps=4"), tmp_path / "c" / "run")
    state = json.loads((tmp_path / "c" / "run" / "checkpoint" / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and state["epoch"] == 0
    resumed = train(
        _cfg(tmp_path / "c", smoke, "trainer.resume=true", f"trainer.resume_dir={tmp_path / 'c' / 'run'}"),
        tmp_path / "c" / "run2",
    )
    assert _dev(resumed) == _dev(a)
    wa, wc = _weights(tmp_path / "a" / "run" / "model"), _weights(tmp_path / "c" / "run2" / "model")
    assert all(torch.allclose(wa[k], wc[k], atol=1e-6) for k in wa)
    # the interrupted checkpoint was continued to completion: it is consumed, not resumed a second time
    assert not (tmp_path / "c" / "run" / "checkpoint").exists()


def _launch(args, root, **kw):
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "KEFU_CACHE_DIR": str(root / "cache"),
    }
    return subprocess.Popen(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,
    )


def _smoke_args(root, smoke, *extra):
    return [
        "kefu_triage.train",
        *SMOKE_OVERRIDES,
        f"paths.root_dir={root}",
        f"data.dir={smoke['data_dir']}",
        f"hydra.run.dir={root / 'run'}",
        "trainer.max_epochs=30",
        "trainer.checkpoint_every_steps=3",
        "trainer.early_stopping_patience=100",
        *extra,
    ]


def _wait_for(path, proc, timeout=120):
    end = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None or time.time() > end:
            proc.kill()
            pytest.fail(f"training ended before {path} appeared:\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.2)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killed_training_resumes_without_corruption(smoke, tmp_path, sig):
    proc = _launch(_smoke_args(tmp_path, smoke), tmp_path)
    _wait_for(tmp_path / "run" / "checkpoint" / "trainer_state.json", proc)
    proc.send_signal(sig)
    out = proc.communicate(timeout=120)[0]
    if sig == signal.SIGTERM:
        assert proc.returncode == 130, out[-2000:]
        assert "continue with trainer.resume=true" in out
    state = json.loads((tmp_path / "run" / "checkpoint" / "trainer_state.json").read_text())
    assert state["global_step"] > 0
    # re-run: resumes from the checkpoint and finishes
    proc = _launch(_smoke_args(tmp_path, smoke, "trainer.resume=true", "trainer.max_epochs=2"), tmp_path)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out[-3000:]
    assert "resumed from" in out
    assert (tmp_path / "models" / "smoke" / "model.safetensors").is_file()
    assert not list((tmp_path / "run").glob(".*.tmp-*"))  # no half-written directories left


def test_two_process_data_parallel_training(smoke, tmp_path):
    launcher = Path(sys.executable).parent / "accelerate"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    res = subprocess.run(
        [
            str(launcher),
            "launch",
            "--num_processes",
            "2",
            "--cpu",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "-m",
            *_smoke_args(
                tmp_path, smoke, "trainer=ddp", "trainer.max_epochs=2", "data.max_train_examples=256"
            ),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    from kefu_triage.model.multitask import load_model

    model, _ = load_model(tmp_path / "models" / "smoke")
    assert model.config.num_intents == 17
    log = [
        json.loads(x) for x in (tmp_path / "models" / "smoke" / "train_log.jsonl").read_text().splitlines()
    ]
    assert len(log) == 2
    # the schedule spans both epochs with 2 processes too (accelerate steps the scheduler once per process):
    # halfway through, linear decay after 10% warm-up leaves ~0.56 of the peak rate, not 0
    peak = 2.0e-3  # configs/experiment/smoke.yaml model.lr
    assert 0.4 * peak < log[0]["lr"] < 0.7 * peak and log[1]["lr"] < 0.05 * peak


def test_length_grouped_batches_cover_every_example_once():
    lengths = [((i * 37) % 50) + 1 for i in range(1000)]
    sampler = LengthGroupedSampler(lengths, batch_size=16, seed=3, mega_batch_mult=8)
    batches = sampler.batches()
    assert len(batches) == len(sampler) == 63
    assert sorted(i for b in batches for i in b) == list(range(1000))
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    assert spread < 10  # random batches of 16 from 1..50 span ~45 lengths: grouping keeps padding low
    assert sampler.batches() == batches  # same (seed, epoch): same order (resume relies on it)
    sampler.use_epoch(1)
    assert sampler.batches() != batches


def test_multirun_sweep_composes_every_job():
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    models = sorted(p.stem for p in packaged_config("model", "tiny").parent.glob("*.yaml"))
    sweep = [f"model={','.join(models)}", "trainer=cpu,gpu,ddp"]
    jobs = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(sweep), max_batch_size=None)[
        0
    ]
    assert len(jobs) == 3 * len(models)
    published = set()
    for job in jobs:
        cfg = compose("train", job)
        # every encoder config carries what the training loop reads
        for key in ("name", "source", "max_length", "lr", "batch_size", "warmup_ratio", "weight_decay"):
            assert cfg.model.get(key) is not None, (job, key)
        assert cfg.experiment_name == cfg.model.name
        published.add(cfg.trainer.publish_dir)
    assert len(published) == len(models)  # one models/<name> per encoder: sweeps do not overwrite each other
    smoke = compose("train", ["experiment=smoke", "model=e5_small_zh"])
    assert (
        smoke.model.name == "e5_small_zh" and smoke.experiment_name == "smoke"
    )  # the experiment stays overridable


def test_cosine_schedule_keeps_a_higher_rate_mid_run_and_unknown_schedules_are_refused(smoke, tmp_path):
    lrs = {}
    for schedule in ("linear", "cosine"):
        cfg = _cfg(
            tmp_path / schedule,
            smoke,
            "trainer.max_epochs=3",
            "data.max_train_examples=64",
            f"trainer.lr_schedule={schedule}",
        )
        train(cfg, tmp_path / schedule / "run")
        log = (tmp_path / schedule / "published" / "train_log.jsonl").read_text().splitlines()
        lrs[schedule] = [json.loads(x)["lr"] for x in log]
    # after a third of the steps: linear decay has lost ~1/3 of the peak, a cosine ~1/4
    assert lrs["cosine"][0] > lrs["linear"][0] and lrs["cosine"][-1] < 1e-3 * lrs["cosine"][0] + 1e-12
    with pytest.raises(ValueError, match="trainer.lr_schedule"):
        train(_cfg(tmp_path / "bad", smoke, "trainer.lr_schedule=wavy"), tmp_path / "bad" / "run")


def test_heads_learn_at_head_lr_scale_times_the_encoder_rate(smoke):
    from kefu_triage.model.multitask import load_model
    from kefu_triage.train.loop import optimizer_and_schedule

    model, _ = load_model(smoke["model_dir"])
    optimizer, scheduler = optimizer_and_schedule(model, 1e-4, 0.01, "linear", 0.0, 10, head_lr_scale=10)
    rates = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            rates[id(p)] = (group["lr"], group["weight_decay"])
    named = dict(model.named_parameters())
    assert len(rates) == len(named)  # every parameter in exactly one group
    assert rates[id(named["intent_head.weight"])] == (1e-3, 0.01)
    assert rates[id(named["urgent_head.bias"])] == (1e-3, 0.0)
    encoder_weight = next(n for n in named if n.startswith("encoder.") and n.endswith("dense.weight"))
    assert rates[id(named[encoder_weight])] == (1e-4, 0.01)
    scheduler.step()  # the schedule scales each group from its own rate
    assert optimizer.param_groups[-1]["lr"] / optimizer.param_groups[0]["lr"] == pytest.approx(10)
    with pytest.raises(ValueError, match="head_lr_scale must be > 0"):
        optimizer_and_schedule(model, 1e-4, 0.01, "linear", 0.0, 10, head_lr_scale=0)


def test_layer_lr_decay_slows_each_lower_encoder_layer(smoke):
    from kefu_triage.model.multitask import load_model
    from kefu_triage.train.loop import optimizer_and_schedule

    model, _ = load_model(smoke["model_dir"])
    named = dict(model.named_parameters())
    layers = sorted({int(n.split(".layer.")[1].split(".")[0]) for n in named if ".layer." in n})
    top = layers[-1]

    def rates(**kw):
        optimizer, _ = optimizer_and_schedule(model, 1e-4, 0.01, "linear", 0.0, 10, head_lr_scale=10, **kw)
        out = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
        assert len(out) == len(named)  # every parameter in exactly one group
        return {n: out[id(p)] for n, p in named.items()}

    decayed, plain = rates(layer_lr_decay=0.5), rates()
    assert set(plain.values()) == {1e-4, 1e-3}  # 1.0 (the default) leaves the rates as they were
    dense = "attention.output.dense.weight"
    for layer in layers:
        name = next(n for n in named if f".layer.{layer}.{dense}" in n)
        assert decayed[name] == pytest.approx(1e-4 * 0.5 ** (top - layer))
    word = next(n for n in named if "word_embeddings" in n)
    assert decayed[word] == pytest.approx(1e-4 * 0.5 ** len(layers))  # one step below the first layer
    assert decayed["intent_head.weight"] == pytest.approx(1e-3)  # the heads keep head_lr_scale x lr
    for bad in (0.0, 1.5, "0.9", True):
        with pytest.raises(ValueError, match="layer_lr_decay must be in"):
            rates(layer_lr_decay=bad)


def test_ema_weights_are_published_and_resume_exactly(smoke, tmp_path):
    ema = "trainer.ema_decay=0.9"
    a = train(_cfg(tmp_path / "a", smoke, ema, "trainer.keep_checkpoint=true"), tmp_path / "a" / "run")
    published = _weights(tmp_path / "a" / "run" / "model")
    raw = load_file(str(tmp_path / "a" / "run" / "checkpoint" / "accelerate" / "model.safetensors"))
    assert (tmp_path / "a" / "run" / "checkpoint" / "ema_state.pt").is_file()
    # the best epoch's average is published, not the last step's raw weights
    assert any(not torch.allclose(published[k], raw[k]) for k in raw if k in published)
    train(_cfg(tmp_path / "p", smoke), tmp_path / "p" / "run")
    plain = _weights(tmp_path / "p" / "run" / "model")
    assert any(not torch.allclose(published[k], plain[k]) for k in plain)

    resumed, again = _stopped_and_resumed(tmp_path / "c", smoke, ema)
    assert _dev(resumed) == _dev(a)
    assert all(torch.allclose(published[k], again[k], atol=1e-6) for k in published)
    with pytest.raises(ValueError, match="ema_decay must be in"):
        train(_cfg(tmp_path / "bad", smoke, "trainer.ema_decay=1.5"), tmp_path / "bad" / "run")


def test_rdrop_penalises_disagreement_between_dropout_passes(smoke, tmp_path):
    from kefu_triage.model.multitask import load_model
    from kefu_triage.train.loop import rdrop_loss

    model, tokenizer = load_model(smoke["model_dir"])
    batch = dict(
        tokenizer(
            ["这双鞋我想退掉", "我的快递现在到哪里了", "再不处理我就投诉"], padding=True, return_tensors="pt"
        )
    )
    batch.update(
        intent_labels=torch.tensor([0, 1, 2]),
        urgent_labels=torch.tensor([0, 0, 1]),
        refund_labels=torch.tensor([1, -1, -1]),
    )
    model.eval()  # no dropout: both passes agree, so R-Drop is exactly the supervised loss
    with torch.no_grad():
        loss, out = rdrop_loss(model, batch, alpha=1.0)
        assert out.intent_logits.shape[0] == 6
        assert loss.item() == pytest.approx(model(**batch).loss.item(), abs=1e-5)
    model.train()
    torch.manual_seed(0)
    loss, out = rdrop_loss(model, batch, alpha=1.0)
    assert loss.item() > out.loss.item() + 1e-6  # two dropout masks disagree: a positive KL term
    loss.backward()
    assert model.intent_head.weight.grad is not None

    plain = train(_cfg(tmp_path / "p", smoke), tmp_path / "p" / "run")
    rdrop = train(_cfg(tmp_path / "r", smoke, "trainer.rdrop_alpha=1.0"), tmp_path / "r" / "run")
    assert _dev(rdrop) != _dev(plain)
    with pytest.raises(ValueError, match="rdrop_alpha must be a number >= 0"):
        train(_cfg(tmp_path / "bad", smoke, "trainer.rdrop_alpha=-1"), tmp_path / "bad" / "run")


def test_class_weight_bias_is_taken_out_of_the_published_intent_head(smoke, tmp_path):
    from kefu_triage.model.multitask import load_model

    plain = train(_cfg(tmp_path / "p", smoke), tmp_path / "p" / "run")
    weighted = _weights(tmp_path / "p" / "run" / "model")
    removed = train(
        _cfg(tmp_path / "b", smoke, "trainer.remove_class_weight_bias=true"), tmp_path / "b" / "run"
    )
    published = _weights(tmp_path / "b" / "run" / "model")
    assert _dev(removed) == _dev(plain)  # the same training; only the published intent bias differs

    model, _ = load_model(tmp_path / "b" / "run" / "model")
    w = torch.tensor(model.config.intent_class_weights)
    assert w.min() < w.max()  # the smoke data is imbalanced, so the weights tilt the head
    expected = weighted["intent_head.bias"] - torch.log(w)
    assert torch.allclose(published["intent_head.bias"], expected, atol=1e-6)
    assert all(torch.equal(published[k], weighted[k]) for k in weighted if k != "intent_head.bias")
    assert model.config.class_weight_bias_removed
    assert removed["class_weight_bias"]["removed"] == pytest.approx(torch.log(w).tolist(), abs=1e-5)
    assert "intent_macro_f1" in removed["class_weight_bias"]["dev"]
    assert not (tmp_path / "b" / "run" / "adjusted").exists()  # consumed like best/
    with pytest.raises(ValueError, match="already removed"):
        model.remove_class_weight_bias()  # twice would tilt the head the other way
    with pytest.raises(ValueError, match="remove_class_weight_bias must be true or false"):
        train(
            _cfg(tmp_path / "bad", smoke, "trainer.remove_class_weight_bias=maybe"), tmp_path / "bad" / "run"
        )


def test_wise_alpha_publishes_the_encoder_interpolated_towards_its_start(smoke, tmp_path):
    from kefu_triage.train.loop import interpolate_encoder

    plain = train(_cfg(tmp_path / "p", smoke), tmp_path / "p" / "run")
    tuned = _weights(tmp_path / "p" / "run" / "model")
    halves = train(_cfg(tmp_path / "h", smoke, "trainer.wise_alpha=0.5"), tmp_path / "h" / "run")
    half = _weights(tmp_path / "h" / "run" / "model")
    train(_cfg(tmp_path / "q", smoke, "trainer.wise_alpha=0.25"), tmp_path / "q" / "run")
    quarter = _weights(tmp_path / "q" / "run" / "model")

    assert _dev(halves) == _dev(plain)  # the same training; only the published weights differ
    assert halves["wise_ft"]["alpha"] == 0.5 and "intent_macro_f1" in halves["wise_ft"]["dev"]
    summary = json.loads((tmp_path / "h" / "run" / "model" / "data_summary.json").read_text())
    assert summary["training"]["wise_ft"] == halves["wise_ft"]
    assert not (tmp_path / "h" / "run" / "adjusted").exists()  # consumed like best/
    heads = [k for k in tuned if not k.startswith("encoder.")]
    assert heads and all(torch.equal(half[k], tuned[k]) for k in heads)
    encoder = [k for k in tuned if k.startswith("encoder.") and tuned[k].is_floating_point()]
    # both runs point back to the same start: (published - alpha * fine-tuned) / (1 - alpha)
    start_h = {k: (half[k] - 0.5 * tuned[k]) / 0.5 for k in encoder}
    start_q = {k: (quarter[k] - 0.25 * tuned[k]) / 0.75 for k in encoder}
    assert all(torch.allclose(start_h[k], start_q[k], atol=1e-5) for k in encoder)
    assert any(not torch.allclose(start_h[k], tuned[k], atol=1e-4) for k in encoder)  # training moved it

    # a run stopped and resumed interpolates towards the same start, not towards the checkpoint
    _, resumed = _stopped_and_resumed(tmp_path / "c", smoke, "trainer.wise_alpha=0.5")
    assert all(torch.allclose(resumed[k], half[k], atol=1e-6) for k in half)

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = torch.nn.Linear(2, 2)

    m = Tiny()
    start = {k: torch.zeros_like(v) for k, v in m.encoder.state_dict().items()}
    before = m.encoder.weight.detach().clone()
    interpolate_encoder(m, start, 0.25)
    assert torch.allclose(m.encoder.weight, 0.25 * before)
    with pytest.raises(ValueError, match=r"start encoder does not match the model: weight is \(3, 2\)"):
        interpolate_encoder(m, {"weight": torch.zeros(3, 2)}, 0.5)
    for bad in ("0", "1.5", "true", "'0.5'"):
        with pytest.raises(ValueError, match="wise_alpha must be a number in"):
            train(_cfg(tmp_path / "bad", smoke, f"trainer.wise_alpha={bad}"), tmp_path / "bad" / "run")


def test_mixed_precision_setting_resolves_and_unknown_values_are_refused(monkeypatch):
    from kefu_triage.train import loop

    monkeypatch.setattr(loop, "native_cpu_bf16", lambda: True)
    assert loop.resolve_mixed_precision("auto", "cpu") == "bf16"
    monkeypatch.setattr(loop, "native_cpu_bf16", lambda: False)
    assert loop.resolve_mixed_precision("auto", "cpu") == "no"  # emulated bf16 would be slower than fp32
    assert loop.resolve_mixed_precision("bf16", "cpu") == "bf16"  # an explicit choice is kept
    assert loop.resolve_mixed_precision(False, "cpu") == "no"  # YAML's bare `no`
    with pytest.raises(ValueError, match="trainer.mixed_precision.*'half'"):
        loop.resolve_mixed_precision("half", "cpu")


def test_bf16_training_runs_under_autocast_and_publishes_float32_weights(smoke, tmp_path):
    plain = train(_cfg(tmp_path / "p", smoke), tmp_path / "p" / "run")
    bf16 = train(_cfg(tmp_path / "b", smoke, "trainer.mixed_precision=bf16"), tmp_path / "b" / "run")
    assert plain["mixed_precision"] == "no" and bf16["mixed_precision"] == "bf16"
    summary = json.loads((tmp_path / "b" / "run" / "model" / "data_summary.json").read_text())
    assert summary["training"]["mixed_precision"] == "bf16"
    weights = _weights(tmp_path / "b" / "run" / "model")
    assert all(w.dtype == torch.float32 for w in weights.values() if w.is_floating_point())
    reference = _weights(tmp_path / "p" / "run" / "model")
    # the same run in float32 ends elsewhere: the forward and backward passes really ran in bfloat16
    assert any(not torch.allclose(weights[k], reference[k], atol=1e-4) for k in reference)
    history = [json.loads(x) for x in (tmp_path / "b" / "run" / "train_log.jsonl").read_text().splitlines()]
    assert history[-1]["train_loss"] < history[0]["train_loss"]

    # stopped and resumed under bf16: the same weights as the uninterrupted bf16 run
    _, resumed = _stopped_and_resumed(tmp_path / "c", smoke, "trainer.mixed_precision=bf16")
    assert all(torch.allclose(weights[k], resumed[k], atol=1e-6) for k in weights)
