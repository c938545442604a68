"""``quantize_artifact``: an fp32 artifact -> a new artifact with INT8 QDQ components.

Flow: check inputs (before any expensive work) -> calibration batches from real CFG trajectories
(:mod:`.calibration`) -> streaming ranges (:mod:`.ranges`) -> ORT quantizer with those ranges and
the target's recipe and exclusions (:mod:`.recipes`) -> copy the rest -> quality report (U-Net
output error on held-out batches, image PSNR vs the source) and optional per-block sensitivity.
The source artifact is only read; the output is written atomically by ``ArtifactWriter``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..artifact import MANIFEST, Artifact, ArtifactWriter, peak_rss_bytes, write_json
from ..errors import LdmDeployError
from ..specs import COMPONENTS
from .calibration import collect_calibration
from .ranges import calibration_targets, collect_ranges, load_structure
from .recipes import (
    Recipe,
    exclusion_patterns,
    match_nodes,
    quantizable_nodes,
    quantize_onnx,
    recipe,
)

METHODS = ("minmax", "percentile", "mse")
SUPPORTED = ("unet", "text_encoder", "vae_decoder")


def check_source(art: Artifact) -> None:
    prec = art.manifest.get("precision", "fp32")
    if prec != "fp32" or art.io_dtype != "float32":
        raise LdmDeployError(
            f"{art.path} is a {prec} artifact (I/O {art.io_dtype}); INT8 calibration and quantization need an fp32 "
            "export (ldm-export without --fp16)")
    if "quantization" in art.manifest:
        raise LdmDeployError(f"{art.path} is already quantized")


def output_error(ref: np.ndarray, out: np.ndarray) -> dict[str, float]:
    r, o = ref.astype(np.float64).ravel(), out.astype(np.float64).ravel()
    denom = float(np.linalg.norm(r)) or 1.0
    cos = float(np.dot(r, o) / ((np.linalg.norm(r) * np.linalg.norm(o)) or 1.0))
    return {"cosine": cos, "rel_l2": float(np.linalg.norm(r - o) / denom), "max_abs": float(np.abs(r - o).max())}


def _mean_error(errs: list[dict[str, float]]) -> dict[str, float]:
    return {
        "cosine": float(np.mean([e["cosine"] for e in errs])),
        "cosine_min": float(np.min([e["cosine"] for e in errs])),
        "rel_l2": float(np.mean([e["rel_l2"] for e in errs])),
        "max_abs": float(np.max([e["max_abs"] for e in errs])),
        "batches": len(errs),
    }


def _session(path: Path, threads: int = 0):  # type: ignore[no-untyped-def]
    from ..runtime.sessions import make_session

    return make_session(path, "cpu", None, threads)


def _run(sess, batch: dict[str, np.ndarray]) -> np.ndarray:  # type: ignore[no-untyped-def]
    from .ranges import _feeds

    return sess.run(None, _feeds(sess, batch))[0]


def compare_models(ref_path: Path, q_path: Path, batches: Sequence[dict[str, np.ndarray]], threads: int = 0,
                   ref_outputs: list[np.ndarray] | None = None) -> dict[str, float]:
    ref_outputs = ref_outputs if ref_outputs is not None else [_run(_session(ref_path, threads), b) for b in batches]
    qs = _session(q_path, threads)
    return _mean_error([output_error(r, _run(qs, b)) for r, b in zip(ref_outputs, batches)])


def block_of(node_name: str, depth: int = 3) -> str:
    """``/unet/down_blocks.0/resnets.0/conv1/Conv`` -> ``down_blocks.0/resnets.0`` (depth 3) -
    the group a node belongs to in the sensitivity table."""
    parts = [p for p in node_name.split("/") if p]
    if parts and parts[0] in COMPONENTS:
        parts = parts[1:]
    parts = parts[:-1] if len(parts) > 1 else parts  # drop the op name
    keep = depth - 1
    return "/".join(parts[:keep]) if parts else node_name


def sensitivity_table(
    model_path: Path, ranges: dict[str, tuple[float, float]], rcp: Recipe, candidates: Sequence[str],
    batches: Sequence[dict[str, np.ndarray]], group: str = "block", limit: int | None = None, threads: int = 0,
    log: Callable[[str], None] = lambda s: None,
) -> list[dict[str, Any]]:
    """Output error of the model when only one group of nodes (a block, or one ``layer``) is
    quantized, over ``batches``; sorted worst first."""
    groups: dict[str, list[str]] = {}
    for n in candidates:
        groups.setdefault(n if group == "layer" else block_of(n), []).append(n)
    items = list(groups.items())[: limit or None]
    ref_sess = _session(model_path, threads)
    refs = [_run(ref_sess, b) for b in batches]
    del ref_sess
    rows = []
    with tempfile.TemporaryDirectory(prefix="ldm-quant-sens-") as d:
        for i, (name, nodes) in enumerate(items):
            out = Path(d) / f"g{i}.onnx"
            quantize_onnx(model_path, out, ranges, rcp, nodes_to_quantize=nodes)
            err = compare_models(model_path, out, batches, threads, ref_outputs=refs)
            rows.append({"group": name, "nodes": len(nodes), **err})
            log(f"sensitivity: {name:<48} {len(nodes):>3} nodes  cos {err['cosine']:.6f}  rel_l2 {err['rel_l2']:.2e}")
            out.unlink()
    rows.sort(key=lambda r: r["rel_l2"], reverse=True)
    return rows


def sensitivity_markdown(rows: list[dict[str, Any]], component: str) -> str:
    lines = [f"# INT8 sensitivity: {component}", "",
             "Output error of the component when only this group is quantized (all else fp32), mean over "
             "calibration batches; worst first.", "",
             "| group | nodes | cosine | rel L2 | max abs |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| `{r['group']}` | {r['nodes']} | {r['cosine']:.6f} | {r['rel_l2']:.3e} | {r['max_abs']:.3e} |")
    return "\n".join(lines) + "\n"


def _to_uint8(images: np.ndarray) -> np.ndarray:
    return np.clip(np.round(images * 255.0), 0, 255).astype(np.uint8)


def image_psnr(src: Path | str, out: Path | str, prompts: Sequence[str], steps: int, seed: int,
               threads: int = 0) -> dict[str, Any]:
    """Images of the same prompts/seeds through both artifacts; PSNR of the quantized ones vs the source."""
    from ..quality.metrics import psnr
    from ..runtime import Pipeline

    comps = ("text_encoder", "unet", "vae_decoder")
    a = Pipeline.load(src, threads=threads, verify=False, components=comps)
    b = Pipeline.load(out, threads=threads, verify=False, components=comps)
    vals = []
    for i, p in enumerate(prompts):
        ia = a(p, num_inference_steps=steps, seed=seed + i, output_type="np").images
        ib = b(p, num_inference_steps=steps, seed=seed + i, output_type="np").images
        vals.append(float(psnr(_to_uint8(ib), _to_uint8(ia))))
    return {"prompts": list(prompts), "steps": steps, "seed": seed, "psnr": vals,
            "psnr_mean": float(np.mean([v for v in vals if np.isfinite(v)] or [float("inf")]))}


def quantize_artifact(
    source: Path | str,
    out: Path | str,
    target: str = "cpu",
    components: Sequence[str] = ("unet",),
    prompts: Sequence[str] | None = None,
    calib_size: int = 64,
    calib_steps: int = 20,
    calib_per_run: int | None = None,
    calib_height: int | None = None,
    calib_width: int | None = None,
    guidance_scale: float = 7.5,
    method: str = "minmax",
    percentile: float = 99.999,
    exclude: Sequence[str] = (),
    default_exclusions: bool = True,
    quantize_cross_kv: bool = False,
    quant_format: str | None = None,
    attention_matmuls: bool | None = None,
    sensitivity: bool = False,
    sensitivity_group: str = "block",
    sensitivity_batches: int = 2,
    holdout: int = 4,
    quality_prompts: int = 2,
    max_calib_memory: int | None = 2 << 30,
    seed: int = 0,
    threads: int = 0,
    overwrite: bool = False,
    log: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    t_start = time.perf_counter()
    art = Artifact.open(source)
    check_source(art)
    if method not in METHODS:
        raise LdmDeployError(f"unknown calibration method {method!r} (choose from {', '.join(METHODS)})")
    comps = list(dict.fromkeys(components))
    if not comps:
        raise LdmDeployError("no component to quantize")
    for c in comps:
        if c not in COMPONENTS:
            raise LdmDeployError(f"unknown component {c!r} (choose from {', '.join(SUPPORTED)})")
        if c not in SUPPORTED:
            raise LdmDeployError(f"component {c!r} cannot be quantized (supported: {', '.join(SUPPORTED)})")
        if c not in art.components:
            raise LdmDeployError(f"artifact {art.path} has no component {c!r}")
    if prompts is not None and not list(prompts):
        raise LdmDeployError("the calibration prompt list is empty")
    rcp = recipe(target, quant_format, attention_matmuls)
    if Path(out).absolute() == art.path.absolute():
        raise LdmDeployError("the output must differ from the source artifact")
    if Path(out).exists() and not overwrite:
        raise LdmDeployError(f"output {out} already exists (pass --overwrite to replace it)")

    # exclusions resolved up front: a user pattern that matches nothing fails before calibration
    patterns = exclusion_patterns([], default_exclusions, quantize_cross_kv)
    structures = {c: load_structure(art.model_file(c)) for c in comps}
    if target == "tensorrt":
        for c, model in structures.items():
            foreign = sorted({f"{n.domain}::{n.op_type}" for n in model.graph.node if n.domain not in ("", "ai.onnx")})
            if foreign:
                raise LdmDeployError(
                    f"{c} uses ONNX Runtime-only operators ({', '.join(foreign)}); for the tensorrt target quantize "
                    "an artifact exported with --optimize tensorrt (or --attention full)")
    node_names = {c: [n.name for n in s.graph.node] for c, s in structures.items()}
    all_names = [n for c in comps for n in node_names[c]]
    match_nodes(all_names, list(exclude), strict=True)
    excluded: dict[str, list[str]] = {}
    per_pattern: dict[str, int] = {}
    cb = bool(rcp.extra_options.get("MatMulConstBOnly"))
    for c in comps:
        cand = set(quantizable_nodes(structures[c], rcp.op_types, cb))
        hits = match_nodes(node_names[c], patterns + list(exclude), strict=False)
        excluded[c] = sorted({n for ns in hits.values() for n in ns if n in cand})
        for p, ns in hits.items():
            per_pattern[p] = per_pattern.get(p, 0) + len([n for n in ns if n in cand])

    art.verify([f for c in art.components for f in art.component_files(c)])

    # calibration: real CFG trajectories of the runtime
    from ..runtime import Pipeline

    pipe = Pipeline.load(art.path, threads=threads, verify=False, components=("text_encoder", "unet", "vae_decoder"))
    t0 = time.perf_counter()
    records: dict[str, list[dict[str, np.ndarray]]] = {"text_encoder": [], "vae_decoder": []}
    wrapped = {}
    for c in ("text_encoder", "vae_decoder"):
        if c in comps:
            wrapped[c] = pipe.components[c]
            pipe.components[c] = _InputRecorder(wrapped[c], records[c])
    try:
        calib = collect_calibration(pipe, prompts, calib_size, calib_steps, seed, guidance_scale, calib_height,
                                    calib_width, calib_per_run, log)
        for c in wrapped:  # held-out batches of other components are not needed
            pipe.components[c] = wrapped[c]
        hold_prompts = list(reversed(calib.prompts))
        held = collect_calibration(pipe, hold_prompts, max(1, holdout), calib_steps, seed + 100_003, guidance_scale,
                                   calib_height, calib_width, None, lambda s: None) if holdout else None
    finally:
        for c, v in wrapped.items():
            pipe.components[c] = v
    calib_seconds = time.perf_counter() - t0
    del pipe
    log(f"calibration: {len(calib)} U-Net batches from {calib.runs} sampling runs in {calib_seconds:.1f} s")

    with ArtifactWriter(out, overwrite=overwrite) as w:
        qinfo: dict[str, Any] = {}
        sens_out: dict[str, Any] = {}
        for c in comps:
            src_file = art.model_file(c)
            batches = calib.batches if c == "unet" else records[c]
            if not batches:
                raise LdmDeployError(f"no calibration inputs were recorded for {c}")
            t0 = time.perf_counter()
            no_out = set(rcp.extra_options.get("OpTypesToExcludeOutputQuantization", []))
            targets = calibration_targets(structures[c], rcp.op_types,
                                          outputs=[o for o in rcp.op_types if o not in no_out])
            coll = collect_ranges(src_file, batches, targets, method, max_calib_memory=max_calib_memory,
                                  threads=threads, log=log)
            rng = coll.ranges(method, symmetric=rcp.symmetric_activations, percentile=percentile)
            ranges_s = time.perf_counter() - t0
            rel = Path(art.components[c]["file"])
            (w.path / rel.parent).mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            summary = quantize_onnx(src_file, w.path / rel, rng, rcp, nodes_to_exclude=excluded[c])
            quant_s = time.perf_counter() - t0
            log(f"{c}: {summary['quantize_linear']} QuantizeLinear, {summary['dequantize_linear']} DequantizeLinear, "
                f"{len(excluded[c])} nodes kept in fp32 ({ranges_s:.1f} s ranges, {quant_s:.1f} s quantize)")
            write_json(w.path / rel.parent / "calibration_ranges.json",
                       {"method": method, "symmetric": rcp.symmetric_activations,
                        "ranges": {k: [float(a), float(b)] for k, (a, b) in rng.items()}})
            qinfo[c] = {
                **summary,
                "quantized_nodes": len(quantizable_nodes(structures[c], rcp.op_types, cb)) - len(excluded[c]),
                "excluded_nodes": len(excluded[c]),
                "excluded": excluded[c],
                "calibrated_tensors": len(targets),
                "calibration_batches": len(batches),
                "range_passes": coll.passes,
                "range_chunks": coll.chunks,
                "exposed_bytes_per_batch": coll.estimated_bytes,
                "ranges_seconds": round(ranges_s, 2),
                "quantize_seconds": round(quant_s, 2),
            }
            if sensitivity:
                cand = [n for n in quantizable_nodes(structures[c], rcp.op_types, cb) if n not in set(excluded[c])]
                sb = batches[: max(1, sensitivity_batches)]
                rows = sensitivity_table(src_file, rng, rcp, cand, sb, sensitivity_group, threads=threads, log=log)
                stem = f"sensitivity_{c}"
                write_json(w.path / f"{stem}.json", {"component": c, "group": sensitivity_group,
                                                     "batches": len(sb), "rows": rows})
                (w.path / f"{stem}.md").write_text(sensitivity_markdown(rows, c))
                sens_out[c] = {"json": f"{stem}.json", "markdown": f"{stem}.md", "groups": len(rows),
                               "worst": rows[0] if rows else None}

        # everything else is copied untouched
        for c, entry in art.components.items():
            if c in comps:
                continue
            d = Path(entry["file"]).parent
            shutil.copytree(art.path / d, w.path / d)
        for d in ("tokenizer", "scheduler"):
            if (art.path / d).is_dir():
                shutil.copytree(art.path / d, w.path / d)

        m = w.manifest
        for k, v in art.manifest.items():
            if k not in ("format", "format_version", "files", "created", "stats", "validation"):
                m[k] = v
        m["stage"] = "quantize"
        m["precision"] = "int8"
        m["parent"] = {"path": str(art.path.absolute()), "created": art.manifest.get("created"),
                       "stage": art.manifest.get("stage"), "precision": art.manifest.get("precision")}
        m["quantization"] = {
            "target": target,
            "recipe": rcp.to_dict(),
            "method": method,
            "percentile": percentile if method == "percentile" else None,
            "components": comps,
            "calibration": calib.meta(),
            "calibration_seconds": round(calib_seconds, 2),
            "max_calib_memory": max_calib_memory,
            "exclusions": {
                "patterns": patterns + [p for p in exclude if p not in patterns],
                "default_exclusions": default_exclusions,
                "quantize_cross_kv": quantize_cross_kv,
                "user_patterns": list(exclude),
                "nodes_per_pattern": per_pattern,
                "excluded_nodes": {c: len(v) for c, v in excluded.items()},
            },
            "per_component": qinfo,
        }
        if sens_out:
            m["quantization"]["sensitivity"] = sens_out
        # provisional manifest so the runtime can open the temporary directory for the quality check
        write_json(w.path / MANIFEST, m)
        quality: dict[str, Any] = {}
        if "unet" in comps and held is not None:
            err = compare_models(art.model_file("unet"), w.path / art.components["unet"]["file"], held.batches, threads)
            quality["unet_heldout"] = {**err, "timesteps": sorted(set(held.timesteps)),
                                       "prompts": sorted(set(held.prompts[i] for i in held.prompt_indices))}
            log(f"quality: U-Net on {len(held)} held-out batches: cosine {err['cosine']:.5f} rel_l2 {err['rel_l2']:.3e}")
        if quality_prompts:
            qp = [calib.prompts[i % len(calib.prompts)] for i in range(quality_prompts)]
            quality["images"] = image_psnr(art.path, w.path, qp, calib_steps, seed + 7, threads)
            log(f"quality: image PSNR vs source {quality['images']['psnr_mean']:.2f} dB")
        m["quantization"]["quality"] = quality
        m["stats"] = {"quantize_seconds": round(time.perf_counter() - t_start, 2), "peak_rss_bytes": peak_rss_bytes()}
    return json.loads((Path(out) / MANIFEST).read_text())


class _InputRecorder:
    """Keeps a copy of every call's inputs of a non-U-Net component during calibration."""

    device = "cpu"

    def __init__(self, inner: Any, sink: list[dict[str, np.ndarray]]):
        self.inner = inner
        self.spec = inner.spec
        self.sink = sink

    def __call__(self, **inputs: np.ndarray) -> np.ndarray:
        self.sink.append({k: np.array(v, copy=True) for k, v in inputs.items()})
        return self.inner(**inputs)

