"""Regression gate: compare a run's metrics.json (or bench.json) with a baseline, metric by metric.

A tolerance rule says which direction is good and how much worse is acceptable:
``max_drop`` (higher is better, absolute), ``max_rise`` (lower is better, absolute),
``max_rel_drop`` / ``max_rel_rise`` (relative to the baseline value, e.g. 0.2 = 20%).
Metric names are dotted paths into the JSON (``model.intent.macro_f1``); ``*`` matches one level.

Standard library only (PyYAML for YAML tolerance files), so users can run it in any CI.
"""

from __future__ import annotations

import fnmatch
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kefu_triage.core.fileio import read_yaml_or_json
from kefu_triage.core.resources import packaged_config

RULE_KINDS = ("max_drop", "max_rise", "max_rel_drop", "max_rel_rise")
TOLERANCES_FILE = packaged_config("regress", "default")


class RegressError(ValueError):
    """Unreadable metrics or tolerance files."""


@dataclass(frozen=True)
class Check:
    metric: str
    baseline: float | None
    current: float | None
    rule: str
    limit: float
    ok: bool
    note: str = ""

    @property
    def delta(self) -> float | None:
        if self.baseline is None or self.current is None:
            return None
        return self.current - self.baseline


def flatten(obj: Any, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of nested dicts as {"a.b.c": value}; lists and strings are skipped."""
    out: dict[str, float] = {}
    if isinstance(obj, dict):
        for key, value in obj.items():
            out.update(flatten(value, f"{prefix}{key}."))
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        out[prefix[:-1]] = float(obj)
    return out


def load_json(path: str | Path, what: str) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise RegressError(f"{what} file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RegressError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise RegressError(f"{path}: expected a JSON object at the top level")
    return data


def load_tolerances(path: str | Path | None = None) -> dict[str, dict[str, float]]:
    """{metric pattern: {rule: limit}} from YAML (needs PyYAML) or JSON; default configs/regress/default.yaml."""
    path = Path(path) if path else TOLERANCES_FILE
    try:
        data = read_yaml_or_json(path, "tolerances")
    except (FileNotFoundError, ValueError) as exc:
        raise RegressError(str(exc)) from None
    rules = (data or {}).get("metrics") if isinstance(data, dict) else None
    if not isinstance(rules, dict) or not rules:
        raise RegressError(f"{path}: expected a non-empty 'metrics:' mapping of metric -> {{rule: limit}}")
    for metric, rule in rules.items():
        if not isinstance(rule, dict) or len(rule) != 1:
            raise RegressError(f"{path}: metrics.{metric}: give exactly one of {list(RULE_KINDS)}")
        ((kind, limit),) = rule.items()
        if kind not in RULE_KINDS:
            raise RegressError(
                f"{path}: metrics.{metric}: unknown rule {kind!r}; use one of {list(RULE_KINDS)}"
            )
        if not isinstance(limit, (int, float)) or isinstance(limit, bool) or limit < 0:
            raise RegressError(f"{path}: metrics.{metric}.{kind} must be a number >= 0, got {limit!r}")
    return {m: {k: float(v) for k, v in r.items()} for m, r in rules.items()}


def _allowed(kind: str, limit: float, baseline: float, current: float) -> bool:
    eps = 1e-9  # float noise must not fail a gate sitting exactly on its limit
    if kind == "max_drop":
        return baseline - current <= limit + eps
    if kind == "max_rise":
        return current - baseline <= limit + eps
    scale = abs(baseline) if baseline else 1.0
    if kind == "max_rel_drop":
        return (baseline - current) / scale <= limit + eps
    return (current - baseline) / scale <= limit + eps


def compare(
    baseline: dict[str, Any], current: dict[str, Any], tolerances: dict[str, dict[str, float]]
) -> list[Check]:
    """One Check per metric named (or matched by a pattern) in the tolerances."""
    base_flat, cur_flat = flatten(baseline), flatten(current)
    checks: list[Check] = []
    for pattern, rule in tolerances.items():
        ((kind, limit),) = rule.items()
        names = (
            sorted(n for n in base_flat if fnmatch.fnmatchcase(n, pattern)) if "*" in pattern else [pattern]
        )
        if not names:
            checks.append(Check(pattern, None, None, kind, limit, False, "no baseline metric matches"))
        for name in names:
            b, c = base_flat.get(name), cur_flat.get(name)
            if b is None:
                checks.append(Check(name, None, c, kind, limit, False, "missing in baseline"))
            elif c is None:
                checks.append(Check(name, b, None, kind, limit, False, "missing in current run"))
            elif math.isnan(c) and not math.isnan(b):
                checks.append(Check(name, b, c, kind, limit, False, "current value is NaN"))
            else:
                checks.append(Check(name, b, c, kind, limit, _allowed(kind, limit, b, c)))
    return checks


def format_table(checks: list[Check]) -> str:
    def fmt(x: float | None) -> str:
        return "-" if x is None else f"{x:.4f}"

    rows = [("metric", "baseline", "current", "delta", "rule", "status")]
    for c in checks:
        status = "ok" if c.ok else "REGRESSED" if not c.note else f"FAIL: {c.note}"
        rows.append(
            (c.metric, fmt(c.baseline), fmt(c.current), fmt(c.delta), f"{c.rule} {c.limit:g}", status)
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def regress(
    baseline_path: str | Path, current_path: str | Path, tolerances_path: str | Path | None = None
) -> tuple[bool, str]:
    """(passed, table). Raises RegressError for unreadable inputs."""
    checks = compare(
        load_json(baseline_path, "baseline"),
        load_json(current_path, "current metrics"),
        load_tolerances(tolerances_path),
    )
    failed = [c for c in checks if not c.ok]
    summary = f"{len(checks) - len(failed)}/{len(checks)} metrics within tolerance"
    return not failed, f"{format_table(checks)}\n\n{summary}" + (
        f"; {len(failed)} regressed" if failed else ""
    )


def run_regress(args: Any) -> int:
    """`kefu-triage regress --baseline B --current C [--tolerances T]`: exit 0 ok, 1 regression, 2 bad input."""
    try:
        passed, table = regress(args.baseline, args.current, args.tolerances)
    except RegressError as exc:
        print(f"kefu-triage regress: error: {exc}", file=sys.stderr)
        return 2
    print(table)
    return 0 if passed else 1
