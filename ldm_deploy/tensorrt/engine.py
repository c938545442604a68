"""TensorRT runtime backend: engines loaded once, one shared device-memory block, preallocated I/O
buffers, ``execute_async_v3`` on one CUDA stream, CUDA graphs for static shapes.

No torch: device memory, copies, streams and graphs go through cuda-python's runtime bindings
(``cuda.bindings.runtime``). ``tensorrt`` and ``cuda`` are imported inside functions and
constructors only, so importing this module (and ``ldm_deploy.runtime``) works without them.

:class:`TrtComponent` has the call interface of ``runtime.components.OnnxComponent``:
``component(**inputs) -> float32 ndarray``, ``.device`` (``"cuda"``) and
``.device_binding(**constants)`` (constants uploaded once, e.g. the U-Net's text embeddings).

All components of one pipeline share one stream and one scratch block sized to the largest
engine (they run one after the other), so calls are serialized by a lock.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..artifact import Artifact
from ..errors import LdmDeployError
from ..specs import ComponentSpec
from . import TensorRTUnavailable, require_cudart, require_tensorrt
from .cache import onnx_digest, select_for_runtime
from .profiles import check_shape

MAX_GRAPHS = 8  # captured CUDA graphs kept per component (one per shape signature)


# --- cuda-python helpers --------------------------------------------------------------------
def _check(cudart: Any, result: Any, what: str) -> Any:
    """cuda-python returns ``(err, *values)``: raise on error, return the value(s)."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        try:
            name = cudart.cudaGetErrorName(err)[1].decode()
        except Exception:  # pragma: no cover - best effort
            name = str(err)
        raise LdmDeployError(f"CUDA error in {what}: {name}")
    return values[0] if len(values) == 1 else (tuple(values) if values else None)


def machine_environment() -> dict[str, str]:
    """TensorRT version, GPU name and compute capability of the current CUDA device: the part of
    an engine's cache key that decides whether a plan can be loaded here."""
    trt = require_tensorrt()
    cudart = require_cudart()
    err, count = cudart.cudaGetDeviceCount()
    if int(err) != 0 or count == 0:
        raise TensorRTUnavailable("no usable CUDA GPU is visible (TensorRT engines need an NVIDIA GPU and driver)")
    dev = _check(cudart, cudart.cudaGetDevice(), "cudaGetDevice")
    props = _check(cudart, cudart.cudaGetDeviceProperties(dev), "cudaGetDeviceProperties")
    name = props.name
    name = name.split(b"\0", 1)[0].decode() if isinstance(name, (bytes, bytearray)) else str(name)
    return {"tensorrt_version": str(trt.__version__), "gpu_name": name.strip(),
            "compute_capability": f"{props.major}.{props.minor}"}


class DeviceBuffer:
    """``cudaMalloc``'d memory, freed by :meth:`free` (or when collected)."""

    def __init__(self, cudart: Any, nbytes: int):
        self.cudart = cudart
        self.nbytes = max(int(nbytes), 1)
        self.ptr = int(_check(cudart, cudart.cudaMalloc(self.nbytes), f"cudaMalloc({self.nbytes})"))

    def free(self) -> None:
        if self.ptr:
            self.cudart.cudaFree(self.ptr)
            self.ptr = 0

    def __del__(self) -> None:  # pragma: no cover - interpreter shutdown order varies
        try:
            self.free()
        except Exception:
            pass


