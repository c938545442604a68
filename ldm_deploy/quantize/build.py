"""``quantize_artifact``: an fp32 artifact -> a new artifact with INT8 QDQ components.

The stage is four steps over one :class:`QuantizeOptions`:

1. :func:`plan` - every check and the node exclusions, before any expensive work;
2. :func:`calibrate` - U-Net input batches from real CFG trajectories (:mod:`.calibration`);
3. :func:`quantize_components` - streaming ranges (:mod:`.ranges`), then ORT's quantizer with the
   target's recipe and exclusions (:mod:`.recipes`), and optional per-block sensitivity
   (:mod:`.sensitivity`);
4. :func:`assess` - U-Net output error on held-out batches and image PSNR vs the source
   (:mod:`.assess`).

The source artifact is only read; the output is written atomically by ``ArtifactWriter``.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx

from ..artifact import MANIFEST, Artifact, ArtifactWriter, peak_rss_bytes, write_json
from ..errors import LdmDeployError
from ..onnx_ops import check_no_ort_only_ops
from ..runtime.sessions import check_threads
from ..specs import COMPONENTS, OPTIONAL_COMPONENTS
from .assess import compare_models, image_psnr
from .calibration import CalibrationSet, collect_calibration, collect_heldout
from .ranges import calibration_targets, collect_ranges, load_structure
from .recipes import Recipe, exclusion_patterns, match_nodes, quantizable_nodes, quantize_onnx, recipe
from .sensitivity import sensitivity_markdown, sensitivity_table

METHODS = ("minmax", "percentile", "mse")
SUPPORTED = ("unet", "unet_shallow", "text_encoder", "vae_decoder")
Log = Callable[[str], None]


@dataclass(frozen=True)
class QuantizeOptions:
    """Everything ``ldm-quantize`` can be told (its flags, one field each)."""

    target: str = "cpu"  # "cpu" (ONNX Runtime), "tensorrt", or "openvino" (NNCF, OpenVINO IR)
    components: tuple[str, ...] = ("unet",)
    prompts: tuple[str, ...] | None = None  # calibration prompts (None: the built-in set)
    calib_size: int = 64  # U-Net batches kept
    calib_steps: int = 20  # sampling steps per calibration run
    calib_per_run: int | None = None  # batches one run contributes (None: ceil(steps / 4))
    calib_height: int | None = None  # calibration image size (None: the artifact's export size)
    calib_width: int | None = None
    guidance_scale: float = 7.5
    method: str = "minmax"  # activation ranges: minmax, percentile, mse
    percentile: float = 99.999
    exclude: tuple[str, ...] = ()  # node patterns kept in fp32, on top of the defaults
    default_exclusions: bool = True
    quantize_cross_kv: bool = False
    quant_format: str | None = None  # "qdq" / "qoperator"; None: the target's
    attention_matmuls: bool | None = None  # None: the target's choice
    reduce_range: bool = False  # cpu target: 7-bit weights (no u8s8 saturation on CPUs without VNNI)
    sensitivity: bool = False
    sensitivity_group: str = "block"
    sensitivity_batches: int = 2
    holdout: int = 4  # held-out U-Net batches for the quality report
    quality_prompts: int = 2  # prompts for the image PSNR check (0: skip)
    max_calib_memory: int | None = 2 << 30
    seed: int = 0
    threads: int = 0
    nncf_preset: str = "mixed"  # openvino target: NNCF's QuantizationPreset (mixed | performance)
    ranges_from: str | None = None  # an earlier cpu/tensorrt output of the same source: reuse its ranges

    def __post_init__(self) -> None:  # lists from callers become tuples (the options are hashable data)
        for name in ("components", "prompts", "exclude"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, tuple):
                object.__setattr__(self, name, tuple(v))


@dataclass
class Plan:
    """What will be quantized and how, resolved and checked before any expensive work."""

    art: Artifact
    options: QuantizeOptions
    components: list[str]
    recipe: Recipe
    structures: dict[str, onnx.ModelProto]
    patterns: list[str]  # default exclusion patterns
    excluded: dict[str, list[str]]  # component -> node names kept in fp32
    per_pattern: dict[str, int]  # pattern -> candidate nodes it excludes
    reused: ReusedRanges | None = None  # --ranges-from: ranges and calibration settings of an earlier run


@dataclass
class ReusedRanges:
    """Activation ranges recorded by an earlier ``ldm-quantize`` of the same source (``--ranges-from``)."""

    path: Path
    ranges: dict[str, dict[str, tuple[float, float]]]  # component -> tensor -> (low, high)
    calibration: dict[str, Any]  # the earlier run's calibration meta
    calibration_seconds: float


@dataclass
class Calibration:
    """The calibration batches, the held-out batches and how long they took."""

    calib: CalibrationSet
    held: CalibrationSet | None
    seconds: float
    reused: ReusedRanges | None = None  # set when the ranges come from an earlier run (no calibration batches)

    def meta(self) -> dict[str, Any]:
        if self.reused is None:
            return self.calib.meta()
        return {**self.reused.calibration, "ranges_from": str(self.reused.path.absolute()),
                "original_calibration_seconds": self.reused.calibration_seconds}

    def batches(self, component: str) -> list[dict[str, np.ndarray]]:
        if component == "unet_shallow":
            return self.calib.shallow_batches
        return self.calib.batches if component == "unet" else self.calib.component_inputs.get(component, [])


def check_source(art: Artifact) -> None:
    prec = art.manifest.get("precision", "fp32")
    if prec != "fp32" or art.io_dtype != "float32":
        raise LdmDeployError(
            f"{art.path} is a {prec} artifact (I/O {art.io_dtype}); INT8 calibration and quantization need an fp32 "
            "export (ldm-export without --fp16)")
    if "quantization" in art.manifest:
        raise LdmDeployError(f"{art.path} is already quantized")


def _check_components(art: Artifact, comps: list[str]) -> None:
    if not comps:
        raise LdmDeployError("no component to quantize")
    for c in comps:
        if c not in COMPONENTS + OPTIONAL_COMPONENTS:
            raise LdmDeployError(f"unknown component {c!r} (choose from {', '.join(SUPPORTED)})")
        if c not in SUPPORTED:
            raise LdmDeployError(f"component {c!r} cannot be quantized (supported: {', '.join(SUPPORTED)})")
        if c not in art.components:
            raise LdmDeployError(f"artifact {art.path} has no component {c!r}")


def _check_portable_ops(structures: dict[str, onnx.ModelProto], target: str) -> None:
    for c, model in structures.items():
        check_no_ort_only_ops(model, c, f"the {target} target")


def plan(source: Path | str, out: Path | str, opts: QuantizeOptions, overwrite: bool = False) -> Plan:
    """Open the source, check every option and resolve the exclusions (a user pattern that matches
    nothing fails here, before calibration)."""
    art = Artifact.open(source)
    check_source(art)
    if opts.method not in METHODS:
        raise LdmDeployError(f"unknown calibration method {opts.method!r} (choose from {', '.join(METHODS)})")
    comps = list(dict.fromkeys(opts.components))
    if "unet" in comps and "unet_shallow" in art.components and "unet_shallow" not in comps:
        comps.append("unet_shallow")  # the two DeepCache graphs of the U-Net are quantized together
    _check_components(art, comps)
    if opts.prompts is not None and not opts.prompts:
        raise LdmDeployError("the calibration prompt list is empty")
    rcp = recipe(opts.target, opts.quant_format, opts.attention_matmuls, opts.reduce_range)
    if not 0.0 < opts.percentile <= 100.0:
        raise LdmDeployError(f"percentile {opts.percentile} is outside (0, 100]")
    check_threads(opts.threads)
    if Path(out).absolute() == art.path.absolute():
        raise LdmDeployError("the output must differ from the source artifact")
    ArtifactWriter(out, overwrite=overwrite)  # refuses an existing or unwritable output before any work

    patterns = exclusion_patterns([], opts.default_exclusions, opts.quantize_cross_kv)
    structures = {c: load_structure(art.model_file(c)) for c in comps}
    if opts.target == "tensorrt":
        _check_portable_ops(structures, "tensorrt")
    node_names = {c: [n.name for n in s.graph.node] for c, s in structures.items()}
    match_nodes([n for c in comps for n in node_names[c]], list(opts.exclude), strict=True)
    excluded: dict[str, list[str]] = {}
    per_pattern: dict[str, int] = {}
    const_b = bool(rcp.extra_options.get("MatMulConstBOnly"))
    for c in comps:
        cand = set(quantizable_nodes(structures[c], rcp.op_types, const_b))
        hits = match_nodes(node_names[c], patterns + list(opts.exclude), strict=False)
        excluded[c] = sorted({n for ns in hits.values() for n in ns if n in cand})
        for p, ns in hits.items():
            per_pattern[p] = per_pattern.get(p, 0) + len([n for n in ns if n in cand])
    reused = load_reused_ranges(opts.ranges_from, art, opts, rcp, comps) if opts.ranges_from else None
    art.verify([f for c in art.components for f in art.component_files(c)])
    return Plan(art, opts, comps, rcp, structures, patterns, excluded, per_pattern, reused)


def load_reused_ranges(path: Path | str, art: Artifact, opts: QuantizeOptions, rcp: Recipe,
                       comps: list[str]) -> ReusedRanges:
    """The ranges of an earlier cpu/tensorrt quantization of ``art`` at ``path``, checked to fit this run:
    same source artifact, same range method and activation symmetry, every component present."""
    if opts.sensitivity:
        raise LdmDeployError("--sensitivity needs calibration batches; it cannot be combined with --ranges-from")
    prev = Artifact.open(path)
    q = prev.manifest.get("quantization")
    if not q or q.get("target") not in ("cpu", "tensorrt"):
        raise LdmDeployError(f"{prev.path} is not a cpu or tensorrt ldm-quantize output: it has no ranges to reuse")
    parent = prev.manifest.get("parent", {})
    if (Path(parent.get("path", "")).absolute() != art.path.absolute()
            or parent.get("created") != art.manifest.get("created")):
        raise LdmDeployError(f"the ranges in {prev.path} were calibrated on {parent.get('path')}, not on {art.path}")
    if q.get("method") != opts.method or (opts.method == "percentile" and q.get("percentile") != opts.percentile):
        raise LdmDeployError(f"the ranges in {prev.path} come from --method {q.get('method')}"
                             + (f" --percentile {q.get('percentile')}" if q.get("method") == "percentile" else "")
                             + "; pass the same method to reuse them")
    ranges: dict[str, dict[str, tuple[float, float]]] = {}
    for c in comps:
        f = prev.path / Path(art.components[c]["file"]).parent / "calibration_ranges.json"
        if c not in q.get("components", []) or not f.is_file():
            raise LdmDeployError(f"{prev.path} has no recorded ranges for {c}")
        data = json.loads(f.read_text())
        if bool(data.get("symmetric")) != rcp.symmetric_activations:
            raise LdmDeployError(f"the ranges in {prev.path} are {'' if data.get('symmetric') else 'a'}symmetric; "
                                 f"the {rcp.target} target needs {'' if rcp.symmetric_activations else 'a'}symmetric ones")
        ranges[c] = {k: (float(lo), float(hi)) for k, (lo, hi) in data["ranges"].items()}
    return ReusedRanges(prev.path, ranges, q["calibration"], float(q.get("calibration_seconds", 0.0)))


def calibrate(p: Plan, pipeline: Any = None, log: Log = lambda s: None) -> Calibration:
    """Calibration and held-out batches from the runtime's own CFG trajectories. ``pipeline``: an
    already-loaded runtime ``Pipeline`` of the source artifact (it is only observed, so it may
    serve other threads meanwhile); by default one is loaded."""
    if p.reused is not None:
        return _heldout_only(p, pipeline, log)
    return calibrate_artifact(p.art, p.options, p.components, pipeline, log)


def _heldout_only(p: Plan, pipeline: Any, log: Log) -> Calibration:
    """With reused ranges only the held-out batches are sampled, with the earlier run's settings."""
    from ..runtime import Pipeline

    o, meta = p.options, p.reused.calibration  # type: ignore[union-attr]
    prompts = list(meta["prompts"])
    calib = CalibrationSet(batches=[], timesteps=[], step_indices=[], prompt_indices=[], prompts=prompts,
                           steps=meta["steps"], seed=meta["seed"], guidance_scale=meta["guidance_scale"],
                           height=meta["height"], width=meta["width"])
    t0 = time.perf_counter()
    held = None
    if o.holdout:
        pipe = pipeline or Pipeline.load(p.art.path, threads=o.threads, verify=False,
                                         components=("text_encoder", "unet", "vae_decoder"))
        held = collect_heldout(pipe, prompts, o.holdout, meta["steps"], meta["seed"], meta["guidance_scale"],
                               meta["height"], meta["width"])
    log(f"calibration: ranges reused from {p.reused.path}; held-out batches in {time.perf_counter() - t0:.1f} s")  # type: ignore[union-attr]
    return Calibration(calib, held, time.perf_counter() - t0, p.reused)


