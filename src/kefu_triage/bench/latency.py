"""`make bench`: CPU latency, throughput and memory of PyTorch eager vs ONNX fp32 vs ONNX int8, in one run,
on the same messages (the test split, so its real length distribution), at 1 and 2 threads.

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
from kefu_triage.runtime.model import TriageModel

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
        fn(messages[s:s + batch])
    return len(messages) / (time.perf_counter() - t0)


def run_bench(cfg: DictConfig) -> dict[str, Any]:
    artifact = Path(cfg.artifact_dir)
    messages = read_examples(cfg.messages_file)
    rng = np.random.default_rng(0)
    lat_msgs = [messages[i] for i in rng.choice(len(messages), min(cfg.latency_messages, len(messages)), replace=False)]
    thr_msgs = [messages[i] for i in rng.choice(len(messages), min(cfg.throughput_messages, len(messages)), replace=False)]
    results: dict[str, Any] = {"engines": {}}
    model, tokenizer = load_model(cfg.model_dir) if cfg.model_dir else (None, None)
    for threads in cfg.threads:
        engines = {}
        if model is not None:
            torch.set_num_threads(threads)
            engines["pytorch_eager"] = lambda recs: predict_logits(model, tokenizer, recs, batch_size=len(recs))
        for precision in ("fp32", "int8"):
            rt = TriageModel.load(artifact, precision=precision, threads=threads, batch_size=cfg.batch_size)
            engines[f"onnx_{precision}"] = functools.partial(_score_artifact, rt)
        for name, fn in engines.items():
            lat = _latencies(fn, lat_msgs, cfg.warmup)
            results["engines"][f"{name}@{threads}t"] = {
                "engine": name, "threads": threads,
                "p50_ms": float(np.percentile(lat, 50)), "p95_ms": float(np.percentile(lat, 95)),
                "p99_ms": float(np.percentile(lat, 99)),
                "throughput_msg_s": _throughput(fn, thr_msgs, cfg.batch_size),
            }
            print(f"  {name:14s} {threads}t  p50 {np.percentile(lat, 50):7.2f} ms  "
                  f"msg/s@{cfg.batch_size} {results['engines'][f'{name}@{threads}t']['throughput_msg_s']:7.0f}")
    probe = subprocess.run([sys.executable, "-c", RSS_PROBE, str(artifact), json.dumps([r["text"] for r in thr_msgs[:256]])],
                           capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    if probe.returncode != 0:
        raise RuntimeError(f"runtime-only RSS probe failed: {probe.stderr[-2000:]}")
    results["runtime_peak_rss_mb"] = int(probe.stdout.strip().splitlines()[-1]) / 1024
    results["artifact_mb"] = {p.name: p.stat().st_size / 1e6 for p in sorted(artifact.glob("*.onnx"))}
    results["messages"] = {"file": str(cfg.messages_file), "latency_n": len(lat_msgs), "throughput_n": len(thr_msgs),
                           "mean_chars": float(np.mean([len(r["text"]) for r in lat_msgs]))}
    results["machine"] = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "processor": _cpu_name(),
                          "python": platform.python_version()}
    results["targets"] = check_targets(results, cfg)
    return results


def check_targets(results: dict[str, Any], cfg: DictConfig) -> dict[str, Any]:
    e, t = results["engines"], cfg.targets
    top = max(cfg.threads)
    int8, torch_e = e.get(f"onnx_int8@{top}t"), e.get(f"pytorch_eager@{top}t")
    out = {"int8_p50_ms": {"value": int8["p50_ms"], "target": f"<= {t.int8_p50_ms}", "ok": int8["p50_ms"] <= t.int8_p50_ms},
           "int8_msg_s_batch": {"value": int8["throughput_msg_s"], "target": f">= {t.int8_msg_s}",
                                "ok": int8["throughput_msg_s"] >= t.int8_msg_s},
           "int8_size_mb": {"value": results["artifact_mb"].get("model.int8.onnx"), "target": f"<= {t.int8_size_mb}",
                            "ok": results["artifact_mb"].get("model.int8.onnx", 1e9) <= t.int8_size_mb},
           "runtime_rss_mb": {"value": results["runtime_peak_rss_mb"], "target": f"<= {t.runtime_rss_mb}",
                              "ok": results["runtime_peak_rss_mb"] <= t.runtime_rss_mb}}
    if torch_e:
        speedup = torch_e["p50_ms"] / int8["p50_ms"]
        out["int8_speedup_vs_pytorch_p50"] = {"value": speedup, "target": f">= {t.speedup_vs_pytorch}",
                                              "ok": speedup >= t.speedup_vs_pytorch}
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
    rows = ["| engine | threads | p50 ms | p95 ms | p99 ms | msg/s (batch) |", "|---|---|---|---|---|---|"]
    for r in results["engines"].values():
        rows.append(f"| {r['engine']} | {r['threads']} | {r['p50_ms']:.2f} | {r['p95_ms']:.2f} | {r['p99_ms']:.2f} | "
                    f"{r['throughput_msg_s']:.0f} |")
    rows += ["", "| target | value | goal | met |", "|---|---|---|---|"]
    for k, v in results["targets"].items():
        rows.append(f"| {k} | {v['value']:.2f} | {v['target']} | {'PASS' if v['ok'] else 'MISS'} |")
    sizes = ", ".join(f"{k} {v:.1f} MB" for k, v in results["artifact_mb"].items())
    m = results["machine"]
    rows += ["", f"Artifact: {sizes}; runtime-only process peak RSS {results['runtime_peak_rss_mb']:.0f} MB.",
             f"Machine: {m['cpu_count']} CPUs ({m['processor']}), {m['platform']}, Python {m['python']}; "
             f"{results['messages']['latency_n']} test messages (mean {results['messages']['mean_chars']:.1f} chars)."]
    return "\n".join(rows)
