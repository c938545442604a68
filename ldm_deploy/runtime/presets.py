"""Sampling presets: named choices of scheduler, step count and feature caching.

``fast`` is the combination with the best measured quality per second (benchmarks/README.md,
"Seconds per image"): DPM-Solver++ 2M at 10 steps, with the full U-Net every 3rd step where the
artifact has the DeepCache graphs.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import LdmDeployError


@dataclass(frozen=True)
class Sampling:
    scheduler: str = "ddim"
    steps: int = 25
    cache_interval: int = 1


PRESETS: dict[str, Sampling] = {"fast": Sampling("dpm++2m", 10, 3)}


def describe_preset(name: str) -> str:
    p = PRESETS[name]
    return f"{p.scheduler}, {p.steps} steps, cache interval {p.cache_interval} (1 without DeepCache graphs)"


def resolve_sampling(preset: str | None, scheduler: str | None = None, steps: int | None = None,
                     cache_interval: int | None = None, has_deepcache: bool = False) -> Sampling:
    """The defaults, or a preset's values (its caching only where ``has_deepcache``), overridden
    by every explicitly given value."""
    if preset is not None and preset not in PRESETS:
        raise LdmDeployError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    base = PRESETS[preset] if preset else Sampling()
    interval = base.cache_interval if has_deepcache else 1
    return Sampling(scheduler if scheduler is not None else base.scheduler,
                    steps if steps is not None else base.steps,
                    cache_interval if cache_interval is not None else interval)