def calibrate_artifact(art: Artifact, o: QuantizeOptions, components: list[str], pipeline: Any = None,
                       log: Log = lambda s: None) -> Calibration:
    """:func:`calibrate` for any target (the NNCF one has no ORT :class:`Plan`)."""
    from ..runtime import Pipeline

    pipe = pipeline or Pipeline.load(art.path, threads=o.threads, verify=False,
                                     components=("text_encoder", "unet", "vae_decoder"))
    t0 = time.perf_counter()
    others = [c for c in components if c not in ("unet", "unet_shallow")]
    calib = collect_calibration(pipe, o.prompts, o.calib_size, o.calib_steps, o.seed, o.guidance_scale,
                                o.calib_height, o.calib_width, o.calib_per_run, log, record_components=others)
    held = collect_heldout(pipe, calib.prompts, max(1, o.holdout), o.calib_steps, o.seed, o.guidance_scale,
                           o.calib_height, o.calib_width) if o.holdout else None
    seconds = time.perf_counter() - t0
    log(f"calibration: {len(calib)} U-Net batches from {calib.runs} sampling runs in {seconds:.1f} s")
    return Calibration(calib, held, seconds)


def quantize_components(p: Plan, cal: Calibration, out_dir: Path, log: Log = lambda s: None,
                        ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Write the INT8 graph of every planned component into ``out_dir``: (per-component report,
    sensitivity report)."""
    o, rcp = p.options, p.recipe
    const_b = bool(rcp.extra_options.get("MatMulConstBOnly"))
    no_out = set(rcp.extra_options.get("OpTypesToExcludeOutputQuantization", []))
    report: dict[str, Any] = {}
    sens: dict[str, Any] = {}
    for c in p.components:
        src_file = p.art.model_file(c)
        batches = cal.batches(c)
        t0 = time.perf_counter()
        targets = calibration_targets(p.structures[c], rcp.op_types, outputs=[t for t in rcp.op_types if t not in no_out])
        coll = None
        if p.reused is not None:
            ranges = p.reused.ranges[c]
            missing = [t for t in targets if t not in ranges]
            if missing:
                raise LdmDeployError(f"{p.reused.path} has no range for {len(missing)} tensors of {c} "
                                     f"(first: {missing[0]}); calibrate again without --ranges-from")
        else:
            if not batches:
                raise LdmDeployError(f"no calibration inputs were recorded for {c}")
            coll = collect_ranges(src_file, batches, targets, o.method, max_calib_memory=o.max_calib_memory,
                                  threads=o.threads, log=log)
            ranges = coll.ranges(o.method, symmetric=rcp.symmetric_activations, percentile=o.percentile)
        ranges_s = time.perf_counter() - t0
        rel = Path(p.art.components[c]["file"])
        (out_dir / rel.parent).mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        summary = quantize_onnx(src_file, out_dir / rel, ranges, rcp, nodes_to_exclude=p.excluded[c])
        quant_s = time.perf_counter() - t0
        log(f"{c}: {summary['quantize_linear']} QuantizeLinear, {summary['dequantize_linear']} DequantizeLinear, "
            f"{len(p.excluded[c])} nodes kept in fp32 ({ranges_s:.1f} s ranges, {quant_s:.1f} s quantize)")
        write_json(out_dir / rel.parent / "calibration_ranges.json",
                   {"method": o.method, "symmetric": rcp.symmetric_activations,
                    "ranges": {k: [float(a), float(b)] for k, (a, b) in ranges.items()}})
        candidates = quantizable_nodes(p.structures[c], rcp.op_types, const_b)
        report[c] = {
            **summary,
            "quantized_nodes": len(candidates) - len(p.excluded[c]),
            "excluded_nodes": len(p.excluded[c]),
            "excluded": p.excluded[c],
            "calibrated_tensors": len(targets),
            "calibration_batches": len(batches) if coll else p.reused.calibration["size"],  # type: ignore[union-attr]
            "range_passes": coll.passes if coll else 0,
            "range_chunks": coll.chunks if coll else 0,
            "exposed_bytes_per_batch": coll.estimated_bytes if coll else 0,
            "ranges_seconds": round(ranges_s, 2),
            "quantize_seconds": round(quant_s, 2),
        }
        if o.sensitivity:
            kept = set(p.excluded[c])
            sb = batches[: max(1, o.sensitivity_batches)]
            rows = sensitivity_table(src_file, ranges, rcp, [n for n in candidates if n not in kept], sb,
                                     o.sensitivity_group, threads=o.threads, log=log)
            stem = f"sensitivity_{c}"
            write_json(out_dir / f"{stem}.json", {"component": c, "group": o.sensitivity_group, "batches": len(sb),
                                                  "rows": rows})
            (out_dir / f"{stem}.md").write_text(sensitivity_markdown(rows, c))
            sens[c] = {"json": f"{stem}.json", "markdown": f"{stem}.md", "groups": len(rows),
                       "worst": rows[0] if rows else None}
    return report, sens


def assess(p: Plan, cal: Calibration, out_dir: Path, log: Log = lambda s: None) -> dict[str, Any]:
    """The quality report of the quantized artifact in ``out_dir`` (it needs its manifest)."""
    o, art = p.options, p.art
    quality: dict[str, Any] = {}
    if "unet" in p.components and cal.held is not None:
        held = cal.held
        err = compare_models(art.model_file("unet"), out_dir / art.components["unet"]["file"], held.batches, o.threads)
        quality["unet_heldout"] = {**err, "timesteps": sorted(set(held.timesteps)),
                                   "prompts": sorted(set(held.prompts[i] for i in held.prompt_indices))}
        log(f"quality: U-Net on {len(held)} held-out batches: cosine {err['cosine']:.5f} rel_l2 {err['rel_l2']:.3e}")
    if "unet_shallow" in p.components and cal.held is not None and cal.held.shallow_batches:
        err = compare_models(art.model_file("unet_shallow"), out_dir / art.components["unet_shallow"]["file"],
                             cal.held.shallow_batches, o.threads)
        quality["unet_shallow_heldout"] = err
        log(f"quality: shallow U-Net on {len(cal.held.shallow_batches)} held-out batches: cosine {err['cosine']:.5f}")
    if o.quality_prompts:
        prompts = cal.calib.prompts
        qp = [prompts[i % len(prompts)] for i in range(o.quality_prompts)]
        quality["images"] = image_psnr(art.path, out_dir, qp, cal.calib.steps, cal.calib.seed + 7, o.threads)
        log(f"quality: image PSNR vs source {quality['images']['psnr_mean']:.2f} dB")
    return quality


def _copy_unquantized(p: Plan, out_dir: Path) -> None:
    for c, entry in p.art.components.items():
        if c not in p.components:
            d = Path(entry["file"]).parent.as_posix()
            shutil.copytree(p.art.subdir(d), out_dir / d)
    for d in ("tokenizer", "scheduler"):
        if (p.art.path / d).is_dir():
            shutil.copytree(p.art.subdir(d), out_dir / d)


def _manifest_section(p: Plan, cal: Calibration, report: dict[str, Any], sens: dict[str, Any]) -> dict[str, Any]:
    o = p.options
    section: dict[str, Any] = {
        "target": o.target,
        "recipe": p.recipe.to_dict(),
        "method": o.method,
        "percentile": o.percentile if o.method == "percentile" else None,
        "components": p.components,
        "calibration": cal.meta(),
        "calibration_seconds": round(cal.seconds, 2),
        "max_calib_memory": o.max_calib_memory,
        "exclusions": {
            "patterns": p.patterns + [x for x in o.exclude if x not in p.patterns],
            "default_exclusions": o.default_exclusions,
            "quantize_cross_kv": o.quantize_cross_kv,
            "user_patterns": list(o.exclude),
            "nodes_per_pattern": p.per_pattern,
            "excluded_nodes": {c: len(v) for c, v in p.excluded.items()},
        },
        "per_component": report,
    }
    if sens:
        section["sensitivity"] = sens
    return section


def quantize_artifact(source: Path | str, out: Path | str, options: QuantizeOptions | None = None, *,
                      overwrite: bool = False, pipeline: Any = None, log: Log = lambda s: None,
                      **fields: Any) -> dict[str, Any]:
    """Quantize ``source`` into the new artifact ``out``; returns its manifest. ``options`` (or
    its fields as keywords, on top of ``options``) say how; ``pipeline`` may be a loaded runtime
    ``Pipeline`` of ``source`` to calibrate with."""
    t_start = time.perf_counter()
    opts = replace(options or QuantizeOptions(), **fields)
    if opts.target == "openvino":
        from .nncf_target import quantize_openvino

        return quantize_openvino(source, out, opts, sys.modules[__name__], overwrite=overwrite, pipeline=pipeline,
                                 log=log)
    p = plan(source, out, opts, overwrite)
    cal = calibrate(p, pipeline, log)
    art = p.art
    with ArtifactWriter(out, overwrite=overwrite) as w:
        report, sens = quantize_components(p, cal, w.path, log)
        _copy_unquantized(p, w.path)
        m = w.manifest
        for k, v in art.manifest.items():
            if k not in ("format", "format_version", "files", "created", "stats", "validation"):
                m[k] = v
        m["stage"] = "quantize"
        m["precision"] = "int8"
        m["parent"] = {"path": str(art.path.absolute()), "created": art.manifest.get("created"),
                       "stage": art.manifest.get("stage"), "precision": art.manifest.get("precision")}
        m["quantization"] = _manifest_section(p, cal, report, sens)
        write_json(w.path / MANIFEST, m)  # provisional: the runtime opens the staging dir for the quality check
        m["quantization"]["quality"] = assess(p, cal, w.path, log)
        m["stats"] = {"quantize_seconds": round(time.perf_counter() - t_start, 2), "peak_rss_bytes": peak_rss_bytes()}
    return json.loads((Path(out) / MANIFEST).read_text())
