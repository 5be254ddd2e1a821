"""Model soup (trainer.soup_seeds): ingredients, their average, resume, and bad settings."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import model_weights as _weights
from conftest import short_train_cfg as _cfg
from kefu_triage.train.loop import TrainingInterrupted, train

SEEDS = "trainer.soup_seeds=[3,5]"


def test_soup_publishes_the_average_of_one_run_per_seed_from_one_start(smoke, tmp_path):
    summary = train(_cfg(tmp_path / "s", smoke, SEEDS), tmp_path / "s" / "run")
    run = tmp_path / "s" / "run"
    a, b = (_weights(run / f"ingredient{i}" / "model") for i in (0, 1))
    published = _weights(tmp_path / "s" / "published")
    assert all(
        torch.allclose(published[k], (a[k] + b[k]) / 2, atol=1e-6) for k in a if a[k].is_floating_point()
    )
    assert any(not torch.allclose(a[k], b[k]) for k in a)  # two different runs
    assert [i["seed"] for i in summary["soup"]["ingredients"]] == [3, 5]
    assert "intent_macro_f1" in summary["soup"]["dev"]
    stored = json.loads((tmp_path / "s" / "published" / "data_summary.json").read_text())
    assert stored["training"]["soup"] == summary["soup"]
    assert not (run / "soup").exists()

    # the first ingredient is exactly a plain run with the first seed
    train(_cfg(tmp_path / "a", smoke, "trainer.seed=3"), tmp_path / "a" / "run")
    assert all(torch.equal(_weights(tmp_path / "a" / "run" / "model")[k], a[k]) for k in a)
    # the second ingredient is exactly a plain run with that seed started from the first seed's weights
    train(_cfg(tmp_path / "b", smoke, "trainer.seed=5", "trainer.init_seed=3"), tmp_path / "b" / "run")
    assert all(torch.equal(_weights(tmp_path / "b" / "run" / "model")[k], b[k]) for k in b)

    # interrupted in the first ingredient, then continued: the same soup as an uninterrupted run
    with pytest.raises(TrainingInterrupted):
        train(_cfg(tmp_path / "c", smoke, SEEDS, "trainer.stop_after_steps=4"), tmp_path / "c" / "run")
    resume = ["trainer.resume=true", f"trainer.resume_dir={tmp_path / 'c' / 'run'}"]
    train(_cfg(tmp_path / "c", smoke, SEEDS, *resume), tmp_path / "c" / "run2")
    resumed = load_file(str(tmp_path / "c" / "published" / "model.safetensors"))
    assert all(torch.allclose(resumed[k], published[k], atol=1e-6) for k in published)
    first = tmp_path / "c" / "run" / "ingredient0" / "model" / "model.safetensors"
    mtime = first.stat().st_mtime_ns
    train(_cfg(tmp_path / "c", smoke, SEEDS, *resume), tmp_path / "c" / "run3")  # finished ingredients reused
    assert first.stat().st_mtime_ns == mtime

    for bad in ("[3,3]", "[3,true]", "[3,'x']"):
        with pytest.raises(ValueError, match="soup_seeds must be distinct integers"):
            train(_cfg(tmp_path / "bad", smoke, f"trainer.soup_seeds={bad}"), tmp_path / "bad" / "run")
    with pytest.raises(ValueError, match="init_seed must be an integer or null"):
        train(_cfg(tmp_path / "bad", smoke, "trainer.init_seed=x"), tmp_path / "bad" / "run")
