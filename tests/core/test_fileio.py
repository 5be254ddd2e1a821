import json

import pytest

from kefu_triage.core.fileio import atomic_directory, atomic_write_json, atomic_write_text


def test_atomic_write_leaves_no_temp_files(tmp_path):
    target = tmp_path / "sub" / "metrics.json"
    atomic_write_json(target, {"a": 1, "中": "文"})
    assert json.loads(target.read_text(encoding="utf-8")) == {"a": 1, "中": "文"}
    assert [p.name for p in target.parent.iterdir()] == ["metrics.json"]


def test_atomic_directory_replaces_on_success(tmp_path):
    target = tmp_path / "artifact"
    with atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("one")
    with atomic_directory(target) as tmp:
        (tmp / "b.txt").write_text("two")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["artifact"]


def test_atomic_directory_keeps_previous_content_on_failure(tmp_path):
    target = tmp_path / "artifact"
    with atomic_directory(target) as tmp:
        (tmp / "model.onnx").write_text("good")
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as tmp:
            (tmp / "model.onnx").write_text("half")
            raise RuntimeError("killed mid-write")
    assert (target / "model.onnx").read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["artifact"]


def test_atomic_write_text_overwrites(tmp_path):
    p = tmp_path / "r.md"
    atomic_write_text(p, "old")
    atomic_write_text(p, "new")
    assert p.read_text() == "new"
