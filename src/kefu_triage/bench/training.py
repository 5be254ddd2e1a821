"""`make bench-train`: training throughput (examples/s) and peak memory per encoder on this machine.

Each encoder runs in its own process (so peak RSS is its own): the real training step (forward, backward,
AdamW, clipping) on batches of generated messages, timed after warm-up steps. A benchmark, not a test.

    python -m kefu_triage.bench.training [--models tiny e5_small_zh] [--precisions no auto] [--steps 20]
                                      [--batch-size 32] [--context-turns 1] [--output reports/bench_train.json]

``--precisions``: each encoder once per setting of ``trainer.mixed_precision`` (``auto`` = bf16 autocast on a CPU
with native bfloat16, else no); the table gives each one's speed relative to float32.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from kefu_triage.core.resources import packaged_config

MODELS_DIR = packaged_config("model", "tiny").parent


def measure(
    model_name: str,
    steps: int,
    warmup: int,
    batch_size: int,
    max_length: int,
    threads: int,
    context_turns: int = 1,
    precision: str = "no",
) -> dict:
    import torch
    from omegaconf import OmegaConf

    from kefu_triage.core.taxonomy import load_taxonomy
    from kefu_triage.data.generator import generate_splits
    from kefu_triage.model.encoders import load_encoder
    from kefu_triage.model.multitask import KefuTriageConfig, KefuTriageModel, encode
    from kefu_triage.train.loop import autocast, resolve_mixed_precision

    precision = resolve_mixed_precision(precision, "cpu", "--precisions")

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    tax = load_taxonomy()
    encoder, tokenizer = load_encoder(OmegaConf.load(MODELS_DIR / f"{model_name}.yaml"))
    cfg = KefuTriageConfig(
        intent_labels=tax.intent_names,
        intent_routes=tax.routes,
        context_turns=context_turns,
        max_seq_length=max_length,
        encoder_name=model_name,
    )
    model = KefuTriageModel.from_encoder(encoder, cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    rows = generate_splits(seed=0, size=3000)["train"]
    n_tokens, times = 0, []
    for step in range(warmup + steps):
        batch_rows = [rows[(step * batch_size + i) % len(rows)] for i in range(batch_size)]
        batch = encode(
            tokenizer,
            [r["text"] for r in batch_rows],
            [r["context"] for r in batch_rows],
            context_turns,
            max_length,
            padding=True,
            return_tensors="pt",
        )
        labels = {
            "intent_labels": torch.tensor([tax.intent_id(r["intent"]) for r in batch_rows]),
            "urgent_labels": torch.tensor([r["urgent"] for r in batch_rows]),
            "refund_labels": torch.tensor(
                [-1 if r["refund_recoverable"] is None else r["refund_recoverable"] for r in batch_rows]
            ),
        }
        t0 = time.perf_counter()
        # under autocast as accelerate runs it; backward and the optimizer outside, as there
        with autocast(precision):
            loss = model(**batch, **labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        if step >= warmup:
            times.append(time.perf_counter() - t0)
            n_tokens += int(batch["attention_mask"].sum())
    peak_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    return {
        "model": model_name,
        "precision": precision,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "examples_per_s": steps * batch_size / sum(times),
        "tokens_per_s": n_tokens / sum(times),
        "step_ms": 1000 * sum(times) / steps,
        "peak_rss_mb": peak_kb / 1024,
        "batch_size": batch_size,
        "threads": threads,
    }


def main(argv: list[str] | None = None) -> int:
    from kefu_triage.train.loop import MIXED_PRECISION, resolve_mixed_precision

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["tiny", "e5_small_zh"])
    p.add_argument(
        "--precisions",
        nargs="+",
        default=["no", "auto"],
        choices=MIXED_PRECISION,
        help="trainer.mixed_precision settings to compare",
    )
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=96)
    p.add_argument(
        "--context-turns", type=int, default=1, help="previous turns as a second segment (data default)"
    )
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument(
        "--output", default="reports/bench_train.json", help="also write the results as JSON here ('' = no)"
    )
    # child process: measure one encoder at one precision, print JSON
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--precision", default="no", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print(
            json.dumps(
                measure(
                    args.one,
                    args.steps,
                    args.warmup,
                    args.batch_size,
                    args.max_length,
                    args.threads,
                    args.context_turns,
                    args.precision,
                )
            )
        )
        return 0
    # auto is bf16 or no on this machine: each resolved setting once
    precisions = list(
        dict.fromkeys(resolve_mixed_precision(x, "cpu", "--precisions") for x in args.precisions)
    )
    results = []
    for name in args.models:
        for precision in precisions:
            res = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "kefu_triage.bench.training",
                    "--one",
                    name,
                    "--precision",
                    str(precision),
                    "--steps",
                    str(args.steps),
                    "--warmup",
                    str(args.warmup),
                    "--batch-size",
                    str(args.batch_size),
                    "--max-length",
                    str(args.max_length),
                    "--threads",
                    str(args.threads),
                    "--context-turns",
                    str(args.context_turns),
                ],
                capture_output=True,
                text=True,
            )
            if res.returncode != 0:
                print(f"{name} ({precision}): failed\n{res.stderr[-2000:]}", file=sys.stderr)
                return 1
            results.append(json.loads(res.stdout.strip().splitlines()[-1]))
    fp32 = {r["model"]: r["examples_per_s"] for r in results if r["precision"] == "no"}
    print(
        f"| encoder | precision | params (M) | examples/s | vs float32 | tokens/s | ms/step (batch {args.batch_size}) "
        "| peak RSS (MB) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        base = fp32.get(r["model"])
        r["speedup_vs_fp32"] = round(r["examples_per_s"] / base, 2) if base else None
        ratio = f"{r['speedup_vs_fp32']:.2f}x" if base else "-"
        print(
            f"| {r['model']} | {r['precision']} | {r['params_m']:.1f} | {r['examples_per_s']:.1f} | {ratio} | "
            f"{r['tokens_per_s']:.0f} | {r['step_ms']:.0f} | {r['peak_rss_mb']:.0f} |"
        )
    if args.output:
        import platform

        from kefu_triage.core.fileio import atomic_write_json

        atomic_write_json(
            args.output,
            {
                "machine": {
                    "cpu_count": os.cpu_count(),
                    "processor": platform.processor() or platform.machine(),
                    "threads": args.threads,
                    "load_avg_1m": round(os.getloadavg()[0], 2),
                },
                "settings": {
                    "steps": args.steps,
                    "warmup": args.warmup,
                    "batch_size": args.batch_size,
                    "max_length": args.max_length,
                    "context_turns": args.context_turns,
                    "precisions": precisions,
                },
                "results": results,
            },
        )
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
