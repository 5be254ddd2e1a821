"""Export: fused graph, parity gate, and atomicity (a failed or killed export leaves the old artifact)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import compose
from kefu_triage.export.build import ExportError, export, quantize_until_parity
from kefu_triage.runtime.model import TriageModel

ROOT = Path(__file__).resolve().parents[2]


def test_artifact_is_fused_quantised_and_self_describing(smoke):
    art = smoke["artifact"]
    manifest = json.loads((art / "triage.json").read_text())
    assert manifest["fused_ops"].get("Attention", 0) == 2  # one per layer of the tiny encoder
    # residual + LayerNorm left unfused on purpose (faster at message shapes, export.build.optimize)
    assert "SkipLayerNormalization" not in manifest["fused_ops"]
    assert manifest["fused_ops"].get("LayerNormalization", 0) >= 4
    assert (
        manifest["parity"]["fp32_max_abs_prob_diff"] <= 1e-4
        and manifest["parity"]["int8_route_agreement"] >= 0.99
    )
    # the shipped step is the first that passed the gate; all-ops int8 (embeddings too) halves the file at least
    q = manifest["quantization"]
    passed = [a["passed"] for a in q["attempts"]]
    assert passed[-1] and not any(passed[:-1]) and q["op_types"] == q["attempts"][-1]["op_types"]
    int8, fp32 = (art / "model.int8.onnx").stat().st_size, (art / "model.onnx").stat().st_size
    assert int8 < (fp32 / 2 if len(passed) == 1 else fp32)
    assert set(manifest["files"]) == {
        "model.onnx",
        "model.int8.onnx",
        "tokenizer.json",
        "novelty.npz",
        "README.md",
    }
    for key in (
        "taxonomy",
        "heads",
        "calibration",
        "policy",
        "input",
        "output",
        "encoder",
        "training_data",
        "eval_metrics",
        "package_versions",
    ):
        assert manifest[key] is not None, key
    assert "Intended use" in (art / "README.md").read_text(encoding="utf-8")


def _cfg(smoke, out, *extra):
    return compose(
        "export",
        [
            f"paths.root_dir={smoke['root']}",
            f"data.dir={smoke['data_dir']}",
            f"model_dir={smoke['model_dir']}",
            f"output_dir={out}",
            *extra,
        ],
    )


def test_failed_parity_gate_keeps_previous_artifact(smoke, tmp_path):
    out = tmp_path / "art"
    export(_cfg(smoke, out))
    before = (out / "triage.json").read_bytes()
    with pytest.raises(ExportError, match="parity gate failed: fp32 max"):
        export(_cfg(smoke, out, "parity.fp32_max_abs_prob_diff=0"))
    assert (out / "triage.json").read_bytes() == before
    with pytest.raises(
        ExportError, match="int8 route agreement .* every quantization.op_types_fallback step"
    ):
        export(_cfg(smoke, out, "parity.int8_min_route_agreement=1.01"))
    assert (out / "triage.json").read_bytes() == before
    TriageModel.load(out)
    assert not list(tmp_path.glob(".art.tmp-*"))


def test_killed_export_keeps_previous_artifact(smoke, tmp_path):
    out = tmp_path / "art"
    export(_cfg(smoke, out))
    before = (out / "triage.json").read_bytes()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kefu_triage.export",
            f"paths.root_dir={smoke['root']}",
            f"data.dir={smoke['data_dir']}",
            f"model_dir={smoke['model_dir']}",
            f"output_dir={out}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while not list(tmp_path.glob(".art.tmp-*/model.onnx")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL  # it was killed mid-export, not finished
    assert (out / "triage.json").read_bytes() == before
    TriageModel.load(out)  # still verifies: no file of it was touched
    export(_cfg(smoke, out))  # the next export cleans the stale temp dir and succeeds
    assert not list(tmp_path.glob(".art.tmp-*"))


def test_int8_falls_back_to_fewer_op_types_until_the_gate_passes(smoke, tmp_path):
    shutil.copy(smoke["artifact"] / "model.onnx", tmp_path / "model.onnx")
    cfg = _cfg(
        smoke,
        tmp_path / "unused",
        "quantization.smooth_alpha=null",
        "quantization.op_types_fallback=[[],[MatMul],[Gather]]",
    )
    sizes = []

    class Checker:  # stands in for the PyTorch comparison: only the second int8 model passes
        def compare(self, artifact_dir, precision):
            sizes.append((artifact_dir / "model.int8.onnx").stat().st_size)
            return {"int8_route_agreement": 0.995 if len(sizes) == 2 else 0.9}

    summary, figures, failures = quantize_until_parity(
        cfg, tmp_path / "model.onnx", tmp_path / "model.int8.onnx", None, Checker()
    )
    assert not failures and figures["int8_route_agreement"] == 0.995
    assert [a["op_types"] for a in summary["attempts"]] == ["all supported", ["MatMul"]]
    assert [a["passed"] for a in summary["attempts"]] == [False, True]
    assert sizes[1] > sizes[0]  # MatMul-only leaves the embeddings in fp32
    assert (tmp_path / "model.int8.onnx").stat().st_size == sizes[1]  # the passing model is the one kept

    sizes.clear()
    cfg.quantization.op_types_fallback = [[]]
    summary, _, failures = quantize_until_parity(
        cfg, tmp_path / "model.onnx", tmp_path / "model.int8.onnx", None, Checker()
    )
    assert failures == ["int8 route agreement 0.9000 < 0.99"] and len(summary["attempts"]) == 1