def _volume(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


# --- engines ---------------------------------------------------------------------------------
class TrtRuntime:
    """Deserialized engines of one pipeline, their shared scratch memory and CUDA stream."""

    def __init__(self, plans: dict[str, tuple[bytes, ComponentSpec]], use_cuda_graph: bool | None = None,
                 verbose: bool = False):
        self.trt = trt = require_tensorrt()
        self.cudart = cudart = require_cudart()
        self.logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.lock = threading.RLock()
        self.stream = _check(cudart, cudart.cudaStreamCreate(), "cudaStreamCreate")
        self.stream_handle = int(self.stream)
        engines = {}
        for name, (plan, _) in plans.items():
            engine = self.runtime.deserialize_cuda_engine(plan)
            if engine is None:
                raise LdmDeployError(f"TensorRT could not deserialize the {name} engine (see the log above); "
                                     "rebuild it with ldm-build")
            engines[name] = engine
        # one scratch block for all contexts, sized to the largest engine (they never run at once)
        size = max((_device_memory_size(e) for e in engines.values()), default=0)
        self.scratch = DeviceBuffer(cudart, size)
        self.components = {name: TrtComponent(self, plans[name][1], e, use_cuda_graph) for name, e in engines.items()}

    def synchronize(self) -> None:
        _check(self.cudart, self.cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    def close(self) -> None:
        for c in self.components.values():
            c.close()
        self.components = {}
        self.scratch.free()
        if self.stream is not None:
            self.cudart.cudaStreamDestroy(self.stream)
            self.stream = None


def _device_memory_size(engine: Any) -> int:
    size = getattr(engine, "device_memory_size_v2", None)  # TensorRT >= 10.1
    return int(size if size is not None else engine.device_memory_size)


def _create_context(trt: Any, engine: Any, scratch: DeviceBuffer) -> Any:
    """An execution context that uses the shared scratch block instead of its own memory."""
    strategy = getattr(trt, "ExecutionContextAllocationStrategy", None)
    if strategy is not None:
        ctx = engine.create_execution_context(strategy.USER_MANAGED)
    else:  # TensorRT < 10
        ctx = engine.create_execution_context_without_device_memory()
    if ctx is None:
        raise LdmDeployError("TensorRT could not create an execution context (out of GPU memory?)")
    if hasattr(ctx, "set_device_memory"):  # TensorRT >= 10.1
        ctx.set_device_memory(scratch.ptr, scratch.nbytes)
    else:
        ctx.device_memory = scratch.ptr
    return ctx


class TrtComponent:
    """One engine as a :class:`~ldm_deploy.runtime.components.Component`."""

    device = "cuda"

    def __init__(self, runtime: TrtRuntime, spec: ComponentSpec, engine: Any, use_cuda_graph: bool | None = None):
        trt, cudart = runtime.trt, runtime.cudart
        self.rt, self.spec, self.engine = runtime, spec, engine
        self.context = _create_context(trt, engine, runtime.scratch)
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.input_names = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if n not in self.input_names]
        missing = sorted(set(spec.input_names) - set(self.input_names))
        if missing or not set(spec.output_names) <= set(self.output_names):
            raise LdmDeployError(f"the {spec.name} engine's I/O {names} does not match its spec "
                                 f"({spec.input_names} -> {spec.output_names})")
        self.output = spec.output_names[0]
        self.dtypes = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names}
        self.limits: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
        for n in self.input_names:
            shape = tuple(engine.get_tensor_shape(n))
            if any(d < 0 for d in shape):
                lo, _, hi = engine.get_tensor_profile_shape(n, 0)
                self.limits[n] = (tuple(lo), tuple(hi))
            else:
                self.limits[n] = (shape, shape)
        # preallocate every I/O buffer for the profile's max shapes
        for n in self.input_names:
            self.context.set_input_shape(n, self.limits[n][1])
        max_shapes = {n: self.limits[n][1] for n in self.input_names}
        max_shapes.update({n: tuple(self.context.get_tensor_shape(n)) for n in self.output_names})
        self.buffers = {n: DeviceBuffer(cudart, _volume(s) * self.dtypes[n].itemsize) for n, s in max_shapes.items()}
        for n, buf in self.buffers.items():
            self.context.set_tensor_address(n, buf.ptr)
        self.static = all(lo == hi for lo, hi in self.limits.values())
        self.use_cuda_graph = self.static if use_cuda_graph is None else bool(use_cuda_graph)
        self._graphs: dict[Any, Any] = {}
        self._signature: Any = None

    # --- the Component interface ------------------------------------------------------------
    def __call__(self, **inputs: np.ndarray) -> np.ndarray:
        with self.rt.lock:
            return self._run(inputs, {})[0]

    def device_binding(self, **constants: np.ndarray) -> "TrtBinding":
        return TrtBinding(self, constants)

    # --- internals ---------------------------------------------------------------------------
    def _cast(self, name: str, value: np.ndarray) -> np.ndarray:
        if name not in self.limits:
            raise LdmDeployError(f"{self.spec.name} has no input {name!r} (inputs: {self.input_names})")
        arr = np.ascontiguousarray(value, dtype=self.dtypes[name])
        lo, hi = self.limits[name]
        check_shape(self.spec.name, name, arr.shape, lo, hi)
        return arr

    def _run(self, inputs: dict[str, np.ndarray], bound: dict[str, tuple[int, tuple[int, ...]]],
             outputs: Sequence[str] | None = None) -> list[np.ndarray]:
        """Run the engine; returns ``outputs`` (default: the first of the spec) as float32."""
        cudart = self.rt.cudart
        missing = sorted(set(self.input_names) - set(inputs) - set(bound))
        if missing:
            raise LdmDeployError(f"{self.spec.name} is missing inputs {missing}")
        h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        host = {n: self._cast(n, v) for n, v in inputs.items()}  # kept alive until the sync below
        for n, arr in host.items():
            _check(cudart, cudart.cudaMemcpyAsync(self.buffers[n].ptr, arr.ctypes.data, arr.nbytes, h2d,
                                                  self.rt.stream), "cudaMemcpyAsync")
        shapes = {n: a.shape for n, a in host.items()} | {n: s for n, (_, s) in bound.items()}
        addresses = {n: self.buffers[n].ptr for n in self.input_names} | {n: p for n, (p, _) in bound.items()}
        signature = (tuple(sorted(shapes.items())), tuple(sorted(addresses.items())))
        if signature != self._signature:
            for n, s in shapes.items():
                if not self.context.set_input_shape(n, s):
                    raise LdmDeployError(f"TensorRT rejected shape {s} for {self.spec.name} input {n}")
            for n, p in addresses.items():
                self.context.set_tensor_address(n, p)
            self._signature = signature
        names = list(outputs or [self.output])
        results = [np.empty(tuple(self.context.get_tensor_shape(n)), dtype=self.dtypes[n]) for n in names]
        self._execute(signature)
        for n, result in zip(names, results):
            _check(cudart, cudart.cudaMemcpyAsync(result.ctypes.data, self.buffers[n].ptr, result.nbytes,
                                                  cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.rt.stream),
                   "cudaMemcpyAsync")
        self.rt.synchronize()
        return [r.astype(np.float32, copy=False) for r in results]

    def _launch(self) -> None:
        if not self.context.execute_async_v3(self.rt.stream_handle):
            raise LdmDeployError(f"TensorRT failed to run the {self.spec.name} engine (see the log above)")

    def _execute(self, signature: Any) -> None:
        if not self.use_cuda_graph:
            self._launch()
            return
        cudart = self.rt.cudart
        graph_exec = self._graphs.get(signature)
        if graph_exec is not None:
            _check(cudart, cudart.cudaGraphLaunch(graph_exec, self.rt.stream), "cudaGraphLaunch")
            return
        # a plain launch first (TensorRT finishes shape-dependent setup outside the capture; it also
        # computes this call's result), then capture the same launch into a graph for next time
        self._launch()
        try:
            _check(cudart, cudart.cudaStreamBeginCapture(
                self.rt.stream, cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal), "cudaStreamBeginCapture")
            try:
                self._launch()
            finally:
                graph = _check(cudart, cudart.cudaStreamEndCapture(self.rt.stream), "cudaStreamEndCapture")
            graph_exec = _check(cudart, cudart.cudaGraphInstantiateWithFlags(graph, 0), "cudaGraphInstantiate")
            cudart.cudaGraphDestroy(graph)
        except LdmDeployError:  # engines that cannot be captured simply run without graphs
            self.use_cuda_graph = False
            return
        if len(self._graphs) >= MAX_GRAPHS:
            old = self._graphs.pop(next(iter(self._graphs)))
            cudart.cudaGraphExecDestroy(old)
        self._graphs[signature] = graph_exec

    def close(self) -> None:
        for g in self._graphs.values():
            self.rt.cudart.cudaGraphExecDestroy(g)
        self._graphs = {}
        for b in self.buffers.values():
            b.free()


