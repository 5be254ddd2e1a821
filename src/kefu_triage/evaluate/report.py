"""report.md and a self-contained report.html (plots embedded as base64 PNG) from an evaluation."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

import numpy as np

from kefu_triage.core.fileio import atomic_write_text

TRIAGE_ROWS = (
    ("coverage", "bot coverage (containment proxy)"),
    ("risk", "bot risk"),
    ("bot_resolved_share", "bot-resolved share"),
    ("urgent_recall", "urgent escalation recall"),
    ("recoverable_capture", "recoverable-refund capture"),
    ("human_share", "human share"),
    ("agents_needed", "agents needed at configured traffic"),
    ("aurc", "AURC (lower is better)"),
    ("coverage_at_risk_2", "coverage at risk 2%"),
    ("coverage_at_risk_5", "coverage at risk 5%"),
    ("coverage_at_risk_10", "coverage at risk 10%"),
)


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "n/a"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def make_plots(results: list[dict[str, Any]], taxonomy) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model = results[0]
    plots = {}
    # confusion matrix (row-normalised)
    cm = np.array(model["metrics"]["intent"]["confusion_matrix"], dtype=float)
    cmn = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(8, 7))
    ax.imshow(cmn, cmap="Blues", vmin=0, vmax=1)
    names = taxonomy.intent_names
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    for i in range(len(names)):
        for j in range(len(names)):
            if cm[i, j]:
                ax.text(
                    j,
                    i,
                    int(cm[i, j]),
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white" if cmn[i, j] > 0.5 else "black",
                )
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    ax.set_title("Intent confusion matrix (test, row-normalised colour)")
    plots["confusion_matrix"] = _png(fig)
    # risk-coverage curves, model vs peers
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for r in results:
        ax.plot(r["curve"]["coverage"], r["curve"]["risk"], label=r["name"])
        ax.scatter([r["metrics"]["triage"]["coverage"]], [r["metrics"]["triage"]["risk"]], marker="o")
    ax.axhline(model["operating_point"]["max_bot_risk"], ls="--", c="grey", lw=0.8, label="max bot risk")
    ax.set_xlabel("bot coverage")
    ax.set_ylabel("bot risk")
    ax.set_title("Risk-coverage (sweeping the confidence threshold; dots = tuned policy)")
    ax.legend()
    plots["risk_coverage"] = _png(fig)
    # reliability diagrams before/after temperature scaling
    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    for ax, head in zip(axes, ("intent", "urgent", "refund_recoverable"), strict=True):
        rel = model["reliability"][head]
        for when in ("before", "after"):
            ax.plot(rel[when]["confidence"], rel[when]["accuracy"], marker="o", label=when)
        ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8)
        ece = model["metrics"]["calibration"]["ece"][head]
        ax.set_title(f"{head}: ECE {ece['before']:.3f} -> {ece['after']:.3f}")
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
        ax.legend()
    plots["reliability"] = _png(fig)
    # threshold sweep: coverage and risk vs confidence threshold
    fig, ax = plt.subplots(figsize=(6, 4.5))
    c = model["curve"]
    ax.plot(c["threshold"], c["coverage"], label="coverage")
    ax.plot(c["threshold"], c["risk"], label="risk")
    ax.axvline(model["thresholds"].confidence, ls="--", c="grey", lw=0.8, label="tuned τ_conf")
    ax.set_xlabel("intent confidence threshold τ_conf")
    ax.set_title("Threshold sweep (test)")
    ax.legend()
    plots["threshold_sweep"] = _png(fig)
    return plots


def markdown(metrics: dict[str, Any], results: list[dict[str, Any]], taxonomy) -> str:
    names = [r["name"] for r in results]
    m = metrics["model"]
    op = metrics["operating_point"]
    ds = metrics["dataset"]
    lines = [
        "# kefu-triage evaluation report",
        "",
        f"Evaluated on `{ds['eval_file']}` ({ds[ds['eval_split']]['rows']} messages); thresholds and "
        "temperatures tuned on dev for the operating point: maximise bot coverage subject to bot risk ≤ "
        f"{op['max_bot_risk']:.0%}, urgent recall ≥ {op['min_urgent_recall']:.0%}, recoverable capture ≥ "
        f"{op['min_recoverable_capture']:.0%}"
        + (
            f"; within {op['urgent_first_slack']:.0%} of that coverage, the point that escalates the most urgent "
            "messages."
            if op.get("urgent_first_slack")
            else "."
        ),
        "",
    ]
    if not op["constraints_met"]:
        lines += [
            f"**The operating point could not be met on dev** (best-effort shortfall: "
            f"{ {k: round(v, 4) for k, v in m['tuning']['shortfall'].items()} }).",
            "",
        ]
    lines += ["## Triage (test)", "", "| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for key, label in TRIAGE_ROWS:
        lines.append(
            f"| {label} | " + " | ".join(_fmt(r["metrics"]["triage"].get(key)) for r in results) + " |"
        )
    lines += [
        "",
        "## Heads (test)",
        "",
        "| metric | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for head, key in (
        ("intent", "accuracy"),
        ("intent", "macro_f1"),
        ("urgent", "roc_auc"),
        ("urgent", "pr_auc"),
        ("urgent", "precision"),
        ("urgent", "recall"),
        ("refund_recoverable", "roc_auc"),
        ("refund_recoverable", "precision"),
        ("refund_recoverable", "recall"),
    ):
        lines.append(
            f"| {head} {key} | " + " | ".join(_fmt(r["metrics"][head].get(key)) for r in results) + " |"
        )
    lines += [
        "",
        f"Rows per head (labels may be partial; a head skips rows without its label): intent "
        f"{ds[ds['eval_split']]['rows']}, urgent {m['urgent'].get('n')}, refund_recoverable "
        f"{m['refund_recoverable'].get('n')}.",
    ]
    lines += [
        "",
        "## Where the model wins and loses (intent F1 per class, model minus peer)",
        "",
        "| intent | route | support | model F1 | " + " | ".join(f"Δ vs {n}" for n in names[1:]) + " |",
        "|---|---|---|---|" + "---|" * (len(names) - 1),
    ]
    for name, route in zip(taxonomy.intent_names, taxonomy.routes, strict=True):
        mf = m["intent"]["per_class"][name]["f1"]
        deltas = [mf - r["metrics"]["intent"]["per_class"][name]["f1"] for r in results[1:]]
        lines.append(
            f"| {name} | {route} | {m['intent']['per_class'][name]['support']} | {mf:.3f} | "
            + " | ".join(f"{d:+.3f}" for d in deltas)
            + " |"
        )
    lines += ["", "## Policy", "", "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for key in ("urgent", "recoverable", "confidence", "margin"):
        lines.append(
            f"| τ_{key} | " + " | ".join(_fmt(r["metrics"]["thresholds"][key]) for r in results) + " |"
        )
    lines.append(
        "| constraints met on dev | "
        + " | ".join(str(r["metrics"]["tuning"]["constraints_met"]) for r in results)
        + " |"
    )
    lines += [
        "",
        "Reasons on test (model): " + ", ".join(f"{k} {v}" for k, v in m["reasons"].items()),
        "",
        "Calibration (model): "
        + ", ".join(
            f"{h} T={m['calibration']['temperatures'][h]:.2f} ECE {e['before']:.3f}→{e['after']:.3f}"
            for h, e in m["calibration"]["ece"].items()
        ),
        "",
    ]
    s = metrics.get("sanity") or {}
    if s:
        lines += ["## Sanity checks on real text (../shared, never trained on)", ""]
        if "reviews_urgent_auc" in s:
            lines.append(
                f"- Urgent head, negative vs positive product reviews ({s['reviews_rows']} sampled): "
                f"ROC-AUC {s['reviews_urgent_auc']:.3f} (> 0.5 means negative reviews score as more urgent)."
            )
        if "real_turns_bot_share" in s:
            top = sorted(s["real_turns_intents"].items(), key=lambda kv: -kv[1])[:6]
            lines.append(
                f"- {s['real_turns_rows']} real JDDC customer turns: bot share {s['real_turns_bot_share']:.1%}; "
                f"reasons {s['real_turns_reasons']}; top predicted intents {top}."
            )
        lines.append("")
    lines += extra_sets_markdown(metrics.get("extra_sets") or {}, metrics.get("extra_sets_skipped") or [])
    lines += ["Plots: see report.html. Worst mistakes: errors.jsonl.", ""]
    return "\n".join(lines)


EXTRA_ROWS = (
    ("intent accuracy", ("intent", "accuracy")),
    ("intent macro-F1 (intents in the set)", ("intent", "macro_f1")),
    ("mean intent confidence", ("intent", "mean_confidence")),
    ("confidence minus accuracy", ("intent", "confidence_minus_accuracy")),
    ("intent ECE", ("calibration", "intent_ece")),
    ("urgent ROC-AUC", ("urgent", "roc_auc")),
    ("urgent recall (head, τ_urgent)", ("urgent", "recall")),
    ("urgent ECE", ("calibration", "urgent_ece")),
    ("refund_recoverable ROC-AUC", ("refund_recoverable", "roc_auc")),
    ("route agreement", ("triage", "route_agreement")),
    ("bot coverage", ("triage", "coverage")),
    ("bot risk", ("triage", "risk")),
    ("urgent escalation recall", ("triage", "urgent_recall")),
    ("AURC (lower is better)", ("triage", "aurc")),
)


def extra_sets_markdown(sets: dict[str, Any], skipped: list[str]) -> list[str]:
    """One section per extra set: the model next to the peers, with the policy tuned on synthetic dev."""
    if not sets and not skipped:
        return []
    lines = ["## Extra sets (temperatures and policy tuned on synthetic dev, applied as-is)", ""]
    if skipped:
        lines += [f"Skipped (paths.shared_dir/data/real not found): {', '.join(skipped)}.", ""]
    for name, s in sets.items():
        scorers = {"model": s["model"], **s["baselines"]}
        lab = s["labelled"]
        lines += [
            f"### {name}",
            "",
            f"`{s['file']}`: {s['rows']} rows; rows per head: intent {lab['intent']}, urgent {lab['urgent']}, "
            f"refund_recoverable {lab['refund_recoverable']}"
            + (f"; texts also in train: {s['texts_in_train']}" if "texts_in_train" in s else "")
            + ". Unknown urgent/refund labels count as 0 in bot risk; route agreement uses the "
            f"{s['model']['triage']['route_rows']} rows whose labels decide the gold route.",
            "",
            "| metric | " + " | ".join(scorers) + " |",
            "|---|" + "---|" * len(scorers),
        ]
        for label, (head, key) in EXTRA_ROWS:
            values = [m.get(head, {}).get(key) for m in scorers.values()]
            if any(v is not None for v in values):
                lines.append(f"| {label} | " + " | ".join(_fmt(v) for v in values) + " |")
        for level in s["model"]["by_difficulty"]:
            lines.append(
                f"| accuracy, difficulty {level} (n={s['model']['by_difficulty'][level]['n']}) | "
                + " | ".join(_fmt(m["by_difficulty"][level]["accuracy"]) for m in scorers.values())
                + " |"
            )
        lines += [
            "",
            "| intent | support | " + " | ".join(f"recall {n}" for n in scorers) + " |",
            "|---|---|" + "---|" * len(scorers),
        ]
        for intent, r in s["model"]["intent"]["per_intent_recall"].items():
            lines.append(
                f"| {intent} | {r['support']} | "
                + " | ".join(
                    _fmt(m["intent"]["per_intent_recall"][intent]["recall"]) for m in scorers.values()
                )
                + " |"
            )
        lines += [
            "",
            "Top confusions (model, gold → predicted): "
            + ", ".join(
                f"{c['gold']} → {c['pred']} {c['count']}" for c in s["model"]["intent"]["top_confusions"]
            ),
            "",
        ]
    return lines


def extra_set_plots(extra: list[dict[str, Any]]) -> dict[str, str]:
    """Per extra set: intent reliability diagram and risk-coverage curve, model and peers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = {}
    for e in extra:
        fig, (rel_ax, rc_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
        for scorer, p in e["plots"].items():
            rel = p["reliability"]["intent"]
            rel_ax.plot(rel["confidence"], rel["accuracy"], marker="o", label=scorer)
            rc_ax.plot(p["curve"]["coverage"], p["curve"]["risk"], label=scorer)
            rc_ax.scatter(*p["operating"], marker="o")
        rel_ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8)
        rel_ax.set_xlabel("intent confidence")
        rel_ax.set_ylabel("accuracy")
        rel_ax.set_title(f"{e['name']}: intent reliability")
        rel_ax.legend()
        rc_ax.set_xlabel("bot coverage")
        rc_ax.set_ylabel("bot risk")
        rc_ax.set_title(f"{e['name']}: risk-coverage (dots = tuned policy)")
        rc_ax.legend()
        plots[f"extra_{e['name']}"] = _png(fig)
    return plots


