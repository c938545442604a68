"""DDIM scheduler in numpy, numerically matching `diffusers.DDIMScheduler` (no torch needed)."""

from __future__ import annotations

import inspect
import math

import numpy as np

_SPACINGS = ("leading", "trailing", "linspace")
_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """Glide's "squaredcos_cap_v2" schedule: betas from alpha_bar(t) = cos((t + 0.008) / 1.008 * pi / 2) ** 2."""
    t = np.arange(num_train_timesteps + 1, dtype=np.float64) / num_train_timesteps
    alpha_bar = np.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.minimum(1.0 - alpha_bar[1:] / alpha_bar[:-1], max_beta)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Shift and scale sqrt(alpha_bar) so the last timestep has zero SNR (arXiv:2305.08891, algorithm 1)."""
    sqrt_ab = np.sqrt(np.cumprod(1.0 - betas))
    first, last = sqrt_ab[0], sqrt_ab[-1]
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    alpha_bar = sqrt_ab**2
    alphas = np.concatenate([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1.0 - alphas


class DDIMScheduler:
    """Denoising diffusion implicit models (arXiv:2010.02502), the sampler of the Stable Diffusion pipelines.

    Arguments have the names, defaults and meaning of `diffusers.DDIMScheduler`'s config. Like diffusers, the
    noise schedule (`betas`, `alphas_cumprod`) is kept in float32; `step` and `add_noise` compute in float64
    and return the dtype of their input sample.
    """

    init_noise_sigma: float = 1.0
    order: int = 1

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
        if timestep_spacing not in _SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {_SPACINGS}, got {timestep_spacing!r}")
        if num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")

        if trained_betas is not None:
            betas = np.asarray(trained_betas, dtype=np.float64)
            if betas.shape != (num_train_timesteps,):
                raise ValueError(f"trained_betas must have shape ({num_train_timesteps},), got {betas.shape}")
        elif beta_schedule == "linear":
            betas = np.linspace(beta_start, beta_end, num_train_timesteps)
        elif beta_schedule == "scaled_linear":
            betas = np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=np.float32) ** 2
        elif beta_schedule == "squaredcos_cap_v2":
            betas = _cosine_betas(num_train_timesteps)
        else:
            raise ValueError(
                f"beta_schedule must be 'linear', 'scaled_linear' or 'squaredcos_cap_v2', got {beta_schedule!r}"
            )
        betas = betas.astype(np.float32)
        if rescale_betas_zero_snr:
            betas = _rescale_zero_terminal_snr(betas.astype(np.float64)).astype(np.float32)

        self.num_train_timesteps = int(num_train_timesteps)
        self.clip_sample = bool(clip_sample)
        self.clip_sample_range = float(clip_sample_range)
        self.steps_offset = int(steps_offset)
        self.prediction_type = prediction_type
        self.timestep_spacing = timestep_spacing

        self.betas = betas
        self.alphas = (1.0 - betas).astype(np.float32)
        # Products accumulate in float64 and are stored in float32, exactly as torch.cumprod does on float32.
        self.alphas_cumprod = np.cumprod(self.alphas.astype(np.float64)).astype(np.float32)
        # The last step has no "previous" alpha product: use 1 (a clean sample) or the product at t=0.
        self.final_alpha_cumprod = 1.0 if set_alpha_to_one else float(self.alphas_cumprod[0])

        self.num_inference_steps: int | None = None
        self.timesteps = np.arange(self.num_train_timesteps, dtype=np.int64)[::-1].copy()

    @classmethod
    def from_config(cls, config: dict) -> "DDIMScheduler":
        """Build from a diffusers `scheduler_config.json` dict; keys this class does not know are ignored."""
        known = set(inspect.signature(cls.__init__).parameters) - {"self"}
        return cls(**{k: v for k, v in config.items() if k in known})

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Choose the `num_inference_steps` timesteps (descending, int64) to sample with."""
        n, T = int(num_inference_steps), self.num_train_timesteps
        if n < 1 or n > T:
            raise ValueError(f"num_inference_steps must be in [1, {T}], got {num_inference_steps}")
        if self.timestep_spacing == "linspace":
            timesteps = np.linspace(0, T - 1, n).round()[::-1].astype(np.int64)
        elif self.timestep_spacing == "leading":
            timesteps = np.arange(n, dtype=np.int64)[::-1] * (T // n) + self.steps_offset
        else:  # trailing
            timesteps = np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1
        if timesteps.max() >= T or timesteps.min() < 0:
            raise ValueError(
                f"steps_offset={self.steps_offset} with {n} steps gives timesteps outside [0, {T - 1}]: {timesteps}"
            )
        self.num_inference_steps = n
        self.timesteps = np.ascontiguousarray(timesteps)

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
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        self.set_timesteps(num_inference_steps)
        n = self.num_inference_steps
        init_steps = min(int(n * strength), n)
        return self.timesteps[max(n - init_steps, 0) * self.order :]

    def __len__(self) -> int:
        return self.num_train_timesteps
