"""evaluate() end to end and the four report outputs.

Fast tests replace the trained model with a noisy oracle scorer (logits built from the gold labels plus
noise, a fixed share of intents deliberately wrong) on a small generated dataset, so the whole path —
calibration, tuning on dev, peers, report, errors, triage_policy.json — runs in seconds without torch.
One test reads the outputs of the shared smoke pipeline (tests/conftest.py) built from the real smoke model.
"""

import base64
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import compose, run_eval_with_scorer
from kefu_triage.core.fileio import atomic_write_jsonl
from kefu_triage.core.taxonomy import load_taxonomy
from kefu_triage.data.generator import generate_splits
from kefu_triage.evaluate import assess as evaluate_module
from kefu_triage.evaluate.regress import flatten

TAX = load_taxonomy()
COLUMNS = ("text", "context", "intent", "urgent", "refund_recoverable")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class NoisyOracleScorer:
    """Stands in for TorchScorer: reads the gold labels and adds noise; ``wrong`` of the intents are
    moved to another intent, so the report has mistakes to show."""

    def __init__(self, model_dir=None, wrong: float = 0.2, seed: int = 0):
        self.taxonomy, self.context_turns, self.wrong, self.seed = TAX, 0, wrong, seed
        self.novelty = None  # like TorchScorer without novelty statistics

    def predict_logits(self, records):
        rng = np.random.default_rng([self.seed, len(records)])
        n, k = len(records), TAX.num_intents
        gold = np.array([TAX.intent_id(r["intent"]) for r in records])
        shown = np.where(rng.random(n) < self.wrong, (gold + rng.integers(1, k, n)) % k, gold)
        logits = rng.normal(0, 1, (n, k))
        logits[np.arange(n), shown] += rng.normal(4, 1.5, n)
        urgent = np.array([r["urgent"] for r in records])
        refund = np.array([r["refund_recoverable"] or 0 for r in records])
        return {
            "intent_logits": logits,
            "urgent_logit": 3 * (2 * urgent - 1) + rng.normal(0, 2, n),
            "refund_recoverable_logit": 2 * (2 * refund - 1) + rng.normal(0, 2, n),
        }


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_data")
    splits = generate_splits(seed=5, size=900)
    for split in ("train", "dev", "test"):
        atomic_write_jsonl(root / f"{split}.jsonl", ({c: r.get(c) for c in COLUMNS} for r in splits[split]))
    return root


def _run(tmp_path, data_dir, monkeypatch, *overrides):
    return run_eval_with_scorer(tmp_path, data_dir, monkeypatch, NoisyOracleScorer, *overrides)


