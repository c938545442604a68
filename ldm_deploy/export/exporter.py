"""Export an SD-class pipeline into a validated ONNX artifact directory."""

from __future__ import annotations

import gc
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..artifact import ArtifactWriter, library_versions, peak_rss_bytes, write_json
from ..errors import LdmDeployError, ValidationError
from ..inputs import example_inputs
from ..runtime.memory import release_free_heap
from ..specs import (
    COMPONENTS, MAX_IMAGE_SIDE, MAX_PROMPT_CHUNKS, ComponentSpec, ShapeRanges, check_batch_size, check_image_side, check_side_bounds,
    component_specs,
)
from .lora import LoraSpec, check_lora_specs

# Exported first: the U-Net is the largest, so its torch weights are freed before the others'
# sessions are built.
EXPORT_ORDER = ("unet", "unet_shallow", "text_encoder", "vae_encoder", "vae_decoder")
#: ONNX opsets each torch.onnx exporter can write these graphs at: from 14 (the first with
#: scaled_dot_product_attention) and from 18 for torch.export, to the newest the exporter knows.
OPSETS = {"torchscript": (14, 20), "dynamo": (18, 23)}


@dataclass
class ExportOptions:
    fp16: bool = False
    keep_io_types: bool = True
    opset: int = 18
    height: int | None = None  # image size the graphs are validated and optimised at
    width: int | None = None
    batch: int = 1
    max_batch: int = 4
    min_size: int | None = None
    max_size: int | None = None
    optimize: str | None = None  # None | "cpu" | "cuda" | "tensorrt"
    validate: bool = True
    components: tuple[str, ...] = COMPONENTS
    native_fp16: bool | None = None  # None: use a fp16 torch model when CUDA is available
    exporter: str = "torchscript"  # or "dynamo"
    attention: str = "auto"  # "mha" (ORT fused), "sliced" (per-head self-attention), "full", or "auto"
    deepcache: int | None = None  # feature caching: the shallow graph's depth (None: one plain U-Net graph)
    loras: tuple[LoraSpec, ...] = ()  # adapters fused into the U-Net and text encoder before export
    long_prompts: bool = False  # U-Net with a dynamic text sequence (prompts over 77 tokens, chunked)


@dataclass(frozen=True)
class ExportPlan:
    """How the options are carried out, decided once: where the torch model runs, the artifact's
    precision and I/O dtype, the attention form and the graph passes after the export."""

    native_fp16: bool  # fp16 torch model on CUDA (else fp32 on CPU, converted after export if fp16)
    precision: str  # "fp32" | "fp16"
    io_dtype: str  # "float32" | "float16"
    attention: str  # "mha" | "sliced" | "full"
    steps: tuple[str, ...]  # "export", then "optimize" and/or "fp16" (graph conversion)

    @property
    def device(self) -> str:
        return "cuda" if self.native_fp16 else "cpu"

    @property
    def fp16_method(self) -> str | None:
        if self.precision != "fp16":
            return None
        return "native-cuda" if self.native_fp16 else "onnx-conversion"


def plan_export(opts: ExportOptions, cuda_available: bool) -> ExportPlan:
    """Resolve ``opts`` into an :class:`ExportPlan` (``cuda_available``: torch sees a GPU)."""
    native = opts.native_fp16 if opts.native_fp16 is not None else (opts.fp16 and cuda_available)
    return ExportPlan(
        native_fp16=bool(native),
        precision="fp16" if opts.fp16 else "fp32",
        io_dtype="float16" if opts.fp16 and not opts.keep_io_types else "float32",
        attention=resolve_attention(opts.attention, bool(native), opts.fp16, opts.optimize),
        steps=("export",) + (("optimize",) if opts.optimize else ()) + (("fp16",) if opts.fp16 and not native else ()),
    )


def _user_sizes(opts: ExportOptions) -> list[tuple[str, int]]:
    return [(label, v) for label, v in (("height", opts.height), ("width", opts.width), ("min-size", opts.min_size),
                                        ("max-size", opts.max_size)) if v is not None]


