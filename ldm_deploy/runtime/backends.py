"""Backends by name: each maps an artifact's components to :class:`~.components.Component`s.

==============  ==========================================================================
``ort-cpu``     ONNX Runtime, CPU execution provider (the default; the base install)
``ort-cuda``    ONNX Runtime, CUDA execution provider (``ldm-deploy[gpu]``)
``ort-trt``     ONNX Runtime, TensorRT execution provider (``ldm-deploy[gpu]``)
``tensorrt``    native TensorRT engines built into the artifact by ``ldm-build``
==============  ==========================================================================

A new backend is one :class:`Backend` entry: ``Pipeline.load``, ``ldm-generate --backend`` and
the benchmark's runtime variants all read :data:`BACKENDS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from ..artifact import Artifact
from ..errors import LdmDeployError
from .components import Component, OnnxComponent
from .sessions import provider_unavailable


@dataclass(frozen=True)
class LoadOptions:
    """Settings a backend may use; those it has no use for are ignored."""

    threads: int = 0  # intra-op threads (ONNX Runtime); 0 = all cores
    low_memory: bool = False  # ONNX Runtime without its CPU memory arena


@dataclass(frozen=True)
class Backend:
    name: str
    description: str
    load: Callable[[Artifact, Sequence[str], LoadOptions], dict[str, Component]]
    unavailable: Callable[[], str | None]  # why it cannot run in this interpreter, or None
    device: str = "cpu"


def _onnxruntime(provider: str) -> Callable[[Artifact, Sequence[str], LoadOptions], dict[str, Component]]:
    def load(art: Artifact, names: Sequence[str], opts: LoadOptions) -> dict[str, Component]:
        return {c: OnnxComponent.load(art.spec(c), art.model_file(c), provider, opts.threads, opts.low_memory)
                for c in names}

    return load


def _tensorrt(art: Artifact, names: Sequence[str], opts: LoadOptions) -> dict[str, Component]:
    from ..tensorrt.engine import load_components

    return dict(load_components(art, names))


def _tensorrt_unavailable() -> str | None:
    from ..tensorrt import TensorRTUnavailable, require_cudart, require_tensorrt

    try:
        require_tensorrt()
        require_cudart()
    except TensorRTUnavailable as e:
        return str(e)
    return None


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("ort-cpu", "ONNX Runtime, CPU", _onnxruntime("cpu"), lambda: provider_unavailable("cpu")),
        Backend("ort-cuda", "ONNX Runtime, CUDA execution provider", _onnxruntime("cuda"),
                lambda: provider_unavailable("cuda"), "cuda"),
        Backend("ort-trt", "ONNX Runtime, TensorRT execution provider", _onnxruntime("tensorrt"),
                lambda: provider_unavailable("tensorrt"), "cuda"),
        Backend("tensorrt", "native TensorRT engines built by ldm-build", _tensorrt, _tensorrt_unavailable, "cuda"),
    )
}


def get_backend(name: str) -> Backend:
    try:
        return BACKENDS[name]
    except KeyError:
        raise LdmDeployError(f"unknown backend {name!r}: choose from {', '.join(BACKENDS)}") from None


def load_components(art: Artifact, names: Sequence[str], backend: str = "ort-cpu",
                    options: LoadOptions = LoadOptions()) -> dict[str, Component]:
    """The components ``names`` of ``art`` on ``backend``."""
    return get_backend(backend).load(art, names, options)
