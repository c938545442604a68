"""One exported component behind an ONNX Runtime session, bound by its spec."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..specs import ComponentSpec

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int32)": np.int32,
              "tensor(int64)": np.int64}


class OnnxComponent:
    """Runs one graph: casts inputs to the graph's dtypes, returns float32 numpy outputs.

    On the CUDA execution provider, inputs that stay constant over the sampling loop can be bound
    once on the device (``bind_constant``) and outputs are written to device buffers through I/O
    binding; each step then moves only the small latent tensor.
    """

    def __init__(self, spec: ComponentSpec, session: Any, device: str = "cpu"):
        self.spec = spec
        self.session = session
        self.device = device
        self.input_types = {i.name: _ORT_TYPES.get(i.type, np.float32) for i in session.get_inputs()}
        missing = set(spec.input_names) - set(self.input_types)
        if missing:
            from ..errors import LdmDeployError

            raise LdmDeployError(f"{spec.name} graph lacks inputs {sorted(missing)} declared by its spec")

    @classmethod
    def load(cls, spec: ComponentSpec, path: Path, provider: str = "cpu", provider_options: dict | None = None,
             threads: int = 0, low_memory: bool = False) -> "OnnxComponent":
        from .sessions import make_session

        session = make_session(path, provider, provider_options, threads, low_memory)
        device = "cuda" if session.get_providers()[0] in ("CUDAExecutionProvider", "TensorrtExecutionProvider") else "cpu"
        return cls(spec, session, device)

    def _cast(self, name: str, value: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(value, dtype=self.input_types[name])

    def __call__(self, **inputs: np.ndarray) -> np.ndarray:
        feeds = {k: self._cast(k, v) for k, v in inputs.items()}
        if self.device == "cpu":
            out = self.session.run([self.spec.output_names[0]], feeds)[0]
        else:
            out = self._run_bound(feeds, {})
        return out.astype(np.float32, copy=False)

    # --- device path (CUDA / TensorRT execution providers) ---------------------------------
    def device_binding(self, **constants: np.ndarray) -> "DeviceBinding":
        """An I/O binding with ``constants`` uploaded once to the device (one per call/thread)."""
        return DeviceBinding(self, {k: self._cast(k, v) for k, v in constants.items()})

    def _run_bound(self, feeds: dict[str, np.ndarray], constants: dict[str, Any]) -> np.ndarray:
        return self.device_binding().run(**feeds)


class DeviceBinding:
    """Per-call I/O binding for device execution providers."""

    def __init__(self, component: OnnxComponent, constants: dict[str, np.ndarray]):
        import onnxruntime as ort

        self.component = component
        self.binding = component.session.io_binding()
        self._ort = ort
        for name, value in constants.items():
            self.binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0))

    def run(self, **inputs: np.ndarray) -> np.ndarray:
        c = self.component
        for name, value in inputs.items():
            self.binding.bind_ortvalue_input(name, self._ort.OrtValue.ortvalue_from_numpy(c._cast(name, value), "cuda", 0))
        self.binding.bind_output(c.spec.output_names[0], "cuda", 0)
        c.session.run_with_iobinding(self.binding)
        return self.binding.copy_outputs_to_cpu()[0].astype(np.float32, copy=False)
