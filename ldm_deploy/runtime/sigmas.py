"""Noise-schedule helpers shared by the numpy schedulers, and the base of the sigma-based ones.

Sigmas are k-diffusion's noise levels, sigma(t) = sqrt((1 - a_t) / a_t) with a_t = alphas_cumprod[t]:
x_t / sqrt(a_t) = x_0 + sigma(t) * noise. Like diffusers, schedules are kept in float32.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable, TypeVar

import numpy as np

SPACINGS = ("leading", "trailing", "linspace")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def config_kwargs(config: dict, *inits: Callable[..., Any]) -> dict:
    """The entries of a diffusers scheduler config that the named parameters of `inits` take."""
    known = {name for init in inits for name, p in inspect.signature(init).parameters.items()
             if name != "self" and p.kind is not p.VAR_KEYWORD}
    return {k: v for k, v in config.items() if k in known}


def cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """Glide's "squaredcos_cap_v2" schedule: betas from alpha_bar(t) = cos((t + 0.008) / 1.008 * pi / 2) ** 2."""
    t = np.arange(num_train_timesteps + 1, dtype=np.float64) / num_train_timesteps
    alpha_bar = np.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.minimum(1.0 - alpha_bar[1:] / alpha_bar[:-1], max_beta)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Shift and scale sqrt(alpha_bar) so the last timestep has zero SNR (arXiv:2305.08891, algorithm 1)."""
    sqrt_ab = np.sqrt(np.cumprod(1.0 - betas))
    first, last = sqrt_ab[0], sqrt_ab[-1]
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    alpha_bar = sqrt_ab**2
    alphas = np.concatenate([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1.0 - alphas


def linspace32(start: float, end: float, n: int) -> np.ndarray:
    """`torch.linspace(start, end, n, dtype=torch.float32)` bit for bit (numpy's differs in the last bits): a
    float32 step, and each half of the points a fused multiply-add from its own end."""
    start32, end32 = np.float32(start), np.float32(end)
    if n == 1:
        return np.array([start32])
    step = np.float64((end32 - start32) / np.float32(n - 1))
    i = np.arange(n)
    from_start = (np.float64(start32) + step * i).astype(np.float32)
    from_end = (np.float64(end32) - step * (n - 1 - i)).astype(np.float32)
    return np.where(i < n // 2, from_start, from_end)


def make_betas(
    num_train_timesteps: int,
    beta_start: float,
    beta_end: float,
    beta_schedule: str,
    trained_betas: np.ndarray | list[float] | None = None,
    rescale_betas_zero_snr: bool = False,
) -> np.ndarray:
    """The float32 betas a diffusers scheduler config describes, bit for bit as diffusers computes them (but
    for `rescale_betas_zero_snr`, which is computed in float64)."""
    if num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
    if trained_betas is not None:
        betas = np.asarray(trained_betas, dtype=np.float64)
        if betas.shape != (num_train_timesteps,):
            raise ValueError(f"trained_betas must have shape ({num_train_timesteps},), got {betas.shape}")
    elif beta_schedule == "linear":
        betas = linspace32(beta_start, beta_end, num_train_timesteps)
    elif beta_schedule == "scaled_linear":
        betas = linspace32(beta_start**0.5, beta_end**0.5, num_train_timesteps) ** 2
    elif beta_schedule == "squaredcos_cap_v2":
        betas = cosine_betas(num_train_timesteps)
    else:
        raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {beta_schedule!r}")
    betas = betas.astype(np.float32)
    if rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas.astype(np.float64)).astype(np.float32)
    return betas


def cumulative_alphas(betas: np.ndarray) -> np.ndarray:
    """alphas_cumprod = prod(1 - beta): accumulated in float64, stored in float32, as torch.cumprod on float32 does."""
    alphas = (1.0 - betas).astype(np.float32)
    return np.cumprod(alphas.astype(np.float64)).astype(np.float32)


def sigmas_from_alphas_cumprod(alphas_cumprod: np.ndarray) -> np.ndarray:
    """sigma(t) = sqrt((1 - a_t) / a_t), in float32, ascending in t."""
    a = np.asarray(alphas_cumprod, dtype=np.float32)
    return np.sqrt((1 - a) / a)


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """`n` descending sigmas evenly spaced in sigma ** (1 / rho) (arXiv:2206.00364, eq. 5)."""
    ramp = np.linspace(0.0, 1.0, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def sigma_to_timestep(sigmas: np.ndarray, train_sigmas: np.ndarray) -> np.ndarray:
    """Fractional timesteps whose sigma is `sigmas`: linear interpolation in log sigma, clamped to [0, T - 1]."""
    log_sigma = np.log(np.maximum(np.asarray(sigmas, dtype=np.float64), 1e-10))
    log_train = np.log(train_sigmas).astype(np.float64)
    return np.interp(log_sigma, log_train, np.arange(len(train_sigmas), dtype=np.float64))


def spaced_timesteps(spacing: str, n: int, num_train_timesteps: int, steps_offset: int = 0) -> np.ndarray:
    """`n` descending (float64) timesteps in [0, T) spaced as in table 2 of arXiv:2305.08891.

    "linspace" is not rounded: diffusers' DDIM and DPM-Solver round it, its Euler schedulers do not.
    """
    T = num_train_timesteps
    if spacing == "linspace":
        return np.linspace(0, T - 1, n)[::-1].copy()
    if spacing == "leading":
        return np.arange(n, dtype=np.float64)[::-1] * (T // n) + steps_offset
    if spacing == "trailing":
        return np.round(np.arange(T, 0, -T / n)) - 1
    raise ValueError(f"timestep_spacing must be one of {SPACINGS}, got {spacing!r}")


def img2img_start(num_inference_steps: int, strength: float) -> int:
    """Index of the first of `num_inference_steps` timesteps that img2img runs at `strength` (1: all, 0: none)."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    n = num_inference_steps
    return max(n - min(int(n * strength), n), 0)


# Settings of diffusers' sigma schedulers that these classes do not implement: a config may carry them only
# with these (default) values.
_UNSUPPORTED = {"use_exponential_sigmas": False, "use_beta_sigmas": False, "use_lu_lambdas": False,
                "use_flow_sigmas": False, "use_dynamic_shifting": False, "thresholding": False,
                "final_sigmas_type": "zero", "interpolation_type": "linear", "timestep_type": "discrete",
                "variance_type": None, "lambda_min_clipped": -math.inf}


_S = TypeVar("_S", bound="SigmaScheduler")


class SigmaScheduler:
    """What the sigma-based schedulers share: the training schedule, one sigma per step (and a final 0), and a
    step counter that, as in diffusers, starts at the first timestep given (or where img2img starts).

    Arguments have the names, defaults and meaning of the diffusers config keys of the same name.
    """

    order: int = 1
    stochastic: bool = False
    init_noise_sigma: float = 1.0

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
        if timestep_spacing not in SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {SPACINGS}, got {timestep_spacing!r}")
        betas = make_betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                           rescale_betas_zero_snr)
        self.alphas_cumprod = cumulative_alphas(betas)
        if rescale_betas_zero_snr:
            self.alphas_cumprod[-1] = 2.0**-24  # diffusers: tiny instead of 0, so the first sigma is finite
        self.train_sigmas = sigmas_from_alphas_cumprod(self.alphas_cumprod)
        self.num_train_timesteps = int(num_train_timesteps)
        self.beta_schedule = beta_schedule
        self.prediction_type = prediction_type
        self.timestep_spacing = timestep_spacing
        self.steps_offset = int(steps_offset)
        self.num_inference_steps: int | None = None
        self.timesteps = np.arange(self.num_train_timesteps, dtype=np.int64)[::-1].copy()
        self.sigmas = np.append(self.train_sigmas[::-1], 0.0).astype(np.float32)
        self._index: int | None = None  # the current step
        self._begin: int | None = None  # where img2img starts

    @classmethod
    def from_config(cls: type[_S], config: dict) -> _S:
        """Build from a diffusers `scheduler_config.json` dict; keys this class does not know are ignored."""
        for key, default in _UNSUPPORTED.items():
            if config.get(key, default) != default:
                raise ValueError(f"{key}={config[key]!r} is not supported by {cls.__name__}")
        return cls(**config_kwargs(config, cls.__init__, SigmaScheduler.__init__))

    def _set(self, timesteps: np.ndarray, sigmas: np.ndarray) -> None:
        """Start a new schedule: `timesteps` and their sigmas, to which the final sigma 0 is appended."""
        self.timesteps = np.ascontiguousarray(timesteps)
        self.sigmas = np.append(sigmas, 0.0).astype(np.float32)
        self.num_inference_steps = len(timesteps)
        self._index = self._begin = None

    def _check_steps(self, num_inference_steps: int) -> int:
        n, T = int(num_inference_steps), self.num_train_timesteps
        if n < 1 or n > T:
            raise ValueError(f"num_inference_steps must be in [1, {T}], got {num_inference_steps}")
        return n

    def _lookup(self, timestep: float) -> int:
        """Index of the first place of `timestep` in the schedule. (diffusers takes the second place of a
        repeated one, which skips a step and then fails at the end of the loop: Karras sigmas on the cosine
        schedule repeat the first timestep. img2img needs no look-up: `img2img_timesteps` sets the start.)"""
        found = np.flatnonzero(self.timesteps == timestep)
        if len(found) == 0:
            raise ValueError(f"timestep {timestep} is not one of this schedule's timesteps")
        return int(found[0])

    def _step_index(self, timestep: float) -> int:
        """The current step's index: the counter, started by the first call of a schedule."""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps() before step()")
        if self._index is None:
            self._index = self._lookup(timestep)
        if self._index >= self.num_inference_steps:
            raise ValueError(f"all {self.num_inference_steps} steps of this schedule have been taken")
        return self._index

    def _add_noise_sigmas(self, timesteps: np.ndarray | float, ndim: int) -> np.ndarray:
        """Sigmas for `add_noise`, shaped to broadcast over a batch: with img2img the current step's (at first,
        where img2img starts), else each timestep's (diffusers' rule)."""
        ts = np.asarray(timesteps).reshape(-1)
        idx = [self._index] * len(ts) if self._begin is not None else [self._lookup(t) for t in ts]
        return self.sigmas[idx].astype(np.float64).reshape((-1,) + (1,) * (ndim - 1))

    def img2img_timesteps(self, num_inference_steps: int, strength: float) -> np.ndarray:
        """Set the timesteps, then return the tail that img2img runs at `strength` (1: all steps, 0: none).

        The first returned timestep is the one to `add_noise` the encoded image at; stepping starts there.
        """
        self.set_timesteps(num_inference_steps)
        start = img2img_start(self.num_inference_steps, strength) * self.order
        self._index = self._begin = start
        return self.timesteps[start:]

    def set_timesteps(self, num_inference_steps: int) -> None:  # pragma: no cover - every scheduler defines it
        raise NotImplementedError

    def __len__(self) -> int:
        return self.num_train_timesteps

