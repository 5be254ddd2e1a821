"""`make bench-train`: one row per encoder and precision, each with its speed relative to float32."""

from __future__ import annotations

import json

from kefu_triage.bench import training


def test_training_bench_compares_each_precision_with_float32(tmp_path, capsys, monkeypatch):
    import kefu_triage.train.loop as loop

    monkeypatch.setattr(loop, "native_cpu_bf16", lambda: True)  # the parent resolves auto; children measure
    out = tmp_path / "bench_train.json"
    rc = training.main(
        ["--models", "tiny", "--precisions", "no", "auto", "bf16", "--steps", "1", "--warmup", "1"]
        + ["--threads", "1", "--output", str(out)]
    )
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["settings"]["precisions"] == ["no", "bf16"]  # auto resolved to bf16, each setting once
    rows = {r["precision"]: r for r in report["results"]}
    assert set(rows) == {"no", "bf16"} and all(r["model"] == "tiny" for r in rows.values())
    assert rows["no"]["speedup_vs_fp32"] == 1.0
    ratio = rows["bf16"]["examples_per_s"] / rows["no"]["examples_per_s"]
    assert abs(rows["bf16"]["speedup_vs_fp32"] - ratio) < 0.01
    table = capsys.readouterr().out
    assert "| tiny | bf16 |" in table and "vs float32" in table


def test_unknown_precision_is_refused_naming_the_option(capsys):
    import pytest

    with pytest.raises(SystemExit) as exc:
        training.main(["--models", "tiny", "--precisions", "half", "--output", ""])
    assert exc.value.code == 2 and "--precisions" in capsys.readouterr().err
