"""`make load-test`: start `kefu-triage serve` on loopback and drive it with an asyncio client (aiohttp on
uvloop) at 1, 8, 32 and 64 concurrent clients, once with micro-batching and once with ``--max-batch 1``.

Prints p50/p95/p99 latency, throughput, errors, CPU per request and the server's RSS before/after per level,
the batching gain, and the targets of issue 19 at 32 clients against the runtime's own batch-32 throughput
measured in this run (in-process, before the server starts); writes load.json. A benchmark, not a test.
Traffic goes to 127.0.0.1 only; every level is bounded in requests and seconds.

Client and server share the machine's cores, so the client is kept cheap: request bodies are encoded once,
and aiohttp on uvloop costs ~0.3 ms of CPU per request where httpx on asyncio cost ~5 ms.

    python -m kefu_triage.bench.load --artifact artifacts/default --output reports/default/load.json
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from kefu_triage.core.fileio import atomic_write_json

HOST = "127.0.0.1"  # loopback only, by design
FALLBACK_MESSAGES = [
    "在吗",
    "快递三天没动了，急用！",
    "我要退货，鞋子尺码不对",
    "发票怎么开？",
    "优惠券用不了",
    "你们这是什么破质量，我要投诉",
    "能便宜点吗",
    "什么时候发货",
    "地址填错了能改吗",
    "退款什么时候到账",
]


def load_messages(path: str | None, limit: int = 2000) -> list[dict[str, Any]]:
    """{"text", "context"} dicts from a JSONL file (the test split by default), or a built-in handful."""
    candidates = [Path(path)] if path else [Path("data/embedded/test.jsonl")]
    for p in candidates:
        if p.is_file():
            rows = []
            with p.open(encoding="utf-8") as fh:
                for line in fh:
                    if line.strip():
                        obj = json.loads(line)
                        rows.append({"text": obj["text"], "context": obj.get("context") or None})
                    if len(rows) >= limit:
                        break
            if rows:
                return rows
        elif path:
            raise FileNotFoundError(f"--messages {p}: file not found")
    return [{"text": t, "context": None} for t in FALLBACK_MESSAGES]


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:")) / 1024
    except (OSError, StopIteration):
        return None


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process: CPU per request is a figure a busy machine distorts less than
    latency."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            parts = fh.read().rsplit(")", 1)[1].split()
        return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def runtime_throughput(
    artifact: str, precision: str, messages: list[dict[str, Any]], batch: int = 32
) -> float:
    """The runtime's own msg/s at ``batch`` (as `make bench` measures it: ``score``, default session
    options), on the same messages."""
    from kefu_triage.runtime.model import TriageModel

    model = TriageModel.load(artifact, precision=precision, batch_size=batch)
    texts, contexts = [m["text"] for m in messages], [m["context"] for m in messages]
    model.score(texts[:batch], contexts[:batch])  # warm-up
    t0 = time.perf_counter()
    for s in range(0, len(texts), batch):
        model.score(texts[s : s + batch], contexts[s : s + batch])
    return len(texts) / (time.perf_counter() - t0)


def server_config_throughput(
    artifact: str, precision: str, messages: list[dict[str, Any]], workers: int, threads: int | None
) -> float:
    """msg/s of the server's scoring without HTTP: ``predict`` (novelty, policy, result dicts) on batches of
    32, ``workers`` batches at once, session options as `kefu-triage serve` sets them. The gap between this
    and the server's msg/s is the cost of HTTP and the client."""
    from threadpoolctl import threadpool_limits

    from kefu_triage.runtime.model import TriageModel

    model = TriageModel.load(
        artifact, precision=precision, threads=threads, batch_size=32, allow_spinning=False
    )
    texts, contexts = [m["text"] for m in messages], [m["context"] for m in messages]
    chunks = [(texts[s : s + 32], contexts[s : s + 32]) for s in range(0, len(texts), 32)]
    with threadpool_limits(1, user_api="blas"), concurrent.futures.ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda c: model.predict(*c), chunks[:workers]))  # warm-up
        t0 = time.perf_counter()
        list(pool.map(lambda c: model.predict(*c), chunks))
        return len(texts) / (time.perf_counter() - t0)


class Server:
    """`kefu-triage serve` in a subprocess on a free loopback port."""

    def __init__(
        self,
        artifact: str,
        precision: str,
        max_batch: int,
        max_wait_ms: float,
        extra: list[str] = (),
        env: dict[str, str] | None = None,
    ):
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        cmd = [
            sys.executable,
            "-m",
            "kefu_triage.cli",
            "serve",
            "--artifact",
            artifact,
            "--host",
            HOST,
            "--port",
            str(self.port),
            "--precision",
            precision,
            "--max-batch",
            str(max_batch),
            "--max-wait-ms",
            str(max_wait_ms),
            "--log-level",
            "warning",
            *extra,
        ]
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"the server exited with {self.proc.returncode}: {self.proc.stderr.read()[-2000:]}"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/readyz", timeout=1.0) as r:
                    if r.status == 200:
                        return
            except (OSError, urllib.error.URLError):  # not listening yet, or 503 while warming up
                pass
            time.sleep(0.2)
        raise TimeoutError(f"the server on {self.url} was not ready within {timeout:.0f} s")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def encode_bodies(messages: list[dict[str, Any]]) -> list[bytes]:
    """One /v1/triage body per message, encoded once before the clock starts."""
    return [json.dumps({"messages": [m]}, ensure_ascii=False).encode() for m in messages]


