import json

import pytest

from kefu_triage.cli import main as cli_main
from kefu_triage.evaluate.regress import RegressError, compare, flatten, load_tolerances, regress

BASE = {
    "model": {
        "intent": {"macro_f1": 0.80},
        "urgent": {"recall": 0.90},
        "triage": {"coverage": 0.70, "risk": 0.04},
    },
    "bench": {"int8": {"speedup": 5.0}},
}
TOL = {
    "model.intent.macro_f1": {"max_drop": 0.01},
    "model.urgent.recall": {"max_drop": 0.02},
    "model.triage.risk": {"max_rise": 0.02},
    "bench.*.speedup": {"max_rel_drop": 0.2},
}


def _with(path, value):
    cur = json.loads(json.dumps(BASE))
    node = cur
    *parents, leaf = path.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value
    return cur


def _write(tmp_path, name, obj):
    p = tmp_path / name
    p.write_text(json.dumps(obj) if not isinstance(obj, str) else obj, encoding="utf-8")
    return p


def test_flatten_skips_non_numeric():
    assert flatten({"a": {"b": 1, "c": "x", "d": [1, 2], "e": True}}) == {"a.b": 1.0}


def test_identical_metrics_pass():
    assert all(c.ok for c in compare(BASE, BASE, TOL))


@pytest.mark.parametrize(
    "path,value,ok",
    [
        ("model.intent.macro_f1", 0.7905, True),  # dropped 0.0095 <= 0.01
        ("model.intent.macro_f1", 0.785, False),  # dropped 0.015
        ("model.intent.macro_f1", 0.95, True),  # improvements always pass
        ("model.triage.risk", 0.055, True),
        ("model.triage.risk", 0.07, False),  # lower is better: a rise of 0.03 fails
        ("bench.int8.speedup", 4.1, True),  # -18% relative
        ("bench.int8.speedup", 3.9, False),  # -22% relative
    ],
)
def test_tolerance_rules(path, value, ok):
    checks = {c.metric: c for c in compare(BASE, _with(path, value), TOL)}
    assert checks[path].ok is ok


def test_missing_metric_in_current_fails():
    cur = json.loads(json.dumps(BASE))
    del cur["model"]["urgent"]
    bad = [c for c in compare(BASE, cur, TOL) if not c.ok]
    assert [c.metric for c in bad] == ["model.urgent.recall"] and "missing in current" in bad[0].note


def test_cli_exit_codes_and_table(tmp_path, capsys):
    tol = _write(tmp_path, "tol.json", {"metrics": TOL})
    base = _write(tmp_path, "base.json", BASE)
    assert (
        cli_main(["regress", "--baseline", str(base), "--current", str(base), "--tolerances", str(tol)]) == 0
    )
    worse = _write(tmp_path, "cur.json", _with("model.urgent.recall", 0.80))
    assert (
        cli_main(["regress", "--baseline", str(base), "--current", str(worse), "--tolerances", str(tol)]) == 1
    )
    out = capsys.readouterr().out
    assert "model.urgent.recall" in out and "REGRESSED" in out


def test_bad_inputs_name_the_file(tmp_path):
    tol = _write(tmp_path, "tol.json", {"metrics": TOL})
    broken = _write(tmp_path, "broken.json", "{not json")
    with pytest.raises(RegressError, match="broken.json"):
        regress(broken, broken, tol)
    with pytest.raises(RegressError, match="not found"):
        regress(tmp_path / "nope.json", broken, tol)
    with pytest.raises(RegressError, match="unknown rule"):
        load_tolerances(_write(tmp_path, "t2.json", {"metrics": {"a": {"max_fall": 1}}}))


def test_packaged_tolerances_load():
    rules = load_tolerances()
    assert "model.intent.macro_f1" in rules
