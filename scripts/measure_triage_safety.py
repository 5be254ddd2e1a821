"""Does the triage know when it does not know? Figures on the real dev sets in ../shared (prints only; never
writes real text into the repository).

    .venv/bin/python scripts/measure_triage_safety.py --model-dir models/seeds2 [--artifact artifacts/x --precision int8]

With a model directory (after `make eval`, which writes triage_policy.json and novelty.npz there) it scores with
PyTorch; with --artifact it scores with the torch-free runtime (the shipped int8 figures). Prints:
1. AUROC of confidence / novelty / combined for "the intent is wrong", on real_gold_dev and jddc_intents_silver;
2. bot risk, coverage, urgent escalation at the tuned policy (no calibration file), with and without the novelty
   gate, and with intent temperatures capped at >= 1 vs as fitted;
3. conformal calibration cross-fitted on real_gold_dev: calibrate on half of the conversations (id prefix before
   the last ':'), measure on the other half, then swap.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from kefu_triage.core.heads import POOLED_OUTPUT, probabilities  # noqa: E402
from kefu_triage.core.novelty import NOVELTY_FILE, NoveltyModel  # noqa: E402
from kefu_triage.core.policy import Thresholds, TriagePolicy  # noqa: E402
from kefu_triage.data.records import read_examples  # noqa: E402
from kefu_triage.evaluate.conformal import ConformalError, calibrate_policy  # noqa: E402
from kefu_triage.evaluate.metrics import Gold, triage_metrics  # noqa: E402
from kefu_triage.evaluate.tuning import safety_metrics  # noqa: E402


def load_scorer(args):
    if args.artifact:
        from kefu_triage.runtime.model import TriageModel

        rt = TriageModel.load(args.artifact, precision=args.precision)
        m = rt.manifest
        return (
            lambda rows: rt.score([r["text"] for r in rows], [r.get("context") for r in rows]),
            rt.taxonomy,
            rt.novelty,
            m["calibration"]["temperatures"],
            Thresholds.from_mapping(m["policy"]["thresholds"]),
        )
    from kefu_triage.model.multitask import load_model, predict_logits

    model, tok = load_model(args.model_dir)
    policy = json.loads((Path(args.model_dir) / "triage_policy.json").read_text(encoding="utf-8"))
    nov_file = Path(args.model_dir) / NOVELTY_FILE
    return (
        lambda rows: predict_logits(model, tok, rows, pooled=True),
        model.config.get_taxonomy(),
        NoveltyModel.load(nov_file) if nov_file.is_file() else None,
        policy["temperatures"],
        Thresholds.from_mapping(policy["thresholds"]),
    )


def probs_of(logits, temps, novelty):
    p = probabilities(logits, temps)
    if novelty is not None and POOLED_OUTPUT in logits:
        p["novelty"] = novelty.score(logits[POOLED_OUTPUT])
    return p


def subset(p, idx):
    return {k: v[idx] for k, v in p.items()}


def gold_subset(g, idx):
    return Gold(g.intent[idx], g.urgent[idx], g.refund[idx], g.intent_routes)


def line(name, m):
    return (
        f"  {name:<34} coverage {m['coverage']:.3f}  bot risk {m['risk']:.3f}  urgent escalated "
        f"{m['urgent_recall']:.3f}  human share {m['human_share']:.3f}"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default=str(ROOT / "models" / "seeds2"))
    ap.add_argument("--artifact", default=None)
    ap.add_argument("--precision", default="int8")
    ap.add_argument("--real-dir", default=str(ROOT.parent / "shared" / "data" / "real"))
    ap.add_argument("--max-bot-risk", type=float, default=0.10)
    ap.add_argument("--min-urgent-recall", type=float, default=0.90)
    args = ap.parse_args()
    real = Path(args.real_dir)
    if not (real / "real_gold_dev.jsonl").is_file():
        print(f"{real}: real_gold_dev.jsonl not found", file=sys.stderr)
        return 1
    score, taxonomy, novelty, temps, th = load_scorer(args)
    routes = taxonomy.routes
    print(f"tuned thresholds {th.to_dict()}; temperatures {temps}; novelty statistics: {novelty is not None}")
    capped = {**temps, "intent": max(1.0, float(temps["intent"]))}

    sets = {}
    for name in ("real_gold_dev", "jddc_intents_silver"):
        f = real / f"{name}.jsonl"
        if f.is_file():
            rows = read_examples(f, taxonomy, drop_invalid=True)
            sets[name] = (rows, score(rows), Gold.from_records(rows, taxonomy))

    print(
        "\n1. AUROC for 'the intent is wrong' (higher = the score ranks mistakes better); AURC of the bot share"
    )
    for name, (rows, logits, gold) in sets.items():
        for label, t in (("T as fitted", temps), ("T_intent >= 1", capped)):
            s = safety_metrics(probs_of(logits, t, novelty), gold, routes, th)
            acc = float((probabilities(logits, t)["intent"].argmax(1) == gold.intent).mean())
            figs = "  ".join(
                f"{k} AUROC {s[k]['auroc_intent_error']:.3f} AURC {s[k]['aurc']:.3f}"
                for k in ("confidence", "novelty", "combined")
                if k in s
            )
            print(f"  {name} ({len(rows)} rows, acc {acc:.3f}, {label}): {figs}")

    rows, logits, gold = sets["real_gold_dev"]
    print("\n2. real_gold_dev at the tuned policy, no calibration file")
    for label, t in (("T as fitted", temps), ("T_intent >= 1", capped)):
        p = probs_of(logits, t, novelty)
        for gate_label, thr in (
            ("with novelty gate", th),
            ("without novelty gate", replace(th, novelty=1.0)),
        ):
            d = TriagePolicy(routes, thr).decide_heads(p)
            print(line(f"{label}, {gate_label}", triage_metrics(d.to_human, d.intent_id, gold)))
        s = safety_metrics(p, gold, routes, th)["urgent"]
        print(
            f"  {label}: urgent head precision {s['precision']:.3f} recall {s['recall']:.3f} traffic share "
            f"{s['traffic_share']:.3f}"
        )

    print(
        f"\n3. conformal calibration, cross-fitted by conversation (target bot-error share {args.max_bot_risk})"
    )
    conv = np.array([r.get("id", str(i)).rsplit(":", 1)[0] for i, r in enumerate(rows)])
    uniq = np.unique(conv)
    rng = np.random.default_rng(0)
    half = set(rng.permutation(uniq)[: len(uniq) // 2].tolist())
    a = np.flatnonzero([c in half for c in conv])
    b = np.flatnonzero([c not in half for c in conv])
    p = probs_of(logits, temps, novelty)
    results = []
    for cal, test, tag in ((a, b, "A->B"), (b, a, "B->A")):
        try:
            rep = calibrate_policy(
                subset(p, cal), gold_subset(gold, cal), routes, th, args.max_bot_risk, args.min_urgent_recall
            )
        except ConformalError as exc:
            print(f"  {tag}: refused: {exc}")
            continue
        thr = Thresholds.from_mapping(rep["thresholds"])
        gt = gold_subset(gold, test)
        d = TriagePolicy(routes, thr).decide_heads(subset(p, test))
        m = triage_metrics(d.to_human, d.intent_id, gt)
        err_share = float((~d.to_human & (gt.should_reach_human | (d.intent_id != gt.intent))).mean())
        results.append((m["coverage"], m["risk"], err_share, m["urgent_recall"]))
        print(
            f"  {tag}: calibrated on {len(cal)} rows ({rep['urgent'].get('urgent_rows')} urgent), measured on "
            f"{len(test)}: thresholds conf {thr.confidence:.3f} novelty {thr.novelty:.3f} urgent {thr.urgent:.3f}"
        )
        print(f"{line('', m)}  bot-error share of all {err_share:.3f}")
    if results:
        c, r, e, u = np.mean(results, axis=0)
        print(
            f"  mean: coverage {c:.3f}  bot risk {r:.3f}  bot-error share {e:.3f}  urgent escalated {u:.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
