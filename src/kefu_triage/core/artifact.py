"""The artifact contract: what an exported artifact directory holds and how its manifest is checked.

The exporter writes it and the runtime reads it; both import this module (numpy-free, torch-free).

``triage.json`` protects itself: ``manifest_sha256`` is the sha256 of the canonical JSON of every other
field, so a hand-edited threshold or a removed ``files`` entry is refused at load. A deliberate policy
change goes through ``kefu-triage set-policy`` (:func:`set_policy`), which rewrites and re-hashes it.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kefu_triage.core.fileio import atomic_write_bytes, sha256_file

SCHEMA_VERSION = 1
MANIFEST = "triage.json"
MANIFEST_HASH_FIELD = "manifest_sha256"
MODEL_FILES = {"int8": "model.int8.onnx", "fp32": "model.onnx"}
REQUIRED_FILES = ("tokenizer.json",)  # plus at least one of MODEL_FILES


class ArtifactError(ValueError):
    """An artifact directory that is incomplete, altered, or of another schema."""


# ---- manifest structure --------------------------------------------------------------------------------
def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {dict: "object", list: "array", str: "string"}.get(type(value), type(value).__name__)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


_SHA256 = re.compile(r"[0-9a-f]{64}")
# (dotted field, required, check, what the check wants). Sections the runtime reads are required; the
# descriptive ones the exporter adds are type-checked when present.
_Check = Callable[[Any], bool]
_FIELDS: tuple[tuple[str, bool, _Check, str], ...] = (
    ("kefu_triage_version", False, lambda v: isinstance(v, str), "a string"),
    ("taxonomy", True, lambda v: isinstance(v, dict), "an object"),
    ("heads", False, lambda v: isinstance(v, dict), "an object"),
    ("calibration", True, lambda v: isinstance(v, dict), "an object"),
    (
        "calibration.temperatures",
        True,
        lambda v: isinstance(v, dict) and all(_is_number(t) and t > 0 for t in v.values()),
        "an object of positive numbers",
    ),
    ("policy", True, lambda v: isinstance(v, dict), "an object"),
    (
        "policy.thresholds",
        True,
        lambda v: isinstance(v, dict) and all(_is_number(t) for t in v.values()),
        "an object of numbers",
    ),
    ("input", True, lambda v: isinstance(v, dict), "an object"),
    (
        "input.names",
        True,
        lambda v: isinstance(v, list) and v and all(isinstance(n, str) for n in v),
        "a non-empty array of strings",
    ),
    ("input.max_length", True, lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    ("input.context_turns", True, lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    ("input.pad_token_id", True, lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    ("output", False, lambda v: isinstance(v, dict), "an object"),
    ("encoder", False, lambda v: isinstance(v, dict), "an object"),
    ("quantization", False, lambda v: v is None or isinstance(v, dict), "an object or null"),
    ("parity", False, lambda v: isinstance(v, dict), "an object"),
    ("files", True, lambda v: isinstance(v, dict), "an object"),
    (
        MANIFEST_HASH_FIELD,
        True,
        lambda v: isinstance(v, str) and _SHA256.fullmatch(v) is not None,
        "a sha256 hex digest",
    ),
)
_MISSING = object()


def _get(manifest: dict[str, Any], dotted: str) -> Any:
    value: Any = manifest
    for key in dotted.split("."):
        if not isinstance(value, dict) or key not in value:
            return _MISSING
        value = value[key]
    return value


def validate_manifest(manifest: Any, source: str = MANIFEST) -> dict[str, Any]:
    """Check the manifest's structure (sections, types, the ``files`` entries); raise ArtifactError naming
    ``source`` and the field. Hashes are checked by :func:`read_manifest`."""
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{source}: must be a JSON object, got {_json_type(manifest)}")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ArtifactError(
            f"{source}: schema_version {version!r}, this runtime reads {SCHEMA_VERSION}; "
            "re-export the artifact with this version of kefu-triage"
        )
    for field, required, check, wants in _FIELDS:
        value = _get(manifest, field)
        if value is _MISSING:
            if required:
                hint = (
                    (
                        " (exported by an older kefu-triage? re-export it, or run `kefu-triage set-policy --artifact "
                        "DIR` to verify its files and add the hash)"
                    )
                    if field == MANIFEST_HASH_FIELD
                    else ""
                )
                raise ArtifactError(f"{source}: field {field!r} is missing{hint}")
            continue
        if not check(value):
            raise ArtifactError(
                f"{source}: field {field!r} must be {wants}, got {_json_type(value)} {_short(value)}"
            )
    for name, entry in manifest["files"].items():
        where = f"{source}: field 'files.{name}'"
        if name in ("", ".", "..", MANIFEST) or "/" in name or "\\" in name:
            raise ArtifactError(f"{where}: not a plain file name of the artifact directory")
        if not isinstance(entry, dict):
            raise ArtifactError(
                f"{where} must be an object with 'sha256' and 'bytes', got {_json_type(entry)}"
            )
        if not (isinstance(entry.get("sha256"), str) and _SHA256.fullmatch(entry["sha256"])):
            raise ArtifactError(
                f"{where}.sha256 must be a sha256 hex digest, got {_short(entry.get('sha256'))}"
            )
        if not (_is_int(entry.get("bytes")) and entry["bytes"] >= 0):
            raise ArtifactError(f"{where}.bytes must be an integer >= 0, got {_short(entry.get('bytes'))}")
    return manifest


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


# ---- manifest integrity --------------------------------------------------------------------------------
def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of the canonical JSON (sorted keys, no whitespace) of every field but ``manifest_sha256``:
    reformatting the file keeps it, changing any value does not."""
    rest = {k: v for k, v in manifest.items() if k != MANIFEST_HASH_FIELD}
    canonical = json.dumps(rest, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()


def write_manifest(artifact_dir: str | Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Write ``triage.json`` atomically with its ``manifest_sha256``; returns the manifest as written."""
    # a JSON round trip first, so the digest is computed over exactly what a reader will parse
    clean = json.loads(
        json.dumps({k: v for k, v in manifest.items() if k != MANIFEST_HASH_FIELD}, ensure_ascii=False)
    )
    clean[MANIFEST_HASH_FIELD] = manifest_digest(clean)
    try:
        data = json.dumps(clean, ensure_ascii=False, indent=2).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (e.g. an undecodable file name in training_data): escape it
        data = json.dumps(clean, ensure_ascii=True, indent=2).encode("ascii")
    atomic_write_bytes(Path(artifact_dir) / MANIFEST, data + b"\n")
    return clean


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ArtifactError(f"{path}: not valid JSON ({exc})") from None
    except OSError as exc:
        raise ArtifactError(f"{path}: cannot read: {exc.strerror or exc}") from None


def _check_files(artifact_dir: Path, manifest: dict[str, Any], verify_hashes: bool) -> None:
    files = manifest["files"]
    for name in REQUIRED_FILES:
        if name not in files:
            raise ArtifactError(f"{artifact_dir / MANIFEST}: field 'files' does not list {name!r}")
    if not any(m in files for m in MODEL_FILES.values()):
        raise ArtifactError(
            f"{artifact_dir / MANIFEST}: field 'files' lists no model ({' or '.join(MODEL_FILES.values())})"
        )
    # every file of the directory must be listed: a removed entry must not take its file out of the check
    for f in sorted(artifact_dir.iterdir()):
        if f.name not in files and f.name != MANIFEST and not f.name.startswith(".") and f.is_file():
            raise ArtifactError(
                f"{f}: in the artifact but not listed in {MANIFEST} 'files' (added by hand, or its "
                "entry was removed); re-export the artifact"
            )
    for name, expected in files.items():
        f = artifact_dir / name
        if not f.is_file():
            raise ArtifactError(f"{f}: missing (listed in {MANIFEST})")
        if f.stat().st_size != expected["bytes"]:  # no need to hash it to know
            raise ArtifactError(
                f"{f}: sha256 does not match {MANIFEST}: the file was changed or corrupted "
                f"({f.stat().st_size} bytes, {MANIFEST} lists {expected['bytes']})"
            )
        if verify_hashes and sha256_file(f) != expected["sha256"]:
            raise ArtifactError(f"{f}: sha256 does not match {MANIFEST}: the file was changed or corrupted")


def read_manifest(artifact_dir: str | Path, verify_hashes: bool = True) -> dict[str, Any]:
    """triage.json, checked: structure, its own ``manifest_sha256``, and (``verify_hashes``) every file of the
    directory listed, present, of the listed size and sha256. ``verify_hashes=False`` (the exporter's parity
    runs on a half-built directory) checks the manifest only."""
    artifact_dir = Path(artifact_dir)
    path = artifact_dir / MANIFEST
    if not path.is_file():
        raise ArtifactError(
            f"{path}: missing; {artifact_dir} is not a kefu-triage artifact (export one with `make export`)"
        )
    manifest = validate_manifest(_load_json(path), str(path))
    if manifest_digest(manifest) != manifest[MANIFEST_HASH_FIELD]:
        raise ArtifactError(
            f"{path}: {MANIFEST_HASH_FIELD} does not match the content: the manifest was edited or "
            "corrupted; restore it or re-export (thresholds are changed with `kefu-triage set-policy`)"
        )
    if verify_hashes:
        _check_files(artifact_dir, manifest, verify_hashes)
    return manifest


# ---- deliberate policy changes -------------------------------------------------------------------------
def set_policy(
    artifact_dir: str | Path, thresholds: dict[str, float], note: str | None = None
) -> tuple[dict[str, float], dict[str, Any]]:
    """Change the artifact's thresholds (merged onto the current ones), record the change in
    ``policy.history`` and rewrite ``triage.json`` with a new hash; returns (previous thresholds, manifest).
    With no thresholds, an artifact written before ``manifest_sha256`` existed is verified (every file
    against its listed sha256) and hashed."""
    from kefu_triage.core.policy import Thresholds  # numpy: only this command needs it

    artifact_dir = Path(artifact_dir)
    path = artifact_dir / MANIFEST
    try:
        manifest = read_manifest(artifact_dir)
    except ArtifactError:
        raw = _load_json(path) if path.is_file() else None
        if thresholds or not (isinstance(raw, dict) and MANIFEST_HASH_FIELD not in raw):
            raise
        manifest = validate_manifest(
            {**raw, MANIFEST_HASH_FIELD: "0" * 64}, str(path)
        )  # older artifact: adopt
        _check_files(artifact_dir, manifest, verify_hashes=True)
        print(f"{path}: had no {MANIFEST_HASH_FIELD} (older export); every file verified, hash added")
    old = Thresholds.from_mapping(manifest["policy"]["thresholds"], source=f"{path}: policy.thresholds")
    new = Thresholds.from_mapping({**old.to_dict(), **thresholds}, source="set-policy")
    policy = manifest["policy"]
    if new != old:
        policy["thresholds"] = new.to_dict()
        policy.setdefault("history", []).append(
            {
                "at": datetime.now(UTC).isoformat(timespec="seconds"),
                "command": "set-policy",
                "previous_thresholds": old.to_dict(),
                "note": note,
                "caveat": "operating_point, eval_metrics and README.md describe the exported thresholds",
            }
        )
    written = write_manifest(artifact_dir, manifest)
    read_manifest(artifact_dir, verify_hashes=False)  # what a loader will see
    return old.to_dict(), written


def run_set_policy(args: Any) -> int:
    """`kefu-triage set-policy --artifact DIR [--urgent X] [--recoverable X] [--confidence X] [--margin X]`."""
    changes = {
        k: getattr(args, k)
        for k in ("urgent", "recoverable", "confidence", "margin")
        if getattr(args, k, None) is not None
    }
    for item in getattr(args, "set", None) or []:
        name, sep, value = item.partition("=")
        try:
            changes[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise ArtifactError(f"--set {item!r}: expected NAME=NUMBER, e.g. --set urgent=0.4")
    old, manifest = set_policy(args.artifact, changes, getattr(args, "note", None))
    new, where = manifest["policy"]["thresholds"], Path(args.artifact) / MANIFEST
    print(f"{where}: thresholds unchanged {new}" if old == new else f"{where}: thresholds {old} -> {new}")
    return 0