async def drive(
    url: str, bodies: list[bytes], clients: int, requests: int, max_seconds: float
) -> dict[str, Any]:
    """``clients`` closed-loop clients, one message per request, until ``requests`` or ``max_seconds``."""
    import aiohttp

    endpoint, headers = f"{url}/v1/triage", {"content-type": "application/json"}
    latencies: list[float] = []
    errors = 0
    issued = 0

    async def post(http: aiohttp.ClientSession, body: bytes) -> bool:
        try:
            async with http.post(endpoint, data=body, headers=headers) as r:
                await r.read()
                return r.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return False

    async def warm(http: aiohttp.ClientSession) -> None:
        for body in bodies[:2]:  # unrecorded: connections open, the server's batches settle
            await post(http, body)

    async def client(http: aiohttp.ClientSession) -> None:
        nonlocal issued, errors
        while issued < requests and time.monotonic() < deadline:
            body = bodies[issued % len(bodies)]
            issued += 1
            t0 = time.perf_counter()
            if await post(http, body):
                latencies.append((time.perf_counter() - t0) * 1000)
            else:
                errors += 1

    connector = aiohttp.TCPConnector(limit=clients)
    timeout = aiohttp.ClientTimeout(total=60.0)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        await asyncio.gather(*(warm(http) for _ in range(clients)))
        deadline = time.monotonic() + max_seconds
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        seconds = time.perf_counter() - t0
    lat = np.array(latencies) if latencies else np.array([np.nan])
    return {
        "clients": clients,
        "requests": len(latencies) + errors,
        "errors": errors,
        "seconds": round(seconds, 3),
        "throughput_msg_s": round(len(latencies) / seconds, 1),
        **{f"p{q}_ms": round(float(np.percentile(lat, q)), 2) for q in (50, 95, 99)},
    }


def run_async(coro):
    """uvloop when installed (uvicorn[standard] brings it): a cheaper event loop for the client too."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def batch_sizes(url: str) -> dict[str, float]:
    """Mean messages per model call so far, from the server's own /metrics."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as r:
        text = r.read().decode()
    values = {
        line.split()[0]: float(line.split()[1])
        for line in text.splitlines()
        if line.startswith(("kefu_batch_size_sum", "kefu_batch_size_count"))
    }
    count = values.get("kefu_batch_size_count", 0)
    return {
        "batches": count,
        "mean_batch": round(values.get("kefu_batch_size_sum", 0) / count, 2) if count else 0.0,
    }


