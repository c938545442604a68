"""Build one TensorRT engine per component with the TensorRT Python API (10.x).

The flag resolution (:func:`resolve_flags`, :func:`plan_builds`) is pure and tested everywhere;
:func:`build_engine` needs ``tensorrt`` and a GPU.

Precision:

- ``fp32``: no reduced-precision flag (TensorRT may still use TF32).
- ``fp16``: the FP16 builder flag (weakly typed network: TensorRT picks per layer).
- ``int8``: explicit quantization of an INT8 QDQ artifact (``ldm-quantize --target tensorrt``,
  manifest ``quantization.target == "tensorrt"``): INT8 + FP16 flags, the Q/DQ nodes decide which
  layers run in INT8. No calibrator: implicit (calibrated) INT8 is deprecated in TensorRT 10.
- ``best``: FP16, plus INT8 when the artifact is a TensorRT QDQ artifact.
- ``strongly_typed``: a strongly typed network (the ONNX graph's own types decide, no precision
  flags); allowed when the graph already has the requested precision.

Builder optimization level 3 (4 with INT8), timing cache loaded and saved, one optimization
profile, memory pool (workspace) limit when asked.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from ..artifact import Artifact
from ..errors import LdmDeployError
from ..specs import TrtProfile
from .cache import EngineKey, atomic_write, onnx_digest
from .profiles import profile_to_json

PRECISIONS = ("fp32", "fp16", "int8", "best")


@dataclass(frozen=True)
class BuildFlags:
    precision: str
    fp16: bool
    int8: bool
    strongly_typed: bool
    optimization_level: int

    def key_flags(self) -> dict[str, Any]:
        """The builder settings that change the plan (part of the cache key)."""
        return {"fp16": self.fp16, "int8": self.int8, "strongly_typed": self.strongly_typed,
                "builder_optimization_level": self.optimization_level}


def quantization_target(manifest: dict[str, Any]) -> str | None:
    q = manifest.get("quantization")
    return q.get("target") if isinstance(q, dict) else None


def resolve_flags(precision: str | None, manifest: dict[str, Any], strongly_typed: bool = False,
                  optimization_level: int | None = None) -> BuildFlags:
    """Turn ``--precision`` (None = auto: int8 for a TensorRT QDQ artifact, else fp16) and the
    artifact's manifest into builder flags, refusing combinations that cannot work."""
    target = quantization_target(manifest)
    if target is not None and target != "tensorrt":
        raise LdmDeployError(
            f"this artifact was quantized for {target!r}; TensorRT needs symmetric INT8 Q/DQ from "
            "`ldm-quantize --target tensorrt` (or build from the unquantized artifact)")
    qdq = target == "tensorrt"
    precision = precision or ("int8" if qdq else "fp16")
    if precision not in PRECISIONS:
        raise LdmDeployError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "int8" and not qdq:
        raise LdmDeployError(
            "--precision int8 needs an INT8 QDQ artifact (`ldm-quantize --target tensorrt`): TensorRT builds INT8 "
            "with explicit quantization here, not with a calibrator")
    if qdq and precision in ("fp32", "fp16"):
        raise LdmDeployError(f"this artifact has INT8 Q/DQ nodes: build it with --precision int8 (or best), "
                             f"not {precision}")
    int8 = qdq and precision in ("int8", "best")
    if strongly_typed:
        graph = manifest.get("precision", "fp32")
        if not qdq and precision != graph:
            raise LdmDeployError(
                f"--strongly-typed keeps the graph's own types ({graph}); it cannot build {precision}: "
                f"drop --strongly-typed or use an {precision} artifact")
        fp16 = False
        int8 = False
    else:
        fp16 = precision in ("fp16", "int8", "best")
    level = optimization_level if optimization_level is not None else (4 if qdq else 3)
    if not 0 <= level <= 5:
        raise LdmDeployError(f"builder optimization level must be 0..5, got {level}")
    return BuildFlags(precision, fp16, int8, strongly_typed, level)


def engine_key(art: Artifact, component: str, profile: TrtProfile, flags: BuildFlags,
               environment: dict[str, str]) -> EngineKey:
    return EngineKey(
        component=component,
        onnx_sha256=onnx_digest(art, component),
        tensorrt_version=environment["tensorrt_version"],
        gpu_name=environment["gpu_name"],
        compute_capability=environment["compute_capability"],
        profile=profile_to_json(profile),
        precision=flags.precision,
        flags=flags.key_flags(),
    )


def default_timing_cache(art_path: Path, environment: dict[str, str]) -> Path:
    cc = environment["compute_capability"].replace(".", "")
    return Path(art_path) / "engines" / f"timing-trt{environment['tensorrt_version']}-sm{cc}.cache"


# --- the real build ---------------------------------------------------------------------------
def make_logger(trt: Any, verbose: bool = False) -> Any:
    return trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)


def parse_onnx(trt: Any, builder: Any, onnx_path: Path, strongly_typed: bool, logger: Any) -> tuple[Any, Any]:
    """Network definition from an ONNX file (external data resolved next to it). Parser errors
    become one readable :class:`LdmDeployError`."""
    flags = 0
    if strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        raise LdmDeployError(f"TensorRT's ONNX parser rejected {onnx_path}: {parser_errors(parser)}")
    return network, parser


