"""`make eval`: calibrate, tune the triage policy on dev, measure everything on test (or data.eval_file),
compare with the peers, and write report.md, report.html, metrics.json, errors.jsonl.

``python -m kefu_triage.evaluate model_dir=models/default`` (a trained model; the tuned operating point is
stored back into it as triage_policy.json for export) or ``artifact_dir=artifacts/default`` (an ONNX
artifact, scored with the torch-free runtime and its stored temperatures and thresholds re-tuned on dev).
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from kefu_triage.core.fileio import atomic_write_json, atomic_write_jsonl
from kefu_triage.core.heads import POOLED_OUTPUT, probabilities
from kefu_triage.core.novelty import NOVELTY_FILE
from kefu_triage.core.policy import REASONS, Thresholds, TriagePolicy
from kefu_triage.core.taxonomy import Taxonomy, taxonomy_from_config
from kefu_triage.data.records import load_split_records, read_examples, summarize
from kefu_triage.evaluate.calibration import calibrate, fit_novelty
from kefu_triage.evaluate.conformal import ConformalError, calibrate_policy, calibration_summary
from kefu_triage.evaluate.extra_sets import assess_extra_set, load_extra_set, resolve_extra_sets
from kefu_triage.evaluate.metrics import Gold, binary_metrics, intent_metrics, triage_metrics
from kefu_triage.evaluate.peers import KeywordRuleBaseline, TfidfLogRegBaseline
from kefu_triage.evaluate.tuning import risk_coverage_curve, safety_metrics, tune_thresholds

POLICY_FILE = "triage_policy.json"


# ---------------------------------------------------------------------------------------------------
# Scorers: anything that turns records into the three heads' logits
# ---------------------------------------------------------------------------------------------------
class TorchScorer:
    name = "model"

    def __init__(self, model_dir: str | Path, batch_size: int = 64):
        from kefu_triage.model.multitask import load_model

        self.model, self.tokenizer = load_model(model_dir)
        self.batch_size = batch_size
        self.taxonomy = self.model.config.get_taxonomy()
        self.context_turns = self.model.config.context_turns
        self.novelty = None  # fitted by evaluate() from the training split (kefu_triage.core.novelty)

    def predict_logits(self, records: list[dict[str, Any]]) -> dict[str, np.ndarray]:
        from kefu_triage.model.multitask import predict_logits

        return predict_logits(self.model, self.tokenizer, records, self.batch_size, pooled=True)


class ArtifactScorer:
    name = "model"

    def __init__(self, artifact_dir: str | Path, precision: str = "int8"):
        from kefu_triage.runtime.model import TriageModel

        self.runtime = TriageModel.load(artifact_dir, precision=precision)
        self.taxonomy = self.runtime.taxonomy
        self.context_turns = self.runtime.context_turns
        self.novelty = self.runtime.novelty  # the artifact's own statistics (None in older artifacts)

    def predict_logits(self, records: list[dict[str, Any]]) -> dict[str, np.ndarray]:
        return self.runtime.score([r["text"] for r in records], [r.get("context") for r in records])


# ---------------------------------------------------------------------------------------------------
# One scorer, end to end
# ---------------------------------------------------------------------------------------------------
def _labels(gold: Gold) -> dict[str, np.ndarray]:
    return {"intent": gold.intent, "urgent": gold.urgent, "refund_recoverable": gold.refund}


def with_novelty(
    probs: dict[str, np.ndarray], logits: dict[str, np.ndarray], novelty
) -> dict[str, np.ndarray]:
    """``probs`` plus ``"novelty"`` when the scorer has novelty statistics and gave its pooled state."""
    if novelty is not None and POOLED_OUTPUT in logits:
        return {**probs, "novelty": novelty.score(logits[POOLED_OUTPUT])}
    return probs


def assess(
    name: str,
    dev_logits: dict[str, np.ndarray],
    test_logits: dict[str, np.ndarray],
    gold_dev: Gold,
    gold_test: Gold,
    taxonomy: Taxonomy,
    cfg: DictConfig,
    novelty=None,
    calibration: tuple[dict[str, np.ndarray], Gold] | None = None,
) -> dict[str, Any]:
    """Calibrate + tune on dev, measure on test. Returns metrics and what the report needs. ``novelty``
    (kefu_triage.core.novelty.NoveltyModel) adds the novelty gate to the tuning; ``calibration`` (logits and
    gold of a labelled sample of the user's traffic) then sets the thresholds by conformal risk control."""
    cal = calibrate(dev_logits, _labels(gold_dev), {"intent": cfg.policy.get("min_intent_temperature")})
    temps = cal["temperatures"]
    p_dev = with_novelty(probabilities(dev_logits, temps), dev_logits, novelty)
    p_test = with_novelty(probabilities(test_logits, temps), test_logits, novelty)
    op = OmegaConf.to_container(cfg.policy.operating_point)
    tuned = tune_thresholds(
        p_dev,
        gold_dev,
        taxonomy.routes,
        op,
        margin=float(cfg.policy.thresholds.margin),
        grid=int(cfg.tuning.grid),
    )
    th: Thresholds = tuned["thresholds"]
    conformal = None
    if calibration is not None:
        cal_logits, cal_gold = calibration
        try:
            conformal = calibrate_policy(
                with_novelty(probabilities(cal_logits, temps), cal_logits, novelty),
                cal_gold,
                taxonomy.routes,
                th,
                float(cfg.policy.max_bot_risk),
                float(op["min_urgent_recall"]),
                delta=float(cfg.policy.get("calibration_delta", 0.1)),
            )
        except ConformalError as exc:
            raise ConformalError(f"policy.calibration_file={cfg.policy.calibration_file}: {exc}") from None
        th = Thresholds.from_mapping(conformal["thresholds"])
    d = TriagePolicy(taxonomy.routes, th).decide_heads(p_test)
    refund_rows, urgent_rows = (
        gold_test.refund >= 0,
        gold_test.urgent >= 0,
    )  # partial labels: skip unknown rows
    rc = risk_coverage_curve(p_test, gold_test, taxonomy.routes, th)
    traffic = OmegaConf.to_container(cfg.traffic)
    metrics = {
        "intent": intent_metrics(gold_test.intent, p_test["intent"], taxonomy.intent_names),
        "urgent": binary_metrics(gold_test.urgent[urgent_rows], p_test["urgent"][urgent_rows], th.urgent),
        "refund_recoverable": binary_metrics(
            gold_test.refund[refund_rows], p_test["refund_recoverable"][refund_rows], th.recoverable
        ),
        "triage": {
            **triage_metrics(d.to_human, d.intent_id, gold_test, traffic),
            "aurc": rc["aurc"],
            **{k: v for k, v in rc.items() if k.startswith("coverage_at_risk")},
        },
        "reasons": {r: int((d.reason == r).sum()) for r in REASONS},
        "calibration": {"temperatures": temps, "ece": cal["ece"]},
        "thresholds": th.to_dict(),
        "tuning": {
            "constraints_met": bool(tuned["constraints_met"]),
            "shortfall": tuned["shortfall"],
            "dev": tuned["dev_metrics"],
        },
        # confidence vs novelty vs both: AUROC for wrong intents, risk-coverage/AURC; urgent escalation cost
        "safety": {
            split: {
                k: {f: v for f, v in m.items() if f != "curve"}
                for k, m in safety_metrics(p, g, taxonomy.routes, th).items()
            }
            for split, p, g in (("test", p_test, gold_test), ("dev", p_dev, gold_dev))
        },
    }
    if conformal is not None:
        metrics["conformal"] = conformal
    return {
        "name": name,
        "metrics": metrics,
        "probs": p_test,
        "decisions": d,
        "curve": rc["curve"],
        "reliability": cal["reliability"],
        "thresholds": th,
        "temperatures": temps,
        "novelty": novelty,
        "operating_point": op,
        "constraints_met": bool(tuned["constraints_met"]),
    }


ERROR_SEVERITY = (
    "bot_took_human_message",
    "bot_wrong_intent",
    "missed_urgent_head",
    "wrong_intent",
    "needless_escalation",
)


def worst_errors(
    result: dict[str, Any], records: list[dict[str, Any]], gold: Gold, taxonomy: Taxonomy, limit: int = 100
) -> list[dict[str, Any]]:
    """Mistakes, most harmful kind first and most confident first within a kind: the bot took a message that
    needed a person; the bot took a message with the wrong intent; the urgent head missed an urgent message;
    a wrong intent that a person will correct; a message the bot could have handled that went to a person."""
    p, d = result["probs"], result["decisions"]
    names = taxonomy.intent_names
    bot = ~d.to_human
    wrong = d.intent_id != gold.intent
    kinds = np.full(len(gold), "", dtype=object)
    for mask, kind in reversed(
        list(
            zip(
                (
                    bot & gold.should_reach_human,
                    bot & wrong,
                    (gold.urgent == 1) & (p["urgent"] < result["thresholds"].urgent),
                    wrong,
                    ~bot & ~gold.should_reach_human & (gold.intent_routes[gold.intent] != "human"),
                ),
                ERROR_SEVERITY,
                strict=True,
            )
        )
    ):
        kinds[mask] = kind
    rows = []
    for i in np.flatnonzero(kinds != ""):
        top = np.argsort(-p["intent"][i])[:3]
        rows.append(
            {
                "error": kinds[i],
                "confidence": round(float(p["intent"][i].max()), 4),
                "text": records[i]["text"],
                "context": records[i].get("context") or [],
                "gold": {
                    "intent": names[gold.intent[i]],
                    "urgent": None if gold.urgent[i] < 0 else int(gold.urgent[i]),
                    "refund_recoverable": None if gold.refund[i] < 0 else int(gold.refund[i]),
                },
                "pred": {
                    "intent": names[d.intent_id[i]],
                    "top_intents": [[names[j], round(float(p["intent"][i][j]), 4)] for j in top],
                    "urgent_prob": round(float(p["urgent"][i]), 4),
                    "refund_recoverable_prob": round(float(p["refund_recoverable"][i]), 4),
                    "route": str(d.route[i]),
                    "reason": str(d.reason[i]),
                },
            }
        )
    rows.sort(key=lambda r: (ERROR_SEVERITY.index(r["error"]), -r["confidence"]))
    return rows[:limit]


def shared_sanity(scorer, cfg: DictConfig) -> dict[str, Any]:
    """On ../shared product reviews (never trained on): urgent head on negative vs positive reviews (ROC-AUC).
    Skipped when ../shared is absent. Real customer turns are measured as labelled extra sets (extra_sets.py)."""
    from sklearn.metrics import roc_auc_score

    shared = Path(cfg.paths.shared_dir)
    out: dict[str, Any] = {}
    reviews = shared / "data" / "real" / "reviews_sentiment.jsonl"
    if reviews.is_file():
        rows = [json.loads(x) for x in reviews.read_text(encoding="utf-8").splitlines() if x.strip()]
        rows = random.Random(0).sample(rows, min(cfg.sanity.max_rows, len(rows)))
        logits = scorer.predict_logits([{"text": r["text"]} for r in rows])
        y = np.array([r["sentiment"] == "negative" for r in rows], dtype=int)
        out["reviews_urgent_auc"] = float(roc_auc_score(y, logits["urgent_logit"]))
        out["reviews_rows"] = len(rows)
    return out


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Run the whole evaluation; write the four outputs (and triage_policy.json); return metrics.json's content."""
    from kefu_triage.evaluate.report import write_report

    if cfg.get("model_dir"):
        scorer = TorchScorer(cfg.model_dir)
    elif cfg.get("artifact_dir"):
        scorer = ArtifactScorer(cfg.artifact_dir, cfg.precision)
    else:
        raise ValueError("eval: give model_dir=... (a trained model) or artifact_dir=... (an ONNX artifact)")
    taxonomy = scorer.taxonomy
    cfg_tax = taxonomy_from_config(cfg.taxonomy)
    if cfg_tax.intent_names != taxonomy.intent_names:
        raise ValueError(
            f"eval: the model was trained on taxonomy intents {taxonomy.intent_names}, but taxonomy= "
            f"({cfg_tax.source}) has {cfg_tax.intent_names}"
        )
    splits = load_split_records(cfg.data, taxonomy)
    eval_split = "eval" if "eval" in splits else "test"
    if eval_split not in splits or "dev" not in splits:
        raise ValueError(
            "eval: needs data.dev_file (tuning) and data.test_file or data.eval_file (measuring)"
        )
    dev, test = splits["dev"], splits[eval_split]
    gold_dev, gold_test = Gold.from_records(dev, taxonomy), Gold.from_records(test, taxonomy)

    nov_cfg = cfg.policy.get("novelty") or {}
    if not nov_cfg.get("enabled", True):
        scorer.novelty = None  # an artifact's shipped statistics too: measure the policy without the gate
    elif isinstance(scorer, TorchScorer) and splits.get("train"):
        scorer.novelty = fit_novelty(
            scorer.predict_logits,
            splits["train"],
            dev,
            taxonomy,
            max_rows=int(nov_cfg.get("max_train_rows", 3000)),
            seed=int(nov_cfg.get("seed", 0)),
        )
    calibration = None
    if cfg.policy.get("calibration_file"):
        cal_records = read_examples(cfg.policy.calibration_file, taxonomy)
        calibration = (scorer.predict_logits(cal_records), Gold.from_records(cal_records, taxonomy))
    results = [
        assess(
            "model",
            scorer.predict_logits(dev),
            scorer.predict_logits(test),
            gold_dev,
            gold_test,
            taxonomy,
            cfg,
            novelty=scorer.novelty,
            calibration=calibration,
        )
    ]
    if "conformal" in results[0]["metrics"]:
        print(calibration_summary(results[0]["metrics"]["conformal"]))
    scorers = [
        scorer
    ]  # aligned with results: each one's temperatures and policy are reused on the extra sets
    if cfg.baselines.enabled and "train" in splits:
        for peer in (
            TfidfLogRegBaseline(taxonomy.num_intents, scorer.context_turns),
            KeywordRuleBaseline(taxonomy.intent_names),
        ):
            peer.fit(splits["train"], taxonomy)
            results.append(
                assess(
                    peer.name,
                    peer.predict_logits(dev),
                    peer.predict_logits(test),
                    gold_dev,
                    gold_test,
                    taxonomy,
                    cfg,
                )
            )
            scorers.append(peer)
    model = results[0]
    sanity = shared_sanity(scorer, cfg) if cfg.sanity.enabled else {}
    extra_paths, skipped, real_dir = resolve_extra_sets(cfg)
    if skipped:
        print(f"extra sets skipped ({real_dir} not found): {', '.join(skipped)}")
    extra = []
    for name, path in extra_paths.items():
        records = load_extra_set(name, path, taxonomy, cfg)
        extra.append(
            assess_extra_set(
                name,
                path,
                records,
                [(r, s.predict_logits(records)) for r, s in zip(results, scorers, strict=True)],
                taxonomy,
                splits.get("train"),
            )
        )

    metrics = {
        "schema_version": 1,
        "model": model["metrics"],
        "baselines": {r["name"]: r["metrics"] for r in results[1:]},
        "operating_point": {
            **model["operating_point"],
            "constraints_met": model["constraints_met"],
            "thresholds": model["thresholds"].to_dict(),
            "temperatures": model["temperatures"],
        },
        "dataset": {
            "eval_split": eval_split,
            "eval_file": str(cfg.data.get(f"{eval_split}_file")),
            **{k: summarize(v) for k, v in splits.items()},
        },
        "sanity": sanity,
        "extra_sets": {e["name"]: e["metrics"] for e in extra},
        "extra_sets_skipped": skipped,
        "traffic": OmegaConf.to_container(cfg.traffic),
    }
    out_dir = Path(cfg.output_dir)
    write_report(out_dir, metrics, results, test, gold_test, taxonomy, extra)
    atomic_write_json(out_dir / "metrics.json", _jsonable(metrics))
    atomic_write_jsonl(
        out_dir / "errors.jsonl", worst_errors(model, test, gold_test, taxonomy, cfg.errors_limit)
    )
    if cfg.get("model_dir") and cfg.write_policy:
        novelty_file = Path(cfg.model_dir) / NOVELTY_FILE
        if (
            model["novelty"] is not None
        ):  # export ships these statistics: the tuned novelty gate refers to them
            model["novelty"].save(novelty_file)
        else:
            novelty_file.unlink(missing_ok=True)
        atomic_write_json(
            Path(cfg.model_dir) / POLICY_FILE,
            {
                "thresholds": model["thresholds"].to_dict(),
                "temperatures": model["temperatures"],
                "operating_point": model["operating_point"],
                "constraints_met": model["constraints_met"],
                "dev_metrics": model["metrics"]["tuning"]["dev"],
                "test_metrics": {
                    "intent_macro_f1": model["metrics"]["intent"]["macro_f1"],
                    **model["metrics"]["triage"],
                },
            },
        )
    if not model["constraints_met"]:
        print(
            f"WARNING: the operating point cannot be met on dev; best effort shortfall: "
            f"{model['metrics']['tuning']['shortfall']}",
            file=sys.stderr,
        )
    return metrics


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return None if np.isnan(obj) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj
