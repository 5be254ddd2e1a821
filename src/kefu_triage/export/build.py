"""`make export`: the trained model -> a parity-gated ONNX artifact directory.

TorchScript exporter (``dynamo=False``) with eager attention so onnxruntime's transformer optimizer can
fuse Attention/EmbedLayerNorm/Gelu; then dynamic int8 quantisation with activation smoothing
(`kefu_triage.export.quantize`). The artifact is built in a temporary
directory and renamed into place only after the parity gate passes, so a failed or killed export leaves
the previous artifact intact.
"""

from __future__ import annotations

import json
import platform
import shutil
import sys
from collections import Counter
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from kefu_triage import __version__
from kefu_triage.core.artifact import SCHEMA_VERSION, write_manifest
from kefu_triage.core.fileio import atomic_directory, atomic_write_text, sha256_file
from kefu_triage.core.heads import OUTPUT_NAMES, POOLED_OUTPUT, probabilities
from kefu_triage.core.inputs import (
    MAX_MESSAGE_CHARS,
    MAX_TURN_CHARS,
    ROLE_PREFIX,
    encode_inputs,
    pad_encodings,
)
from kefu_triage.core.novelty import METHOD as NOVELTY_METHOD
from kefu_triage.core.novelty import NOVELTY_FILE, NoveltyModel
from kefu_triage.core.policy import Thresholds, TriagePolicy
from kefu_triage.data.records import read_examples
from kefu_triage.evaluate.metrics import macro_f1
from kefu_triage.export.quantize import prepare_int8, quantize_prepared
from kefu_triage.model.multitask import load_model, predict_logits
from kefu_triage.runtime.model import TriageModel

FUSED_OPS = (
    "Attention",
    "MultiHeadAttention",
    "SkipLayerNormalization",
    "EmbedLayerNormalization",
    "FastGelu",
    "BiasGelu",
    "Gelu",
    "LayerNormalization",
    "SkipSimplifiedLayerNormalization",
)


class ExportError(RuntimeError):
    """The export or its parity gate failed; the previous artifact is untouched."""


class _OnnxHeads(torch.nn.Module):
    """The model with plain tensor outputs, in the artifact's output order."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        return out.intent_logits, out.urgent_logit, out.refund_recoverable_logit, out.pooled


def load_policy(model_dir: Path, cfg: DictConfig) -> dict[str, Any]:
    path = model_dir / "triage_policy.json"
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    print(
        f"WARNING: {path} not found (run `make eval` first to tune it): exporting temperatures 1.0 and the "
        "configured policy.thresholds",
        file=sys.stderr,
    )
    return {
        "thresholds": OmegaConf.to_container(cfg.policy.thresholds),
        "temperatures": {"intent": 1.0, "urgent": 1.0, "refund_recoverable": 1.0},
        "operating_point": OmegaConf.to_container(cfg.policy.operating_point),
        "constraints_met": None,
    }


def export_onnx(model, input_names: list[str], path: Path, opset: int) -> None:
    model.eval()
    dummy = {
        "input_ids": torch.tensor([[2, 100, 101, 3], [2, 102, 3, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]),
        "token_type_ids": torch.zeros(2, 4, dtype=torch.long),
    }
    axes = {n: {0: "batch", 1: "sequence"} for n in input_names}
    axes.update({n: {0: "batch"} for n in (*OUTPUT_NAMES, POOLED_OUTPUT)})
    with torch.no_grad():
        torch.onnx.export(
            _OnnxHeads(model),
            tuple(dummy[n] for n in input_names),
            str(path),
            dynamo=False,
            input_names=input_names,
            output_names=[*OUTPUT_NAMES, POOLED_OUTPUT],
            dynamic_axes=axes,
            opset_version=opset,
            do_constant_folding=True,
        )


def optimize(raw: Path, fp32: Path, num_heads: int, hidden: int) -> dict[str, int]:
    """onnxruntime's transformer optimizer; returns the fused-op counts of the result.

    Residual Add + LayerNormalization stay unfused: onnxruntime 1.32's SkipLayerNormalization is slower than
    the two ops at message shapes (measured: 12-15% of a 4-layer int8 call), and the runtime's sessions keep
    it from re-fusing them (``kefu_triage.runtime.model.DISABLED_OPTIMIZERS``)."""
    import onnx
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("bert")
    options.enable_skip_layer_norm = False
    optimized = optimize_model(
        str(raw),
        model_type="bert",
        num_heads=num_heads,
        hidden_size=hidden,
        opt_level=1,
        optimization_options=options,
    )
    optimized.save_model_to_file(str(fp32))
    counts = Counter(n.op_type for n in onnx.load(str(fp32)).graph.node)
    return {op: counts.get(op, 0) for op in FUSED_OPS if counts.get(op, 0)}


def calibration_feeds(
    tokenizer, model_config, records: list[dict[str, Any]], input_names: list[str], batch_size: int = 32
):
    """Padded numpy batches of ``records`` tokenised as the runtime does, for activation calibration."""
    from kefu_triage.model.multitask import input_tokenizer

    records = sorted(records, key=lambda r: len(r["text"]))
    backend = input_tokenizer(tokenizer, model_config.max_seq_length)
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        encodings = encode_inputs(
            backend, [r["text"] for r in chunk], [r.get("context") for r in chunk], model_config.context_turns
        )
        yield pad_encodings(encodings, tokenizer.pad_token_id, input_names)


def novelty_statistics(cfg: DictConfig, model, tokenizer, taxonomy, model_dir: Path) -> NoveltyModel | None:
    """The novelty statistics for the artifact: the ones `make eval` fitted and tuned the novelty threshold
    on (model_dir/novelty.npz), else fitted here from data.train_file (class means, shared covariance) with
    data.dev_file as the reference CDF; None (no novelty gate) when neither is possible."""
    from kefu_triage.evaluate.calibration import fit_novelty

    stored = model_dir / NOVELTY_FILE
    if stored.is_file():
        return NoveltyModel.load(stored)
    nov = cfg.policy.get("novelty") or {}
    train_file, dev_file = cfg.data.get("train_file"), cfg.data.get("dev_file")
    if not nov.get("enabled", True) or not all(f and Path(f).is_file() for f in (train_file, dev_file)):
        print(
            f"WARNING: {stored} not found and data.train_file/dev_file unavailable (or policy.novelty.enabled="
            "false): the artifact has no novelty statistics, predictions carry novelty null",
            file=sys.stderr,
        )
        return None
    print(
        f"WARNING: {stored} not found (run `make eval` first to tune the novelty threshold): fitting novelty "
        f"statistics on {train_file}",
        file=sys.stderr,
    )
    return fit_novelty(
        lambda rows: predict_logits(model, tokenizer, rows, pooled=True),
        read_examples(train_file, taxonomy),
        read_examples(dev_file, taxonomy),
        taxonomy,
        max_rows=int(nov.get("max_train_rows", 3000)),
        seed=int(nov.get("seed", 0)),
    )


def calibration_records(cfg: DictConfig, taxonomy) -> list[dict[str, Any]]:
    """A fixed random sample of training messages (never the dev messages the parity gate judges)."""
    q = cfg.quantization
    path = q.calibration_file or cfg.data.get("train_file")
    if not path or not Path(path).is_file():
        raise ExportError(
            f"export: activation smoothing needs calibration messages; {path} not found (run "
            "`make data`, set quantization.calibration_file, or quantization.smooth_alpha=null)"
        )
    records = read_examples(path, taxonomy)
    rng = np.random.default_rng(q.calibration_seed)
    pick = rng.choice(len(records), size=min(q.calibration_rows, len(records)), replace=False)
    return [records[i] for i in sorted(pick)]


class ParityCheck:
    """The PyTorch reference on the gate's messages, computed once; each ONNX model is compared against it:
    max |Δprob|, route agreement, intent macro-F1 drop."""

    def __init__(
        self,
        model,
        tokenizer,
        records: list[dict[str, Any]],
        policy: dict[str, Any],
        taxonomy,
        novelty: NoveltyModel | None = None,
    ):
        self.records, self.taxonomy, self.temps = records, taxonomy, policy["temperatures"]
        self.policy = TriagePolicy(taxonomy.routes, Thresholds.from_mapping(policy["thresholds"]))
        logits = predict_logits(model, tokenizer, records, pooled=novelty is not None)
        self.torch_p = probabilities(logits, self.temps)
        # the novelty gate is part of the route, so int8 must agree on it too
        self.torch_novelty = novelty.score(logits[POOLED_OUTPUT]) if novelty is not None else None
        self.torch_routes = self._routes({**self.torch_p, "novelty": self.torch_novelty})
        self.gold = (
            np.array([taxonomy.intent_id(r["intent"]) for r in records])
            if all("intent" in r for r in records)
            else None
        )
        self.torch_macro_f1 = self._macro_f1(self.torch_p["intent"]) if self.gold is not None else None

    def _routes(self, p: dict[str, np.ndarray]) -> np.ndarray:
        return self.policy.decide_heads(p).route

    def _macro_f1(self, intent_p: np.ndarray) -> float:
        return macro_f1(self.gold, intent_p.argmax(1), self.taxonomy.num_intents)

    def compare(self, artifact_dir: Path, precision: str) -> dict[str, float]:
        rt = TriageModel.load(artifact_dir, precision=precision, verify_hashes=False)
        scores = rt.score([r["text"] for r in self.records], [r.get("context") for r in self.records])
        p = probabilities(scores, self.temps)
        novelty = rt.novelty_scores(scores)
        out = {
            f"{precision}_max_abs_prob_diff": float(max(np.abs(p[k] - self.torch_p[k]).max() for k in p)),
            f"{precision}_route_agreement": float(
                (self._routes({**p, "novelty": novelty}) == self.torch_routes).mean()
            ),
        }
        if novelty is not None and self.torch_novelty is not None:
            out[f"{precision}_max_abs_novelty_diff"] = float(np.abs(novelty - self.torch_novelty).max())
        if self.gold is not None:
            out[f"{precision}_intent_macro_f1_drop"] = float(
                self.torch_macro_f1 - self._macro_f1(p["intent"])
            )
        return out


def check_gate(figures: dict[str, float], gate: DictConfig) -> list[str]:
    """The gate's failures among ``figures`` (fp32 and/or int8 ones, whichever are present)."""
    failures = []
    if figures.get("fp32_max_abs_prob_diff", 0.0) > gate.fp32_max_abs_prob_diff:
        failures.append(
            f"fp32 max |Δprob| {figures['fp32_max_abs_prob_diff']:.2e} > {gate.fp32_max_abs_prob_diff}"
        )
    if "int8_route_agreement" in figures and figures["int8_route_agreement"] < gate.int8_min_route_agreement:
        failures.append(
            f"int8 route agreement {figures['int8_route_agreement']:.4f} < {gate.int8_min_route_agreement}"
        )
    if figures.get("int8_intent_macro_f1_drop", 0.0) > gate.int8_max_macro_f1_drop:
        failures.append(
            f"int8 intent macro-F1 drop {figures['int8_intent_macro_f1_drop']:.4f} > {gate.int8_max_macro_f1_drop}"
        )
    return failures


