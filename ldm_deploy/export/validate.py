"""Parity of an exported graph against its PyTorch module on the same inputs."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np

from ..errors import ValidationError
from ..numerics import compare


@dataclass(frozen=True)
class Tolerance:
    """Limits for one precision. ``max_rel`` bounds max|onnx - torch| / max|torch|."""

    max_rel: float
    min_cosine: float


TOLERANCES = {
    "fp32": Tolerance(max_rel=1e-3, min_cosine=0.99999),
    "fp16": Tolerance(max_rel=2e-2, min_cosine=0.9995),
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
    try:
        stats = compare(reference, out)
    except ValueError as e:
        raise ValidationError(f"{component}: {e}") from None
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
