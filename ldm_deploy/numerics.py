"""Numbers that compare arrays, shared by export validation, INT8 assessment, the quality harness
and the benchmark: tensor error statistics, image PSNR and the float -> uint8 image conversion.
numpy only (importable from the torch-free runtime)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def compare(reference: Any, actual: Any) -> dict[str, Any]:
    """Error statistics of ``actual`` against ``reference`` (computed in float64): max / mean
    absolute error, ``max_rel`` = max|a - r| / max|r|, ``rel_l2`` = ||a - r|| / ||r||, cosine
    similarity, and whether ``actual`` is finite. Shapes must match (ValueError otherwise)."""
    ref = np.asarray(reference, dtype=np.float64).ravel()
    act = np.asarray(actual, dtype=np.float64).ravel()
    if ref.shape != act.shape:
        raise ValueError(f"shape mismatch: reference {np.shape(reference)} vs output {np.shape(actual)}")
    finite = bool(np.isfinite(act).all())
    if not finite:
        inf = float("inf")
        return {"max_abs": inf, "mean_abs": inf, "max_rel": inf, "rel_l2": inf, "cosine": 0.0, "finite": False}
    diff = np.abs(act - ref)
    ref_norm, act_norm = float(np.linalg.norm(ref)), float(np.linalg.norm(act))
    denom = ref_norm * act_norm
    return {
        "max_abs": float(diff.max()) if diff.size else 0.0,
        "mean_abs": float(diff.mean()) if diff.size else 0.0,
        "max_rel": float(diff.max() / (float(np.abs(ref).max()) or 1.0)) if diff.size else 0.0,
        "rel_l2": float(np.linalg.norm(diff) / (ref_norm or 1.0)),
        "cosine": float(ref @ act / denom) if denom > 0 else (1.0 if ref_norm == act_norm else 0.0),
        "finite": True,
    }


def mean_errors(errors: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """:func:`compare` results over several batches: mean and min cosine, mean rel_l2, max max_abs."""
    return {
        "cosine": float(np.mean([e["cosine"] for e in errors])),
        "cosine_min": float(np.min([e["cosine"] for e in errors])),
        "rel_l2": float(np.mean([e["rel_l2"] for e in errors])),
        "max_abs": float(np.max([e["max_abs"] for e in errors])),
        "batches": len(errors),
    }


def to_uint8(images: Any) -> np.ndarray:
    """Float images in [0, 1] (any shape) -> uint8, clipped and rounded."""
    return (np.clip(np.asarray(images, dtype=np.float32), 0.0, 1.0) * 255).round().astype(np.uint8)


def as_image_batches(a: Any, b: Any) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(a), np.asarray(b)
    if x.shape != y.shape:
        raise ValueError(f"image shapes differ: {x.shape} vs {y.shape}")
    if x.ndim == 2:  # single grayscale image
        x, y = x[..., None], y[..., None]
    if x.ndim == 3:
        x, y = x[None], y[None]
    if x.ndim != 4:
        raise ValueError(f"expected HxWxC images or [N, H, W, C] batches, got shape {x.shape}")
    return x.astype(np.float64), y.astype(np.float64)


def reduce_per_image(values: np.ndarray, single: bool, reduction: str) -> Any:
    if reduction == "none":
        return float(values[0]) if single else values
    if reduction == "mean":
        return float(np.mean(values)) if len(values) else float("nan")
    raise ValueError("reduction must be 'mean' or 'none'")


def psnr(a: Any, b: Any, data_range: float = 255.0, reduction: str = "mean") -> Any:
    """Peak signal-to-noise ratio in dB, per image (over all pixels and channels).

    For batches the per-image values are averaged (``reduction="mean"``) or
    returned as an array (``"none"``). Identical images give ``inf``.
    """
    x, y = as_image_batches(a, b)
    mse = ((x - y) ** 2).reshape(len(x), -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        values = np.where(mse == 0, np.inf, 10.0 * np.log10(float(data_range) ** 2 / np.maximum(mse, 1e-300)))
    return reduce_per_image(values, np.asarray(a).ndim <= 3, reduction)
