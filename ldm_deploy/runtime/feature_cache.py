"""Feature caching (DeepCache) in the sampling loop: which U-Net graph runs at each step.

An artifact exported with ``ldm-export --deepcache`` has two U-Net graphs: ``unet`` (the full
U-Net, which also outputs ``cache_feature``) and ``unet_shallow`` (the first and last layers
only, fed the cached feature). With ``cache_interval`` N, steps 0, N, 2N, ... run the full graph
and refresh the feature; the steps between run the shallow graph on the last feature.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from ..errors import LdmDeployError
from .components import Component

FULL, SHALLOW = "unet", "unet_shallow"


def check_cache_interval(cache_interval: object, components: Mapping[str, Component], has_graph: bool) -> None:
    """One clear line for an interval that is not an integer >= 1, or > 1 without the shallow graph
    (``has_graph``: the artifact has it, but it was not loaded)."""
    if isinstance(cache_interval, bool) or not isinstance(cache_interval, (int, np.integer)) or cache_interval < 1:
        raise LdmDeployError(f"cache_interval must be an integer >= 1 (1: no feature caching), got {cache_interval!r}")
    if cache_interval > 1 and SHALLOW not in components:
        if has_graph:
            raise LdmDeployError(f"cache_interval > 1 needs the {SHALLOW} graph: load it (Pipeline.load(components=...))")
        raise LdmDeployError("cache_interval > 1 needs an artifact with the DeepCache graphs: export it with "
                             "ldm-export --deepcache")


class CachedUNet:
    """The U-Net of one sampling loop (one per call: it holds that call's cached feature)."""

    def __init__(self, components: Mapping[str, Component], context: np.ndarray, cache_interval: int = 1):
        self.interval = int(cache_interval)
        self.full = components[FULL].device_binding(encoder_hidden_states=context)
        self.with_feature = len(components[FULL].spec.output_names) > 1
        self.shallow = components[SHALLOW].device_binding(encoder_hidden_states=context) if self.interval > 1 else None
        self.feature: np.ndarray | None = None  # the last full step's cache_feature

    def graph(self, step: int) -> str:
        """The graph that runs at ``step`` (0-based)."""
        if self.shallow is None or self.feature is None or step % self.interval == 0:
            return FULL
        return SHALLOW

    def inputs(self, graph: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The per-step inputs of ``graph`` (the shallow graph also gets the cached feature)."""
        return {**inputs, "cache_feature": self.feature} if graph == SHALLOW else inputs

    def run(self, graph: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """Noise prediction of ``graph``; a full step also refreshes the cached feature."""
        if graph == SHALLOW:
            return self.shallow.run(**inputs)  # type: ignore[union-attr]
        if not self.with_feature:
            return self.full.run(**inputs)
        noise_pred, self.feature = self.full.run_all(**inputs)
        return noise_pred
