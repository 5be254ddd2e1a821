"""`make bench`: CPU latency, throughput and memory, in one run on the same messages (the test split, so its
real length distribution), at 1 and 2 threads: the teacher (PyTorch eager, ONNX fp32) beside the shipped
student (PyTorch eager, ONNX fp32, ONNX int8), with each engine's speed-up over the teacher's eager p50.

A benchmark, not a test: it prints figures and ratios against the targets and writes bench.json.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from kefu_triage.data.records import read_examples
from kefu_triage.model.multitask import load_model, predict_logits
from kefu_triage.runtime.model import TriageModel, inference_session

# Peak RSS from /proc/self/status VmHWM: ru_maxrss would report the parent's (torch-laden) peak, which
# Linux carries across fork+exec.
RSS_PROBE = """
import json, sys
from kefu_triage.runtime.model import TriageModel
m = TriageModel.load(sys.argv[1], precision="int8")
texts = json.loads(sys.argv[2])
for i in range(0, len(texts), 32):
    m.predict(texts[i:i + 32])
assert "torch" not in sys.modules
print(next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")))
"""


def _score_artifact(runtime: TriageModel, records: list[dict[str, Any]]):
    return runtime.score([r["text"] for r in records], [r.get("context") for r in records])


def _latencies(fn, messages: list[dict[str, Any]], warmup: int) -> np.ndarray:
    for r in messages[:warmup]:
        fn([r])
    times = []
    for r in messages:
        t0 = time.perf_counter()
        fn([r])
        times.append((time.perf_counter() - t0) * 1000)
    return np.array(times)


def _throughput(fn, messages: list[dict[str, Any]], batch: int) -> float:
    fn(messages[:batch])  # warm-up
    t0 = time.perf_counter()
    for s in range(0, len(messages), batch):
        fn(messages[s : s + batch])
    return len(messages) / (time.perf_counter() - t0)


def teacher_onnx_session(model, tokenizer, directory: Path, threads: int):
    """The teacher as optimised fp32 ONNX, exported like `make export` does (no int8, no gate): the teacher
    ONNX row needs no teacher artifact."""
    from kefu_triage.export.build import export_onnx, optimize

    path = directory / "teacher.onnx"
    if not path.is_file():
        names = ["input_ids", "attention_mask"] + (
            ["token_type_ids"] if "token_type_ids" in tokenizer.model_input_names else []
        )
        export_onnx(model, names, directory / "teacher.raw.onnx", 17)
        enc = model.encoder.config
        optimize(directory / "teacher.raw.onnx", path, enc.num_attention_heads, enc.hidden_size)
    return inference_session(path, threads)


def _int8_side_by_side(path: Path, threads: int, batch_size: int):
    """The throughput setup of a one-message-per-call int8 runtime: ``threads`` workers of one intra-op
    thread each (what `kefu-triage serve` runs for int8), instead of one call at a time on ``threads``."""
    rt = TriageModel.load(path, precision="int8", threads=1, batch_size=batch_size, workers=threads)
    return functools.partial(_score_artifact, rt), f"{threads} workers x 1 thread"


def _engines(cfg: DictConfig, threads: int, models: dict[str, Any], tmp: Path) -> dict[str, Any]:
    """name -> scoring function, in table order: teacher eager, teacher ONNX, shipped eager, shipped ONNX.
    int8 engines are (latency function, throughput function, throughput setup)."""
    engines: dict[str, Any] = {}
    int8_artifacts: dict[str, Path] = {}  # int8 engine -> its artifact, for the throughput setup
    shipped = "student" if "teacher" in models else "model"
    artifact = Path(cfg.artifact_dir)
    runtimes = {
        p: TriageModel.load(artifact, precision=p, threads=threads, batch_size=cfg.batch_size)
        for p in ("fp32", "int8")
    }
    torch.set_num_threads(threads)
    if "teacher" in models:
        model, tokenizer = models["teacher"]
        engines["teacher_pytorch_eager"] = functools.partial(_score_torch, model, tokenizer)
        if cfg.get("teacher_artifact_dir"):
            for p in ("fp32", "int8"):
                rt = TriageModel.load(
                    cfg.teacher_artifact_dir, precision=p, threads=threads, batch_size=cfg.batch_size
                )
                engines[f"teacher_onnx_{p}"] = functools.partial(_score_artifact, rt)
            int8_artifacts["teacher_onnx_int8"] = Path(cfg.teacher_artifact_dir)
        else:  # the shipped artifact's tokenizer and input contract (the student keeps the teacher's)
            rt = TriageModel(
                artifact,
                runtimes["fp32"].manifest,
                teacher_onnx_session(model, tokenizer, tmp, threads),
                runtimes["fp32"].tokenizer,
                cfg.batch_size,
            )
            engines["teacher_onnx_fp32"] = functools.partial(_score_artifact, rt)
    if "shipped" in models:
        engines[f"{shipped}_pytorch_eager"] = functools.partial(_score_torch, *models["shipped"])
    for p, rt in runtimes.items():
        engines[f"{shipped}_onnx_{p}"] = functools.partial(_score_artifact, rt)
    int8_artifacts[f"{shipped}_onnx_int8"] = artifact
    if threads > 1:  # at one thread the side-by-side setup is the latency runtime itself
        for name, path in int8_artifacts.items():
            engines[name] = (engines[name], *_int8_side_by_side(path, threads, cfg.batch_size))
    return engines


def _score_torch(model, tokenizer, records: list[dict[str, Any]]):
    return predict_logits(model, tokenizer, records, batch_size=len(records))


def run_bench(cfg: DictConfig) -> dict[str, Any]:
    import tempfile

    artifact = Path(cfg.artifact_dir)
    messages = read_examples(cfg.messages_file)
    rng = np.random.default_rng(0)
    lat_msgs = [
        messages[i]
        for i in rng.choice(len(messages), min(cfg.latency_messages, len(messages)), replace=False)
    ]
    thr_msgs = [
        messages[i]
        for i in rng.choice(len(messages), min(cfg.throughput_messages, len(messages)), replace=False)
    ]
    results: dict[str, Any] = {"engines": {}}
    models = {}
    if cfg.get("teacher_model_dir") and Path(cfg.teacher_model_dir).is_dir():
        models["teacher"] = load_model(cfg.teacher_model_dir)
    if cfg.model_dir:
        models["shipped"] = load_model(cfg.model_dir)
    with tempfile.TemporaryDirectory(prefix="kefu-bench-") as tmp:
        for threads in cfg.threads:
            for name, engine in _engines(cfg, threads, models, Path(tmp)).items():
                fn, thr_fn, setup = engine if isinstance(engine, tuple) else (engine, engine, None)
                lat = _latencies(fn, lat_msgs, cfg.warmup)
                row = results["engines"][f"{name}@{threads}t"] = {
                    "engine": name,
                    "threads": threads,
                    "p50_ms": float(np.percentile(lat, 50)),
                    "p95_ms": float(np.percentile(lat, 95)),
                    "p99_ms": float(np.percentile(lat, 99)),
                    "throughput_msg_s": _throughput(thr_fn, thr_msgs, cfg.batch_size),
                    "throughput_setup": setup or f"one call at a time, {threads} thread(s)",
                }
                print(
                    f"  {name:24s} {threads}t  p50 {row['p50_ms']:7.2f} ms  msg/s@{cfg.batch_size} "
                    f"{row['throughput_msg_s']:7.0f}" + (f" ({setup})" if setup else "")
                )
    for row in results["engines"].values():  # ratios within one run hold even when absolute times move
        base = results["engines"].get(f"teacher_pytorch_eager@{row['threads']}t")
        if base:
            row["p50_speedup_vs_teacher_eager"] = base["p50_ms"] / row["p50_ms"]
            row["throughput_vs_teacher_eager"] = row["throughput_msg_s"] / base["throughput_msg_s"]
    probe = subprocess.run(
        [sys.executable, "-c", RSS_PROBE, str(artifact), json.dumps([r["text"] for r in thr_msgs[:256]])],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "2"},
    )
    if probe.returncode != 0:
        raise RuntimeError(f"runtime-only RSS probe failed: {probe.stderr[-2000:]}")
    results["runtime_peak_rss_mb"] = int(probe.stdout.strip().splitlines()[-1]) / 1024
    results["artifact_mb"] = {p.name: p.stat().st_size / 1e6 for p in sorted(artifact.glob("*.onnx"))}
    results["messages"] = {
        "file": str(cfg.messages_file),
        "latency_n": len(lat_msgs),
        "throughput_n": len(thr_msgs),
        "mean_chars": float(np.mean([len(r["text"]) for r in lat_msgs])),
    }
    results["machine"] = {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "processor": _cpu_name(),
        "python": platform.python_version(),
        "load_average": _load_average(),
    }
    results["targets"] = check_targets(results, cfg)
    return results


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def check_targets(results: dict[str, Any], cfg: DictConfig) -> dict[str, Any]:
    e, t = results["engines"], cfg.targets
    top = max(cfg.threads)
    int8 = next(v for k, v in e.items() if k.endswith(f"_onnx_int8@{top}t") and not k.startswith("teacher_"))
    base = e.get(f"teacher_pytorch_eager@{top}t") or next(
        (v for k, v in e.items() if k.endswith(f"_pytorch_eager@{top}t")), None
    )
    out = {
        "int8_p50_ms": {
            "value": int8["p50_ms"],
            "target": f"<= {t.int8_p50_ms}",
            "ok": int8["p50_ms"] <= t.int8_p50_ms,
        },
        "int8_msg_s_batch": {
            "value": int8["throughput_msg_s"],
            "target": f">= {t.int8_msg_s}",
            "ok": int8["throughput_msg_s"] >= t.int8_msg_s,
        },
        "int8_size_mb": {
            "value": results["artifact_mb"].get("model.int8.onnx"),
            "target": f"<= {t.int8_size_mb}",
            "ok": results["artifact_mb"].get("model.int8.onnx", 1e9) <= t.int8_size_mb,
        },
        "runtime_rss_mb": {
            "value": results["runtime_peak_rss_mb"],
            "target": f"<= {t.runtime_rss_mb}",
            "ok": results["runtime_peak_rss_mb"] <= t.runtime_rss_mb,
        },
    }
    if base:
        speedup = base["p50_ms"] / int8["p50_ms"]
        out[f"int8_speedup_vs_{base['engine']}_p50"] = {
            "value": speedup,
            "target": f">= {t.speedup_vs_pytorch}",
            "ok": speedup >= t.speedup_vs_pytorch,
        }
    return out


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def format_table(results: dict[str, Any]) -> str:
    rows = [
        "| engine | threads | p50 ms | p95 ms | p99 ms | msg/s (batch) | msg/s setup | p50 × vs teacher eager | "
        "msg/s × vs teacher eager |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["engines"].values():
        ratios = " | ".join(
            f"{r[k]:.1f}×" if k in r else "-"
            for k in ("p50_speedup_vs_teacher_eager", "throughput_vs_teacher_eager")
        )
        rows.append(
            f"| {r['engine']} | {r['threads']} | {r['p50_ms']:.2f} | {r['p95_ms']:.2f} | {r['p99_ms']:.2f} | "
            f"{r['throughput_msg_s']:.0f} | {r.get('throughput_setup', '')} | {ratios} |"
        )
    rows += ["", "| target | value | goal | met |", "|---|---|---|---|"]
    for k, v in results["targets"].items():
        rows.append(f"| {k} | {v['value']:.2f} | {v['target']} | {'PASS' if v['ok'] else 'MISS'} |")
    sizes = ", ".join(f"{k} {v:.1f} MB" for k, v in results["artifact_mb"].items())
    m = results["machine"]
    rows += [
        "",
        f"Artifact: {sizes}; runtime-only process peak RSS {results['runtime_peak_rss_mb']:.0f} MB.",
        f"Machine: {m['cpu_count']} CPUs ({m['processor']}), {m['platform']}, Python {m['python']}; "
        f"{results['messages']['latency_n']} test messages (mean {results['messages']['mean_chars']:.1f} chars); "
        f"load average {m.get('load_average')} (timings under load are not comparable across runs).",
    ]
    return "\n".join(rows)
