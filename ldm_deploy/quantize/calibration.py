"""Calibration data from real sampling runs: the U-Net inputs of CFG trajectories.

The runtime :class:`~ldm_deploy.runtime.Pipeline` samples calibration prompts with classifier-free
guidance while an observer of the call (``Pipeline(..., observer=)``) keeps the U-Net inputs (``sample`` [2B, C, h, w],
``timestep`` [1], ``encoder_hidden_states`` [2B, 77, D]) at selected steps. Only those inputs are
stored (a few MB at SD1.5 scale), never the activations.

For artifacts with feature caching (``ldm-export --deepcache``) the shallow U-Net graph is
calibrated on the same steps: its inputs are the step's U-Net inputs plus the cached feature of
the previous step (the feature one step stale, as the runtime feeds it between full steps).

Selection: ``size`` batches stratified over the trajectory: batch ``k`` is taken at step
``floor((k + 0.5) * steps / size)`` from run ``k mod n_runs``, so every run contributes steps spread
from the noisiest to the cleanest and consecutive batches come from different prompts. Each run
contributes at most ``per_run`` batches (default ``ceil(steps / 4)``), which sets the number of
sampling runs, ``ceil(size / per_run)``; run ``r`` uses prompt ``r mod len(prompts)`` and seed
``seed + r``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..errors import LdmDeployError

#: Built-in calibration prompts: shapes-domain captions (what the embedded model was trained on)
#: mixed with general Stable Diffusion prompts (subjects, styles, lighting, compositions).
DEFAULT_PROMPTS: tuple[str, ...] = (
    "a small red circle on a blue background, top left",
    "a photograph of an astronaut riding a horse",
    "a large yellow square on a black background, center",
    "a watercolor painting of a lighthouse on a cliff at sunset",
    "a small green triangle on a white background, bottom right",
    "a close-up portrait of an old fisherman, dramatic lighting, 85mm",
    "a large purple diamond on an orange background, top right",
    "an isometric illustration of a tiny city with trees and rivers",
    "a small white circle on a green background, bottom left",
    "a bowl of ramen on a wooden table, studio photo, high detail",
    "a large blue triangle on a yellow background, center",
    "a cyberpunk street at night, neon signs, rain, reflections",
    "a small black square on a purple background, top left",
    "a snowy mountain landscape with a frozen lake, morning fog",
    "a large orange diamond on a blue background, bottom right",
    "a cute corgi wearing sunglasses on a beach, digital art",
    "a small yellow triangle on a red background, top right",
    "an oil painting of a vase of sunflowers in the style of van gogh",
    "a large red square on a white background, bottom left",
    "a futuristic spaceship interior, volumetric light, concept art",
    "a small purple circle on a black background, center",
    "a medieval castle on a hill under a starry sky",
    "a large green diamond on a red background, top left",
    "a minimalist logo of a fox, flat vector, white background",
    "a small blue square on an orange background, bottom right",
    "a macro photo of a dew drop on a leaf",
    "a large white triangle on a purple background, center",
    "a busy market street in marrakech, vivid colors",
    "a small orange circle on a green background, top right",
    "a pencil sketch of a cat sleeping on a windowsill",
    "a large black diamond on a yellow background, bottom left",
    "an underwater coral reef with tropical fish, sunbeams",
)


@dataclass
class CalibrationSet:
    """Recorded U-Net input batches (CFG: batch 2B = [unconditional, conditional])."""

    batches: list[dict[str, np.ndarray]]
    timesteps: list[int]
    step_indices: list[int]
    prompt_indices: list[int]
    prompts: list[str]
    steps: int
    seed: int
    guidance_scale: float
    height: int
    width: int
    runs: int = 0
    component_inputs: dict[str, list[dict[str, np.ndarray]]] = field(default_factory=dict)
    shallow_batches: list[dict[str, np.ndarray]] = field(default_factory=list)  # unet_shallow inputs (DeepCache)
    meta_extra: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.batches)

    def meta(self) -> dict[str, Any]:
        ts = sorted(set(self.timesteps))
        return {
            "prompts": self.prompts,
            "num_prompts": len(self.prompts),
            "steps": self.steps,
            "size": len(self.batches),
            "sampling_runs": self.runs,
            "seed": self.seed,
            "guidance_scale": self.guidance_scale,
            "height": self.height,
            "width": self.width,
            "unet_batch": int(self.batches[0]["sample"].shape[0]) if self.batches else 0,
            "timesteps": ts,
            "timestep_range": [min(ts), max(ts)] if ts else None,
            "distinct_steps": len(set(self.step_indices)),
            **self.meta_extra,
        }

    def save(self, path: Path | str) -> None:
        arrays: dict[str, np.ndarray] = {}
        for i, b in enumerate(self.batches):
            for k, v in b.items():
                arrays[f"{i}/{k}"] = v
        np.savez(path, **arrays, timesteps=np.array(self.timesteps), step_indices=np.array(self.step_indices),
                 prompt_indices=np.array(self.prompt_indices))


def collect_heldout(pipe: Any, prompts: Sequence[str], size: int, steps: int, seed: int, guidance_scale: float,
                    height: int | None = None, width: int | None = None) -> CalibrationSet:
    """The held-out batches of a calibration with these settings: the same selection over the prompts in
    reverse order with other seeds, so no batch repeats a calibration trajectory. ``ldm-quantize`` reports
    its quality on them; rebuilt from an artifact's calibration meta they are the same batches."""
    return collect_calibration(pipe, list(reversed(prompts)), size, steps, seed + 100_003, guidance_scale, height,
                               width)


