"""The labelling loop: select -> (simulated) annotation in Label Studio / doccano -> import-labels -> validate."""

from __future__ import annotations

import csv
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from kefu_triage.cli import main as cli_main
from kefu_triage.core.taxonomy import load_taxonomy
from kefu_triage.data import labelling
from kefu_triage.data.labelling import (
    LabellingError,
    choose,
    embedding_output,
    import_labels,
    read_pool,
    select,
)
from kefu_triage.data.records import DataValidationError, read_examples

TAX = load_taxonomy()
AGENT = "agent"

# Invented messages (text, context, intent, urgent, refund_recoverable): the pool's hidden truth, which the
# simulated annotator uses to accept or correct the model's pre-annotation.
POOL = [
    ("亲在不在呀", None, "greeting", 0, None),
    ("好滴辛苦啦", [(AGENT, "亲还有别的问题吗")], "greeting", 0, None),
    ("这个保温杯能装开水吗", None, "product_inquiry", 0, None),
    ("请问这款床单是几件套", None, "product_inquiry", 0, None),
    ("那双跑鞋偏码吗平时穿四十的", None, "product_inquiry", 0, None),
    ("店铺满两百减三十还能叠加吗", None, "promotion", 0, None),
    ("领的券怎么结算时用不了", None, "promotion", 0, None),
    ("昨天买的今天便宜了二十块能退差价不", None, "price_protection", 0, None),
    ("花呗付不了款是怎么回事", None, "payment", 0, None),
    ("能不能货到付款啊", None, "payment", 0, None),
    ("拍了两天了还没发货", None, "shipping_time", 0, None),
    ("下午四点前下单今天能发出吗", None, "shipping_time", 0, None),
    ("明天结婚要用今天必须发出来不然来不及了", None, "shipping_time", 1, None),
    ("快递一直显示在中转站不动", None, "logistics", 0, None),
    ("包裹被放到驿站了我怎么不知道", None, "logistics", 0, None),
    ("显示已签收可我根本没拿到快递急死了", None, "logistics", 1, None),
    ("收件人电话填错了帮我改下", None, "address_change", 0, None),
    ("能改成送到公司地址吗", [(AGENT, "亲您的订单还没有出库哦")], "address_change", 0, None),
    ("刚刚拍错了帮我把订单取消", None, "cancel_order", 0, None),
    ("不想要了订单还没发能取消吗", None, "cancel_order", 0, None),
    ("电子发票在哪里下载", None, "invoice", 0, None),
    ("要开专票需要提供什么资料", None, "invoice", 0, None),
    ("衣服有点大不想要了能退吗", None, "return_refund", 0, 1),
    ("东西已经寄回去了钱什么时候退", None, "return_refund", 0, 0),
    ("还没收到货就直接退款吧不要了", [(AGENT, "亲包裹还在路上哦")], "return_refund", 0, 0),
    ("颜色和图片差太多了想退", None, "return_refund", 0, 1),
    ("鞋子小了想换大一码", None, "exchange", 0, None),
    ("颜色不喜欢可以换个灰色的吗", None, "exchange", 0, None),
    ("那就换吧", [(AGENT, "亲可以给您换一件新的哦")], "exchange", 0, None),
    ("杯子收到就有裂缝", None, "quality_issue", 0, None),
    ("少给了一个盖子", None, "quality_issue", 0, None),
    ("拆开发现是旧的还有划痕太过分了", None, "quality_issue", 1, None),
    ("吹风机用了半个月不出风了怎么保修", None, "repair_warranty", 0, None),
    ("空调什么时候能上门装", None, "repair_warranty", 0, None),
    ("你们客服回复太慢了我要投诉", None, "complaint", 1, None),
    ("再不给处理我就去打一二三一五", None, "complaint", 1, None),
    ("别让机器人回了给我转人工", None, "human_agent", 0, None),
    ("找个真人来说话", None, "human_agent", 0, None),
    ("今天天气真好", None, "other", 0, None),
    ("你们老板是哪里人", None, "other", 0, None),
    ("第三次问了到底什么时候发货", None, "shipping_time", 1, None),
    ("赠品的小毛巾怎么没有", None, "promotion", 0, None),
]
TRUTH = {text: (intent, urgent, refund) for text, _c, intent, urgent, refund in POOL}


