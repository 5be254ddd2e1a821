"""Int8 quantisation: smoothing keeps the fp32 function, evens out outlier channels, and keep_fp32 works."""

import json
import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from kefu_triage.export.quantize import match_nodes, quantize_int8, smooth_activations

HIDDEN = 64


def _two_matmul_graph(path=None, tied=False):
    """x[B, L, 64] -> MatMul(W1) -> MatMul(W2) -> y; W2 may be W1 itself (a tied weight)."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.normal(0, 0.1, (HIDDEN, HIDDEN)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.normal(0, 0.1, (HIDDEN, HIDDEN)).astype(np.float32), "w2")
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="layer.0/dense/MatMul"),
        helper.make_node("MatMul", ["h", "w1" if tied else "w2"], ["y"], name="layer.1/dense/MatMul"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None, HIDDEN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, None, HIDDEN])],
        [w1] if tied else [w1, w2],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    if path is not None:
        onnx.save(model, str(path))
    return model


def _activations(n_batches=4, outlier=40.0, seed=1):
    """Ordinary channels ~N(0, 1) and one channel that is ``outlier`` times larger (as in e5's hidden states)."""
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(n_batches):
        x = rng.normal(0, 1, (8, 12, HIDDEN)).astype(np.float32)
        x[..., 5] *= outlier
        batches.append({"x": x})
    return batches


def _run(model_or_path, x):
    src = (
        model_or_path.SerializeToString()
        if isinstance(model_or_path, onnx.ModelProto)
        else str(model_or_path)
    )
    return ort.InferenceSession(src, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_smoothing_keeps_the_fp32_function():
    model = _two_matmul_graph()
    smoothed, count = smooth_activations(model, _activations(), alpha=0.8)
    assert count == 2
    assert [n.op_type for n in smoothed.graph.node] == ["Mul", "MatMul", "Mul", "MatMul"]
    x = _activations(1, seed=7)[0]["x"]
    np.testing.assert_allclose(_run(smoothed, x), _run(model, x), rtol=1e-4, atol=1e-4)
    # the input model is not modified in place
    assert [n.op_type for n in model.graph.node] == ["MatMul", "MatMul"]


def test_smoothing_cuts_int8_error_on_an_outlier_channel(tmp_path):
    _two_matmul_graph(tmp_path / "fp32.onnx")
    x = _activations(1, seed=7)[0]["x"]
    reference = _run(tmp_path / "fp32.onnx", x)
    errors = {}
    for alpha in (None, 0.8):
        out = tmp_path / f"int8-{alpha}.onnx"
        summary = quantize_int8(
            tmp_path / "fp32.onnx", out, _activations() if alpha else None, smooth_alpha=alpha
        )
        assert summary["smoothed_nodes"] == (2 if alpha else 0)
        assert any(
            n.op_type.startswith(("DynamicQuantize", "MatMulInteger")) for n in onnx.load(str(out)).graph.node
        )
        errors[alpha] = float(np.abs(_run(out, x) - reference).mean())
    # one outlier channel squeezes every other channel into a few int8 levels unless it is smoothed
    assert errors[0.8] < errors[None] / 2, errors
    assert not list(tmp_path.glob("*.smoothed.onnx"))  # the intermediate graph is cleaned up


def test_keep_fp32_leaves_matching_nodes_unquantised(tmp_path, caplog):
    _two_matmul_graph(tmp_path / "fp32.onnx")
    with caplog.at_level(logging.WARNING, logger="kefu_triage.export.quantize"):
        summary = quantize_int8(
            tmp_path / "fp32.onnx",
            tmp_path / "int8.onnx",
            _activations(),
            smooth_alpha=0.8,
            keep_fp32=["layer.1/", "no/such/node"],
        )
    assert summary["fp32_nodes"] == ["layer.1/dense/MatMul"]
    assert summary["smoothed_nodes"] == 1  # the fp32 node needs no smoothing
    ops = {n.name: n.op_type for n in onnx.load(str(tmp_path / "int8.onnx")).graph.node}
    assert ops["layer.1/dense/MatMul"] == "MatMul"
    assert "no/such/node" in caplog.text
    x = _activations(1, seed=3)[0]["x"]
    assert np.isfinite(_run(tmp_path / "int8.onnx", x)).all()


def test_tied_weights_are_not_smoothed():
    smoothed, count = smooth_activations(_two_matmul_graph(tied=True), _activations(), alpha=0.5)
    assert count == 0
    assert [n.op_type for n in smoothed.graph.node] == ["MatMul", "MatMul"]


def test_bad_settings_are_clear_errors(tmp_path):
    _two_matmul_graph(tmp_path / "fp32.onnx")
    with pytest.raises(ValueError, match="smooth_alpha must be in"):
        smooth_activations(_two_matmul_graph(), _activations(), alpha=1.5)
    with pytest.raises(ValueError, match="no calibration messages"):
        quantize_int8(tmp_path / "fp32.onnx", tmp_path / "int8.onnx", None, smooth_alpha=0.8)
    with pytest.raises(ValueError, match="at least one calibration batch"):
        smooth_activations(_two_matmul_graph(), [], alpha=0.8)


def test_match_nodes_by_substring():
    assert match_nodes(_two_matmul_graph(), ["dense/MatMul"]) == [
        "layer.0/dense/MatMul",
        "layer.1/dense/MatMul",
    ]


def test_smoke_artifact_records_its_quantisation(smoke):
    manifest = json.loads((smoke["artifact"] / "triage.json").read_text())
    q = manifest["quantization"]
    assert q["smooth_alpha"] == 0.8 and q["per_channel"] is True
    # both fused attention ops and all four dense MatMuls of the 2-layer tiny encoder, minus the one kept fp32
    assert q["smoothed_nodes"] >= 4 and q["fp32_nodes"] == [
        "/model/encoder/encoder/layer.0/output/dense/MatMul"
    ]
    assert q["calibration"]["rows"] > 0
    assert q["attempts"][-1]["passed"] is True and q["attempts"][-1]["op_types"] == q["op_types"]
    assert all(not a["passed"] for a in q["attempts"][:-1])
