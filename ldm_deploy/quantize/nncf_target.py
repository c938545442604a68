"""``ldm-quantize --target openvino``: NNCF post-training INT8 of the OpenVINO model read from the
artifact's ONNX, written as OpenVINO IR (``<component>/model.xml`` + ``model.bin``).

Calibration is the other targets' (``build.calibrate_artifact``: U-Net inputs from real CFG
trajectories of the runtime) fed to ``nncf.quantize`` through an ``nncf.Dataset``. The U-Net graphs
use ``model_type=TRANSFORMER`` (NNCF's attention-aware placement; no quantizers on the softmax
path), and the default exclusions of the other targets (time embedding, conv_in/out, shortcut
convs, cross-attention K/V) become the ignored scope. The result's manifest says it runs on the
``openvino`` backend only (``backends``); ONNX Runtime backends refuse it in one line.
"""

from __future__ import annotations

import fnmatch
import gc
import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..artifact import MANIFEST, Artifact, ArtifactWriter, peak_rss_bytes, write_json
from ..errors import LdmDeployError, first_line
from ..numerics import compare, mean_errors, psnr, to_uint8
from ..onnx_ops import check_no_ort_only_ops
from ..runtime.sessions import check_threads
from .recipes import exclusion_patterns

PRESETS = ("mixed", "performance")
COMPONENTS = ("unet", "unet_shallow", "vae_decoder")
TRANSFORMER_GRAPHS = ("unet", "unet_shallow")
Log = Callable[[str], None]
# QuantizeOptions / Calibration and the shared checks and calibration live in .build, which calls
# this module: they are passed in (``stage``) rather than imported, to keep the import graph acyclic.
QuantizeOptions = Calibration = Any


def require_nncf() -> tuple[Any, Any]:
    """(openvino, nncf), or one line saying how to install them."""
    try:
        import nncf  # noqa: PLC0415
        import openvino as ov  # noqa: PLC0415
    except Exception as e:
        raise LdmDeployError(f"the openvino target needs OpenVINO and NNCF ({first_line(e)}): "
                             "install them with `pip install 'ldm-deploy[openvino]'`") from None
    import logging

    nncf.set_log_level(logging.WARNING)  # not its per-node tables
    return ov, nncf


def ignored_patterns(opts: QuantizeOptions) -> list[str]:
    """The exclusion globs of the other targets (plus ``--exclude``) as NNCF name regexes."""
    globs = exclusion_patterns([], opts.default_exclusions, opts.quantize_cross_kv) + list(opts.exclude)
    out = []
    for g in globs:
        if g.startswith("re:"):
            out.append(g[3:])
        elif any(ch in g for ch in "*?["):
            out.append(fnmatch.translate(g).removesuffix(r"\Z").removeprefix("(?s:").removesuffix(")") or g)
        else:
            out.append(".*" + _escape(g) + ".*")
    return out


def _escape(text: str) -> str:
    import re

    return re.escape(text)


def check_options(art: Artifact, opts: QuantizeOptions, stage: Any) -> list[str]:
    """Every check before calibration; returns the components to quantize."""
    stage.check_source(art)
    if opts.nncf_preset not in PRESETS:
        raise LdmDeployError(f"unknown NNCF preset {opts.nncf_preset!r} (choose from {', '.join(PRESETS)})")
    if opts.method != "minmax":
        raise LdmDeployError(f"--method {opts.method} applies to the cpu and tensorrt targets; NNCF estimates its own "
                             "ranges (choose --nncf-preset)")
    if opts.sensitivity:
        raise LdmDeployError("--sensitivity is not available for the openvino target")
    if opts.reduce_range:
        raise LdmDeployError("--reduce-range is for the cpu target; OpenVINO handles CPUs without VNNI itself")
    if opts.ranges_from:
        raise LdmDeployError("--ranges-from applies to the cpu and tensorrt targets; NNCF estimates its own ranges")
    if opts.prompts is not None and not opts.prompts:
        raise LdmDeployError("the calibration prompt list is empty")
    check_threads(opts.threads)
    comps = list(dict.fromkeys(opts.components))
    if "unet" in comps and "unet_shallow" in art.components and "unet_shallow" not in comps:
        comps.append("unet_shallow")
    stage._check_components(art, comps)
    bad = [c for c in comps if c not in COMPONENTS]
    if bad:
        raise LdmDeployError(f"the openvino target quantizes {', '.join(COMPONENTS)}, not {', '.join(bad)}")
    for c in art.components:  # the whole artifact must run on OpenVINO afterwards
        check_no_ort_only_ops(art.model_file(c), c, "OpenVINO")
    return comps