def _turns(context):
    return [{"role": r, "text": t} for r, t in context] if context else None


def _write_pool(path: Path) -> Path:
    rows = [
        {"id": f"chat-{i:03d}", "text": t, **({"context": _turns(c)} if c else {})}
        for i, (t, c, *_labels) in enumerate(POOL)
    ]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def pool(tmp_path):
    return _write_pool(tmp_path / "unlabeled.jsonl")


def _choices(result: list[dict]) -> dict[str, str]:
    return {r["from_name"]: r["value"]["choices"][0] for r in result}


def _annotate_like_a_human(task: dict) -> list[dict]:
    """Accept each pre-annotated choice that matches the truth, correct the others, add what is missing."""
    intent, urgent, refund = TRUTH[task["data"]["text"]]
    wanted = {"intent": intent, "urgent": str(urgent)}
    if refund is not None:
        wanted["refund_recoverable"] = str(refund)
    predicted = {r["from_name"]: r for r in task["predictions"][0]["result"]}
    result = []
    for k, (name, value) in enumerate(wanted.items()):
        item = {
            "id": f"r{k}",
            "from_name": name,
            "to_name": "text",
            "type": "choices",
            "value": {"choices": [value]},
            "origin": "manual",
        }
        if name in predicted and predicted[name]["value"]["choices"] == [value]:
            item["origin"] = "prediction"
        result.append(item)
    return result


def _label_studio_export(tasks: list[dict]) -> list[dict]:
    """The documented Label Studio JSON export: tasks with id, data, annotations (+ predictions, timestamps)."""
    out = []
    for k, task in enumerate(tasks):
        tid = 100 + k
        out.append(
            {
                "id": tid,
                "data": task["data"],
                "meta": {},
                "project": 3,
                "created_at": "2024-05-01T08:00:00.000000Z",
                "updated_at": "2024-05-01T09:00:00.000000Z",
                "annotations": [
                    {
                        "id": 900 + k,
                        "completed_by": 1,
                        "result": _annotate_like_a_human(task),
                        "was_cancelled": False,
                        "ground_truth": False,
                        "created_at": "2024-05-01T09:00:00.000000Z",
                        "updated_at": "2024-05-01T09:00:00.000000Z",
                        "lead_time": 4.2,
                        "task": tid,
                    }
                ],
                "predictions": [{**task["predictions"][0], "id": 700 + k, "created_ago": "1 hour"}],
            }
        )
    return out


def _validate_ok(path: Path, capsys) -> None:
    code = cli_main(["validate", str(path)])
    out = capsys.readouterr()
    assert code == 0, out.out + out.err
    assert "OK" in out.out


