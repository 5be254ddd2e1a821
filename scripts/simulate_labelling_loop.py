"""Simulated labelling loop (issue 15): do messages chosen by `kefu-triage select` teach more than random ones?

    .venv/bin/python scripts/simulate_labelling_loop.py --artifact artifacts/default --n 300 \\
        --strategies diverse,random [--epochs 3] [--dry-run]

The pool is ../shared/data/real/jddc_intents_silver.jsonl with its labels hidden. For each strategy, one round:
1. `kefu-triage select --strategy S --format doccano` chooses ``--n`` pool messages with the artifact;
2. the "annotator" is the silver label: the doccano tasks get the silver intent as their only label (urgent and
   refund_recoverable stay unknown: partial labels, masked in training) and go through
   `kefu-triage import-labels --format doccano`, as a real export would;
3. the default recipe (``experiment=default``) is trained on the embedded training split plus those rows
   (``nice -n 10``), into models/loop_<strategy>;
4. the model is scored on ../shared/data/real/real_gold_dev.jsonl (intent accuracy, macro-F1, accuracy on its
   context-dependent items). The silver pool is not an evaluation set here: part of it is now training data.

Strategies are trained one after another unless ``--parallel`` (each process then gets one thread). Nothing
here is part of the shipped pipeline; outputs go to reports/labelling_loop/ (gitignored).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from measure_adaptation import score  # noqa: E402  (the same real-set scorer as the adaptation measurement)

CLI = [str(Path(sys.executable).parent / "kefu-triage")]


def run(cmd: list[str], dry: bool, env: dict | None = None) -> None:
    print("$ " + " ".join(str(c) for c in cmd), flush=True)
    if not dry:
        subprocess.run([str(c) for c in cmd], cwd=ROOT, check=True, env=env)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", default=str(ROOT / "artifacts" / "default"))
    ap.add_argument("--shared", default=str(ROOT.parent / "shared"))
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--strategies", default="diverse,random")
    ap.add_argument("--epochs", type=int, default=None, help="trainer.max_epochs (default: the recipe's)")
    ap.add_argument("--seed", type=int, default=0, help="select --seed")
    ap.add_argument("--train-file", default=str(ROOT / "data" / "embedded" / "train.jsonl"))
    ap.add_argument("--parallel", action="store_true", help="train the strategies at once, one thread each")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--output-dir", default=str(ROOT / "reports" / "labelling_loop"))
    args = ap.parse_args(argv)

    real = Path(args.shared) / "data" / "real"
    pool_file, gold = real / "jddc_intents_silver.jsonl", real / "real_gold_dev.jsonl"
    missing = [str(p) for p in (pool_file, gold, Path(args.train_file)) if not p.is_file()]
    if missing:
        print(f"error: missing {', '.join(missing)}", file=sys.stderr)
        return 2
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    pool = [json.loads(x) for x in pool_file.read_text(encoding="utf-8").splitlines() if x.strip()]
    silver = {r["id"]: r["intent"] for r in pool}
    hidden = out / "pool_unlabelled.jsonl"  # the labels stay out of what select sees
    hidden.write_text(
        "".join(json.dumps({"id": r["id"], "text": r["text"]}, ensure_ascii=False) + "\n" for r in pool),
        encoding="utf-8",
    )
    base_rows = Path(args.train_file).read_text(encoding="utf-8").splitlines()
    data_dir = Path(args.train_file).parent
    procs, results = {}, {}
    for strategy in [s.strip() for s in args.strategies.split(",") if s.strip()]:
        work = out / strategy
        work.mkdir(parents=True, exist_ok=True)
        tasks, export, labelled = work / "tasks.jsonl", work / "export.jsonl", work / "labelled.jsonl"
        run(
            [
                *CLI,
                "select",
                "--artifact",
                args.artifact,
                "--input",
                hidden,
                "--n",
                args.n,
                "--strategy",
                strategy,
            ]
            + ["--format", "doccano", "--output", tasks, "--seed", args.seed],
            args.dry_run,
        )
        if not args.dry_run:
            rows = [json.loads(x) for x in tasks.read_text(encoding="utf-8").splitlines() if x.strip()]
            annotated = []
            for i, row in enumerate(rows):
                pool_id = row["kefu"]["row"]["id"]  # the pool's id column, carried in the task metadata
                annotated.append({"id": i + 1, **row, "label": [silver[pool_id]]})
            export.write_text(
                "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in annotated), encoding="utf-8"
            )
        run([*CLI, "import-labels", "--format", "doccano", export, "--output", labelled], args.dry_run)
        train_file = work / "train.jsonl"
        if not args.dry_run:
            added = labelled.read_text(encoding="utf-8").splitlines()
            train_file.write_text("\n".join(base_rows + added) + "\n", encoding="utf-8")
            agree = sum(
                r["label"][0] in (row.get("label") or []) for r, row in zip(annotated, rows, strict=True)
            )
            results[strategy] = {"added": len(added), "model_agreed_with_label": agree}
        name = f"loop_{strategy}"
        cmd = ["nice", "-n", "10", sys.executable, "-m", "kefu_triage.train", "experiment=default"]
        cmd += [f"experiment_name={name}", f"data.train_file={train_file}", f"data.dir={data_dir}"]
        cmd += ["data.generate_if_missing=false", "trainer.progress_bar=false"]
        if args.epochs:
            cmd.append(f"trainer.max_epochs={args.epochs}")
        print("$ " + " ".join(cmd), flush=True)
        if args.dry_run:
            continue
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        if args.parallel:
            env["OMP_NUM_THREADS"] = "1"
        log = open(work / "train.log", "w")
        start = time.time()
        procs[strategy] = (subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=log), start, log)
        if not args.parallel:
            procs[strategy][0].wait()
    if args.dry_run:
        return 0
    for strategy, (proc, start, log) in procs.items():
        if proc.wait():
            print(
                f"error: training for {strategy} failed; see {out / strategy / 'train.log'}", file=sys.stderr
            )
            return 1
        log.close()
        results[strategy]["wall_s"] = round(time.time() - start, 1)
        results[strategy]["gold"] = score(ROOT / "models" / f"loop_{strategy}", [gold])[gold.name]
    print(f"\n| strategy | added | {gold.name} acc | macro-F1 | needs-context acc | train wall min |")
    print("|---|---|---|---|---|---|")
    for strategy, r in results.items():
        g = r["gold"]
        print(
            f"| {strategy} | {r['added']} | {g['intent_accuracy']:.4f} | {g['intent_macro_f1']:.4f} | "
            f"{g['needs_context_accuracy']:.4f} | {r['wall_s'] / 60:.1f} |"
        )
    (out / "results.json").write_text(json.dumps({"n": args.n, "rounds": 1, "results": results}, indent=2))
    print(f"\nwritten {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