def parser_errors(parser: Any, limit: int = 5) -> str:
    msgs = []
    for i in range(parser.num_errors):
        if i == limit:
            msgs.append(f"... and {parser.num_errors - limit} more")
            break
        err = parser.get_error(i)
        where = []
        node = err.node() if hasattr(err, "node") else -1
        if node is not None and node >= 0:
            where.append(f"node {node}")
        for attr in ("node_name", "node_operator"):
            fn = getattr(err, attr, None)
            value = fn() if callable(fn) else None
            if value:
                where.append(f"{attr.split('_')[1]} {value}")
        msgs.append((f"[{', '.join(where)}] " if where else "") + str(err.desc()).strip())
    return "; ".join(msgs) or "no error details reported"


def build_engine(
    onnx_path: Path,
    profile: TrtProfile,
    flags: BuildFlags,
    workspace_gb: float | None = None,
    timing_cache: Path | None = None,
    verbose: bool = False,
    log: Callable[[str], None] = lambda s: None,
) -> Any:
    """Build and return the serialized engine (an ``IHostMemory``, buffer protocol)."""
    from . import require_tensorrt

    trt = require_tensorrt()
    _precheck_ops(onnx_path)
    logger = make_logger(trt, verbose)
    builder = trt.Builder(logger)
    network, _parser = parse_onnx(trt, builder, onnx_path, flags.strongly_typed, logger)

    config = builder.create_builder_config()
    if workspace_gb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if flags.fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if flags.int8:
        config.set_flag(trt.BuilderFlag.INT8)
    config.builder_optimization_level = flags.optimization_level

    trt_profile = builder.create_optimization_profile()
    names = [network.get_input(i).name for i in range(network.num_inputs)]
    missing = sorted(set(profile.shapes) - set(names))
    if missing:
        raise LdmDeployError(f"{onnx_path} lacks inputs {missing} declared by its spec (graph inputs: {names})")
    for i in range(network.num_inputs):
        inp = network.get_input(i)
        if inp.name not in profile.shapes:
            raise LdmDeployError(f"{onnx_path} has input {inp.name!r} that its spec does not declare")
        lo, opt, hi = profile.shapes[inp.name]
        dims = tuple(inp.shape)
        if len(dims) != len(lo):
            raise LdmDeployError(f"{onnx_path} input {inp.name} has rank {len(dims)}, its spec says {len(lo)}")
        if any(d < 0 for d in dims):  # dynamic input: the profile gives its range
            trt_profile.set_shape(inp.name, lo, opt, hi)
        elif not (tuple(lo) == tuple(hi) == dims):
            raise LdmDeployError(f"{onnx_path} input {inp.name} is static {dims} but the profile asks {lo}..{hi}")
    config.add_optimization_profile(trt_profile)

    cache = None
    if timing_cache is not None:
        data = timing_cache.read_bytes() if timing_cache.is_file() else b""
        cache = config.create_timing_cache(data)
        if not config.set_timing_cache(cache, ignore_mismatch=False) and data:
            log(f"    timing cache {timing_cache} does not match this TensorRT/GPU: starting a new one")
            cache = config.create_timing_cache(b"")
            config.set_timing_cache(cache, ignore_mismatch=False)
            data = b""
        log(f"    timing cache {timing_cache} ({'loaded' if data else 'new'})")

    t0 = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise LdmDeployError(f"TensorRT failed to build an engine from {onnx_path} (see the TensorRT log above)")
    log(f"    built in {time.perf_counter() - t0:.1f} s, {plan.nbytes / 2**20:.1f} MiB")
    if timing_cache is not None:
        timing_cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(timing_cache, config.get_timing_cache().serialize())
    return plan


def _precheck_ops(onnx_path: Path) -> None:
    """Fail early, naming the operators, when the graph uses ops TensorRT's parser lacks (skipped
    where the ``onnx`` package is not installed: the parser stays the authority)."""
    try:
        import onnx  # noqa: F401
    except ImportError:
        return
    from .ops import check_graph

    check_graph(onnx_path)


@dataclass
class BuildResult:
    component: str
    status: str  # built | cached | refused
    path: Path | None
    message: str = ""


def build_artifact(
    art: Artifact,
    components: Sequence[str],
    profiles: dict[str, TrtProfile],
    flags: BuildFlags,
    environment: dict[str, str],
    workspace_gb: float | None = None,
    timing_cache: Path | None = None,
    rebuild: str = "stale",  # stale: rebuild missing/stale/corrupt | never: refuse | always
    verbose: bool = False,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
) -> list[BuildResult]:
    """Build (or reuse) the engine of every component into ``art/engines``."""
    from .cache import lookup, record_engine

    results = []
    for comp in components:
        key = engine_key(art, comp, profiles[comp], flags, environment)
        found = lookup(art.path, key)
        if found.status == "fresh" and rebuild != "always":
            log(f"[{comp}] up to date: {found.path.name}")  # type: ignore[union-attr]
            results.append(BuildResult(comp, "cached", found.path))
            continue
        if rebuild == "never":
            results.append(BuildResult(comp, "refused", None, found.message(comp)))
            continue
        if found.status not in ("missing", "fresh"):
            log(f"[{comp}] {found.message(comp)}: rebuilding")
        log(f"[{comp}] building {flags.precision} engine from {art.model_file(comp).relative_to(art.path)}")
        t0 = time.perf_counter()
        plan = build_engine(art.model_file(comp), profiles[comp], flags, workspace_gb, timing_cache, verbose, log)
        path = record_engine(art.path, key, plan, {"build_seconds": round(time.perf_counter() - t0, 2),
                                                   "workspace_gb": workspace_gb})
        results.append(BuildResult(comp, "built", path))
    return results
