"""DDIM scheduler in numpy, numerically matching `diffusers.DDIMScheduler` (no torch needed), and the registry
of the runtime's schedulers (:data:`SCHEDULERS`, :func:`make_scheduler`)."""

from __future__ import annotations

from typing import Any, Callable, Protocol

import numpy as np

from ..errors import LdmDeployError
from .dpm_solver import DPMSolverMultistepScheduler
from .euler import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler
from .sigmas import SPACINGS, config_kwargs, cumulative_alphas, img2img_start, make_betas, spaced_timesteps

_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


class DDIMScheduler:
    """Denoising diffusion implicit models (arXiv:2010.02502), the sampler of the Stable Diffusion pipelines.

    Arguments have the names, defaults and meaning of `diffusers.DDIMScheduler`'s config. Like diffusers, the
    noise schedule (`betas`, `alphas_cumprod`) is kept in float32; `step` and `add_noise` compute in float64
    and return the dtype of their input sample.
    """

    init_noise_sigma: float = 1.0
    order: int = 1
    stochastic: bool = False  # draws noise only with eta > 0, which the caller decides

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        clip_sample: bool = True,
        clip_sample_range: float = 1.0,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "leading",
        rescale_betas_zero_snr: bool = False,
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
    ):
        if thresholding:
            raise ValueError("thresholding=True is not supported (dynamic thresholding is for pixel-space models)")
        if prediction_type not in _PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {_PREDICTION_TYPES}, got {prediction_type!r}")
        if timestep_spacing not in SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {SPACINGS}, got {timestep_spacing!r}")
        betas = make_betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                           rescale_betas_zero_snr)

        self.num_train_timesteps = int(num_train_timesteps)
        self.clip_sample = bool(clip_sample)
        self.clip_sample_range = float(clip_sample_range)
        self.steps_offset = int(steps_offset)
        self.prediction_type = prediction_type
        self.timestep_spacing = timestep_spacing

        self.betas = betas
        self.alphas = (1.0 - betas).astype(np.float32)
        self.alphas_cumprod = cumulative_alphas(betas)
        # The last step has no "previous" alpha product: use 1 (a clean sample) or the product at t=0.
        self.final_alpha_cumprod = 1.0 if set_alpha_to_one else float(self.alphas_cumprod[0])

        self.num_inference_steps: int | None = None
        self.timesteps = np.arange(self.num_train_timesteps, dtype=np.int64)[::-1].copy()

    @classmethod
    def from_config(cls, config: dict) -> "DDIMScheduler":
        """Build from a diffusers `scheduler_config.json` dict; keys this class does not know are ignored."""
        return cls(**config_kwargs(config, cls.__init__))

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Choose the `num_inference_steps` timesteps (descending, int64) to sample with."""
        n, T = int(num_inference_steps), self.num_train_timesteps
        if n < 1 or n > T:
            raise ValueError(f"num_inference_steps must be in [1, {T}], got {num_inference_steps}")
        timesteps = spaced_timesteps(self.timestep_spacing, n, T, self.steps_offset).round().astype(np.int64)
        if timesteps.max() >= T or timesteps.min() < 0:
            raise ValueError(
                f"steps_offset={self.steps_offset} with {n} steps gives timesteps outside [0, {T - 1}]: {timesteps}"
            )
        self.num_inference_steps = n
        self.timesteps = np.ascontiguousarray(timesteps)

    def scale_model_input(self, sample: np.ndarray, timestep: float | None = None) -> np.ndarray:
        """DDIM feeds the model the sample as it is."""
        return sample

    def _alpha_prod(self, t: int) -> float:
        return float(self.alphas_cumprod[t]) if t >= 0 else self.final_alpha_cumprod

    def step(
        self,
        model_output: np.ndarray,
        timestep: int,
        sample: np.ndarray,
        eta: float = 0.0,
        noise: np.ndarray | None = None,
        generator: np.random.Generator | None = None,
    ) -> np.ndarray:
        """One DDIM update x_t -> x_{t-1} (formulas 12 and 16 of the paper); returns the previous sample.

        `eta` scales the fresh noise (0: deterministic DDIM, 1: DDPM-like); with `eta > 0`, give either the
        `noise` to add (shaped like `sample`) or a `generator` to draw it from.
        """
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps() before step()")
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        if eta > 0 and (noise is None) == (generator is None):
            raise ValueError("eta > 0 needs exactly one of `noise` or `generator`")
        t = int(timestep)
        if not 0 <= t < self.num_train_timesteps:
            raise ValueError(f"timestep {t} outside [0, {self.num_train_timesteps - 1}]")

        # diffusers steps back by the integer ratio, whatever the spacing ("trailing"/"linspace" included)
        prev_t = t - self.num_train_timesteps // self.num_inference_steps
        a_t, a_prev = self._alpha_prod(t), self._alpha_prod(prev_t)
        b_t = 1.0 - a_t
        x = np.asarray(sample, dtype=np.float64)
        out = np.asarray(model_output, dtype=np.float64)

        if self.prediction_type == "epsilon":
            x0 = (x - b_t**0.5 * out) / a_t**0.5
            eps = out
        elif self.prediction_type == "v_prediction":
            x0 = a_t**0.5 * x - b_t**0.5 * out
            eps = a_t**0.5 * out + b_t**0.5 * x
        else:  # sample
            x0 = out
            eps = (x - a_t**0.5 * x0) / b_t**0.5
        if self.clip_sample:
            x0 = np.clip(x0, -self.clip_sample_range, self.clip_sample_range)

        variance = (1.0 - a_prev) / b_t * (1.0 - a_t / a_prev)
        std = eta * variance**0.5
        prev = a_prev**0.5 * x0 + (1.0 - a_prev - std**2) ** 0.5 * eps
        if eta > 0:
            if noise is None:
                noise = generator.standard_normal(x.shape)
            noise = np.asarray(noise, dtype=np.float64)
            if noise.shape != x.shape:
                raise ValueError(f"noise shape {noise.shape} != sample shape {x.shape}")
            prev = prev + std * noise
        return prev.astype(np.asarray(sample).dtype, copy=False)

    def add_noise(self, original: np.ndarray, noise: np.ndarray, timesteps: np.ndarray | int) -> np.ndarray:
        """Sample q(x_t | x_0) = sqrt(a_t) x_0 + sqrt(1 - a_t) noise; `timesteps` is one int or one per batch item."""
        x0 = np.asarray(original)
        a = self.alphas_cumprod[np.asarray(timesteps, dtype=np.int64)].astype(np.float64).reshape(-1)
        if a.size != 1 and a.size != x0.shape[0]:
            raise ValueError(f"got {a.size} timesteps for a batch of {x0.shape[0]}")
        a = a.reshape((-1,) + (1,) * (x0.ndim - 1))
        noisy = a**0.5 * x0.astype(np.float64) + (1.0 - a) ** 0.5 * np.asarray(noise, dtype=np.float64)
        return noisy.astype(x0.dtype, copy=False)

    def img2img_timesteps(self, num_inference_steps: int, strength: float) -> np.ndarray:
        """Set the timesteps, then return the tail that img2img runs at `strength` (1: all steps, 0: none).

        The first returned timestep is the one to `add_noise` the encoded image at.
        """
        start = img2img_start(int(num_inference_steps), strength)
        self.set_timesteps(num_inference_steps)
        return self.timesteps[start * self.order :]

    def __len__(self) -> int:
        return self.num_train_timesteps


class Scheduler(Protocol):
    """What the sampling loop uses of a scheduler (DDIM, DPM-Solver++ 2M, Euler, Euler ancestral)."""

    order: int
    init_noise_sigma: float
    stochastic: bool  # draws noise in `step` (from its `generator`)
    timesteps: np.ndarray

    def set_timesteps(self, num_inference_steps: int) -> None: ...

    def scale_model_input(self, sample: np.ndarray, timestep: Any) -> np.ndarray: ...

    def step(self, model_output: np.ndarray, timestep: Any, sample: np.ndarray, **kwargs: Any) -> np.ndarray: ...

    def add_noise(self, original: np.ndarray, noise: np.ndarray, timesteps: Any) -> np.ndarray: ...

    def img2img_timesteps(self, num_inference_steps: int, strength: float) -> np.ndarray: ...


def _dpm(karras: bool) -> Callable[[dict], Scheduler]:
    settings = {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": karras}
    return lambda config: DPMSolverMultistepScheduler.from_config({**config, **settings})


#: Sampler names -> factories taking a diffusers scheduler config (as `X.from_config(config)` does).
SCHEDULERS: dict[str, Callable[[dict], Scheduler]] = {
    "ddim": DDIMScheduler.from_config,
    "dpm++2m": _dpm(karras=False),
    "dpm++2m-karras": _dpm(karras=True),
    "euler": EulerDiscreteScheduler.from_config,
    "euler-a": EulerAncestralDiscreteScheduler.from_config,
}


def make_scheduler(name: str, config: dict) -> Scheduler:
    """The scheduler `name` (a key of :data:`SCHEDULERS`) built from a diffusers scheduler config dict."""
    factory = SCHEDULERS.get(name) if isinstance(name, str) else None
    if factory is None:
        raise LdmDeployError(f"unknown scheduler {name!r}; choose one of: {', '.join(SCHEDULERS)}")
    try:
        return factory(config)
    except (TypeError, ValueError) as e:
        raise LdmDeployError(f"scheduler {name!r} cannot use this scheduler config: {e}") from None
