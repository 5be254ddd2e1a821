"""Extra labelled sets in `make eval` (eval.extra_sets) and evaluation with partial labels.

A noisy oracle stands in for the model (as in test_report.py) so the whole path runs in seconds; the sets
are small files of invented messages written into tmp_path (never real text). One test, marked ``shared``,
evaluates the real ../shared sets with the smoke model and skips when ../shared is absent.
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
from kefu_triage.evaluate.metrics import Gold, binary_metrics
from kefu_triage.evaluate.regress import flatten

TAX = load_taxonomy()
COLUMNS = ("text", "context", "intent", "urgent", "refund_recoverable")
SHARED = Path(__file__).resolve().parents[3] / "shared" / "data" / "real"

# Invented messages (written for this test): (text, intent, urgent, refund_recoverable, difficulty)
GOLD_ROWS = [
    ("包裹三天了物流一直没更新", "logistics", 0, None, "easy"),
    ("快递显示签收了可我没拿到啊！！", "logistics", 1, None, "easy"),
    ("今天拍的明天能发出吗", "shipping_time", 0, None, "easy"),
    ("米白的还有吗", "product_inquiry", 0, None, "hard"),
    ("这款保温杯能装开水吗", "product_inquiry", 0, None, "easy"),
    ("鞋码偏小想退掉", "return_refund", 0, 1, "easy"),
    ("两双能放一个快递里寄回吗", "return_refund", 0, None, "hard"),
    ("东西坏了必须退钱，马上处理", "return_refund", 1, 0, "easy"),
    ("帮我转个人工", "human_agent", 0, None, "easy"),
    ("客服一直不回复，我要投诉你们", "complaint", 1, None, "easy"),
    ("发票抬头能改成公司的吗", "invoice", 0, None, "easy"),
    ("收货地址填错了要改一下", "address_change", None, None, "easy"),
    ("那个颜色呢", "product_inquiry", None, None, "hard"),
    ("你好，在吗", "greeting", 0, None, "easy"),
    ("满三百减五十的券怎么用不了", "promotion", 0, None, "easy"),
    ("还没发货就取消吧", "cancel_order", 0, None, "hard"),
]
SILVER_ROWS = [  # intent-only, like a ticket-category export: no urgent / refund columns at all
    ("物流到哪了", "logistics"),
    ("啥时候发货", "shipping_time"),
    ("这个是正品吗", "product_inquiry"),
    ("不想要了退货", "return_refund"),
    ("开个电子发票", "invoice"),
    ("人工客服", "human_agent"),
    ("刚下的单能取消吗", "cancel_order"),
    ("屏幕有划痕", "quality_issue"),
]


class PartialLabelOracle:
    """Logits from the gold labels plus noise, a share of intents wrong; an unknown label gets a coin flip."""

    def __init__(self, model_dir=None, wrong: float = 0.25, seed: int = 0):
        self.taxonomy, self.context_turns, self.wrong, self.seed = TAX, 0, wrong, seed
        self.novelty = None

    def predict_logits(self, records):
        rng = np.random.default_rng([self.seed, len(records)])
        n, k = len(records), TAX.num_intents
        gold = np.array([TAX.intent_id(r["intent"]) for r in records])
        shown = np.where(rng.random(n) < self.wrong, (gold + rng.integers(1, k, n)) % k, gold)
        logits = rng.normal(0, 1, (n, k))
        logits[np.arange(n), shown] += rng.normal(4, 1.5, n)
        urgent = np.array([rng.integers(0, 2) if r.get("urgent") is None else r["urgent"] for r in records])
        refund = np.array([r.get("refund_recoverable") or 0 for r in records])
        return {
            "intent_logits": logits,
            "urgent_logit": 3 * (2 * urgent - 1) + rng.normal(0, 1, n),
            "refund_recoverable_logit": 2 * (2 * refund - 1) + rng.normal(0, 2, n),
        }


def _rows(rows, with_difficulty=True):
    out = []
    for i, (text, intent, urgent, refund, difficulty) in enumerate(rows):
        row = {
            "id": f"t{i}",
            "source": "invented",
            "text": text,
            "context": [],
            "intent": intent,
            "urgent": urgent,
            "refund_recoverable": refund,
        }
        if with_difficulty:
            row["difficulty"] = difficulty
        out.append(row)
    return out


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("extra_data")
    splits = generate_splits(seed=7, size=900)
    for split in ("train", "dev", "test"):
        atomic_write_jsonl(root / f"{split}.jsonl", ({c: r.get(c) for c in COLUMNS} for r in splits[split]))
    return root


@pytest.fixture(scope="module")
def shared_dir(tmp_path_factory):
    """A stand-in for ../shared with the two default extra sets (invented rows)."""
    root = tmp_path_factory.mktemp("shared")
    real = root / "data" / "real"
    real.mkdir(parents=True)
    atomic_write_jsonl(real / "real_gold_dev.jsonl", _rows(GOLD_ROWS))
    atomic_write_jsonl(
        real / "jddc_intents_silver.jsonl",
        [
            {"id": f"s{i}", "text": t, "intent": it, "jddc_intent": "咨询"}
            for i, (t, it) in enumerate(SILVER_ROWS)
        ],
    )
    return root


def _run(tmp_path, data_dir, monkeypatch, *overrides):
    return run_eval_with_scorer(tmp_path, data_dir, monkeypatch, PartialLabelOracle, *overrides)[:2]


@pytest.fixture(scope="module")
def with_sets(data_dir, shared_dir, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    try:  # undo at once: a session fixture built later in this module (smoke) must see the real scorer
        result = _run(tmp_path_factory.mktemp("eval_extra"), data_dir, mp, f"paths.shared_dir={shared_dir}")
    finally:
        mp.undo()
    return result


def test_default_sets_are_measured_next_to_the_peers(with_sets):
    metrics, reports = with_sets
    on_disk = json.loads((reports / "metrics.json").read_text(encoding="utf-8"))
    assert (
        set(on_disk["extra_sets"]) == {"real_gold_dev", "jddc_silver"} and on_disk["extra_sets_skipped"] == []
    )
    flat = flatten(on_disk)
    for scorer in ("model", "baselines.tfidf_lr", "baselines.keyword_rules"):
        for key in (
            "intent.accuracy",
            "intent.macro_f1",
            "intent.mean_confidence",
            "calibration.intent_ece",
            "urgent.roc_auc",
            "urgent.recall",
            "triage.route_agreement",
            "triage.coverage",
            "triage.risk",
            "triage.aurc",
            "by_difficulty.hard.accuracy",
            "by_difficulty.easy.accuracy",
        ):
            assert f"extra_sets.real_gold_dev.{scorer}.{key}" in flat, f"{scorer}.{key}"
    gold = on_disk["extra_sets"]["real_gold_dev"]
    assert gold["rows"] == len(GOLD_ROWS) and gold["difficulty"] == {"easy": 12, "hard": 4}
    assert gold["labelled"] == {"intent": 16, "urgent": 14, "refund_recoverable": 2}
    m = gold["model"]
    hard = [i for i, r in enumerate(GOLD_ROWS) if r[4] == "hard"]
    assert m["by_difficulty"]["hard"]["n"] == len(hard)
    assert 0 <= m["triage"]["route_agreement"] <= 1 and m["triage"]["route_rows"] < len(GOLD_ROWS)
    recall = m["intent"]["per_intent_recall"]
    assert set(recall) == {r[1] for r in GOLD_ROWS} and recall["logistics"]["support"] == 2
    assert all(c["gold"] != c["pred"] for c in m["intent"]["top_confusions"])


def test_intent_only_set_skips_the_binary_heads(with_sets):
    metrics, _ = with_sets
    silver = metrics["extra_sets"]["jddc_silver"]
    assert silver["labelled"] == {"intent": len(SILVER_ROWS), "urgent": 0, "refund_recoverable": 0}
    assert silver["model"]["urgent"] == {"n": 0} and silver["model"]["by_difficulty"] == {}
    assert silver["model"]["intent"]["intents_present"] == len({r[1] for r in SILVER_ROWS})


def test_unknown_urgent_rows_are_skipped_by_the_urgent_metrics(with_sets):
    metrics, _ = with_sets
    rows = _rows(GOLD_ROWS)
    gold = Gold.from_records(rows, TAX)
    known = gold.urgent >= 0
    logits = PartialLabelOracle().predict_logits(rows)
    th = metrics["operating_point"]["thresholds"]["urgent"]
    temp = metrics["operating_point"]["temperatures"]["urgent"]
    expected = binary_metrics(gold.urgent[known], 1 / (1 + np.exp(-logits["urgent_logit"][known] / temp)), th)
    got = metrics["extra_sets"]["real_gold_dev"]["model"]["urgent"]
    assert got["n"] == int(known.sum()) == 14 and got["positives"] == 3
    assert got["roc_auc"] == pytest.approx(expected["roc_auc"]) and got["recall"] == pytest.approx(
        expected["recall"]
    )


def test_report_shows_each_set_with_its_plot(with_sets):
    _, reports = with_sets
    md = (reports / "report.md").read_text(encoding="utf-8")
    assert "### real_gold_dev" in md and "### jddc_silver" in md
    assert "rows per head: intent 16, urgent 14, refund_recoverable 2" in md
    assert "| accuracy, difficulty hard (n=4) |" in md and "Top confusions (model" in md
    assert "| metric | model | tfidf_lr | keyword_rules |" in md
    html = (reports / "report.html").read_text(encoding="utf-8")
    images = html.split('src="data:image/png;base64,')[1:]
    assert len(images) == 4 + 2  # the synthetic report's four plots, one per extra set
    assert base64.b64decode(images[-1].split('"', 1)[0])[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<h3>real_gold_dev</h3>" in html


def test_absent_shared_dir_skips_the_default_sets_in_one_line(tmp_path, data_dir, monkeypatch, capsys):
    metrics, reports = _run(
        tmp_path,
        data_dir,
        monkeypatch,
        f"paths.shared_dir={tmp_path / 'no_shared'}",
        "baselines.enabled=false",
    )
    out = capsys.readouterr().out
    skip = [line for line in out.splitlines() if "extra sets skipped" in line]
    assert len(skip) == 1 and "real_gold_dev, jddc_silver" in skip[0]
    assert metrics["extra_sets"] == {} and metrics["extra_sets_skipped"] == ["real_gold_dev", "jddc_silver"]
    assert "Skipped (paths.shared_dir/data/real not found)" in (reports / "report.md").read_text(
        encoding="utf-8"
    )


def test_user_set_partial_labels_and_errors(tmp_path, data_dir, monkeypatch):
    mine = tmp_path / "mine.csv"
    mine.write_text(
        "text,intent\n快递怎么还没到,logistics\n能开发票吗,invoice\n想退货,return_refund\n", encoding="utf-8"
    )
    metrics, _ = _run(
        tmp_path,
        data_dir,
        monkeypatch,
        f"paths.shared_dir={tmp_path / 'none'}",
        f"+extra_sets.mine={mine}",
        "baselines.enabled=false",
    )
    assert set(metrics["extra_sets"]) == {"mine"} and metrics["extra_sets"]["mine"]["labelled"]["urgent"] == 0
    assert metrics["extra_sets"]["mine"]["baselines"] == {}
    with pytest.raises(ValueError, match=r"extra_sets.gone: file not found"):
        _run(tmp_path, data_dir, monkeypatch, f"+extra_sets.gone={tmp_path / 'gone.jsonl'}")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"text": "在吗", "intent": "greeting", "urgent": 3}, ensure_ascii=False) + "\n",
        encoding="utf-8",
    )
    with pytest.raises(ValueError, match=r"bad.jsonl:1: urgent: must be 0 or 1, got 3"):
        _run(tmp_path, data_dir, monkeypatch, f"+extra_sets.bad={bad}")


def test_partial_labels_in_the_test_split_are_skipped_per_head(tmp_path, data_dir, monkeypatch):
    rows = [json.loads(x) for x in (data_dir / "test.jsonl").read_text(encoding="utf-8").splitlines()]
    for r in rows[::3]:  # a third of the rows without an urgent label
        r["urgent"] = None
    partial = tmp_path / "partial.jsonl"
    atomic_write_jsonl(partial, rows)
    metrics, reports = _run(
        tmp_path,
        data_dir,
        monkeypatch,
        f"data.eval_file={partial}",
        "baselines.enabled=false",
        f"paths.shared_dir={tmp_path / 'none'}",
    )
    known = sum(r["urgent"] is not None for r in rows)
    assert metrics["model"]["urgent"]["n"] == known < len(rows)
    assert metrics["model"]["urgent"]["positives"] == sum(r["urgent"] == 1 for r in rows)
    assert f"urgent {known}," in (reports / "report.md").read_text(encoding="utf-8")


@pytest.mark.shared
@pytest.mark.slow
def test_real_shared_sets_evaluate_with_the_smoke_model(smoke, tmp_path):
    if not SHARED.is_dir():
        pytest.skip("../shared/data/real not present")
    cfg = compose(
        "eval",
        [
            f"paths.root_dir={smoke['root']}",
            f"paths.shared_dir={SHARED.parents[1]}",
            f"data.dir={smoke['data_dir']}",
            f"model_dir={smoke['model_dir']}",
            f"output_dir={tmp_path}",
            "tuning.grid=11",
            "sanity.enabled=false",
            "write_policy=false",
            "extra_sets_max_rows=300",
        ],
    )
    metrics = evaluate_module.evaluate(cfg)
    for name in ("real_gold_dev", "jddc_silver"):
        m = metrics["extra_sets"][name]
        assert m["rows"] == 300 and 0 <= m["model"]["intent"]["accuracy"] <= 1
        assert "tfidf_lr" in m["baselines"]
    assert metrics["extra_sets"]["real_gold_dev"]["labelled"]["urgent"] == 300
    assert "hard" in metrics["extra_sets"]["real_gold_dev"]["model"]["by_difficulty"]
