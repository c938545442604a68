"""Parity of an exported graph against its PyTorch module on the same inputs."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np

from ..errors import ValidationError


@dataclass(frozen=True)
class Tolerance:
    """Limits for one precision. ``max_rel`` bounds max|onnx - torch| / max|torch|."""

    max_rel: float
    min_cosine: float


TOLERANCES = {
    "fp32": Tolerance(max_rel=1e-3, min_cosine=0.99999),
    "fp16": Tolerance(max_rel=2e-2, min_cosine=0.9995),
}


def compare(reference: np.ndarray, actual: np.ndarray) -> dict[str, float | bool]:
    """Error statistics of ``actual`` against ``reference`` (computed in float64)."""
    ref = np.asarray(reference, dtype=np.float64).ravel()
    act = np.asarray(actual, dtype=np.float64).ravel()
    if ref.shape != act.shape:
        raise ValidationError(f"shape mismatch: reference {np.shape(reference)} vs output {np.shape(actual)}")
    finite = bool(np.isfinite(act).all())
    diff = np.abs(act - ref)
    scale = float(np.abs(ref).max()) or 1.0
    denom = float(np.linalg.norm(ref) * np.linalg.norm(act))
    return {
        "max_abs": float(diff.max()) if finite else float("inf"),
        "mean_abs": float(diff.mean()) if finite else float("inf"),
        "max_rel": float(diff.max() / scale) if finite else float("inf"),
        "cosine": float(ref @ act / denom) if finite and denom > 0 else (1.0 if denom == 0 and finite else 0.0),
        "finite": finite,
    }


def check(stats: dict[str, Any], tol: Tolerance) -> list[str]:
    """The tolerance violations in ``stats`` (empty when it passes)."""
    problems = []
    if not stats["finite"]:
        problems.append("output has NaN/Inf")
    if stats["max_rel"] > tol.max_rel:
        problems.append(f"max_rel {stats['max_rel']:.3g} > {tol.max_rel:g}")
    if stats["cosine"] < tol.min_cosine:
        problems.append(f"cosine {stats['cosine']:.6f} < {tol.min_cosine:g}")
    return problems


def validate(
    component: str,
    run_onnx: Callable[[dict[str, np.ndarray]], np.ndarray],
    reference: np.ndarray,
    inputs: dict[str, np.ndarray],
    precision: str,
    how: str,
) -> dict[str, Any]:
    """Run the graph on ``inputs`` and compare with the torch ``reference``; returns the report
    entry (``passed`` false with reasons when out of tolerance)."""
    tol = TOLERANCES[precision]
    out = run_onnx(inputs)
    stats = compare(reference, out)
    problems = check(stats, tol)
    return {
        "component": component,
        "status": "passed" if not problems else "failed",
        "how": how,
        "shapes": {k: list(v.shape) for k, v in inputs.items()},
        "tolerance": asdict(tol),
        **stats,
        "problems": problems,
    }