def _dataset(nncf: Any, batches: list[dict[str, np.ndarray]], names: set[str]) -> Any:
    return nncf.Dataset(batches, lambda b: {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in b.items()
                                            if k in names})


def quantize_one(ov: Any, nncf: Any, core: Any, src: Path, dst: Path, batches: list[dict[str, np.ndarray]],
                 transformer: bool, preset: str, ignored: list[str]) -> dict[str, Any]:
    """NNCF INT8 of one ONNX graph -> IR at ``dst`` (``.xml``); a summary for the manifest."""
    model = core.read_model(str(src))
    names = {n for p in model.inputs for n in p.get_names()}
    t0 = time.perf_counter()
    q = nncf.quantize(
        model, _dataset(nncf, batches, names), subset_size=len(batches),
        preset=nncf.QuantizationPreset.MIXED if preset == "mixed" else nncf.QuantizationPreset.PERFORMANCE,
        model_type=nncf.ModelType.TRANSFORMER if transformer else None,
        ignored_scope=nncf.IgnoredScope(patterns=ignored, validate=False),
    )
    seconds = time.perf_counter() - t0
    fq = sum(1 for op in q.get_ops() if op.get_type_name() == "FakeQuantize")
    ov.save_model(q, str(dst), compress_to_fp16=False)
    return {"fake_quantize": fq, "calibration_batches": len(batches), "quantize_seconds": round(seconds, 2),
            "model_type": "transformer" if transformer else None}


def _ov_outputs(core: Any, xml: Path, batches: list[dict[str, np.ndarray]], threads: int) -> list[np.ndarray]:
    cfg = {"INFERENCE_NUM_THREADS": threads} if threads else {}
    compiled = core.compile_model(str(xml), "CPU", cfg)
    names = {n for p in compiled.inputs for n in p.get_names()}
    req = compiled.create_infer_request()
    return [np.array(req.infer({k: v for k, v in b.items() if k in names})[compiled.output(0)], dtype=np.float32)
            for b in batches]


def assess(core: Any, art: Artifact, out_dir: Path, comps: list[str], cal: Calibration, opts: QuantizeOptions,
           log: Log) -> dict[str, Any]:
    """Held-out output error vs the fp32 ONNX graph on ONNX Runtime, and image PSNR of the
    openvino-backend images vs the source on ort-cpu."""
    from ..runtime import Pipeline
    from .assess import onnx_outputs

    quality: dict[str, Any] = {}
    held = {"unet": cal.held.batches if cal.held else [],
            "unet_shallow": cal.held.shallow_batches if cal.held else []}
    for c in comps:
        batches = held.get(c) or []
        if not batches:
            continue
        ref = onnx_outputs(art.model_file(c), batches, opts.threads)
        got = _ov_outputs(core, out_dir / c / "model.xml", batches, opts.threads)
        err = mean_errors([compare(r, g) for r, g in zip(ref, got)])
        quality[f"{c}_heldout"] = err
        log(f"quality: {c} on {len(batches)} held-out batches: cosine {err['cosine']:.5f} rel_l2 {err['rel_l2']:.3e}")
    if opts.quality_prompts:
        prompts = cal.calib.prompts
        qp = [prompts[i % len(prompts)] for i in range(opts.quality_prompts)]
        parts = ("text_encoder", "unet", "vae_decoder")
        seed = opts.seed + 7

        def images(pipe: Any) -> list[np.ndarray]:
            return [to_uint8(pipe(p, num_inference_steps=opts.calib_steps, seed=seed + i, output_type="np").images)
                    for i, p in enumerate(qp)]

        # One pipeline at a time: at SD1.5 scale an fp32 ORT pipeline next to an OpenVINO one, in the process
        # that has just run NNCF, went past 24 GB.
        ref = images(Pipeline.load(art.path, threads=opts.threads, verify=False, components=parts))
        gc.collect()
        got = images(Pipeline.load(out_dir, backend="openvino", threads=opts.threads, verify=False, components=parts,
                                   compile_cache=False))
        gc.collect()
        vals = [float(psnr(b, a)) for a, b in zip(ref, got)]
        quality["images"] = {"prompts": qp, "steps": opts.calib_steps, "seed": seed, "psnr": vals,
                             "reference": "source artifact on ort-cpu",
                             "psnr_mean": float(np.mean([v for v in vals if np.isfinite(v)] or [float("inf")]))}
        log(f"quality: image PSNR vs source {quality['images']['psnr_mean']:.2f} dB")
    return quality