def quantize_until_parity(
    cfg: DictConfig, fp32: Path, int8: Path, feeds: list[dict[str, np.ndarray]] | None, checker: ParityCheck
) -> tuple[dict[str, Any], dict[str, float], list[str]]:
    """Accuracy-aware int8: try ``quantization.op_types_fallback`` in order (each step leaves more of the graph
    in fp32, so it is larger and slower) and keep the first int8 model that passes the gate.

    Returns (quantization summary with every attempt, int8 parity figures, gate failures of the last attempt).
    """
    q = cfg.quantization
    attempts: list[dict[str, Any]] = []
    if not q.op_types_fallback:
        raise ExportError(
            "export: quantization.op_types_fallback is empty; give at least one op-type list ([] = all)"
        )
    prepared_path = int8.with_name(int8.name + ".smoothed.onnx")
    try:  # smoothing does not depend on the op types: once for every attempt
        prepared = prepare_int8(
            fp32, prepared_path, feeds, smooth_alpha=q.smooth_alpha, keep_fp32=list(q.keep_fp32)
        )
        for op_types in q.op_types_fallback:
            summary = quantize_prepared(
                prepared_path, int8, prepared, per_channel=q.per_channel, op_types=list(op_types)
            )
            figures = checker.compare(int8.parent, "int8")
            failures = check_gate(figures, cfg.parity)
            attempts.append(
                {
                    "op_types": summary["op_types"],
                    "bytes": int8.stat().st_size,
                    **figures,
                    "passed": not failures,
                }
            )
            print(
                f"int8 ({summary['op_types']}): {int8.stat().st_size / 1e6:.1f} MB, route agreement "
                f"{figures['int8_route_agreement']:.4f}"
                + (f" -> {'; '.join(failures)}" if failures else " -> passes")
            )
            if not failures:
                break
    finally:
        prepared_path.unlink(missing_ok=True)
    return {**summary, "attempts": attempts}, figures, failures