def check_options(opts: ExportOptions) -> None:
    """Reject bad options before anything is loaded (the model-specific size multiple is checked
    by :func:`shape_ranges` once the model is known)."""
    unknown = [c for c in opts.components if c not in COMPONENTS]
    if unknown:
        raise LdmDeployError(f"unknown component(s) {', '.join(unknown)}; choose from {', '.join(COMPONENTS)}")
    if not opts.components:
        raise LdmDeployError("no component to export")
    if opts.exporter not in OPSETS:
        raise LdmDeployError(f"unknown exporter {opts.exporter!r} (choose {' or '.join(OPSETS)})")
    lo, hi = OPSETS[opts.exporter]
    if isinstance(opts.opset, bool) or not isinstance(opts.opset, int) or not lo <= opts.opset <= hi:
        raise LdmDeployError(f"opset {opts.opset} is not supported by the {opts.exporter} exporter (choose {lo} to {hi})")
    for label, v in _user_sizes(opts):
        check_side_bounds(label, v)
    if opts.min_size is not None and opts.max_size is not None and opts.min_size > opts.max_size:
        raise LdmDeployError(f"min-size {opts.min_size} is larger than max-size {opts.max_size}")
    check_batch_size("batch", opts.batch)
    check_batch_size("max-batch", opts.max_batch)
    if opts.max_batch < opts.batch:
        raise LdmDeployError(f"batch {opts.batch} / max-batch {opts.max_batch}: need 1 <= batch <= max-batch")
    resolve_attention(opts.attention, False, opts.fp16, opts.optimize)
    if opts.deepcache is not None:
        if isinstance(opts.deepcache, bool) or not isinstance(opts.deepcache, int) or opts.deepcache < 1:
            raise LdmDeployError(f"--deepcache depth must be a positive integer, got {opts.deepcache!r}")
        if "unet" not in opts.components:
            raise LdmDeployError("--deepcache splits the U-Net: include unet in --components")
    check_lora_specs(list(opts.loras))


