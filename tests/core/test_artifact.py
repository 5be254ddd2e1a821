"""The artifact manifest contract on a synthetic artifact directory (no model needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kefu_triage.cli import main as cli_main
from kefu_triage.core.artifact import (
    MANIFEST,
    MANIFEST_HASH_FIELD,
    ArtifactError,
    read_manifest,
    set_policy,
    write_manifest,
)
from kefu_triage.core.fileio import sha256_file


def _artifact(root: Path) -> Path:
    art = root / "artifact"
    art.mkdir()
    for name, data in (
        ("model.onnx", b"fp32"),
        ("model.int8.onnx", b"int8"),
        ("tokenizer.json", b"{}"),
        ("README.md", b"# card\n"),
    ):
        (art / name).write_bytes(data)
    files = {f.name: {"sha256": sha256_file(f), "bytes": f.stat().st_size} for f in sorted(art.iterdir())}
    write_manifest(
        art,
        {
            "schema_version": 1,
            "taxonomy": {"intents": [{"name": "other", "route": "human"}]},
            "calibration": {"temperatures": {"intent": 1.2, "urgent": 1.0}},
            "policy": {
                "thresholds": {"urgent": 0.5, "recoverable": 0.5, "confidence": 0.4, "margin": 0.0},
                "operating_point": None,
            },
            "input": {
                "names": ["input_ids", "attention_mask"],
                "max_length": 64,
                "context_turns": 1,
                "pad_token_id": 0,
            },
            "eval_metrics": {"note": "乱码 \ud800"},  # a lone surrogate must not break the canonical hash
            "files": files,
        },
    )
    return art


def _edit(art: Path, change) -> None:
    """Change triage.json by hand (no re-hash), as an operator with an editor would. ``change`` edits the
    manifest in place (returns None) or returns a replacement."""
    manifest = json.loads((art / MANIFEST).read_text(encoding="utf-8"))
    replacement = change(manifest)
    manifest = manifest if replacement is None else replacement
    (art / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")


def test_written_manifest_reads_back_and_survives_reformatting(tmp_path):
    art = _artifact(tmp_path)
    manifest = read_manifest(art)
    assert len(manifest[MANIFEST_HASH_FIELD]) == 64 and manifest["policy"]["thresholds"]["urgent"] == 0.5
    _edit(art, lambda m: None)  # same content, other whitespace and key layout
    assert read_manifest(art) == manifest


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m.pop("policy") and None, "triage.json: field 'policy' is missing"),
        (lambda m: m["policy"].pop("thresholds") and None, "field 'policy.thresholds' is missing"),
        (
            lambda m: m["policy"].update(thresholds=[0.5]),
            "field 'policy.thresholds' must be an object of numbers, got array",
        ),
        (
            lambda m: m["input"].update(max_length="64"),
            "field 'input.max_length' must be an integer >= 1, got string",
        ),
        (
            lambda m: m["calibration"]["temperatures"].update(intent=0),
            "field 'calibration.temperatures' must be an object of",
        ),
        (
            lambda m: m["files"]["model.onnx"].pop("sha256") and None,
            "field 'files.model.onnx'.sha256 must be a sha256",
        ),
        (
            lambda m: m["files"].update({"../x": m["files"]["model.onnx"]}),
            "'files.../x': not a plain file name",
        ),
        (lambda m: ["not", "an", "object"], "triage.json: must be a JSON object, got array"),
        (lambda m: m.update(schema_version=2), "triage.json: schema_version 2"),
    ],
)
def test_manifest_structure_errors_name_the_file_and_field(tmp_path, change, message):
    art = _artifact(tmp_path)
    _edit(art, change)
    with pytest.raises(ArtifactError, match=message.replace("(", r"\(").replace(".", r"\.")):
        read_manifest(art, verify_hashes=False)


def test_hand_edited_threshold_is_refused(tmp_path):
    art = _artifact(tmp_path)
    _edit(art, lambda m: m["policy"]["thresholds"].update(urgent=0.99))
    with pytest.raises(ArtifactError, match="manifest_sha256 does not match"):
        read_manifest(art, verify_hashes=False)  # checked even on the fast path


def test_removed_files_entry_cannot_bypass_the_hash_check(tmp_path):
    art = _artifact(tmp_path)
    (art / "model.int8.onnx").write_bytes(b"swapped model")
    with pytest.raises(ArtifactError, match="model.int8.onnx: .*bytes"):
        read_manifest(art)
    # drop the entry and even re-hash the manifest: the unlisted file is still refused
    manifest = json.loads((art / MANIFEST).read_text(encoding="utf-8"))
    del manifest["files"]["model.int8.onnx"]
    write_manifest(art, manifest)
    with pytest.raises(ArtifactError, match="model.int8.onnx: in the artifact but not listed"):
        read_manifest(art)
    (art / "model.int8.onnx").unlink()
    assert "model.int8.onnx" not in read_manifest(art)["files"]  # an fp32-only artifact is complete
    manifest = read_manifest(art)
    del manifest["files"]["tokenizer.json"]
    (art / "tokenizer.json").unlink()
    write_manifest(art, manifest)
    with pytest.raises(ArtifactError, match="does not list 'tokenizer.json'"):
        read_manifest(art)


def test_same_size_change_is_caught_by_sha256(tmp_path):
    art = _artifact(tmp_path)
    (art / "model.onnx").write_bytes(b"FP32")
    with pytest.raises(ArtifactError, match="model.onnx: sha256 does not match"):
        read_manifest(art)
    read_manifest(art, verify_hashes=False)  # the exporter's parity runs skip file hashes


def test_set_policy_rewrites_and_rehashes(tmp_path):
    art = _artifact(tmp_path)
    old, manifest = set_policy(art, {"urgent": 0.4}, note="ops request")
    assert old["urgent"] == 0.5
    loaded = read_manifest(art)
    assert loaded == manifest and loaded["policy"]["thresholds"]["urgent"] == 0.4
    assert loaded["policy"]["thresholds"]["confidence"] == 0.4  # the others are kept
    (entry,) = loaded["policy"]["history"]
    assert entry["previous_thresholds"]["urgent"] == 0.5 and entry["note"] == "ops request"
    before = (art / MANIFEST).read_bytes()
    with pytest.raises(ValueError, match="urgent"):
        set_policy(art, {"urgent": 1.5})
    with pytest.raises(ValueError, match="unknown threshold"):
        set_policy(art, {"urgnet": 0.3})
    assert (art / MANIFEST).read_bytes() == before
    assert not [p for p in art.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_set_policy_cli(tmp_path, capsys):
    art = _artifact(tmp_path)
    assert cli_main(["set-policy", "--artifact", str(art), "--urgent", "0.3", "--set", "margin=0.05"]) == 0
    assert "-> {'urgent': 0.3" in capsys.readouterr().out
    thresholds = read_manifest(art)["policy"]["thresholds"]
    assert {k: thresholds[k] for k in ("urgent", "recoverable", "confidence", "margin")} == {
        "urgent": 0.3,
        "recoverable": 0.5,
        "confidence": 0.4,
        "margin": 0.05,
    }
    assert cli_main(["set-policy", "--artifact", str(art), "--set", "margin"]) == 2
    assert "NAME=NUMBER" in capsys.readouterr().err
    _edit(art, lambda m: m["policy"]["thresholds"].update(urgent=0.9))
    assert (
        cli_main(["set-policy", "--artifact", str(art), "--urgent", "0.2"]) == 2
    )  # no laundering of hand edits
    assert "manifest_sha256 does not match" in capsys.readouterr().err


def test_unhashed_manifest_is_refused_then_adopted_by_set_policy(tmp_path):
    art = _artifact(tmp_path)
    _edit(art, lambda m: m.pop(MANIFEST_HASH_FIELD) and None)
    with pytest.raises(ArtifactError, match="field 'manifest_sha256' is missing .*set-policy"):
        read_manifest(art)
    with pytest.raises(ArtifactError, match="manifest_sha256"):
        set_policy(art, {"urgent": 0.3})  # a change needs a verified manifest first
    (art / "README.md").write_bytes(b"# edited\n")
    with pytest.raises(ArtifactError, match="README.md"):
        set_policy(art, {})  # adoption verifies every file
    (art / "README.md").write_bytes(b"# card\n")
    set_policy(art, {})
    assert read_manifest(art)["policy"]["thresholds"]["urgent"] == 0.5
