"""DPM-Solver++ 2M in numpy, numerically matching `diffusers.DPMSolverMultistepScheduler` (no torch needed)."""

from __future__ import annotations

import math

import numpy as np

from .sigmas import SigmaScheduler, karras_sigmas, sigma_to_timestep, spaced_timesteps


def _alpha(sigma: float) -> float:
    """alpha_t = sqrt(a_t) = 1 / sqrt(sigma^2 + 1); the variance-preserving noise level is sigma * alpha_t."""
    return 1.0 / math.sqrt(sigma * sigma + 1.0)


class DPMSolverMultistepScheduler(SigmaScheduler):
    """DPM-Solver++ (arXiv:2211.01095), multistep, second order ("DPM++ 2M"), optionally on Karras sigmas.

    A data-prediction solver in lambda = -log(sigma): each step is exact for the linear part and integrates the
    predicted clean sample x0 with the current x0 (first order: the first and the last step) or with the
    current and previous x0 (second order, midpoint form). Deterministic: `scale_model_input` is the identity
    and `init_noise_sigma` is 1. Other arguments: those of :class:`~.sigmas.SigmaScheduler`.
    """

    def __init__(
        self,
        solver_order: int = 2,
        algorithm_type: str = "dpmsolver++",
        solver_type: str = "midpoint",
        lower_order_final: bool = True,
        use_karras_sigmas: bool = False,
        **schedule,
    ):
        if solver_order not in (1, 2):
            raise ValueError(f"solver_order must be 1 or 2, got {solver_order}")
        if algorithm_type != "dpmsolver++" or solver_type != "midpoint":
            raise ValueError(f"only algorithm_type 'dpmsolver++' with solver_type 'midpoint' is supported, "
                             f"got {algorithm_type!r} with {solver_type!r}")
        super().__init__(**schedule)
        self.solver_order = solver_order
        # With a final sigma of 0 the last step is first order whatever `lower_order_final` says; it only
        # matters for third order, which this class does not have.
        self.lower_order_final = bool(lower_order_final)
        self.use_karras_sigmas = bool(use_karras_sigmas)
        self._prev_x0: np.ndarray | None = None

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Choose the timesteps (descending, int64) and their sigmas; forget the previous model outputs."""
        n, T = self._check_steps(num_inference_steps), self.num_train_timesteps
        if self.use_karras_sigmas:  # over the whole training range; the spacing does not apply
            sigmas = karras_sigmas(float(self.train_sigmas[0]), float(self.train_sigmas[-1]), n)
            timesteps = sigma_to_timestep(sigmas, self.train_sigmas)
            if self.beta_schedule != "squaredcos_cap_v2":  # diffusers truncates the cosine schedule's instead
                timesteps = timesteps.round()
        else:
            # diffusers spaces n + 1 points and drops the last (t = offset) for "leading" and "linspace"
            extra = 0 if self.timestep_spacing == "trailing" else 1
            timesteps = spaced_timesteps(self.timestep_spacing, n + extra, T, self.steps_offset).round()[: n]
            sigmas = np.interp(timesteps, np.arange(T), self.train_sigmas)
        self._set(timesteps.astype(np.int64), sigmas)
        self._prev_x0 = None

    def scale_model_input(self, sample: np.ndarray, timestep: float | None = None) -> np.ndarray:
        """DPM-Solver feeds the model the sample as it is."""
        return sample

    def _predict_x0(self, model_output: np.ndarray, sample: np.ndarray, sigma: float) -> np.ndarray:
        alpha, sigma_vp = _alpha(sigma), sigma * _alpha(sigma)
        if self.prediction_type == "epsilon":
            return (sample - sigma_vp * model_output) / alpha
        return alpha * sample - sigma_vp * model_output  # v_prediction

    def step(
        self,
        model_output: np.ndarray,
        timestep: float,
        sample: np.ndarray,
        generator: np.random.Generator | None = None,
        noise: np.ndarray | None = None,
    ) -> np.ndarray:
        """One solver step from `timestep` to the next one; returns the previous (less noisy) sample.

        x' = (sigma'_vp / sigma_vp) x + alpha' (1 - e^-h) D, with h = lambda' - lambda = log(sigma / sigma'):
        D = x0 (first order) or x0 + (x0 - x0_prev) / (2 r), r = h_prev / h (second order). Draws no noise:
        `generator` and `noise` are accepted for a uniform interface and ignored.
        """
        i = self._step_index(timestep)
        sigma, sigma_next = float(self.sigmas[i]), float(self.sigmas[i + 1])
        x = np.asarray(sample, dtype=np.float64)
        x0 = self._predict_x0(np.asarray(model_output, dtype=np.float64), x, sigma)

        last = i == self.num_inference_steps - 1
        d = x0
        if self.solver_order == 2 and self._prev_x0 is not None and not last:
            h = math.log(sigma / sigma_next)
            h_prev = math.log(float(self.sigmas[i - 1]) / sigma)
            d = x0 + (x0 - self._prev_x0) * (h / h_prev) / 2
        a_next = _alpha(sigma_next)
        prev = (sigma_next * a_next) / (sigma * _alpha(sigma)) * x + a_next * (1.0 - sigma_next / sigma) * d

        self._prev_x0 = x0
        self._index = i + 1
        return prev.astype(np.asarray(sample).dtype, copy=False)

    def add_noise(self, original: np.ndarray, noise: np.ndarray, timesteps: np.ndarray | float) -> np.ndarray:
        """Sample q(x_t | x_0) = alpha_t x_0 + sigma_vp noise at the timesteps' sigmas (as diffusers does)."""
        x0 = np.asarray(original)
        sigma = self._add_noise_sigmas(timesteps, x0.ndim)
        alpha = 1.0 / np.sqrt(sigma**2 + 1.0)
        noisy = alpha * x0.astype(np.float64) + sigma * alpha * np.asarray(noise, dtype=np.float64)
        return noisy.astype(x0.dtype, copy=False)