def shape_ranges(opts: ExportOptions, native: int, size_multiple: int, vae_scale: int,
                 seq_len: int = 77) -> ShapeRanges:
    """Validate the user's sizes and build the artifact's shape ranges."""
    check_options(opts)
    h = opts.height if opts.height is not None else native
    w = opts.width if opts.width is not None else native
    sizes = {"height": h, "width": w, **dict(_user_sizes(opts))}
    for label, v in sizes.items():
        check_image_side(label, v, size_multiple, vae_scale)
    lo = opts.min_size or max(size_multiple, (min(h, w) // 2) // size_multiple * size_multiple)
    hi = opts.max_size or max(min(2 * max(h, w), MAX_IMAGE_SIDE // size_multiple * size_multiple), h, w)
    try:
        return ShapeRanges(
            batch=(1, opts.batch, opts.max_batch),
            image_height=(min(lo, h), h, max(hi, h)),
            image_width=(min(lo, w), w, max(hi, w)),
            vae_scale=vae_scale,
            size_multiple=size_multiple,
            sequence=(seq_len, seq_len, seq_len * (MAX_PROMPT_CHUNKS if opts.long_prompts else 1)),
        )
    except ValueError as e:
        raise LdmDeployError(str(e)) from None


def _quiet_exporter_logs() -> None:
    for name in ("torch.onnx", "torch._dynamo", "torch.export", "torch.fx.experimental.symbolic_shapes"):
        logging.getLogger(name).setLevel(logging.ERROR)


def resolve_attention(attention: str, native: bool, fp16: bool, optimize: str | None) -> str:
    """``auto``: the plain pattern for GPU/TensorRT targets (their fusions match it), ORT's fused
    ``MultiHeadAttention`` for fp32 CPU graphs, per-head slices for fp16 graphs converted on CPU."""
    if attention not in ("auto", "mha", "sliced", "full"):
        raise LdmDeployError(f"unknown attention mode {attention!r} (choose auto, mha, sliced or full)")
    if attention != "auto":
        return attention
    if native or optimize in ("cuda", "tensorrt"):
        return "full"
    return "sliced" if fp16 else "mha"


def export_model(
    model_name: str,
    out: Path,
    opts: ExportOptions,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Export ``model_name`` into the artifact directory ``out``; returns its manifest.

    Raises :class:`ValidationError` (and leaves no artifact) when a component is out of tolerance.
    """
    check_options(opts)  # before the heavy imports
    import torch

    from ..models import load_model
    from .attention import set_export_attention
    from .deepcache import deepcache_dims
    from .fp16 import convert_to_fp16
    from .onnx_export import export_component, trace_sizes
    from .optimize import optimize
    from .tokenizer import write_tokenizer
    from .wrappers import component_module

    _quiet_exporter_logs()
    log = _with_rss(log)
    start = time.perf_counter()
    plan = plan_export(opts, torch.cuda.is_available())
    with ArtifactWriter(out, overwrite=overwrite) as writer:
        log(f"loading {model_name} ({'fp16 on CUDA' if plan.native_fp16 else 'fp32 on CPU'})")
        model = load_model(model_name, dtype=torch.float16 if plan.native_fp16 else torch.float32, device=plan.device)
        loras = []
        if opts.loras:
            from .lora import fuse_loras

            loras = fuse_loras(model, list(opts.loras), log=log)
        dims = model.dims()
        native_size = int(model.unet.config.sample_size) * dims.vae_scale
        ranges = shape_ranges(opts, native_size, dims.size_multiple, dims.vae_scale, dims.seq_len)
        deepcache = deepcache_dims(model.unet, opts.deepcache) if opts.deepcache else None
        specs = component_specs(dims, deepcache, long_prompts=opts.long_prompts)
        configs = model_configs(model)
        if plan.attention in ("sliced", "mha"):
            set_export_attention(model.unet, plan.attention)
        scratch = writer.path / ".scratch"
        components: dict[str, Any] = {}
        validation: dict[str, Any] = {}
        order = [c for c in EXPORT_ORDER if c in opts.components or (c == "unet_shallow" and deepcache)]
        feature: np.ndarray | None = None  # the full graph's cached feature at the validation inputs
        for i, name in enumerate(order, 1):
            t0 = time.perf_counter()
            spec = specs[name]
            module = component_module(name, model, opts.deepcache)
            final = writer.path / name / "model.onnx"
            steps = plan.steps
            paths = [final if j == len(steps) - 1 else scratch / name / f"{s}.onnx" for j, s in enumerate(steps)]
            val_inputs = example_inputs(spec, ranges.sizes("opt"), plan.io_dtype, seed=1)
            if name == "unet_shallow" and feature is not None:  # validate on the feature it will be given
                val_inputs["cache_feature"] = feature.astype(val_inputs["cache_feature"].dtype)
            reference = _torch_forward(module, spec, val_inputs) if opts.validate else None
            if name == "unet" and deepcache and reference is not None:
                feature = reference[1]
            log(f"[{i}/{len(order)}] {name}: exporting")
            export_component(module, spec, example_inputs(spec, trace_sizes(ranges, dims.unet_factor)), ranges,
                             dims.unet_factor, paths[0], opset=opts.opset, exporter=opts.exporter)
            # The torch weights are no longer needed: free them before ONNX Runtime loads the graph.
            if not (name == "unet" and deepcache):  # the shallow graph still needs the U-Net
                _release(model, "unet" if name == "unet_shallow" else name)
            del module
            release_memory()
            for j, step in enumerate(steps[1:], 1):
                log(f"[{i}/{len(order)}] {name}: {step}")
                if step == "optimize":
                    optimize(paths[j - 1], paths[j], name, opts.optimize or "cpu", fp16=False)
                else:
                    convert_to_fp16(paths[j - 1], paths[j], keep_io_types=opts.keep_io_types)
                _remove_graph(paths[j - 1])
            shutil.rmtree(scratch / name, ignore_errors=True)
            if reference is not None:
                log(f"[{i}/{len(order)}] {name}: validating against PyTorch at {_fmt_shapes(val_inputs)}")
                validation[name] = _validate(name, final, val_inputs, reference, plan.precision, opts.optimize,
                                             spec.output_names)
                _report_line(validation[name], log)
            else:
                validation[name] = {"component": name, "status": "skipped", "how": "--no-validate"}
            components[name] = {
                "file": f"{name}/model.onnx",
                "spec": spec.to_dict(),
                "export_seconds": round(time.perf_counter() - t0, 2),
            }
            log(f"[{i}/{len(order)}] {name}: done in {time.perf_counter() - t0:.1f} s")
        shutil.rmtree(scratch, ignore_errors=True)
        failed = {k: v for k, v in validation.items() if v["status"] == "failed"}
        if failed:
            detail = "; ".join(f"{k}: {', '.join(v['problems'])}" for k, v in failed.items())
            raise ValidationError(f"parity check failed ({detail}); no artifact was written")
        write_tokenizer(model.tokenizer_dir, writer.path / "tokenizer")
        (writer.path / "scheduler").mkdir()
        write_json(writer.path / "scheduler" / "scheduler_config.json", model.scheduler_config)
        writer.manifest.update(
            {
                "stage": "export",
                "source": model.source,
                "loras": loras,
                "precision": plan.precision,
                "io_dtype": plan.io_dtype,
                "fp16_method": plan.fp16_method,
                "opset": opts.opset,
                "optimize": opts.optimize,
                "attention": plan.attention,
                "exporter": opts.exporter,
                "model_dims": dims.__dict__,
                "long_prompts": opts.long_prompts,
                "model_configs": configs,
                "deepcache": None if deepcache is None else {**deepcache.__dict__, "full": "unet",
                                                              "shallow": "unet_shallow"},
                "shape_ranges": ranges.to_dict(),
                "components": components,
                "validation": validation,
                "versions": library_versions(),
                "stats": {
                    "export_seconds": round(time.perf_counter() - start, 1),
                    "peak_rss_bytes": peak_rss_bytes(),
                },
            }
        )
        manifest = writer.manifest
    return manifest


def model_configs(model) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """The source model's diffusers / transformers configs (what other runtimes, e.g. Optimum,
    read beside the graphs), as JSON-safe dicts."""
    import json

    out: dict[str, Any] = {}
    for name in ("unet", "vae", "text_encoder"):
        config = getattr(getattr(model, name, None), "config", None)
        if config is None:
            continue
        d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        out[name] = json.loads(json.dumps(d, default=str))
    return out


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc keeps them otherwise)."""
    gc.collect()
    release_free_heap()


def _remove_graph(path: Path) -> None:
    """Delete an intermediate graph and its external data."""
    path.unlink(missing_ok=True)
    (path.parent / (path.name + ".data")).unlink(missing_ok=True)


def _release(model, component: str) -> None:  # type: ignore[no-untyped-def]
    """Free the torch weights a finished component no longer needs.

    The storage is dropped in place (``p.data = empty``) because the exporter's graph objects
    can outlive the export and still reference the parameters."""
    import torch

    attr = {"unet": "unet", "text_encoder": "text_encoder", "vae_decoder": "vae"}.get(component)
    if attr is None:  # the VAE is still needed for its decoder
        return
    module = getattr(model, attr)
    for t in list(module.parameters()) + list(module.buffers()):
        t.data = torch.empty(0, dtype=t.dtype, device=t.device)
    setattr(model, attr, _Config(module.config))


class _Config:
    """Stands in for a freed torch module: keeps only its config."""

    def __init__(self, config):  # type: ignore[no-untyped-def]
        self.config = config


def _torch_forward(module, spec: ComponentSpec, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:  # type: ignore[no-untyped-def]
    """The module's outputs (one per spec output) on ``inputs``."""
    import torch

    param = next(module.parameters())
    args = [torch.from_numpy(inputs[n]).to(param.device) for n in spec.input_names]
    args = [a.to(param.dtype) if a.is_floating_point() else a for a in args]
    with torch.no_grad():
        out = module(*args)
    return [o.float().cpu().numpy() for o in (out if isinstance(out, (tuple, list)) else (out,))]


def _validate(name: str, path: Path, inputs: dict[str, np.ndarray], reference: list[np.ndarray], precision: str,
              optimize_target: str | None, output_names: list[str]) -> dict[str, Any]:
    """Every output against its torch reference; the report is the first output's, with the
    others under ``other_outputs`` (any failure fails the component)."""
    import onnxruntime as ort

    from ..runtime.sessions import make_session, run_session
    from .validate import validate

    provider = "cuda" if "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"
    if optimize_target == "cuda" and provider != "cuda":
        return {"component": name, "status": "not-validated",
                "how": "graph fused for the CUDA execution provider, which this machine lacks"}
    session = make_session(path, provider)
    how = f"onnxruntime {ort.__version__} {session.get_providers()[0]}"
    if precision == "fp16" and provider == "cpu":
        how += " (fp16 graph; ops without fp16 CPU kernels run in fp32 behind inserted casts)"
    outputs = run_session(session, inputs)
    del session
    release_memory()
    results = [validate(name, lambda x, o=o: o, ref, inputs, precision, how) for o, ref in zip(outputs, reference)]
    result = results[0]
    if len(results) > 1:
        result["other_outputs"] = {n: {k: r[k] for k in ("max_abs", "max_rel", "cosine", "problems")}
                                   for n, r in zip(output_names[1:], results[1:])}
        extra = [f"{n}: {p}" for n, r in zip(output_names[1:], results[1:]) for p in r["problems"]]
        if extra:
            result["problems"] = result["problems"] + extra
            result["status"] = "failed"
    return result


def _with_rss(log: Callable[[str], None]) -> Callable[[str], None]:
    """Prefix progress lines with elapsed time and the current resident memory."""
    import psutil

    proc, t0 = psutil.Process(), time.perf_counter()

    def emit(msg: str) -> None:
        log(f"[{time.perf_counter() - t0:6.1f}s {proc.memory_info().rss / 2**30:5.2f} GiB] {msg}")

    return emit


def _fmt_shapes(inputs: dict[str, np.ndarray]) -> str:
    return ", ".join(f"{k}{list(v.shape)}" for k, v in inputs.items())


def _report_line(r: dict[str, Any], log: Callable[[str], None]) -> None:
    if r["status"] in ("passed", "failed"):
        log(f"    {r['status']}: max_abs {r['max_abs']:.3g}  max_rel {r['max_rel']:.3g}  cosine {r['cosine']:.7f}"
            + (f"  ({'; '.join(r['problems'])})" if r["problems"] else ""))
    else:
        log(f"    {r['status']}: {r['how']}")
