"""Euler and Euler-ancestral samplers in numpy, numerically matching diffusers' `EulerDiscreteScheduler` and
`EulerAncestralDiscreteScheduler` (no torch needed)."""

from __future__ import annotations

import numpy as np

from .sigmas import SigmaScheduler, karras_sigmas, sigma_to_timestep, spaced_timesteps


class EulerDiscreteScheduler(SigmaScheduler):
    """Euler's method on the probability-flow ODE dx/dsigma = (x - x0) / sigma (arXiv:2206.00364, algorithm 2
    without churn), in k-diffusion's variables: the latents are x_0 + sigma noise, so the model sees them scaled
    by 1 / sqrt(sigma^2 + 1) (`scale_model_input`) and the initial noise is scaled by `init_noise_sigma`.

    Timesteps are float32 and may be fractional. `use_karras_sigmas` respaces the sigmas between those of the
    first and last spaced timesteps (or `sigma_max` / `sigma_min`). Other arguments: those of
    :class:`~.sigmas.SigmaScheduler`.
    """

    def __init__(
        self,
        use_karras_sigmas: bool = False,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        **schedule,
    ):
        super().__init__(**schedule)
        self.use_karras_sigmas = bool(use_karras_sigmas)
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    @property
    def init_noise_sigma(self) -> float:  # type: ignore[override]
        """The initial noise's standard deviation: the largest sigma, or sqrt(sigma^2 + 1) for "leading" spacing."""
        top = float(self.sigmas.max())
        return top if self.timestep_spacing in ("linspace", "trailing") else (top * top + 1.0) ** 0.5

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Choose the timesteps (descending, float32) and their sigmas."""
        n, T = self._check_steps(num_inference_steps), self.num_train_timesteps
        timesteps = spaced_timesteps(self.timestep_spacing, n, T, self.steps_offset).astype(np.float32)
        sigmas = np.interp(timesteps, np.arange(T), self.train_sigmas)
        if self.use_karras_sigmas:
            lo = sigmas[-1] if self.sigma_min is None else self.sigma_min
            hi = sigmas[0] if self.sigma_max is None else self.sigma_max
            sigmas = karras_sigmas(float(lo), float(hi), n)
            timesteps = sigma_to_timestep(sigmas, self.train_sigmas).astype(np.float32)
        self._set(timesteps, sigmas)

    def scale_model_input(self, sample: np.ndarray, timestep: float) -> np.ndarray:
        """The model's input at `timestep`: sample / sqrt(sigma^2 + 1)."""
        sigma = float(self.sigmas[self._step_index(timestep)])
        return (np.asarray(sample, dtype=np.float64) / (sigma * sigma + 1.0) ** 0.5).astype(sample.dtype, copy=False)

    def _predict_x0(self, model_output: np.ndarray, sample: np.ndarray, sigma: float) -> np.ndarray:
        if self.prediction_type == "epsilon":
            return sample - sigma * model_output
        return model_output * (-sigma / (sigma * sigma + 1.0) ** 0.5) + sample / (sigma * sigma + 1.0)  # v

    def step(
        self,
        model_output: np.ndarray,
        timestep: float,
        sample: np.ndarray,
        generator: np.random.Generator | None = None,
        noise: np.ndarray | None = None,
    ) -> np.ndarray:
        """One step from sigma to the next sigma along the derivative (x - x0) / sigma; returns the previous
        sample. Only Euler-ancestral uses `generator` or `noise`; plain Euler accepts and ignores them."""
        i = self._step_index(timestep)
        sigma, sigma_next = float(self.sigmas[i]), float(self.sigmas[i + 1])
        x = np.asarray(sample, dtype=np.float64)
        x0 = self._predict_x0(np.asarray(model_output, dtype=np.float64), x, sigma)
        prev = self._move(x, (x - x0) / sigma, sigma, sigma_next, generator, noise)
        self._index = i + 1
        return prev.astype(np.asarray(sample).dtype, copy=False)

    def _move(self, x: np.ndarray, derivative: np.ndarray, sigma: float, sigma_next: float,
              generator: np.random.Generator | None, noise: np.ndarray | None) -> np.ndarray:
        """Euler: x + (sigma' - sigma) dx/dsigma."""
        return x + derivative * (sigma_next - sigma)

    def add_noise(self, original: np.ndarray, noise: np.ndarray, timesteps: np.ndarray | float) -> np.ndarray:
        """x_0 + sigma noise at the timesteps' sigmas."""
        x0 = np.asarray(original)
        sigma = self._add_noise_sigmas(timesteps, x0.ndim)
        return (x0.astype(np.float64) + sigma * np.asarray(noise, dtype=np.float64)).astype(x0.dtype, copy=False)


class EulerAncestralDiscreteScheduler(EulerDiscreteScheduler):
    """Euler-ancestral: an Euler step down to sigma_down, then fresh noise of std sigma_up, so that
    sigma_down^2 + sigma_up^2 = sigma'^2 (k-diffusion's `sample_euler_ancestral`). Stochastic: `step` needs a
    `generator` or the `noise` to add. No Karras sigmas (diffusers has none for it). Arguments: those of
    :class:`~.sigmas.SigmaScheduler`.
    """

    stochastic = True

    def __init__(self, **schedule):
        super().__init__(**schedule)

    def _move(self, x: np.ndarray, derivative: np.ndarray, sigma: float, sigma_next: float,
              generator: np.random.Generator | None, noise: np.ndarray | None) -> np.ndarray:
        """An Euler step to sigma_down plus sigma_up times `noise` (shaped like the sample) or noise drawn from
        `generator`."""
        if (noise is None) == (generator is None):
            raise ValueError("Euler-ancestral needs exactly one of `noise` or `generator`")
        z = generator.standard_normal(x.shape) if noise is None else np.asarray(noise, dtype=np.float64)
        if z.shape != x.shape:
            raise ValueError(f"noise shape {z.shape} != sample shape {x.shape}")
        sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        return x + derivative * (sigma_down - sigma) + sigma_up * z
