"""The ``openvino`` backend: OpenVINO compiled models (CPU) over an artifact's graphs.

Each component is read from its ONNX file, or from OpenVINO IR (``model.xml`` + ``model.bin``,
written by ``ldm-quantize --target openvino``) where the manifest names one, optionally reshaped
to one static size (OpenVINO's fastest mode), and compiled with a precision hint, a thread count
and a compiled-model cache inside the artifact.

Compiled-model cache: ``ARTIFACT/openvino-cache/<component>-<digest>/`` is OpenVINO's
``CACHE_DIR`` for one :class:`CacheKey` (OpenVINO version, CPU, the graph's sha256 from the
manifest, precision hint, static shape), with the key in ``key.json``. A changed graph or another
machine gets another directory; directories of the same component built from another graph are
removed when a new one is made. Like the TensorRT engine cache, nothing in ``manifest.json``
changes.

``openvino`` (and ``onnx``, for the operator check) are imported only when this backend loads.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..artifact import Artifact
from ..errors import LdmDeployError, first_line
from ..specs import ComponentSpec
from .components import OutputsBinding

CACHE_DIR = "openvino-cache"
PRECISION_HINTS = ("default", "f32", "bf16")  # default: whatever OpenVINO picks for this CPU
INSTALL_HINT = "install it with `pip install 'ldm-deploy[openvino]'`"
IR_SUFFIX = ".xml"


def require_openvino() -> Any:
    """The ``openvino`` module, or one line saying how to install it."""
    try:
        import openvino as ov  # noqa: PLC0415
    except Exception as e:  # ImportError, or a broken native library
        raise LdmDeployError(f"OpenVINO is not available ({first_line(e)}): {INSTALL_HINT}") from None
    return ov


def openvino_unavailable() -> str | None:
    """Why the openvino backend cannot run here, or None."""
    try:
        require_openvino()
    except LdmDeployError as e:
        return str(e)
    return None


def cpu_name(core: Any) -> str:
    return str(core.get_property("CPU", "FULL_DEVICE_NAME"))


def check_precision_hint(hint: str, core: Any | None = None) -> None:
    """A known hint, and ``bf16`` only where the CPU has bf16 instructions (``core`` given)."""
    if hint not in PRECISION_HINTS:
        raise LdmDeployError(f"unknown OpenVINO precision hint {hint!r} (choose from {', '.join(PRECISION_HINTS)})")
    if hint == "bf16" and core is not None:
        caps = [str(c) for c in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")]
        if "BF16" not in caps:
            raise LdmDeployError(f"this CPU ({cpu_name(core)}) has no bf16 support in OpenVINO (capabilities: "
                                 f"{', '.join(caps)}); use --ov-precision f32 or default")


def static_sizes(static_shape: tuple[int, int, int], vae_scale: int, cfg: bool = True) -> dict[str, int]:
    """The spec's named dims for one (batch, image height, image width); ``unet_batch`` is 2 x batch
    with classifier-free guidance."""
    batch, h, w = static_shape
    return {"batch": batch, "unet_batch": 2 * batch if cfg else batch, "height": h // vae_scale,
            "width": w // vae_scale, "image_height": h, "image_width": w}


@dataclass(frozen=True)
class CacheKey:
    """What a compiled model depends on (mirrors :class:`~ldm_deploy.tensorrt.cache.EngineKey`)."""

    component: str
    graph_sha256: str  # the manifest's sha256 of the ONNX file (or of the IR files together)
    openvino_version: str
    cpu: str
    precision_hint: str
    static_shape: tuple[int, ...] | None

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    def digest(self) -> str:
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def dirname(self) -> str:
        return f"{self.component}-{self.digest()}"


def cache_dir(art: Artifact, key: CacheKey) -> Path | None:
    """The cache directory of ``key`` (made, with ``key.json``), or None where the artifact is not
    writable. Directories of the same component built from another graph are removed."""
    from ..tensorrt.cache import atomic_write_json

    root = art.path / CACHE_DIR
    d = root / key.dirname
    try:
        d.mkdir(parents=True, exist_ok=True)
        if not (d / "key.json").is_file():
            atomic_write_json(d / "key.json", key.to_dict())
            for other in root.glob(f"{key.component}-*"):
                stale = _read_key(other)
                if other != d and stale is not None and stale.get("component") == key.component \
                        and stale.get("graph_sha256") != key.graph_sha256:
                    shutil.rmtree(other, ignore_errors=True)
    except OSError:
        return None
    return d


def _read_key(d: Path) -> dict[str, Any] | None:
    try:
        return json.loads((d / "key.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def cache_entries(art_path: Path | str, component: str | None = None) -> list[dict[str, Any]]:
    """The recorded keys of the cache directories (with ``dir``), for tools and tests."""
    root = Path(art_path) / CACHE_DIR
    out = []
    for d in sorted(root.glob("*")) if root.is_dir() else []:
        k = _read_key(d)
        if k is not None and (component is None or k.get("component") == component):
            out.append({**k, "dir": str(d)})
    return out


def is_ir(art: Artifact, component: str) -> bool:
    return art.model_file(component).suffix == IR_SUFFIX


def read_model(core: Any, art: Artifact, component: str) -> Any:
    """The OpenVINO model of a component: its IR, or its ONNX file after the operator check."""
    path = art.model_file(component)
    if path.suffix != IR_SUFFIX:
        from ..onnx_ops import check_no_ort_only_ops

        try:
            check_no_ort_only_ops(path, component, "OpenVINO")
        except ImportError:
            raise LdmDeployError(f"the openvino backend reads ONNX graphs with the onnx package: {INSTALL_HINT}") from None
    try:
        return core.read_model(str(path))
    except Exception as e:  # OpenVINO raises RuntimeError subclasses for unreadable or unsupported graphs
        raise LdmDeployError(f"OpenVINO could not read {path}: {first_line(e, 300)}") from None


def compile_config(precision_hint: str, threads: int, cache: Path | None) -> dict[str, Any]:
    cfg: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY"}
    if precision_hint != "default":
        cfg["INFERENCE_PRECISION_HINT"] = precision_hint
    if threads:
        cfg["INFERENCE_NUM_THREADS"] = threads
    if cache is not None:
        cfg["CACHE_DIR"] = str(cache)
    return cfg


class OpenVinoComponent:
    """One compiled model: inputs cast to the model's element types, float32 outputs; with a
    static shape, inputs of another shape are refused in one line."""

    device = "cpu"

    def __init__(self, spec: ComponentSpec, compiled: Any, static: dict[str, tuple[int, ...]] | None = None,
                 info: dict[str, Any] | None = None):
        self.spec = spec
        self.compiled = compiled
        self.static = static
        self.info = info or {}
        # a port may carry several tensor names (OpenVINO merges names through no-op nodes)
        self.input_types = {n: p.get_element_type().to_dtype().type for p in compiled.inputs for n in p.get_names()}
        missing = set(spec.input_names) - set(self.input_types)
        if missing:
            raise LdmDeployError(f"{spec.name} graph lacks inputs {sorted(missing)} declared by its spec")
        self.outputs = {name: compiled.output(name) for name in spec.output_names}

    def cast(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = {k: np.ascontiguousarray(v, dtype=self.input_types[k]) for k, v in inputs.items()
                 if k in self.input_types}
        if self.static:
            for k, v in feeds.items():
                if k in self.static and v.shape != self.static[k]:
                    raise LdmDeployError(f"{self.spec.name} was compiled for the static shape {self.static[k]} of "
                                         f"'{k}' but got {v.shape}; load without static_shape for other sizes")
        return feeds

    def __call__(self, **inputs: np.ndarray) -> np.ndarray:
        return self.device_binding().run(**inputs)

    def device_binding(self, **constants: np.ndarray) -> "OpenVinoBinding":
        return OpenVinoBinding(self, self.cast(constants))


class OpenVinoBinding(OutputsBinding):
    """An infer request of its own (one per call/thread) with the constants cast once."""

    def __init__(self, component: OpenVinoComponent, constants: dict[str, np.ndarray]):
        self.component = component
        self.constants = constants
        self.request = component.compiled.create_infer_request()

    def _run(self, names: list[str], inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        c = self.component
        try:
            res = self.request.infer({**self.constants, **c.cast(inputs)})
        except LdmDeployError:
            raise
        except Exception as e:  # shape outside the graph's range and the like
            raise LdmDeployError(f"OpenVINO failed to run {c.spec.name}: {first_line(e, 300)}") from None
        return [np.array(res[c.outputs[n]], dtype=np.float32) for n in names]


def load_component(core: Any, art: Artifact, component: str, precision_hint: str = "default", threads: int = 0,
                   static_shape: tuple[int, int, int] | None = None, use_cache: bool = True) -> OpenVinoComponent:
    """Read, reshape (``static_shape``) and compile one component."""
    import time

    from ..tensorrt.cache import onnx_digest

    ov = require_openvino()
    spec = art.spec(component)
    model = read_model(core, art, component)
    static = None
    if static_shape is not None:
        sizes = static_sizes(static_shape, int(art.manifest["model_dims"]["vae_scale"]))
        static = spec.input_shapes(sizes)
        model.reshape({name: ov.PartialShape(list(shape)) for name, shape in static.items()})
    key = CacheKey(component, onnx_digest(art, component), ov.get_version(), cpu_name(core), precision_hint,
                   tuple(static_shape) if static_shape else None) if use_cache else None
    cache = cache_dir(art, key) if key is not None else None
    t0 = time.perf_counter()
    try:
        compiled = core.compile_model(model, "CPU", compile_config(precision_hint, threads, cache))
    except Exception as e:
        raise LdmDeployError(f"OpenVINO could not compile {component}: {first_line(e, 300)}") from None
    info = {"compile_seconds": time.perf_counter() - t0, "cache_dir": str(cache) if cache else None,
            "key": key.to_dict() if key else None, "loaded_from_cache": _loaded_from_cache(compiled),
            "execution_precision": str(compiled.get_property("INFERENCE_PRECISION_HINT"))}
    return OpenVinoComponent(spec, compiled, static, info)


def _loaded_from_cache(compiled: Any) -> bool | None:
    try:
        return bool(compiled.get_property("LOADED_FROM_CACHE"))
    except Exception:  # older OpenVINO: property unknown
        return None


def load_components(art: Artifact, names: Sequence[str], precision_hint: str = "default", threads: int = 0,
                    static_shape: tuple[int, int, int] | None = None, use_cache: bool = True,
                    ) -> dict[str, OpenVinoComponent]:
    """Every component of ``names`` compiled for OpenVINO's CPU plugin."""
    ov = require_openvino()
    core = ov.Core()
    check_precision_hint(precision_hint, core)
    if static_shape is not None:
        check_static_shape(art, static_shape)
    return {c: load_component(core, art, c, precision_hint, threads, static_shape, use_cache) for c in names}


def check_static_shape(art: Artifact, static_shape: Any) -> tuple[int, int, int]:
    """(batch, image height, image width) of positive ints inside the artifact's shape ranges."""
    if not (isinstance(static_shape, (tuple, list)) and len(static_shape) == 3
            and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0 for v in static_shape)):
        raise LdmDeployError(f"static_shape must be (batch, height, width) of positive integers, got {static_shape!r}")
    batch, h, w = (int(v) for v in static_shape)
    art.shape_ranges.check_image(h, w)
    art.shape_ranges.check_batch(batch)
    return batch, h, w