def quantize_openvino(source: Path | str, out: Path | str, opts: QuantizeOptions, stage: Any, *,
                      overwrite: bool = False, pipeline: Any = None, log: Log = lambda s: None) -> dict[str, Any]:
    """The whole openvino target: check, calibrate, NNCF-quantize, write, assess. ``stage``: the
    module :mod:`.build` (shared checks and calibration)."""
    t_start = time.perf_counter()
    art = Artifact.open(source)
    comps = check_options(art, opts, stage)
    if Path(out).absolute() == art.path.absolute():
        raise LdmDeployError("the output must differ from the source artifact")
    ArtifactWriter(out, overwrite=overwrite)  # refuses an existing or unwritable output before any work
    ov, nncf = require_nncf()
    art.verify([f for c in art.components for f in art.component_files(c)])
    cal = stage.calibrate_artifact(art, opts, comps, pipeline, log)
    core = ov.Core()
    ignored = ignored_patterns(opts)
    with ArtifactWriter(out, overwrite=overwrite) as w:
        report: dict[str, Any] = {}
        for c in comps:
            batches = cal.batches(c)
            if not batches:
                raise LdmDeployError(f"no calibration inputs were recorded for {c}")
            (w.path / c).mkdir(parents=True, exist_ok=True)
            report[c] = quantize_one(ov, nncf, core, art.model_file(c), w.path / c / "model.xml", batches,
                                     c in TRANSFORMER_GRAPHS, opts.nncf_preset, ignored)
            log(f"{c}: {report[c]['fake_quantize']} FakeQuantize nodes ({report[c]['quantize_seconds']} s)")
        for c, entry in art.components.items():
            if c not in comps:
                d = Path(entry["file"]).parent.as_posix()
                shutil.copytree(art.subdir(d), w.path / d)
        for d in ("tokenizer", "scheduler"):
            if (art.path / d).is_dir():
                shutil.copytree(art.subdir(d), w.path / d)
        m = w.manifest
        for k, v in art.manifest.items():
            if k not in ("format", "format_version", "files", "created", "stats", "validation"):
                m[k] = v
        m["components"] = {c: ({**e, "file": f"{c}/model.xml"} if c in comps else e) for c, e in art.components.items()}
        m["stage"] = "quantize"
        m["precision"] = "int8"
        m["backends"] = ["openvino"]
        m["graph_format"] = f"OpenVINO IR ({', '.join(comps)}) and ONNX (the rest)"
        m["parent"] = {"path": str(art.path.absolute()), "created": art.manifest.get("created"),
                       "stage": art.manifest.get("stage"), "precision": art.manifest.get("precision")}
        m["quantization"] = {
            "target": "openvino",
            "recipe": {"tool": "nncf", "nncf_version": nncf.__version__, "openvino_version": ov.get_version(),
                       "preset": opts.nncf_preset, "subset_size": {c: len(cal.batches(c)) for c in comps},
                       "fast_bias_correction": True,
                       "model_type": {c: report[c]["model_type"] for c in comps},
                       "ignored_scope": {"patterns": ignored, "validate": False}},
            "method": "nncf",
            "components": comps,
            "calibration": cal.calib.meta(),
            "calibration_seconds": round(cal.seconds, 2),
            "exclusions": {"default_exclusions": opts.default_exclusions, "quantize_cross_kv": opts.quantize_cross_kv,
                           "user_patterns": list(opts.exclude)},
            "per_component": report,
        }
        write_json(w.path / MANIFEST, m)  # provisional: the runtime opens the staging dir for the image check
        gc.collect()  # drop NNCF's models and statistics before the check loads two more models
        m["quantization"]["quality"] = assess(core, art, w.path, comps, cal, opts, log)
        m["stats"] = {"quantize_seconds": round(time.perf_counter() - t_start, 2), "peak_rss_bytes": peak_rss_bytes()}
    return json.loads((Path(out) / MANIFEST).read_text())

