"""The artifact contract: what an exported artifact directory holds and how its manifest is checked.

The exporter writes it and the runtime reads it; both import this module (numpy-free, torch-free).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kefu_triage.core.fileio import sha256_file

SCHEMA_VERSION = 1
MANIFEST = "triage.json"
MODEL_FILES = {"int8": "model.int8.onnx", "fp32": "model.onnx"}


class ArtifactError(ValueError):
    """An artifact directory that is incomplete, altered, or of another schema."""


def read_manifest(artifact_dir: str | Path, verify_hashes: bool = True) -> dict[str, Any]:
    """triage.json, checked: schema version, every listed file present with its sha256."""
    artifact_dir = Path(artifact_dir)
    path = artifact_dir / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{path}: missing; {artifact_dir} is not a kefu-triage artifact (export one with `make export`)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path}: not valid JSON ({exc})") from None
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ArtifactError(f"{path}: schema_version {version!r}, this runtime reads {SCHEMA_VERSION}; "
                            "re-export the artifact with this version of kefu-triage")
    for name, expected in (manifest.get("files") or {}).items():
        f = artifact_dir / name
        if not f.is_file():
            raise ArtifactError(f"{f}: missing (listed in {MANIFEST})")
        if verify_hashes and sha256_file(f) != expected.get("sha256"):
            raise ArtifactError(f"{f}: sha256 does not match {MANIFEST}: the file was changed or corrupted")
    return manifest
