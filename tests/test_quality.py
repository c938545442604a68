"""Quality harness: metrics against direct computations, the shipped classifier, and the
harness telling real generator images from bad ones."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from ldm_deploy.data.shapes import COLORS, Attributes, caption, eval_prompts, render
from ldm_deploy.quality import (
    DEFAULT_WEIGHTS,
    AttributeClassifier,
    evaluate,
    find_inception_weights,
    frechet_distance,
    frechet_distance_from_stats,
    inception_fid,
    load_default_classifier,
    prompt_adherence,
    psnr,
    ssim,
)

torch.set_num_threads(1)

N_EVAL = 200


@pytest.fixture(scope="module")
def clf() -> AttributeClassifier:
    return load_default_classifier()


@pytest.fixture(scope="module")
def prompts() -> list[Attributes]:
    return eval_prompts(N_EVAL)


def _render_all(attrs, seed, recolor=None) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = []
    for a in attrs:
        if recolor is not None:
            a = recolor(a)
        out.append(render(a, size=64, rng=rng))
    return np.stack(out)


@pytest.fixture(scope="module")
def real_images(prompts) -> np.ndarray:
    return _render_all(prompts, seed=987)


# --------------------------------------------------------------------------- Fréchet distance


def test_frechet_closed_form_diagonal():
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([0.5, -1.0, 0.0])
    s1, s2 = np.array([1.0, 2.0, 0.5]), np.array([0.25, 3.0, 0.5])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    got = frechet_distance_from_stats(mu1, np.diag(s1), mu2, np.diag(s2))
    assert got == pytest.approx(expected, rel=1e-10)


def test_frechet_samples_match_known_gaussians():
    rng = np.random.default_rng(0)
    mu1, mu2 = np.array([0.0, 1.0, -2.0, 0.3]), np.array([0.5, -1.0, 0.0, 0.3])
    s1, s2 = np.array([1.0, 2.0, 0.5, 1.5]), np.array([0.25, 3.0, 0.5, 1.0])
    a = mu1 + rng.standard_normal((40_000, 4)) * np.sqrt(s1)
    b = mu2 + rng.standard_normal((40_000, 4)) * np.sqrt(s2)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert frechet_distance(a, b) == pytest.approx(expected, rel=0.03)


def test_frechet_full_covariance_matches_direct_computation():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((500, 6)) @ rng.standard_normal((6, 6)) + 1.0
    b = rng.standard_normal((400, 6)) @ rng.standard_normal((6, 6))
    m1, m2 = a.mean(0), b.mean(0)
    c1, c2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # independent route: Tr sqrt(C1 C2) = sum of sqrt of the (real, >= 0) eigenvalues of C1 C2
    tr_sqrt = np.sum(np.sqrt(np.clip(scipy.linalg.eigvals(c1 @ c2).real, 0, None)))
    expected = np.sum((m1 - m2) ** 2) + np.trace(c1) + np.trace(c2) - 2 * tr_sqrt
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)


def test_frechet_identical_and_singular():
    rng = np.random.default_rng(2)
    a = rng.standard_normal((300, 8))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    # fewer samples than dimensions: singular covariances must still give a finite value
    x, y = rng.standard_normal((10, 32)), rng.standard_normal((10, 32)) + 2.0
    d = frechet_distance(x, y)
    assert math.isfinite(d) and d > 32 * 2.0  # at least the squared mean shift, roughly
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-3)


# --------------------------------------------------------------------------- PSNR / SSIM


def test_psnr_properties(real_images):
    img = real_images[0]
    assert psnr(img, img) == math.inf
    shifted = np.clip(img.astype(int) + 10, 0, 255).astype(np.uint8)
    mse = np.mean((shifted.astype(float) - img) ** 2)
    assert psnr(img, shifted) == pytest.approx(10 * np.log10(255.0**2 / mse))
    rng = np.random.default_rng(3)
    noisy = [np.clip(img + rng.normal(0, s, img.shape), 0, 255).astype(np.uint8) for s in (2, 10, 40)]
    values = [psnr(img, n) for n in noisy]
    assert values[0] > values[1] > values[2] > 0
    batch = psnr(real_images[:4], real_images[:4][::-1], reduction="none")
    assert batch.shape == (4,)
    assert psnr(real_images[:4], real_images[:4][::-1]) == pytest.approx(np.mean(batch))


def test_ssim_properties(real_images):
    img = real_images[1]
    assert ssim(img, img) == pytest.approx(1.0)
    assert ssim(real_images[:5], real_images[:5]) == pytest.approx(1.0)
    rng = np.random.default_rng(4)
    noisy = [np.clip(img + rng.normal(0, s, img.shape), 0, 255).astype(np.uint8) for s in (2, 10, 40)]
    values = [ssim(img, n) for n in noisy]
    assert 1.0 > values[0] > values[1] > values[2]
    per = ssim(real_images[:3], np.stack(noisy), reduction="none")
    assert per.shape == (3,) and np.all(per < 1.0)


def test_ssim_matches_skimage(real_images):
    metrics = pytest.importorskip("skimage.metrics")
    rng = np.random.default_rng(5)
    a = real_images[2]
    b = np.clip(a + rng.normal(0, 15, a.shape), 0, 255).astype(np.uint8)
    ref = metrics.structural_similarity(
        a, b, channel_axis=-1, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255
    )
    assert ssim(a, b) == pytest.approx(ref, abs=1e-6)


def test_prompt_adherence_counts():
    a = Attributes("circle", "red", "blue", "small", "center")
    wrong = {"shape": "square", "color": "red", "background": "blue", "size": "small", "position": "center"}
    res = prompt_adherence([a, wrong], [a, "a small red circle on a blue background, center"])
    assert res["adherence"] == 0.5
    assert res["per_attribute"]["shape"] == 0.5 and res["per_attribute"]["color"] == 1.0
    assert res["correct"] == [True, False]


# --------------------------------------------------------------------------- classifier


def test_shipped_classifier_is_small_and_round_trips(clf, real_images, tmp_path):
    assert DEFAULT_WEIGHTS.is_file() and DEFAULT_WEIGHTS.stat().st_size < 2 * 1024 * 1024
    path = clf.save(tmp_path / "c.pt")
    again = AttributeClassifier.load(path)
    np.testing.assert_allclose(again.features(real_images[:8]), clf.features(real_images[:8]))
    f = clf.features(real_images[:8])
    assert f.shape == (8, clf.feature_dim)
    # single arrays, PIL images and other resolutions are accepted
    pil = [Image.fromarray(x) for x in real_images[:3]]
    assert clf.predict(pil) == clf.predict(real_images[:3])
    big = np.asarray(Image.fromarray(real_images[0]).resize((128, 128), Image.BILINEAR))
    assert clf.predict(big) == clf.predict(real_images[0])


def test_classifier_accuracy_on_real_images(clf, prompts, real_images):
    res = prompt_adherence(clf.predict(real_images), prompts)
    assert res["adherence"] >= 0.95, res
    assert min(res["per_attribute"].values()) >= 0.97, res


# --------------------------------------------------------------------------- harness


def _other_color(a: Attributes) -> Attributes:
    names = list(COLORS)
    color = names[(names.index(a.color) + 3) % len(names)]
    if color == a.background:
        color = names[(names.index(color) + 1) % len(names)]
    return Attributes(a.shape, color, a.background, a.size, a.position)


def test_harness_tells_good_from_bad(clf, prompts, real_images):
    good = evaluate(real_images, prompts, classifier=clf)
    rng = np.random.default_rng(6)
    noise = rng.integers(0, 256, size=real_images.shape, dtype=np.uint8)
    bad_noise = evaluate(noise, prompts, classifier=clf)
    wrong = _render_all(prompts, seed=988, recolor=_other_color)
    bad_color = evaluate(wrong, prompts, classifier=clf)

    assert good["n"] == N_EVAL and good["n_heldout"] == 50 and good["n_seen"] == 150
    assert good["adherence"] >= 0.95
    assert good["adherence_seen"] >= 0.95 and good["adherence_heldout"] >= 0.95
    assert bad_noise["adherence"] <= 0.05
    assert bad_color["adherence"] <= 0.05
    assert bad_color["per_attribute"]["color"] <= 0.05
    assert bad_color["per_attribute"]["shape"] >= 0.95  # only the colour is wrong
    assert good["domain_fid"] * 10 < bad_color["domain_fid"]
    assert bad_color["domain_fid"] < bad_noise["domain_fid"]
    assert "psnr" not in good
    for r in (good, bad_noise, bad_color):
        if r["inception_fid"] is None:
            assert r["inception_fid_note"]


def test_harness_reference_images(clf, prompts, real_images):
    sub, attrs = real_images[:16], prompts[:16]
    same = evaluate(sub, attrs, reference_images=sub, classifier=clf, inception=False)
    assert same["psnr"] == math.inf and same["ssim"] == pytest.approx(1.0)
    rng = np.random.default_rng(7)
    noisy = np.clip(sub + rng.normal(0, 8, sub.shape), 0, 255).astype(np.uint8)
    captions = [caption(a) for a in attrs]  # captions work as prompts too
    res = evaluate(noisy, captions, reference_images=sub, classifier=clf, inception=False)
    assert 25 < res["psnr"] < 40 and 0.3 < res["ssim"] < 0.99
    assert res["adherence"] >= 0.9  # light noise does not fool the judge
    assert res["inception_fid"] is None and res["inception_fid_note"] == "not requested"


def test_inception_fid_without_weights(real_images, monkeypatch, tmp_path):
    path, _ = find_inception_weights()
    if path is not None:
        pytest.skip(f"Inception weights present at {path}")
    with pytest.raises(RuntimeError, match="Inception weights not available locally"):
        inception_fid(real_images[:4], real_images[4:8])
    monkeypatch.setenv("LDM_DEPLOY_INCEPTION_WEIGHTS", str(tmp_path / "missing.pth"))
    with pytest.raises(RuntimeError, match="Inception weights not available locally"):
        inception_fid(real_images[:4], real_images[4:8])
    res = evaluate(real_images[:8], eval_prompts(N_EVAL)[:8])
    assert res["inception_fid"] is None
    assert res["inception_fid_note"].startswith("Inception weights not available locally")