def model_card(manifest: dict[str, Any]) -> str:
    ev = manifest.get("eval_metrics") or {}
    data = manifest.get("training_data") or {}
    op = manifest["policy"]
    lines = [
        f"# kefu-triage artifact: {manifest['encoder']['name']}",
        "",
        "Triage for Chinese e-commerce customer-service messages: intent (17-way by default), urgent, and "
        "refund_recoverable heads, plus the policy that routes each message to `bot` or `human` with a reason.",
        "",
        "## Intended use",
        "",
        "Call on every incoming customer message (optionally with its previous turns) to decide whether the bot "
        "may answer or a person must. Load with `kefu_triage.runtime.TriageModel.load(dir)` (onnxruntime, "
        "tokenizers, numpy only) or `kefu-triage predict --artifact DIR`.",
        "",
        "## Files",
        "",
    ]
    lines += [
        f"- `{n}` ({f['bytes'] / 1e6:.1f} MB, sha256 {f['sha256'][:12]}…)"
        for n, f in manifest["files"].items()
    ]
    lines += [
        "",
        "## Data",
        "",
        f"Trained on: {json.dumps(data.get('files', {}), ensure_ascii=False)}.",
        f"Rows: {json.dumps({k: v.get('rows') for k, v in (data.get('splits') or {}).items()})}.",
        "",
        "## Policy",
        "",
        f"Thresholds {op['thresholds']}; temperatures {manifest['calibration']['temperatures']}; "
        f"operating point {op.get('operating_point')}, met on dev: {op.get('constraints_met')}.",
        "",
        "## Metrics (from `make eval` on the test split)",
        "",
    ]
    lines += [f"- {k}: {v:.4f}" if isinstance(v, float) else f"- {k}: {v}" for k, v in ev.items()] or [
        "- not evaluated"
    ]
    qz = manifest.get("quantization") or {}
    lines += [
        "",
        "## Quantisation",
        "",
        f"`model.int8.onnx`: {qz.get('method')}; quantised op types: {qz.get('op_types')}; smoothing alpha "
        f"{qz.get('smooth_alpha')}; kept in fp32: {qz.get('fp32_nodes')}. Attempts, in order:",
        "",
    ]
    lines += [
        f"- {a['op_types']}: {a['bytes'] / 1e6:.1f} MB, route agreement {a['int8_route_agreement']:.4f}, "
        f"{'passed' if a['passed'] else 'failed'} the gate"
        for a in qz.get("attempts", [])
    ]
    lines += ["", "## Parity (export gate on dev)", ""] + [
        f"- {k}: {v}" for k, v in manifest["parity"].items()
    ]
    lines += [
        "",
        "## Limits",
        "",
        "- The default training data is generated from hand-written seeds and templates; measure on your own "
        'labelled traffic (`make eval ARGS="data.eval_file=..."`) before relying on the figures.',
        "- Messages are cut to the first "
        f"{manifest['input']['max_length']} tokens; only the last {manifest['input']['context_turns']} "
        "previous turns are used.",
        "- Thresholds were tuned for the operating point above; re-tune for yours.",
        "",
    ]
    return "\n".join(lines)