def test_label_studio_round_trip_passes_validate(smoke, pool, tmp_path, capsys):
    tasks_path = tmp_path / "tasks.json"
    assert (
        cli_main(
            [
                "select",
                "--artifact",
                str(smoke["artifact"]),
                "--input",
                str(pool),
                "--n",
                "12",
                "--strategy",
                "uncertainty",
                "--format",
                "label-studio",
                "--output",
                str(tasks_path),
            ]
        )
        == 0
    )
    assert "selected 12 of 42" in capsys.readouterr().out
    tasks = json.loads(tasks_path.read_text(encoding="utf-8"))
    assert len(tasks) == 12 and len({t["data"]["text"] for t in tasks}) == 12
    for t in tasks:
        pred = t["predictions"][0]
        assert pred["model_version"].startswith("kefu-triage-") and 0 < pred["score"] <= 1
        choices = _choices(pred["result"])
        assert choices["intent"] in TAX.intent_names and choices["urgent"] in ("0", "1")
        assert ("refund_recoverable" in choices) == (TAX.route_of(choices["intent"]) == "refund_triage")
        assert all(r["to_name"] == "text" and r["type"] == "choices" for r in pred["result"])
        assert isinstance(t["data"]["context"], str) and t["data"]["kefu"]["source"].startswith(
            "unlabeled.jsonl:"
        )

    # the labeling config names exactly the controls the tasks and the importer use
    config = ET.fromstring((tmp_path / "tasks.json.label_config.xml").read_text(encoding="utf-8"))
    controls = {c.get("name"): [x.get("value") for x in c.iter("Choice")] for c in config.iter("Choices")}
    assert controls["intent"] == TAX.intent_names and len(controls["intent"]) == 17
    assert controls["urgent"] == ["0", "1"] and controls["refund_recoverable"] == ["0", "1"]
    assert {t.get("name"): t.get("value") for t in config.iter("Text")} == {
        "context": "$context",
        "text": "$text",
    }
    refund_view = next(v for v in config.iter("View") if v.get("visibleWhen"))
    assert (
        refund_view.get("whenTagName") == "intent" and refund_view.get("whenChoiceValue") == "return_refund"
    )

    export = tmp_path / "export.json"
    export.write_text(json.dumps(_label_studio_export(tasks), ensure_ascii=False), encoding="utf-8")
    labelled = tmp_path / "labelled.jsonl"
    assert (
        cli_main(["import-labels", "--format", "label-studio", str(export), "--output", str(labelled)]) == 0
    )
    assert "wrote 12 labelled example(s)" in capsys.readouterr().out
    _validate_ok(labelled, capsys)
    records = read_examples(labelled, TAX)
    by_text = {text: c for text, c, *_ in POOL}
    for r in records:
        assert (r["intent"], r["urgent"], r["refund_recoverable"]) == TRUTH[r["text"]]  # corrections kept
        assert r["context"] == (_turns(by_text[r["text"]]) or [])  # structured context restored
        assert r["id"].startswith("chat-") and r["label_source"].startswith("label-studio task ")


