"""`make data`: generate the embedded dataset into data/embedded/{train,dev,test}.jsonl + stats.md + stats.json.

Generated rows go through the same validator as user data and the same duplicate/leakage check, so a
generator bug fails here with the split and row number instead of surfacing as a strange training curve.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from kefu_triage.core.fileio import atomic_write_json, atomic_write_jsonl, atomic_write_text
from kefu_triage.core.taxonomy import Taxonomy, taxonomy_from_config
from kefu_triage.data.generator import SPLITS, generate_splits
from kefu_triage.data.records import check_splits, report_splits, summarize, validate_examples

# written per row, in this order (the generator's other bookkeeping stays out of the files)
COLUMNS = ("id", "text", "context", "intent", "urgent", "refund_recoverable", "group_id", "source")


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def stats_markdown(stats: dict[str, Any], taxonomy: Taxonomy) -> str:
    splits = [s for s in SPLITS if s in stats["splits"]]
    per = stats["splits"]
    g = stats["generator"]
    lines = [
        "# Embedded dataset statistics",
        "",
        f"`make data` (seed {g['seed']}, size {g['size']}, dev/test fraction {g['dev_fraction']}/"
        f"{g['test_fraction']}, {len(stats['taxonomy']['intents'])} intents"
        + (f", dialogue share {g['dialogue_share']}" if "dialogue_share" in g else "")
        + ").",
        "",
        "| | " + " | ".join(splits) + " |",
        "|---|" + "---:|" * len(splits),
    ]
    rows = (
        ("rows", "rows", lambda v: f"{v:,}"),
        ("urgent_rate", "urgent rate", _pct),
        ("refund_recoverable", "refund recoverable", str),
        ("refund_firm", "refund firm", str),
        ("mean_chars", "mean length (characters)", str),
        ("with_context", "share with context", _pct),
        ("groups", "seed / template groups", str),
    )
    for key, label, fmt in rows:
        lines.append(f"| {label} | " + " | ".join(fmt(per[s][key]) for s in splits) + " |")
    lines += ["", "| intent | route | " + " | ".join(splits) + " |", "|---|---|" + "---:|" * len(splits)]
    for name, route in zip(taxonomy.intent_names, taxonomy.routes, strict=True):
        lines.append(
            f"| {name} | {route} | " + " | ".join(str(per[s]["intents"].get(name, 0)) for s in splits) + " |"
        )
    lines += [
        "",
        "Rows by source: "
        + "; ".join(
            f"{s} " + ", ".join(f"{k} {v}" for k, v in per[s].get("sources", {}).items()) for s in splits
        )
        + ".",
    ]
    # the generator's own per-split counters (dropped duplicates, leaked texts redrawn, shortfall, ...)
    counters = {
        k: v
        for k, v in g.get("report", {}).items()
        if k != "groups"
        and isinstance(v, dict)
        and v
        and set(v) <= set(splits)
        and all(isinstance(x, int) for x in v.values())
    }
    if counters:
        lines += [
            "",
            "| generator (never silent) | " + " | ".join(splits) + " |",
            "|---|" + "---:|" * len(splits),
        ]
        lines += [
            f"| {k.replace('_', ' ')} | " + " | ".join(str(v.get(s, 0)) for s in splits) + " |"
            for k, v in counters.items()
        ]
    lines += ["", f"Check of the written splits: {stats['split_check']['summary']}.", ""]
    return "\n".join(lines)


def generator_arguments(g: Any) -> dict[str, Any]:
    """``generate_splits`` keyword arguments from a ``data.generator`` config block."""
    args = {
        "seed": int(g.seed),
        "size": int(g.size),
        "dev_fraction": float(g.dev_fraction),
        "test_fraction": float(g.test_fraction),
    }
    # optional settings pass through only when configured (older configs lack them)
    for key, cast in (("dialogue_share", float), ("max_seed_share", float), ("seed_variants", int)):
        if g.get(key) is not None:
            args[key] = cast(g[key])
    return args


def prepare_data(cfg: DictConfig) -> dict[str, Any]:
    """Generate, validate, check and write the splits into ``cfg.data.dir``; returns the stats."""
    g = cfg.data.get("generator")
    if not g:
        raise ValueError(
            f"prepare_data: data={cfg.data.get('name')} has no generator settings; `make data` "
            "generates the embedded dataset (data=embedded)"
        )
    taxonomy = taxonomy_from_config(cfg.taxonomy)
    arguments = generator_arguments(g)
    generated = generate_splits(**arguments, taxonomy=taxonomy)
    # the validator user data goes through: a generator bug fails here, naming the split and row
    splits = {split: validate_examples(generated[split], taxonomy, f"generated {split}") for split in SPLITS}
    report = check_splits(splits)
    report_splits(report, bool(cfg.data.get("fail_on_leakage", False)), "generated splits")

    out_dir = Path(cfg.data.dir)
    gen_stats = generated.get("stats", {})
    per_split = {}
    for split in SPLITS:
        per_split[split] = {
            **summarize(splits[split]),
            "groups": len({r.get("group_id") for r in splits[split]}),
            "sources": dict(sorted(Counter(r.get("source") or "unknown" for r in splits[split]).items())),
        }
    stats = {
        "taxonomy": {"source": taxonomy.source, "intents": taxonomy.intent_names},
        "generator": {**arguments, "report": gen_stats},
        "splits": per_split,
        "split_check": {**report.to_dict(), "summary": report.summary()},
    }
    # each file atomically; stats last, so stats.json on disk always describes complete split files
    for split in SPLITS:
        atomic_write_jsonl(
            out_dir / f"{split}.jsonl", ({k: r.get(k) for k in COLUMNS} for r in splits[split])
        )
    atomic_write_text(out_dir / "stats.md", stats_markdown(stats, taxonomy))
    atomic_write_json(out_dir / "stats.json", stats)
    return stats
