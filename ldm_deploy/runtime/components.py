"""What the pipeline calls: a :class:`Component` (one exported graph, bound by its spec), whatever
the backend. ``OnnxComponent`` is ONNX Runtime's; the native TensorRT backend has
:class:`~ldm_deploy.tensorrt.engine.TrtComponent`; :mod:`.backends` maps names to loaders."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ..errors import LdmDeployError
from ..specs import ComponentSpec
from .sessions import GPU_PROVIDERS, cast_feeds, input_types, make_session


class Binding(Protocol):
    """A component with some inputs fixed for a series of calls (the sampling loop's text
    context): ``run`` takes the remaining inputs and returns the first output as float32;
    ``run_all`` returns every output of the spec, in its order."""

    def run(self, **inputs: np.ndarray) -> np.ndarray: ...

    def run_all(self, **inputs: np.ndarray) -> list[np.ndarray]: ...


@runtime_checkable
class Component(Protocol):
    """One graph behind a backend. ``__call__`` takes the spec's inputs by name (any numeric
    dtype: the component casts) and returns the first output as float32 numpy. ``device`` is
    "cpu" or "cuda". ``device_binding`` fixes inputs that stay constant over a loop (uploaded
    once on a device backend); one binding per call/thread."""

    spec: ComponentSpec
    device: str

    def __call__(self, **inputs: np.ndarray) -> np.ndarray: ...

    def device_binding(self, **constants: np.ndarray) -> Binding: ...


class OnnxComponent:
    """One graph in an ONNX Runtime session: inputs cast to the graph's dtypes, float32 outputs.

    On the CUDA / TensorRT execution providers, ``device_binding`` uploads the constant inputs
    once and writes outputs to device buffers through I/O binding; each step then moves only the
    small latent tensor.
    """

    def __init__(self, spec: ComponentSpec, session: Any):
        self.spec = spec
        self.session = session
        self.device = "cuda" if session.get_providers()[0] in GPU_PROVIDERS else "cpu"
        self.input_types = input_types(session)
        missing = set(spec.input_names) - set(self.input_types)
        if missing:
            raise LdmDeployError(f"{spec.name} graph lacks inputs {sorted(missing)} declared by its spec")

    @classmethod
    def load(cls, spec: ComponentSpec, path: Path, provider: str = "cpu", threads: int = 0,
             low_memory: bool = False) -> "OnnxComponent":
        return cls(spec, make_session(path, provider, threads, low_memory))

    def cast(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return cast_feeds(self.input_types, inputs)

    def __call__(self, **inputs: np.ndarray) -> np.ndarray:
        return self.device_binding().run(**inputs)

    def device_binding(self, **constants: np.ndarray) -> Binding:
        if self.device == "cpu":
            return HostBinding(self, self.cast(constants))
        return DeviceBinding(self, self.cast(constants))


class OutputsBinding:
    """``run`` (first output) and ``run_all`` (every spec output) over one ``_run(names, inputs)``,
    which a backend's binding implements."""

    component: Any

    def run(self, **inputs: np.ndarray) -> np.ndarray:
        return self._run(self.component.spec.output_names[:1], inputs)[0]

    def run_all(self, **inputs: np.ndarray) -> list[np.ndarray]:
        return self._run(self.component.spec.output_names, inputs)

    def _run(self, names: list[str], inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        raise NotImplementedError


class HostBinding(OutputsBinding):
    """CPU: the constants are cast once and added to every call's feeds."""

    def __init__(self, component: OnnxComponent, constants: dict[str, np.ndarray]):
        self.component = component
        self.constants = constants

    def _run(self, names: list[str], inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        c = self.component
        feeds = {**self.constants, **c.cast(inputs)}
        return [o.astype(np.float32, copy=False) for o in c.session.run(names, feeds)]


class DeviceBinding(OutputsBinding):
    """CUDA / TensorRT execution providers: an I/O binding with the constants on the device."""

    def __init__(self, component: OnnxComponent, constants: dict[str, np.ndarray]):
        import onnxruntime as ort

        self.component = component
        self.binding = component.session.io_binding()
        self._ort = ort
        for name, value in constants.items():
            self.binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0))

    def _run(self, names: list[str], inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        c = self.component
        for name, value in c.cast(inputs).items():
            self.binding.bind_ortvalue_input(name, self._ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0))
        self.binding.clear_binding_outputs()
        for name in names:
            self.binding.bind_output(name, "cuda", 0)
        c.session.run_with_iobinding(self.binding)
        return [o.astype(np.float32, copy=False) for o in self.binding.copy_outputs_to_cpu()]
