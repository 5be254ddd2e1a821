"""The built wheel works without the checkout: `kefu-triage validate`, `regress` and `predict` run from a
directory that is not the repository, importing the package from the unpacked wheel only.

The wheel is installed with `pip install --target` and put on PYTHONPATH; the venv's interpreter supplies
the dependencies. The build copies the sources to a temporary directory first, so it leaves no build/ or
egg-info in the checkout and cannot pick up files that are not in src/.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from kefu_triage.core.resources import resource_path

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # builds a wheel and needs the smoke artifact (~1-2 min with the fixture)


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """Build the wheel from a copy of the sources and install it into a bare target directory."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src_copy"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    dist, site = tmp / "dist", tmp / "site"
    # no build isolation: setuptools comes from the venv, so the test needs no network
    build = _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(src),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(dist),
        ],
        cwd=tmp,
        env=os.environ.copy(),
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = dist.glob("kefu_triage-*.whl")
    install = _run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-compile",
            "-q",
            "--target",
            str(site),
            str(wheel),
        ],
        cwd=tmp,
        env=os.environ.copy(),
    )
    assert install.returncode == 0, install.stderr
    script = site / "bin" / "kefu-triage"
    assert script.is_file(), "the wheel declares no kefu-triage console script"
    work = tmp / "elsewhere"  # the cwd of every command: neither the repo nor the install
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "KEFU_ROOT")}
    env.update(PYTHONPATH=str(site), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONNOUSERSITE="1")
    return {
        "wheel": wheel,
        "site": site,
        "work": work,
        "env": env,
        # the console script's shebang is the interpreter pip ran with (the venv's)
        "cli": [sys.executable, str(script)],
    }


def test_wheel_ships_every_packaged_resource(installed):
    names = set(zipfile.ZipFile(installed["wheel"]).namelist())
    root = resource_path()
    expected = {
        f"kefu_triage/resources/{p.relative_to(root).as_posix()}"
        for p in root.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert expected - names == set()
    for must in (
        "conf/taxonomy/ecommerce_zh.yaml",
        "conf/regress/default.yaml",
        "conf/model/e5_small_zh.yaml",
        "conf/model/tiny.yaml",
        "templates/lexicon.yaml",
        "seed/logistics.jsonl",
    ):
        assert f"kefu_triage/resources/{must}" in names
    assert not any(n.startswith(("configs/", "tests/")) for n in names)


def test_imports_come_from_the_wheel_not_the_checkout(installed):
    probe = _run(
        [
            sys.executable,
            "-c",
            "import kefu_triage.cli, kefu_triage.core.resources as r; "
            "print(kefu_triage.cli.__file__); print(r.resource_path('conf'))",
        ],
        cwd=installed["work"],
        env=installed["env"],
    )
    assert probe.returncode == 0, probe.stderr
    site = installed["site"].resolve()
    for line in probe.stdout.split():
        assert Path(line).resolve().is_relative_to(site), f"{line} is not under the installed wheel {site}"


def test_validate_runs_from_another_directory(installed):
    work = installed["work"]
    good = work / "good.jsonl"
    rows = [
        {"text": "快递三天没动了", "intent": "logistics", "urgent": 0, "refund_recoverable": None},
        {
            "text": "尺码小了想退，能换大一码吗",
            "intent": "return_refund",
            "urgent": 0,
            "refund_recoverable": 1,
        },
        {
            "text": "是的",
            "context": [{"role": "agent", "text": "亲 是要开发票吗"}],
            "intent": "invoice",
            "urgent": 0,
            "refund_recoverable": None,
        },
    ]
    good.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    ok = _run([*installed["cli"], "validate", str(good)], cwd=work, env=installed["env"])
    assert ok.returncode == 0, ok.stderr
    assert f"{good}: OK, 3 rows" in ok.stdout and "all 1 file(s) valid" in ok.stdout

    bad = work / "bad.jsonl"  # the packaged taxonomy is what rejects the intent
    bad.write_text(
        json.dumps({"text": "在吗", "intent": "no_such_intent", "urgent": 0}) + "\n", encoding="utf-8"
    )
    res = _run([*installed["cli"], "validate", str(bad)], cwd=work, env=installed["env"])
    assert res.returncode == 1
    assert f"{bad}:1" in res.stderr and "no_such_intent" in res.stderr


def test_regress_uses_the_packaged_tolerances(installed):
    work = installed["work"]

    def metrics(name: str, macro_f1: float) -> Path:
        path = work / name
        model = {
            "intent": {"macro_f1": macro_f1},
            "urgent": {"recall": 0.9},
            "triage": {"coverage": 0.5, "risk": 0.05},
        }
        path.write_text(json.dumps({"model": model}), encoding="utf-8")
        return path

    base, same, worse = metrics("base.json", 0.80), metrics("same.json", 0.795), metrics("worse.json", 0.70)
    ok = _run(
        [*installed["cli"], "regress", "--baseline", str(base), "--current", str(same)],
        cwd=work,
        env=installed["env"],
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "4/4 metrics within tolerance" in ok.stdout  # the four rules of conf/regress/default.yaml
    bad = _run(
        [*installed["cli"], "regress", "--baseline", str(base), "--current", str(worse)],
        cwd=work,
        env=installed["env"],
    )
    assert bad.returncode == 1
    assert "model.intent.macro_f1" in bad.stdout and "REGRESSED" in bad.stdout


def test_predict_scores_with_the_smoke_artifact(installed, smoke):
    texts = ["快递三天没动了，急用！", "发票怎么开"]
    res = _run(
        [*installed["cli"], "predict", "--artifact", str(smoke["artifact"]), *texts],
        cwd=installed["work"],
        env=installed["env"],
    )
    assert res.returncode == 0, res.stderr
    preds = [json.loads(line) for line in res.stdout.splitlines()]
    assert [p["text"] for p in preds] == texts
    for p in preds:
        assert p["route"] in ("bot", "human") and 0.0 <= p["urgent_prob"] <= 1.0
        assert p["intent"] in {t["intent"] for t in p["top_intents"]}
    missing = _run(
        [*installed["cli"], "predict", "--artifact", str(installed["work"] / "nope"), "在吗"],
        cwd=installed["work"],
        env=installed["env"],
    )
    assert missing.returncode != 0 and "nope" in missing.stderr and "Traceback" not in missing.stderr
