"""Backends by name: each maps an artifact's components to :class:`~.components.Component`s.

==============  ==========================================================================
``ort-cpu``     ONNX Runtime, CPU execution provider (the default; the base install)
``ort-cuda``    ONNX Runtime, CUDA execution provider (``ldm-deploy[gpu]``)
``ort-trt``     ONNX Runtime, TensorRT execution provider (``ldm-deploy[gpu]``)
``tensorrt``    native TensorRT engines built into the artifact by ``ldm-build``
``openvino``    OpenVINO compiled models on the CPU (``ldm-deploy[openvino]``; :mod:`.openvino`)
==============  ==========================================================================

A new backend is one :class:`Backend` entry: ``Pipeline.load``, ``ldm-generate --backend`` and
the benchmark's runtime variants all read :data:`BACKENDS`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

from ..artifact import Artifact
from ..errors import LdmDeployError
from .components import Component, OnnxComponent
from .cpu_features import int8_saturation_warning
from .sessions import provider_unavailable


@dataclass(frozen=True)
class LoadOptions:
    """Settings a backend may use; those it has no use for are ignored."""

    threads: int = 0  # intra-op threads (ONNX Runtime, OpenVINO); 0 = all cores
    low_memory: bool = False  # ONNX Runtime without its CPU memory arena
    precision_hint: str = "default"  # OpenVINO INFERENCE_PRECISION_HINT: default, f32, bf16
    static_shape: tuple[int, int, int] | None = None  # OpenVINO: compile for one (batch, height, width)
    compile_cache: bool = True  # OpenVINO: compiled-model cache in the artifact (openvino-cache/)

    def backend_specific(self) -> list[str]:
        """The fields set away from their defaults that only some backends use."""
        defaults = LoadOptions()
        return [f for f in BACKEND_SPECIFIC if getattr(self, f) != getattr(defaults, f)]


#: LoadOptions fields a backend must declare (``Backend.options``) to be given non-default values.
BACKEND_SPECIFIC = ("precision_hint", "static_shape", "compile_cache")


@dataclass(frozen=True)
class Backend:
    name: str
    description: str
    load: Callable[[Artifact, Sequence[str], LoadOptions], dict[str, Component]]
    unavailable: Callable[[], str | None]  # why it cannot run in this interpreter, or None
    device: str = "cpu"
    options: tuple[str, ...] = ()  # the BACKEND_SPECIFIC LoadOptions fields it honours

    def check_options(self, opts: LoadOptions) -> None:
        unused = [f for f in opts.backend_specific() if f not in self.options]
        if unused:
            raise LdmDeployError(f"{', '.join(unused)} {'does' if len(unused) == 1 else 'do'} not apply to backend "
                                 f"{self.name!r} (only to: {', '.join(_users(unused[0])) or 'none'})")


def _users(option: str) -> list[str]:
    return [b.name for b in BACKENDS.values() if option in b.options]


def check_artifact_backend(art: Artifact, backend: str) -> None:
    """Artifacts whose manifest lists ``backends`` (OpenVINO IR from ``ldm-quantize --target
    openvino``) run only there; one line otherwise."""
    allowed = art.manifest.get("backends")
    if allowed and backend not in allowed:
        raise LdmDeployError(f"{art.path} runs only on backend {' or '.join(map(repr, allowed))} (its graphs are "
                             f"{art.manifest.get('graph_format', 'not ONNX')}), not {backend!r}; load it with "
                             f"backend={allowed[0]!r} (ldm-generate --backend {allowed[0]})")


def _onnxruntime(provider: str) -> Callable[[Artifact, Sequence[str], LoadOptions], dict[str, Component]]:
    def load(art: Artifact, names: Sequence[str], opts: LoadOptions) -> dict[str, Component]:
        if provider == "cpu":
            msg = int8_saturation_warning(art.manifest)
            if msg:
                warnings.warn(msg, RuntimeWarning, stacklevel=4)
        return {c: OnnxComponent.load(art.spec(c), art.model_file(c), provider, opts.threads, opts.low_memory)
                for c in names}

    return load


def _tensorrt(art: Artifact, names: Sequence[str], opts: LoadOptions) -> dict[str, Component]:
    from ..tensorrt.engine import load_components

    return dict(load_components(art, names))


def _openvino(art: Artifact, names: Sequence[str], opts: LoadOptions) -> dict[str, Component]:
    from .openvino import load_components as load_openvino

    return dict(load_openvino(art, names, opts.precision_hint, opts.threads, opts.static_shape, opts.compile_cache))


def _openvino_unavailable() -> str | None:
    from .openvino import openvino_unavailable

    return openvino_unavailable()


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
        Backend("openvino", "OpenVINO compiled models, CPU", _openvino, _openvino_unavailable,
                options=BACKEND_SPECIFIC),
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
    chosen = get_backend(backend)
    chosen.check_options(options)
    check_artifact_backend(art, backend)
    return chosen.load(art, names, options)