def _md_to_html(md: str) -> str:
    """Just enough Markdown (headings, tables, lists, bold, code) for our own report."""
    out, in_table = [], False
    for line in md.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if set("".join(cells)) <= set("-"):
                continue
            tag = "th" if not in_table else "td"
            if not in_table:
                out.append("<table>")
                in_table = True
            out.append("<tr>" + "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in cells) + "</tr>")
            continue
        if in_table:
            out.append("</table>")
            in_table = False
        esc = html.escape(line).replace("**", "")
        if line.startswith("### "):
            out.append(f"<h3>{esc[4:]}</h3>")
        elif line.startswith("## "):
            out.append(f"<h2>{esc[3:]}</h2>")
        elif line.startswith("# "):
            out.append(f"<h1>{esc[2:]}</h1>")
        elif line.startswith("- "):
            out.append(f"<p>• {esc[2:]}</p>")
        elif line.strip():
            out.append(f"<p>{esc}</p>")
    if in_table:
        out.append("</table>")
    return "\n".join(out)


def write_report(
    out_dir: Path,
    metrics: dict[str, Any],
    results: list[dict[str, Any]],
    records,
    gold,
    taxonomy,
    extra: list[dict[str, Any]] | None = None,
) -> None:
    md = markdown(metrics, results, taxonomy)
    plots = {**make_plots(results, taxonomy), **extra_set_plots(extra or [])}
    figures = "\n".join(
        f'<h2>{html.escape(k.replace("_", " "))}</h2><img alt="{k}" src="data:image/png;base64,{v}">'
        for k, v in plots.items()
    )
    page = f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>kefu-triage evaluation</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}
th{{background:#f3f3f3}}img{{max-width:100%}}</style></head><body>
{_md_to_html(md)}
{figures}
</body></html>"""
    atomic_write_text(out_dir / "report.md", md)
    atomic_write_text(out_dir / "report.html", page)
