"""Where the package's own data lives (importlib.resources), so an installed wheel works from any directory."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def resource_path(*parts: str) -> Path:
    """A file or folder under ``kefu_triage/resources`` (seeds, templates, packaged configs)."""
    return Path(str(files("kefu_triage").joinpath("resources", *parts)))


def packaged_config(group: str, name: str) -> Path:
    """A Hydra config shipped in the package, e.g. ``packaged_config("model", "e5_small_zh")``."""
    return resource_path("conf", group, f"{name}.yaml")