def run_config(
    artifact: str,
    precision: str,
    max_batch: int,
    max_wait_ms: float,
    levels: list[int],
    messages: list[dict[str, Any]],
    requests: int,
    max_seconds: float,
    server_args: list[str] = (),
    server_env: dict[str, str] | None = None,
) -> dict[str, Any]:
    bodies = encode_bodies(messages)
    server = Server(artifact, precision, max_batch, max_wait_ms, list(server_args), server_env)
    try:
        server.wait_ready()
        rss_before = rss_mb(server.proc.pid)
        rows = []
        for c in levels:
            before = batch_sizes(server.url)
            cpu0, client0 = cpu_seconds(server.proc.pid), time.process_time()
            row = run_async(drive(server.url, bodies, c, requests, max_seconds))
            n_req = max(row["requests"], 1)
            row["server_cpu_ms_per_request"] = round((cpu_seconds(server.proc.pid) - cpu0) * 1000 / n_req, 2)
            row["client_cpu_ms_per_request"] = round((time.process_time() - client0) * 1000 / n_req, 2)
            after = batch_sizes(server.url)
            n = after["batches"] - before["batches"]
            row["mean_batch"] = (
                round(
                    (after["mean_batch"] * after["batches"] - before["mean_batch"] * before["batches"]) / n, 2
                )
                if n
                else 0.0
            )
            rows.append(row)
            print(
                f"  max_batch={max_batch:<3} clients={c:<3} {row['throughput_msg_s']:>8.1f} msg/s  p50 {row['p50_ms']:>7.2f}"
                f"  p95 {row['p95_ms']:>7.2f}  p99 {row['p99_ms']:>7.2f} ms  errors {row['errors']}  "
                f"mean batch {row['mean_batch']}  CPU/request: server {row['server_cpu_ms_per_request']} ms, "
                f"client {row['client_cpu_ms_per_request']} ms",
                flush=True,
            )
        rss_after = rss_mb(server.proc.pid)
    finally:
        code = server.stop()
    return {
        "max_batch": max_batch,
        "max_wait_ms": max_wait_ms,
        "levels": rows,
        "server_rss_mb_before": rss_before,
        "server_rss_mb_after": rss_after,
        "sigterm_exit_code": code,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifact", required=True)
    ap.add_argument("--output", required=True, help="load.json path")
    ap.add_argument("--messages", default=None, help="JSONL with 'text' (default: data/embedded/test.jsonl)")
    ap.add_argument("--precision", choices=["int8", "fp32"], default="int8")
    ap.add_argument("--clients", default="1,8,32,64", help="comma-separated concurrency levels")
    ap.add_argument("--requests", type=int, default=1000, help="measured requests per level (bound)")
    ap.add_argument("--max-seconds", type=float, default=30.0, help="time bound per level")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument(
        "--max-wait-ms", type=float, default=None, help="the server's (default: 0 for int8, 5 for fp32)"
    )
    ap.add_argument(
        "--workers",
        type=int,
        default=None,
        help="the server's inference workers (KEFU_WORKERS; default: one per core for int8, 1 for fp32)",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="the server's onnxruntime threads per worker (default: cores / workers)",
    )
    args = ap.parse_args(argv)
    if not (Path(args.artifact) / "triage.json").is_file():
        print(
            f"load-test: error: {args.artifact}: not an artifact (no triage.json); run `make export` first",
            file=sys.stderr,
        )
        return 2
    from kefu_triage.runtime.server import ServeSettings

    levels = [int(x) for x in args.clients.split(",")]
    messages = load_messages(args.messages)
    plan = ServeSettings(
        artifact=args.artifact,
        precision=args.precision,
        workers=args.workers,
        threads=args.threads,
        max_wait_ms=args.max_wait_ms,
    ).plan_cpu()
    ref = runtime_throughput(args.artifact, args.precision, messages[:1024])
    print(
        f"runtime {args.precision} batch-32 throughput (in-process): {ref:.1f} msg/s on {min(len(messages), 1024)} messages"
    )
    ref_server = server_config_throughput(
        args.artifact, args.precision, messages[:1024], plan.workers, plan.threads
    )
    print(
        f"the server's scoring without HTTP (predict, {plan.workers} worker(s) x "
        f"{plan.threads or 'all'} thread(s), in-process): {ref_server:.1f} msg/s"
    )
    configs = {}
    for mb in dict.fromkeys((args.max_batch, 1)):
        print(f"server --max-batch {mb} --max-wait-ms {plan.max_wait_ms:g}:")
        configs[f"max_batch_{mb}"] = run_config(
            args.artifact,
            args.precision,
            mb,
            plan.max_wait_ms,
            levels,
            messages,
            args.requests,
            args.max_seconds,
            ["--threads", str(args.threads)] if args.threads else [],
            {"KEFU_WORKERS": str(args.workers)} if args.workers else None,
        )
    batched, single = configs[f"max_batch_{args.max_batch}"], configs["max_batch_1"]
    gain = {
        str(b["clients"]): round(b["throughput_msg_s"] / s["throughput_msg_s"], 2)
        if s["throughput_msg_s"]
        else None
        for b, s in zip(batched["levels"], single["levels"], strict=True)
    }
    targets = {}
    at32 = next((row for row in batched["levels"] if row["clients"] == 32), None)
    if at32:
        p99_limit = 2 * (32 / ref) * 1000 + 20
        targets = {
            "throughput_ratio_vs_runtime_batch32": round(at32["throughput_msg_s"] / ref, 3),
            "throughput_ok": at32["throughput_msg_s"] >= 0.8 * ref,
            "throughput_ratio_vs_server_scoring_without_http": round(
                at32["throughput_msg_s"] / ref_server, 3
            ),
            "p99_limit_ms": round(p99_limit, 2),
            "p99_ok": at32["p99_ms"] <= p99_limit,
            "errors_ok": at32["errors"] == 0,
        }
    print(f"batching gain (throughput max_batch={args.max_batch} / max_batch=1) by clients: {gain}")
    for cfg in configs.values():
        print(
            f"server RSS max_batch={cfg['max_batch']}: {cfg['server_rss_mb_before']:.0f} MB before, "
            f"{cfg['server_rss_mb_after']:.0f} MB after; SIGTERM exit code {cfg['sigterm_exit_code']}"
        )
    if targets:
        print(
            f"at 32 clients: {targets['throughput_ratio_vs_runtime_batch32']:.0%} of the runtime's batch-32 msg/s "
            f"(target >= 80%: {'ok' if targets['throughput_ok'] else 'MISSED'}); p99 {at32['p99_ms']} ms "
            f"(limit {targets['p99_limit_ms']} ms: {'ok' if targets['p99_ok'] else 'MISSED'}); errors {at32['errors']}"
        )
    report = {
        "artifact": str(args.artifact),
        "precision": args.precision,
        "messages": len(messages),
        "runtime_batch32_msg_s": round(ref, 1),
        "server_scoring_without_http_msg_s": round(ref_server, 1),
        "server_workers": plan.workers,
        "server_threads_per_worker": plan.threads,
        "configs": configs,
        "batching_gain": gain,
        "targets_at_32": targets,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "note": "client and server share this machine's cores",
    }
    atomic_write_json(args.output, report)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