def export(cfg: DictConfig) -> dict[str, Any]:
    model_dir, out_dir = Path(cfg.model_dir), Path(cfg.output_dir)
    model, tokenizer = load_model(model_dir)
    mcfg = model.config
    taxonomy = mcfg.get_taxonomy()
    policy = load_policy(model_dir, cfg)
    input_names = ["input_ids", "attention_mask"]
    if "token_type_ids" in tokenizer.model_input_names:
        input_names.append("token_type_ids")
    parity_file = cfg.parity.file or (Path(cfg.data.dev_file) if cfg.data.get("dev_file") else None)
    if not parity_file or not Path(parity_file).is_file():
        raise ExportError(
            f"export: the parity gate needs labelled dev data; {parity_file} not found (run `make data`)"
        )
    records = read_examples(parity_file, taxonomy)[: cfg.parity.max_rows]

    with atomic_directory(out_dir) as tmp:
        export_onnx(model, input_names, tmp / "model.raw.onnx", cfg.opset)
        enc = model.encoder.config
        fused = optimize(tmp / "model.raw.onnx", tmp / "model.onnx", enc.num_attention_heads, enc.hidden_size)
        (tmp / "model.raw.onnx").unlink()
        tokenizer.backend_tokenizer.save(str(tmp / "tokenizer.json"))
        novelty = novelty_statistics(cfg, model, tokenizer, taxonomy, model_dir)
        if novelty is not None:
            novelty.save(tmp / NOVELTY_FILE)
        data_summary = model_dir / "data_summary.json"
        eval_summary = policy.get("test_metrics") or {}
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "kefu_triage_version": __version__,
            "taxonomy": taxonomy.to_dict(),
            "heads": {
                "intent": {"labels": taxonomy.intent_names, "routes": taxonomy.routes},
                "urgent": {"labels": ["not_urgent", "urgent"]},
                "refund_recoverable": {
                    "labels": ["firm", "recoverable"],
                    "defined_for": taxonomy.refund_intents,
                },
            },
            "calibration": {"temperatures": policy["temperatures"]},
            "policy": {
                "thresholds": policy["thresholds"],
                "operating_point": policy.get("operating_point"),
                "constraints_met": policy.get("constraints_met"),
            },
            "input": {
                "names": input_names,
                "max_length": mcfg.max_seq_length,
                "context_turns": mcfg.context_turns,
                "role_prefix": ROLE_PREFIX,
                "max_message_chars": MAX_MESSAGE_CHARS,
                "max_turn_chars": MAX_TURN_CHARS,
                "pad_token_id": tokenizer.pad_token_id,
            },
            "output": {"names": list(OUTPUT_NAMES), "pooled": POOLED_OUTPUT},
            "novelty": None
            if novelty is None
            else {
                "file": NOVELTY_FILE,
                "method": NOVELTY_METHOD,
                "classes": int(novelty.means.shape[0]),
                "reference_points": int(len(novelty.reference)),
                "shrinkage": novelty.shrinkage,
                "scale": "empirical CDF of held-out reference messages: novelty 0.95 = more unusual than 95%",
            },
            "encoder": {
                "name": mcfg.encoder_name,
                "hidden_size": enc.hidden_size,
                "layers": enc.num_hidden_layers,
                "vocab_size": enc.vocab_size,
                "pooling": mcfg.pooling,
                # which model this is: a distilled student names its teacher (kefu_triage.train.distill)
                "role": "student" if getattr(mcfg, "distilled_from", None) else "trained",
                "distilled_from": getattr(mcfg, "distilled_from", None),
            },
            "training_data": json.loads(data_summary.read_text(encoding="utf-8"))
            if data_summary.is_file()
            else None,
            "eval_metrics": eval_summary,
            "fused_ops": fused,
            "quantization": None,
            "package_versions": {
                p: _version(p)
                for p in ("torch", "transformers", "onnx", "onnxruntime", "tokenizers", "numpy")
            }
            | {"python": platform.python_version()},
            "files": {},
        }
        # first without hashes (the parity runs load it), then the real manifest
        write_manifest(tmp, manifest)
        checker = ParityCheck(model, tokenizer, records, policy, taxonomy, novelty)
        figures = {"rows": len(records), **checker.compare(tmp, "fp32")}
        failures = check_gate(figures, cfg.parity)
        if failures and cfg.parity.enforce:
            raise ExportError(
                "parity gate failed: " + "; ".join(failures) + f" (previous artifact at {out_dir} kept)"
            )
        q = cfg.quantization
        calib = calibration_records(cfg, taxonomy) if q.smooth_alpha else []
        feeds = list(calibration_feeds(tokenizer, mcfg, calib, input_names)) if calib else None
        quantization, int8_figures, int8_failures = quantize_until_parity(
            cfg, tmp / "model.onnx", tmp / "model.int8.onnx", feeds, checker
        )
        if q.smooth_alpha:
            quantization["calibration"] = {"rows": len(calib), "seed": q.calibration_seed}
        figures |= int8_figures
        failures += int8_failures
        print("parity: " + ", ".join(f"{k}={v:.6g}" for k, v in figures.items()))
        if failures and cfg.parity.enforce:
            raise ExportError(
                "parity gate failed: " + "; ".join(failures) + " (with every quantization."
                f"op_types_fallback step; previous artifact at {out_dir} kept)"
            )
        manifest["quantization"] = quantization
        manifest["parity"] = {**figures, "passed": not failures}
        manifest["files"] = {
            n: {"sha256": sha256_file(tmp / n), "bytes": (tmp / n).stat().st_size}
            for n in ("model.onnx", "model.int8.onnx", "tokenizer.json")
            + ((NOVELTY_FILE,) if novelty is not None else ())
        }
        atomic_write_text(tmp / "README.md", model_card(manifest))
        manifest["files"]["README.md"] = {
            "sha256": sha256_file(tmp / "README.md"),
            "bytes": (tmp / "README.md").stat().st_size,
        }
        manifest = write_manifest(tmp, manifest)  # with manifest_sha256: triage.json covers itself
        TriageModel.load(tmp)  # the artifact as a user will load it: hashes and schema verified
    shutil.rmtree(out_dir / "__pycache__", ignore_errors=True)
    return manifest


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None
