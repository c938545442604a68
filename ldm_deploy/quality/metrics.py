"""Image-quality metrics in numpy/scipy only (no torch).

* :func:`frechet_distance` - Fréchet distance between Gaussians fitted to two feature sets
  (the "FID" formula, for any feature extractor);
* :func:`psnr`, :func:`ssim` - full-reference fidelity of uint8 RGB images (single
  ``HxWx3`` images or ``[N, H, W, 3]`` batches);
* :func:`prompt_adherence` - how often predicted attributes match the prompt.
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping, Sequence

import numpy as np
import scipy.linalg
from scipy import ndimage

from ldm_deploy.data.shapes import Attributes, parse_caption
from ldm_deploy.numerics import as_image_batches, reduce_per_image, psnr

__all__ = [
    "ATTRIBUTES",
    "frechet_distance",
    "frechet_distance_from_stats",
    "feature_stats",
    "psnr",
    "ssim",
    "prompt_adherence",
    "as_attribute_dict",
]

ATTRIBUTES: tuple[str, ...] = ("shape", "color", "background", "size", "position")


# --------------------------------------------------------------------------- Fréchet distance


def feature_stats(feats: Any) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[D]`` and (unbiased) covariance ``[D, D]`` of a ``[N, D]`` feature array."""
    f = np.asarray(feats, dtype=np.float64)
    if f.ndim != 2:
        raise ValueError(f"features must be [N, D], got shape {f.shape}")
    if f.shape[0] < 2:
        raise ValueError("need at least 2 samples to estimate a covariance")
    return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))


def frechet_distance_from_stats(
    mu1: Any, sigma1: Any, mu2: Any, sigma2: Any, eps: float = 1e-6
) -> float:
    """``||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2})``.

    If the product's square root is not finite (singular covariances, e.g. fewer
    samples than dimensions), ``eps * I`` is added to both covariances. Small
    imaginary parts from numerical error are dropped; large ones raise ``ValueError``.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape}/{mu2.shape}, sigma {s1.shape}/{s2.shape}")
    diff = mu1 - mu2

    def sqrt_product(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scipy warns on singular input; we check finiteness ourselves
            return scipy.linalg.sqrtm(a @ b)

    covmean = sqrt_product(s1, s2)
    if not np.all(np.isfinite(covmean)):
        offset = np.eye(s1.shape[0]) * eps
        covmean = sqrt_product(s1 + offset, s2 + offset)
    if np.iscomplexobj(covmean):
        # numerical noise: tolerate imaginary parts that are small relative to the scale of the problem
        scale = max(1.0, float(np.abs(np.diag(covmean)).max(initial=0.0)))
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3 * scale):
            raise ValueError(f"imaginary component {np.abs(covmean.imag).max():.3g} in sqrtm(S1 S2)")
        covmean = covmean.real
    value = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))
    return max(value, 0.0)


def frechet_distance(feats_a: Any, feats_b: Any, eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussians fitted to ``[N, D]`` feature sets ``feats_a`` and ``feats_b``.

    Zero for identical sets (up to round-off, clipped at 0).
    """
    mu1, s1 = feature_stats(feats_a)
    mu2, s2 = feature_stats(feats_b)
    if mu1.shape != mu2.shape:
        raise ValueError(f"feature dimensions differ: {mu1.shape[0]} vs {mu2.shape[0]}")
    return frechet_distance_from_stats(mu1, s1, mu2, s2, eps=eps)


# --------------------------------------------------------------------------- PSNR / SSIM


def ssim(
    a: Any,
    b: Any,
    data_range: float = 255.0,
    win_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
    reduction: str = "mean",
) -> Any:
    """Mean structural similarity (Wang et al. 2004), per channel then averaged.

    Gaussian window of ``win_size`` (11) taps, ``sigma`` 1.5, population
    (co)variances, constants ``C1 = (k1 L)^2``, ``C2 = (k2 L)^2``; filtering uses
    reflective borders and the mean skips the ``(win_size - 1) / 2`` pixel border
    (the conventions of ``skimage.metrics.structural_similarity(...,
    gaussian_weights=True, use_sample_covariance=False)``). Identical images give 1.0.
    """
    x, y = as_image_batches(a, b)
    if win_size % 2 != 1 or win_size < 3:
        raise ValueError("win_size must be odd and >= 3")
    radius = (win_size - 1) // 2
    if min(x.shape[1:3]) < win_size:
        raise ValueError(f"images must be at least {win_size}x{win_size}")
    truncate = radius / sigma  # makes gaussian_filter use exactly `win_size` taps

    def filt(img: np.ndarray) -> np.ndarray:  # smooth spatial axes only ([N, H, W, C])
        return ndimage.gaussian_filter(img, sigma=(0, sigma, sigma, 0), truncate=truncate, mode="reflect")

    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    mu_x, mu_y = filt(x), filt(y)
    sxx = filt(x * x) - mu_x * mu_x
    syy = filt(y * y) - mu_y * mu_y
    sxy = filt(x * y) - mu_x * mu_y
    smap = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    smap = smap[:, radius:-radius, radius:-radius, :]
    values = smap.reshape(len(x), -1, smap.shape[-1]).mean(axis=1).mean(axis=1)  # per channel, then channels
    return reduce_per_image(values, np.asarray(a).ndim <= 3, reduction)


# --------------------------------------------------------------------------- prompt adherence


def as_attribute_dict(a: Any) -> dict[str, str]:
    """An :class:`Attributes`, a caption string or a mapping -> ``{name: value}``."""
    if isinstance(a, Attributes):
        return {k: getattr(a, k) for k in ATTRIBUTES}
    if isinstance(a, str):
        return as_attribute_dict(parse_caption(a))
    if isinstance(a, Mapping):
        return {k: a[k] for k in ATTRIBUTES}
    raise TypeError(f"cannot read attributes from {type(a).__name__}")


def prompt_adherence(predictions: Sequence[Any], attributes: Sequence[Any]) -> dict[str, Any]:
    """Compare predicted attributes with the prompted ones.

    ``predictions``: per-image dicts (as from ``AttributeClassifier.predict``);
    ``attributes``: the prompts as :class:`Attributes`, captions or dicts.
    Returns ``{"adherence": share of images with ALL attributes right,
    "per_attribute": {name: accuracy}, "n": N, "correct": [bool per image]}``.
    """
    preds = [as_attribute_dict(p) for p in predictions]
    truth = [as_attribute_dict(a) for a in attributes]
    if len(preds) != len(truth):
        raise ValueError(f"{len(preds)} predictions for {len(truth)} prompts")
    n = len(truth)
    hits = {k: [p[k] == t[k] for p, t in zip(preds, truth)] for k in ATTRIBUTES}
    correct = [all(hits[k][i] for k in ATTRIBUTES) for i in range(n)]
    nan = float("nan")
    return {
        "adherence": float(np.mean(correct)) if n else nan,
        "per_attribute": {k: (float(np.mean(v)) if n else nan) for k, v in hits.items()},
        "n": n,
        "correct": correct,
    }