def selection(size: int, steps: int, per_run: int | None = None) -> tuple[int, list[tuple[int, int]]]:
    """(number of sampling runs, [(run, step index)] for each kept batch)."""
    if size < 1:
        raise LdmDeployError(f"calibration size must be >= 1, got {size}")
    if steps < 1:
        raise LdmDeployError(f"calibration steps must be >= 1, got {steps}")
    per_run = per_run or max(1, math.ceil(steps / 4))
    per_run = min(per_run, steps)
    n_runs = math.ceil(size / per_run)
    picks = [(k % n_runs, int((k + 0.5) * steps / size)) for k in range(size)]
    return n_runs, picks


class _Recorder:
    """Observes one sampling run: the U-Net inputs of the chosen steps, and every call's inputs
    of the ``components`` named (text encoder, VAE decoder). Nothing in the pipeline changes."""

    def __init__(self, keep_steps: set[int], components: Sequence[str] = ()):
        self.keep_steps = keep_steps
        self.records: list[tuple[int, dict[str, np.ndarray]]] = []
        self.shallow: dict[int, dict[str, np.ndarray]] = {}
        self.inputs: dict[str, list[dict[str, np.ndarray]]] = {c: [] for c in components}
        self._feature: np.ndarray | None = None  # the previous step's cached feature

    def on_component(self, name: str, inputs: Mapping[str, np.ndarray]) -> None:
        if name in self.inputs:
            self.inputs[name].append({k: np.array(v, copy=True) for k, v in inputs.items()})

    def on_step_end(self, info: Any) -> None:
        feature = getattr(info, "cache_feature", None)
        if info.index in self.keep_steps:
            inputs = {k: np.array(v, dtype=np.float32, copy=True) for k, v in info.unet_inputs.items()}
            self.records.append((info.index, inputs))
            if feature is not None:
                stale = self._feature if self._feature is not None else feature
                self.shallow[info.index] = {**inputs, "cache_feature": np.array(stale, dtype=np.float32, copy=True)}
        self._feature = feature


def collect_calibration(
    pipe: Any,
    prompts: Sequence[str] | None = None,
    size: int = 64,
    steps: int = 20,
    seed: int = 0,
    guidance_scale: float = 7.5,
    height: int | None = None,
    width: int | None = None,
    per_run: int | None = None,
    log: Callable[[str], None] = lambda s: None,
    record_components: Sequence[str] = (),
) -> CalibrationSet:
    """Run ``pipe`` (a runtime ``Pipeline``) on the prompts and keep ``size`` U-Net input batches
    spread over the trajectories (see the module docstring); with ``record_components``, also
    every input of those components (``CalibrationSet.component_inputs``). ``pipe`` is only
    observed, so other threads may use it at the same time."""
    prompts = list(DEFAULT_PROMPTS if prompts is None else prompts)
    if not prompts:
        raise LdmDeployError("the calibration prompt list is empty")
    if guidance_scale <= 1.0:
        raise LdmDeployError("calibration uses classifier-free guidance: guidance_scale must be > 1")
    n_runs, picks = selection(size, steps, per_run)
    height = height or pipe.default_size[0]
    width = width or pipe.default_size[1]
    by_run: dict[int, list[int]] = {}
    for k, (r, j) in enumerate(picks):
        by_run.setdefault(r, []).append(k)
    batches: list[dict[str, np.ndarray] | None] = [None] * size
    shallow: list[dict[str, np.ndarray] | None] = [None] * size
    timesteps = [0] * size
    prompt_idx = [0] * size
    component_inputs: dict[str, list[dict[str, np.ndarray]]] = {c: [] for c in record_components}
    for r in range(n_runs):
        wanted = {picks[k][1]: k for k in by_run.get(r, [])}
        rec = _Recorder(set(wanted), record_components)
        pi = r % len(prompts)
        pipe(prompts[pi], num_inference_steps=steps, guidance_scale=guidance_scale, height=height, width=width,
             seed=seed + r, output_type="np", observer=rec)
        for step, inputs in rec.records:
            k = wanted[step]
            batches[k] = inputs
            shallow[k] = rec.shallow.get(step)
            timesteps[k] = int(round(float(inputs["timestep"].reshape(-1)[0])))
            prompt_idx[k] = pi
        for c, items in rec.inputs.items():
            component_inputs[c].extend(items)
        log(f"calibration: run {r + 1}/{n_runs} '{prompts[pi][:48]}' kept steps {sorted(wanted)}")
    kept = [b for b in batches if b is not None]
    if len(kept) != size:  # pragma: no cover - would mean the pipeline ran fewer steps than asked
        raise LdmDeployError(f"calibration recorded {len(kept)} batches, expected {size}")
    return CalibrationSet(
        batches=kept, timesteps=timesteps, step_indices=[j for _, j in picks], prompt_indices=prompt_idx,
        prompts=prompts, steps=steps, seed=seed, guidance_scale=guidance_scale, height=height, width=width,
        runs=n_runs, component_inputs=component_inputs, shallow_batches=[b for b in shallow if b is not None],
    )
