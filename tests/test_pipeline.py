"""The smoke experiment end to end, checked against a committed baseline (the project's own CI gate)."""

import json
from pathlib import Path

import pytest

from kefu_triage.cli import main as cli_main
from kefu_triage.evaluate.regress import compare, flatten, load_tolerances

BASELINE = Path(__file__).parent / "baselines" / "smoke_metrics.json"


def test_pipeline_writes_every_output(smoke):
    for name in ("report.md", "report.html", "metrics.json", "errors.jsonl"):
        assert (smoke["reports"] / name).stat().st_size > 0, name
    html = (smoke["reports"] / "report.html").read_text(encoding="utf-8")
    assert html.count('src="data:image/png;base64,') == 4
    policy = json.loads((smoke["model_dir"] / "triage_policy.json").read_text())
    manifest = json.loads((smoke["artifact"] / "triage.json").read_text())
    # the operating point tuned by eval is what the artifact serves
    assert manifest["policy"]["thresholds"] == policy["thresholds"]
    assert manifest["calibration"]["temperatures"] == policy["temperatures"]
    assert manifest["parity"]["passed"] is True


def test_smoke_metrics_match_committed_baseline(smoke):
    """Fixed seed on CPU: a change that moves the smoke figures beyond tolerance fails CI.
    Refresh on purpose with `python scripts/refresh_smoke_baseline.py` (see README)."""
    if not BASELINE.is_file():
        pytest.fail(f"{BASELINE} missing: run python scripts/refresh_smoke_baseline.py")
    current = json.loads((smoke["reports"] / "metrics.json").read_text())
    bad = [c for c in compare(json.loads(BASELINE.read_text()), current, load_tolerances()) if not c.ok]
    assert not bad, "\n".join(f"{c.metric}: baseline {c.baseline} current {c.current} {c.note}" for c in bad)


def test_regress_fails_when_baseline_is_raised_beyond_tolerance(smoke, tmp_path, capsys):
    current = smoke["reports"] / "metrics.json"
    raised = json.loads(current.read_text())
    raised["model"]["intent"]["macro_f1"] += 0.05  # a baseline better than this run by 5 points
    path = tmp_path / "raised.json"
    path.write_text(json.dumps(raised))
    assert cli_main(["regress", "--baseline", str(current), "--current", str(current)]) == 0
    assert cli_main(["regress", "--baseline", str(path), "--current", str(current)]) == 1
    assert "model.intent.macro_f1" in capsys.readouterr().out


def test_metrics_json_has_stable_keys(smoke):
    flat = flatten(json.loads((smoke["reports"] / "metrics.json").read_text()))
    for key in (
        "model.intent.macro_f1",
        "model.intent.accuracy",
        "model.urgent.roc_auc",
        "model.urgent.recall",
        "model.refund_recoverable.roc_auc",
        "model.triage.coverage",
        "model.triage.risk",
        "model.triage.bot_resolved_share",
        "model.triage.urgent_recall",
        "model.triage.recoverable_capture",
        "model.triage.human_share",
        "model.triage.agents_needed",
        "model.triage.aurc",
        "model.triage.coverage_at_risk_5",
        "baselines.tfidf_lr.intent.macro_f1",
        "baselines.keyword_rules.triage.coverage",
    ):
        assert key in flat, key