@pytest.fixture(scope="module")
def evaluated(data_dir, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    try:  # undo at once: a session fixture built later in this module (smoke) must see the real scorer
        result = _run(tmp_path_factory.mktemp("eval"), data_dir, mp)
    finally:
        mp.undo()
    return result


def test_report_html_is_self_contained_with_four_plots(evaluated):
    _, reports, _ = evaluated
    html = (reports / "report.html").read_text(encoding="utf-8")
    images = html.split('src="data:image/png;base64,')[1:]
    assert len(images) == 4
    for img in images:  # each one decodes to a PNG
        assert base64.b64decode(img.split('"', 1)[0])[:8] == PNG_MAGIC
    assert "http://" not in html and "https://" not in html  # nothing fetched when opened offline
    for title in ("confusion matrix", "risk coverage", "reliability", "threshold sweep"):
        assert title in html


def test_report_md_compares_model_and_peers(evaluated):
    metrics, reports, _ = evaluated
    md = (reports / "report.md").read_text(encoding="utf-8")
    assert "| metric | model | tfidf_lr | keyword_rules |" in md
    assert "Where the model wins and loses" in md
    for intent in TAX.intent_names:  # one row per intent with its deltas
        assert f"| {intent} | {TAX.route_of(intent)} |" in md
    assert f"{metrics['model']['intent']['macro_f1']:.3f}" in md


def test_metrics_json_stable_keys_and_values(evaluated):
    metrics, reports, _ = evaluated
    on_disk = json.loads((reports / "metrics.json").read_text(encoding="utf-8"))
    flat = flatten(on_disk)
    for scorer in ("model", "baselines.tfidf_lr", "baselines.keyword_rules"):
        for key in (
            "intent.macro_f1",
            "intent.accuracy",
            "urgent.roc_auc",
            "urgent.pr_auc",
            "urgent.recall",
            "urgent.precision",
            "refund_recoverable.roc_auc",
            "triage.coverage",
            "triage.risk",
            "triage.bot_resolved_share",
            "triage.urgent_recall",
            "triage.recoverable_capture",
            "triage.human_share",
            "triage.agents_needed",
            "triage.aurc",
            "triage.coverage_at_risk_2",
            "triage.coverage_at_risk_5",
            "triage.coverage_at_risk_10",
        ):
            assert f"{scorer}.{key}" in flat, f"{scorer}.{key}"
    t = on_disk["model"]["triage"]
    assert t["bot_resolved_share"] == pytest.approx(t["coverage"] * (1 - t["risk"]))
    assert t["human_share"] == pytest.approx(1 - t["coverage"])
    traffic = on_disk["traffic"]
    assert t["agents_needed"] == pytest.approx(
        traffic["messages_per_hour"]
        * t["human_share"]
        * traffic["handling_time_seconds"]
        / 3600
        / traffic["agent_occupancy"]
    )
    assert on_disk["dataset"]["eval_split"] == "test" and on_disk["dataset"]["test"]["rows"] > 0
    assert isinstance(on_disk["operating_point"]["constraints_met"], bool)
    # the noisy oracle's urgent logits separate the classes well: the numbers are measured, not constants
    assert on_disk["model"]["urgent"]["roc_auc"] > 0.8
    assert sum(on_disk["model"]["reasons"].values()) == on_disk["dataset"]["test"]["rows"]


def test_errors_jsonl_worst_mistakes_first(evaluated):
    _, reports, _ = evaluated
    rows = [json.loads(line) for line in (reports / "errors.jsonl").read_text(encoding="utf-8").splitlines()]
    assert rows, "the noisy oracle makes mistakes; errors.jsonl must list them"
    order = evaluate_module.ERROR_SEVERITY
    kinds = [order.index(r["error"]) for r in rows]
    assert kinds == sorted(kinds)
    for r in rows:
        assert isinstance(r["text"], str) and r["gold"]["intent"] in TAX.intent_names
        assert r["pred"]["intent"] == r["pred"]["top_intents"][0][0]
        assert 0 <= r["pred"]["urgent_prob"] <= 1 and r["pred"]["route"] in ("bot", "human")
    wrong_bot = [r for r in rows if r["error"] == "bot_wrong_intent"]
    assert all(r["gold"]["intent"] != r["pred"]["intent"] and r["pred"]["route"] == "bot" for r in wrong_bot)


def test_operating_point_is_stored_for_export(evaluated):
    metrics, _, model_dir = evaluated
    policy = json.loads((model_dir / "triage_policy.json").read_text(encoding="utf-8"))
    for key in ("thresholds", "temperatures", "operating_point", "constraints_met", "dev_metrics"):
        assert key in policy, key
    assert policy["thresholds"] == metrics["operating_point"]["thresholds"]
    assert set(policy["temperatures"]) == {"intent", "urgent", "refund_recoverable"}
    assert policy["constraints_met"] == metrics["operating_point"]["constraints_met"]


def test_eval_file_is_measured_instead_of_test(tmp_path, data_dir, monkeypatch):
    rows = [json.loads(x) for x in (data_dir / "test.jsonl").read_text(encoding="utf-8").splitlines()[:40]]
    custom = tmp_path / "custom.jsonl"
    atomic_write_jsonl(custom, rows)
    metrics, reports, _ = _run(
        tmp_path, data_dir, monkeypatch, f"data.eval_file={custom}", "baselines.enabled=false"
    )
    assert metrics["dataset"]["eval_split"] == "eval" and metrics["dataset"]["eval"]["rows"] == 40
    assert metrics["baselines"] == {}
    assert str(custom) in (reports / "report.md").read_text(encoding="utf-8")


def test_eval_without_a_model_is_a_clear_error(tmp_path, data_dir):
    cfg = compose("eval", [f"paths.root_dir={tmp_path}", f"data.dir={data_dir}", f"output_dir={tmp_path}"])
    with pytest.raises(ValueError, match="model_dir=.*artifact_dir="):
        evaluate_module.evaluate(cfg)


def test_smoke_model_report(smoke):
    """The real smoke model (shared session pipeline): the report and policy come from a trained model."""
    metrics = json.loads((Path(smoke["reports"]) / "metrics.json").read_text(encoding="utf-8"))
    assert set(metrics["baselines"]) == {"tfidf_lr", "keyword_rules"}
    assert 0.0 <= metrics["model"]["triage"]["coverage"] <= 1.0
    assert metrics["model"]["intent"]["macro_f1"] > 1.5 / TAX.num_intents  # learnt something beyond chance
    md = (Path(smoke["reports"]) / "report.md").read_text(encoding="utf-8")
    assert "Where the model wins and loses" in md
    policy = json.loads((Path(smoke["model_dir"]) / "triage_policy.json").read_text(encoding="utf-8"))
    assert policy["thresholds"] == metrics["operating_point"]["thresholds"]


def test_artifact_eval_with_novelty_disabled_leaves_the_shipped_statistics_out(smoke, tmp_path):
    """``policy.novelty.enabled=false`` measures an artifact without its novelty gate: its shipped statistics
    are not used for the policy or the safety figures (they once were, whatever the setting)."""

    def run(name, *extra):
        cfg = compose(
            "eval",
            [
                f"paths.root_dir={smoke['root']}",
                f"paths.shared_dir={tmp_path / 'no_shared'}",
                f"data.dir={smoke['data_dir']}",
                f"artifact_dir={smoke['artifact']}",
                f"output_dir={tmp_path / name}",
                "tuning.grid=11",
                "sanity.enabled=false",
                "baselines.enabled=false",
                *extra,
            ],
        )
        return evaluate_module.evaluate(cfg)

    gated, ungated = run("gated"), run("ungated", "policy.novelty.enabled=false")
    assert "novelty" in gated["model"]["safety"]["test"]
    assert "novelty" not in ungated["model"]["safety"]["test"]
    assert ungated["operating_point"]["thresholds"]["novelty"] == 1.0
    assert ungated["model"]["reasons"].get("unfamiliar", 0) == 0