class TrtBinding:
    """Inputs that stay constant over the sampling loop, uploaded once into their own device
    buffers (so several bindings can coexist); ``run`` moves only the per-step inputs."""

    def __init__(self, component: TrtComponent, constants: dict[str, np.ndarray]):
        self.component = component
        cudart = component.rt.cudart
        self._buffers: list[DeviceBuffer] = []
        self.bound: dict[str, tuple[int, tuple[int, ...]]] = {}
        with component.rt.lock:
            for name, value in constants.items():
                arr = component._cast(name, value)
                buf = DeviceBuffer(cudart, arr.nbytes)
                _check(cudart, cudart.cudaMemcpyAsync(buf.ptr, arr.ctypes.data, arr.nbytes,
                                                      cudart.cudaMemcpyKind.cudaMemcpyHostToDevice,
                                                      component.rt.stream), "cudaMemcpyAsync")
                component.rt.synchronize()
                self._buffers.append(buf)
                self.bound[name] = (buf.ptr, arr.shape)

    def run(self, **inputs: np.ndarray) -> np.ndarray:
        with self.component.rt.lock:
            return self.component._run(inputs, self.bound)[0]

    def run_all(self, **inputs: np.ndarray) -> list[np.ndarray]:
        with self.component.rt.lock:
            return self.component._run(inputs, self.bound, self.component.spec.output_names)

    def close(self) -> None:
        for b in self._buffers:
            b.free()


# --- loading from an artifact ----------------------------------------------------------------
def load_components(
    art: Artifact,
    components: Sequence[str],
    precision: str | None = None,
    use_cuda_graph: bool | None = None,
    verify: bool = True,
    optional: Sequence[str] = ("vae_encoder", "unet_shallow"),
) -> dict[str, TrtComponent]:
    """The engines of ``components`` built into ``art`` for this machine, as ``TrtComponent``s
    sharing one runtime. An engine whose key does not match this machine and artifact (other
    TensorRT version or GPU, re-exported ONNX, other precision) or whose plan fails its sha256
    check is refused with the reason and never deserialized. ``optional`` components without any
    engine are skipped."""
    require_tensorrt()
    require_cudart()
    env = machine_environment()
    chosen: dict[str, Path] = {}
    for comp in components:
        found = select_for_runtime(art.path, comp, env, onnx_digest(art, comp), precision, verify)
        if found.status == "missing" and comp in optional:
            continue
        if found.status != "fresh":
            raise LdmDeployError(f"{found.message(comp)}; build it on this machine with `ldm-build {art.path}`")
        chosen[comp] = found.path  # type: ignore[assignment]
    plans = {comp: (p.read_bytes(), art.spec(comp)) for comp, p in chosen.items()}
    return TrtRuntime(plans, use_cuda_graph).components
