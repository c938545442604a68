"""Synthetic, seeded inputs that follow a component spec (numpy only).

Used to trace the export and to check parity; calibration uses real sampling trajectories
instead (see ``ldm_deploy.quantize``).
"""

from __future__ import annotations

import numpy as np

from .specs import ComponentSpec

BOS, EOS = 49406, 49407


def example_inputs(
    spec: ComponentSpec, sizes: dict[str, int], io_dtype: str = "float32", seed: int = 0
) -> dict[str, np.ndarray]:
    """One input dict for ``spec`` at the concrete axis ``sizes``, with realistic value ranges."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for t in spec.inputs:
        shape = t.concrete_shape(sizes)
        dtype = np.dtype(t.resolve_dtype(io_dtype))
        if t.name == "input_ids":
            ids = np.full(shape, EOS, dtype=np.int64)
            ids[:, 0] = BOS
            for row in ids:  # a prompt of random length, then eos padding
                n = int(rng.integers(3, shape[1] - 1))
                row[1 : n + 1] = rng.integers(0, BOS, size=n)
            out[t.name] = ids.astype(dtype)
        elif t.name == "timestep":
            out[t.name] = np.full(shape, 981.0 - 980.0 * rng.random(), dtype=dtype).round()
        elif t.name == "image":
            out[t.name] = rng.uniform(-1.0, 1.0, size=shape).astype(dtype)
        else:
            out[t.name] = rng.standard_normal(shape).astype(dtype)
    return out