def test_doccano_round_trip_passes_validate(smoke, pool, tmp_path, capsys):
    out = tmp_path / "doccano.jsonl"
    assert (
        cli_main(
            [
                "select",
                "--artifact",
                str(smoke["artifact"]),
                "--input",
                str(pool),
                "--n",
                "10",
                "--strategy",
                "random",
                "--seed",
                "3",
                "--format",
                "doccano",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 10 and all("id" not in r for r in rows)
    label_set = {
        x["text"] for x in json.loads((tmp_path / "doccano.jsonl.labels.json").read_text(encoding="utf-8"))
    }
    assert label_set == set(TAX.intent_names) | {"urgent", "not_urgent", "recoverable", "firm"}
    assert all(set(r["label"]) <= label_set for r in rows)

    # doccano's export: its own example id, the text, the label list, the import's other keys as metadata
    export_lines = []
    for k, r in enumerate(rows):
        intent, urgent, refund = TRUTH[r["text"]]
        labels = [intent, "urgent" if urgent else "not_urgent"] + (
            [] if refund is None else ["recoverable" if refund else "firm"]
        )
        meta = {key: v for key, v in r.items() if key not in ("text", "label")}
        export_lines.append(
            {"id": 40 + k, "text": r["text"], **meta, "label": sorted(labels), "Comments": []}
        )
    export = tmp_path / "all.jsonl"
    export.write_text(
        "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in export_lines), encoding="utf-8"
    )
    labelled = tmp_path / "labelled.jsonl"
    assert cli_main(["import-labels", "--format", "doccano", str(export), "--output", str(labelled)]) == 0
    capsys.readouterr()
    _validate_ok(labelled, capsys)
    records = read_examples(labelled, TAX)
    assert sorted(r["text"] for r in records) == sorted(r["text"] for r in rows)
    assert all((r["intent"], r["urgent"], r["refund_recoverable"]) == TRUTH[r["text"]] for r in records)


def _ls_task(tid, result, cancelled=False, annotations=True):
    task = {"id": tid, "data": {"text": "快递一直显示在中转站不动", "context": ""}, "predictions": []}
    task["annotations"] = (
        [{"id": tid * 10, "result": result, "was_cancelled": cancelled}] if annotations else []
    )
    return task


def _c(name, value):
    return {"from_name": name, "to_name": "text", "type": "choices", "value": {"choices": [value]}}


def test_bad_label_studio_export_names_every_task(tmp_path, capsys):
    export = tmp_path / "bad.json"
    export.write_text(
        json.dumps(
            [
                _ls_task(1, [_c("intent", "logistics"), _c("urgent", "0")]),  # good
                _ls_task(2, [_c("intent", "logistic"), _c("urgent", "0")]),  # unknown label
                _ls_task(3, [_c("urgent", "1")]),  # missing intent
                _ls_task(4, [], cancelled=True),  # skipped
                _ls_task(5, [], annotations=False),  # never annotated
                _ls_task(6, [_c("intent", "complaint"), _c("urgent", "maybe")]),  # bad urgent value
            ],
            ensure_ascii=False,
        ),
        encoding="utf-8",
    )
    out = tmp_path / "labelled.jsonl"
    assert cli_main(["import-labels", "--format", "label-studio", str(export), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "task 2: intent: unknown label 'logistic' (did you mean 'logistics'?)" in err
    assert "task 3: intent: missing" in err
    assert "task 4: skipped" in err and "task 5: not annotated" in err
    assert "task 6: urgent: unknown label 'maybe'" in err
    assert "task 1:" not in err and not out.exists()  # nothing written while the export has problems

    assert (
        cli_main(
            ["import-labels", "--format", "label-studio", str(export), "--output", str(out), "--drop-invalid"]
        )
        == 0
    )
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["label_source"] for r in rows] == ["label-studio task 1"]
    assert "dropped:" in capsys.readouterr().err


def test_bad_doccano_export_names_every_example(tmp_path):
    export = tmp_path / "bad.jsonl"
    lines = [
        {"id": 7, "text": "杯子收到就有裂缝", "label": ["quality_issue", "not_urgent"]},
        {"id": 8, "text": "少给了一个盖子", "label": ["qualty_issue"]},
        {"id": 9, "text": "找个真人来说话", "label": []},
        {"id": 10, "text": "颜色不喜欢", "label": ["exchange", "return_refund"]},
    ]
    export.write_text(
        "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines) + "{broken\n", encoding="utf-8"
    )
    with pytest.raises(DataValidationError) as exc:
        import_labels(export, "doccano", TAX)
    msg = str(exc.value)
    assert "bad.jsonl:2: task 8: intent: unknown label 'qualty_issue' (did you mean 'quality_issue'?)" in msg
    assert "task 9: not annotated" in msg and "task 10: intent: 2 intents chosen" in msg
    assert "bad.jsonl:5: json: invalid JSON" in msg and "task 7" not in msg


def test_partial_labels_become_null_and_stray_refund_is_dropped(tmp_path):
    export = tmp_path / "partial.json"
    export.write_text(
        json.dumps(
            [
                _ls_task(1, [_c("intent", "logistics")]),  # urgent not labelled
                _ls_task(2, [_c("intent", "return_refund"), _c("urgent", "1")]),  # refund not labelled
                _ls_task(3, [_c("intent", "exchange"), _c("urgent", "0"), _c("refund_recoverable", "1")]),
            ],
            ensure_ascii=False,
        ),
        encoding="utf-8",
    )
    records, warnings = import_labels(export, "label-studio", TAX)
    assert [(r["intent"], r["urgent"], r["refund_recoverable"]) for r in records] == [
        ("logistics", None, None),
        ("return_refund", 1, None),
        ("exchange", 0, None),
    ]
    assert any("task 3: refund_recoverable ignored" in w for w in warnings)


def test_latest_non_cancelled_annotation_wins(tmp_path):
    task = _ls_task(1, [])
    task["annotations"] = [
        {
            "id": 1,
            "result": [_c("intent", "logistics"), _c("urgent", "0")],
            "updated_at": "2024-05-01T10:00:00Z",
        },
        {
            "id": 2,
            "result": [_c("intent", "complaint"), _c("urgent", "1")],
            "updated_at": "2024-05-02T10:00:00Z",
        },
        {"id": 3, "result": [], "was_cancelled": True, "updated_at": "2024-05-03T10:00:00Z"},
    ]
    export = tmp_path / "multi.json"
    export.write_text(json.dumps([task]), encoding="utf-8")
    records, warnings = import_labels(export, "label-studio", TAX)
    assert (records[0]["intent"], records[0]["urgent"]) == ("complaint", 1) and "2 annotations" in warnings[0]


@pytest.mark.parametrize("strategy", ["uncertainty", "diverse", "novelty", "random"])
def test_every_strategy_returns_n_distinct_messages_deterministically(smoke, tmp_path, strategy):
    pool = _write_pool(tmp_path / "pool.jsonl")
    with pool.open("a", encoding="utf-8") as fh:  # a repeated message is one candidate, not two
        fh.write(json.dumps({"text": POOL[0][0]}, ensure_ascii=False) + "\n")
    first = select(smoke["artifact"], pool, n=15, strategy=strategy, seed=7)
    again = select(smoke["artifact"], pool, n=15, strategy=strategy, seed=7)
    texts = [r["text"] for r in first.records]
    assert len(texts) == 15 and len(set(texts)) == 15
    assert texts == [r["text"] for r in again.records]
    assert first.pool_size == len(POOL)
    if strategy == "random":
        other = select(smoke["artifact"], pool, n=15, strategy=strategy, seed=8)
        assert [r["text"] for r in other.records] != texts
    if strategy == "uncertainty":  # the chosen ones are the least certain of the whole pool
        everything = select(smoke["artifact"], pool, n=len(POOL), strategy=strategy)
        assert np.all(np.diff(first.scores) <= 0)
        assert first.scores.min() >= everything.scores[15:].max()
    if strategy == "diverse":  # the artifact's embedding when it has one, else TF-IDF
        assert any(note.startswith("message vectors") for note in first.notes)
    if strategy == "novelty":
        assert any(note.startswith(("novelty", "message vectors")) for note in first.notes)


def test_reference_messages_are_left_out_and_novelty_prefers_unseen_ones(smoke, pool, tmp_path, monkeypatch):
    monkeypatch.setattr(
        labelling, "embedding_output", lambda manifest: None
    )  # the TF-IDF path, whatever the artifact
    reference = tmp_path / "train.jsonl"
    known = [t for t, *_ in POOL[:20]]
    near = ["杯子收到有裂缝", "少给了一个盖子吗", "找个真人来"]  # close to three pool messages not in `known`
    reference.write_text(
        "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in known + near), encoding="utf-8"
    )
    sel = select(smoke["artifact"], pool, n=50, strategy="novelty", reference=[reference])
    texts = [r["text"] for r in sel.records]
    assert len(texts) == len(POOL) - 20 and not set(texts) & set(known)
    assert np.all(np.diff(sel.scores) <= 1e-12)
    assert set(texts[-3:]) == {"杯子收到就有裂缝", "少给了一个盖子", "找个真人来说话"}  # least novel last


def test_diverse_takes_the_most_uncertain_message_of_each_cluster():
    rng = np.random.default_rng(0)
    centres = np.eye(4)[:3] * 10
    vectors = np.concatenate([c + rng.normal(0, 0.1, (6, 4)) for c in centres])
    uncertainty = rng.random(18)
    picked = choose("diverse", 3, uncertainty, seed=1, vectors=vectors)
    assert sorted(picked // 6) == [0, 1, 2]  # one per cluster
    assert all(uncertainty[i] == uncertainty[(i // 6) * 6 : (i // 6) * 6 + 6].max() for i in picked)
    assert list(picked) == list(choose("diverse", 3, uncertainty, seed=1, vectors=vectors))


def test_embedding_output_is_used_only_when_the_manifest_lists_one():
    assert embedding_output({"output": {"names": ["intent_logits", "urgent_logit"]}}) is None
    assert embedding_output({"output": {"names": ["intent_logits", "embedding"]}}) == "embedding"
    assert embedding_output({"output": {"names": ["intent_logits"], "pooled": "pooled"}}) == "pooled"


class _FakeModel:
    """What score_pool uses of a TriageModel whose artifact has a pooled output and novelty statistics."""

    manifest = {
        "output": {"names": ["intent_logits", "urgent_logit", "refund_recoverable_logit"], "pooled": "pooled"}
    }
    temperatures = {"intent": 1.0, "urgent": 1.0, "refund_recoverable": 1.0}

    def score(self, texts, contexts=None):
        n = len(texts)
        pooled = np.stack([np.full(4, 1.0 + i) * (1 if i % 2 else -1) for i in range(n)])
        return {
            "intent_logits": np.zeros((n, 17)),
            "urgent_logit": np.zeros(n),
            "refund_recoverable_logit": np.zeros(n),
            "pooled": pooled,
        }

    def novelty_scores(self, scores):
        return np.linspace(0, 1, len(scores["pooled"]))


def test_score_pool_uses_the_artifacts_embedding_and_novelty(monkeypatch):
    monkeypatch.setattr(labelling, "SCORE_CHUNK", 2)  # several chunks, stitched back in order
    scores = labelling.score_pool(_FakeModel(), ["a", "b", "c", "d", "e"])
    assert scores.vectors.shape == (5, 4) and np.allclose(np.linalg.norm(scores.vectors, axis=1), 1)
    assert np.allclose(scores.vectors[:, 0], [-0.5, 0.5, -0.5, 0.5, -0.5])
    assert np.allclose(scores.novelty, [0, 0.25, 0.5, 0.75, 1]) and scores.probs["intent"].shape == (5, 17)


def test_missing_scikit_learn_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    with pytest.raises(LabellingError, match="needs scikit-learn"):
        labelling._sklearn("diverse")


def test_pool_readers_accept_unlabelled_csv_and_name_bad_lines(tmp_path):
    path = tmp_path / "pool.csv"
    with path.open("w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "context", "channel"])
        w.writerow(["快递到哪了", "", "app"])
        w.writerow(
            ["那就换吧", json.dumps([{"role": "agent", "text": "给您换新的"}], ensure_ascii=False), "web"]
        )
        w.writerow(["", "", "app"])
        w.writerow(["能开发票吗", '[{"role": "robot", "text": "x"}]', "app"])
    with pytest.raises(DataValidationError) as exc:
        read_pool(path)
    assert f"{path}:4: text: empty" in str(exc.value) and f"{path}:5: context: turn 0: role" in str(exc.value)
    rows = read_pool(path, drop_invalid=True)
    assert [r["text"] for r in rows] == ["快递到哪了", "那就换吧"]
    assert rows[1]["context"] == [{"role": "agent", "text": "给您换新的"}] and rows[1]["meta"] == {
        "channel": "web"
    }

    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.table({"text": ["在吗", "发票怎么开"], "id": ["a", "b"]}), tmp_path / "pool.parquet")
    rows = read_pool(tmp_path / "pool.parquet")
    assert [(r["text"], r["meta"]["id"], r["source"]) for r in rows] == [
        ("在吗", "a", "pool.parquet:1"),
        ("发票怎么开", "b", "pool.parquet:2"),
    ]
    with pytest.raises(DataValidationError, match="columns: missing 'text'"):
        pq.write_table(pa.table({"message": ["在吗"]}), tmp_path / "bad.parquet")
        read_pool(tmp_path / "bad.parquet")


def test_select_rejects_a_bad_pool_with_file_and_line(smoke, tmp_path, capsys):
    path = tmp_path / "pool.jsonl"
    path.write_text('{"text": "在吗"}\n{"txt": "x"}\nnot json\n', encoding="utf-8")
    assert (
        cli_main(
            [
                "select",
                "--artifact",
                str(smoke["artifact"]),
                "--input",
                str(path),
                "--n",
                "1",
                "--output",
                str(tmp_path / "t.json"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert f"{path}:2: text: missing" in err and f"{path}:3: json: invalid JSON" in err
    assert not (tmp_path / "t.json").exists()
