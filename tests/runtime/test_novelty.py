"""Novelty in the artifact: statistics fitted on training data, hashed in triage.json, scored without torch."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from kefu_triage.core.artifact import MANIFEST, ArtifactError
from kefu_triage.core.novelty import NOVELTY_FILE, NoveltyError, NoveltyModel


def _gaussians(rng, n=600, d=8):
    labels = rng.integers(0, 3, n)
    centres = np.eye(3, d) * 6
    return centres[labels] + rng.normal(0, 1, (n, d)), labels, centres


def test_novelty_ranks_far_points_higher_and_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    x, y, centres = _gaussians(rng)
    ref, _, _ = _gaussians(rng, 300)
    model = NoveltyModel.fit(x, y, ref)
    near = centres[[0, 1, 2]] + rng.normal(0, 1, (3, 8))
    far = rng.normal(0, 1, (3, 8)) * 3 + 20
    s_near, s_far = model.score(near), model.score(far)
    assert np.all((0 <= s_near) & (s_near < 1)) and np.all((0 <= s_far) & (s_far < 1))
    assert s_far.min() > 0.99 > s_near.max()
    assert np.all(np.diff(model.scale(np.array([1.0, 5.0, 50.0, 500.0]))) > 0)  # no ties beyond the reference
    # held-out in-domain messages: novelty is (about) uniform, so a threshold reads as a quantile
    assert abs((model.score(_gaussians(rng, 2000)[0]) > 0.9).mean() - 0.1) < 0.04
    loaded = NoveltyModel.load(model.save(tmp_path / NOVELTY_FILE))
    np.testing.assert_allclose(loaded.score(near), s_near, rtol=1e-4, atol=1e-5)


def test_distance_is_squared_mahalanobis_to_the_nearest_class_mean():
    rng = np.random.default_rng(1)
    x, y, _ = _gaussians(rng)
    model = NoveltyModel.fit(x, y, _gaussians(rng, 100)[0])
    points = rng.normal(0, 3, (5, 8))
    diff = points[:, None, :] - model.means[None]  # [5, K, D]
    expected = np.einsum("nkd,de,nke->nk", diff, model.precision, diff).min(1)
    np.testing.assert_allclose(model.distance(points), expected, rtol=1e-9)
    np.testing.assert_allclose(model.distance(points[2:3]), expected[2:3], rtol=1e-9)  # alone = in a batch


def test_malformed_statistics_named(tmp_path):
    bad = tmp_path / "novelty.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(NoveltyError, match="novelty.npz: not a readable"):
        NoveltyModel.load(bad)
    np.savez(bad, means=np.zeros((2, 3)), precision=np.eye(4), reference=np.arange(3.0))
    with pytest.raises(NoveltyError, match="inconsistent shapes"):
        NoveltyModel.load(bad)


def test_artifact_carries_hashed_novelty_statistics(smoke):
    from kefu_triage.runtime.model import TriageModel

    art = smoke["artifact"]
    manifest = json.loads((art / MANIFEST).read_text(encoding="utf-8"))
    assert manifest["novelty"]["file"] == NOVELTY_FILE and NOVELTY_FILE in manifest["files"]
    # the statistics eval tuned the novelty gate on are the ones shipped
    shipped, tuned = (
        NoveltyModel.load(art / NOVELTY_FILE),
        NoveltyModel.load(smoke["model_dir"] / NOVELTY_FILE),
    )
    np.testing.assert_allclose(shipped.precision, tuned.precision, rtol=1e-5)
    rt = TriageModel.load(art, precision="fp32")
    scores = rt.score(["快递三天没动了", "我要退货", "asdfgh qwerty 12345"])
    assert scores["pooled"].shape == (3, manifest["encoder"]["hidden_size"])
    out = rt.predict(["快递三天没动了", "我要退货"])
    assert all(0 <= o["novelty"] < 1 and 0 <= o["margin"] <= 1 for o in out)
    assert rt.predict([]) == []


def test_novelty_matches_pytorch(smoke):
    from kefu_triage.core.heads import POOLED_OUTPUT
    from kefu_triage.model.multitask import load_model, predict_logits
    from kefu_triage.runtime.model import TriageModel

    records = [{"text": t} for t in ("快递三天没动了", "我要退货，质量太差", "你好在吗", "发票怎么开")]
    model, tok = load_model(smoke["model_dir"])
    stats = NoveltyModel.load(smoke["artifact"] / NOVELTY_FILE)
    torch_nov = stats.score(predict_logits(model, tok, records, pooled=True)[POOLED_OUTPUT])
    rt = TriageModel.load(smoke["artifact"], precision="fp32")
    np.testing.assert_allclose(
        rt.novelty_scores(rt.score([r["text"] for r in records])), torch_nov, atol=1e-3
    )


def test_tampered_novelty_statistics_refused(smoke, tmp_path):
    from kefu_triage.runtime.model import TriageModel

    art = tmp_path / "artifact"
    shutil.copytree(smoke["artifact"], art)
    f = art / NOVELTY_FILE
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the sha256 can tell
    f.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="novelty.npz: sha256 does not match"):
        TriageModel.load(art)


def test_runtime_novelty_stays_torch_free(smoke):
    code = (
        "import sys; from kefu_triage.runtime.model import TriageModel;"
        f"m = TriageModel.load({str(smoke['artifact'])!r});"
        "o = m.predict(['快递三天没动了']); assert o[0]['novelty'] is not None, o;"
        "bad = [x for x in ('torch', 'transformers', 'sklearn', 'hydra', 'yaml', 'scipy') if x in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
