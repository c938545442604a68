"""How far a quantized artifact is from its source: component outputs on held-out batches and
images of the same prompts and seeds."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..numerics import compare, mean_errors, psnr, to_uint8
from ..runtime.sessions import make_session, run_session


def onnx_outputs(model_path: Path, batches: Sequence[dict[str, np.ndarray]], threads: int = 0) -> list[np.ndarray]:
    """The first output of the graph at ``model_path`` for every batch."""
    session = make_session(model_path, "cpu", threads)
    return [run_session(session, b)[0] for b in batches]


def compare_models(ref_path: Path, q_path: Path, batches: Sequence[dict[str, np.ndarray]], threads: int = 0,
                   ref_outputs: list[np.ndarray] | None = None) -> dict[str, float]:
    """Mean output error (:func:`~ldm_deploy.numerics.mean_errors`) of ``q_path`` vs ``ref_path``."""
    refs = ref_outputs if ref_outputs is not None else onnx_outputs(ref_path, batches, threads)
    outs = onnx_outputs(q_path, batches, threads)
    return mean_errors([compare(r, o) for r, o in zip(refs, outs)])


def image_psnr(src: Path | str, out: Path | str, prompts: Sequence[str], steps: int, seed: int,
               threads: int = 0) -> dict[str, Any]:
    """Images of the same prompts/seeds through both artifacts; PSNR of the quantized ones vs the source."""
    from ..runtime import Pipeline

    comps = ("text_encoder", "unet", "vae_decoder")
    a = Pipeline.load(src, threads=threads, verify=False, components=comps)
    b = Pipeline.load(out, threads=threads, verify=False, components=comps)
    vals = []
    for i, p in enumerate(prompts):
        ia = a(p, num_inference_steps=steps, seed=seed + i, output_type="np").images
        ib = b(p, num_inference_steps=steps, seed=seed + i, output_type="np").images
        vals.append(float(psnr(to_uint8(ib), to_uint8(ia))))
    return {"prompts": list(prompts), "steps": steps, "seed": seed, "psnr": vals,
            "psnr_mean": float(np.mean([v for v in vals if np.isfinite(v)] or [float("inf")]))}
