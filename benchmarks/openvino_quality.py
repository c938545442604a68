"""Image quality of the OpenVINO variants on the embedded ``tiny`` model: adherence, domain FID,
PSNR/SSIM vs ONNX Runtime fp32 (same prompts, same seeds).

Variants: ORT fp32 (the reference; ``--ort-artifact``, the default fused-MHA export), ORT INT8 (``ldm-quantize
--target cpu`` of it), OpenVINO with precision hints f32 and default, and OpenVINO + NNCF INT8 (``ldm-quantize --target openvino`` of
``--ov-artifact``, an export with ``--attention full``)::

    ldm-export --model tiny -o tiny-onnx && ldm-export --model tiny --attention full -o tiny-onnx-full
    python benchmarks/openvino_quality.py --ort-artifact tiny-onnx --ov-artifact tiny-onnx-full \\
        --n 200 --steps 25 --guidance-scale 5 --threads 1 -o benchmarks/results/openvino_quality_tiny

Writes ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
from int8_quality import _clean, generate  # noqa: E402  (one copy of the image loop)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ort-artifact", required=True, help="fp32 artifact for ONNX Runtime (reference)")
    ap.add_argument("--ov-artifact", required=True, help="fp32 artifact exported with --attention full")
    ap.add_argument("--n", type=int, default=200, help="eval_prompts(n)")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance-scale", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--calib-size", type=int, default=64)
    ap.add_argument("--calib-steps", type=int, default=20)
    ap.add_argument("--reduce-range", action="store_true", help="ORT INT8 with 7-bit weights (CPUs without VNNI)")
    ap.add_argument("--exclude", nargs="+", default=[], metavar="PATTERN", help="ORT INT8: more nodes kept in fp32")
    ap.add_argument("-o", "--output", default="benchmarks/results/openvino_quality_tiny")
    a = ap.parse_args()

    from ldm_deploy.data.shapes import caption, eval_prompts
    from ldm_deploy.quality import evaluate
    from ldm_deploy.quantize.build import quantize_artifact

    attrs = eval_prompts(a.n)
    prompts = [caption(x) for x in attrs]
    gen = dict(prompts=prompts, steps=a.steps, seed=a.seed, guidance=a.guidance_scale, threads=a.threads)
    t0 = time.perf_counter()
    ref = generate(a.ort_artifact, **gen)
    rows = [{"variant": "ORT fp32", "seconds": time.perf_counter() - t0, **_clean(evaluate(ref, attrs, inception=False))}]
    with tempfile.TemporaryDirectory(prefix="ov-quality-") as tmp:
        quantized = {}
        for target, src in (("cpu", a.ort_artifact), ("openvino", a.ov_artifact)):
            t0 = time.perf_counter()  # the same calibration settings (and so the same trajectories) for both
            recipe = dict(reduce_range=a.reduce_range, exclude=a.exclude) if target == "cpu" else {}
            m = quantize_artifact(src, Path(tmp) / target, target=target, calib_size=a.calib_size,
                                  calib_steps=a.calib_steps, quality_prompts=0, threads=a.threads, **recipe)
            quantized[target] = (str(Path(tmp) / target), m, time.perf_counter() - t0)
        ort_name = "ORT INT8 (cpu target" + (", --reduce-range" if a.reduce_range else "") + (
            f", --exclude {' '.join(a.exclude)}" if a.exclude else "") + ")"
        variants = [(ort_name, "ort-cpu", quantized["cpu"], {}),
                    ("OpenVINO f32", "openvino", (a.ov_artifact, None, None), {"precision_hint": "f32"}),
                    ("OpenVINO default", "openvino", (a.ov_artifact, None, None), {"precision_hint": "default"}),
                    ("OpenVINO + NNCF INT8", "openvino", quantized["openvino"], {})]
        for name, backend, (art, manifest, q_s), load in variants:
            t0 = time.perf_counter()
            imgs = generate(art, backend=backend, **load, **gen)
            r = _clean(evaluate(imgs, attrs, reference_images=ref, inception=False))
            row = {"variant": name, "seconds": time.perf_counter() - t0, **r}
            if manifest:
                row.update(quantize_seconds=q_s, unet_heldout=manifest["quantization"]["quality"].get("unet_heldout"))
            rows.append(row)
            print(f"{name}: adherence {r['adherence']:.3f} domain FID {r['domain_fid']:.3f} PSNR {r['psnr']:.2f}",
                  file=sys.stderr, flush=True)
    result = {"benchmark": "openvino_quality", "ort_artifact": a.ort_artifact, "ov_artifact": a.ov_artifact,
              "n": a.n, "steps": a.steps, "seed": a.seed, "guidance_scale": a.guidance_scale,
              "calib_size": a.calib_size, "calib_steps": a.calib_steps, "rows": rows}
    outp = Path(a.output)
    outp.parent.mkdir(parents=True, exist_ok=True)
    outp.with_suffix(".json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    fmt = lambda v, f: "" if v is None else format(v, f)  # noqa: E731
    lines = [f"# OpenVINO quality on tiny ({a.n} eval prompts, {a.steps} steps, guidance {a.guidance_scale}, "
             f"seeds {a.seed}+i)", "",
             "| variant | adherence | seen | held-out | domain FID | PSNR vs ORT fp32 | SSIM vs ORT fp32 | "
             "U-Net cos (held-out) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        cos = (r.get("unet_heldout") or {}).get("cosine")
        lines.append(f"| {r['variant']} | {fmt(r['adherence'], '.3f')} | {fmt(r['adherence_seen'], '.3f')} | "
                     f"{fmt(r['adherence_heldout'], '.3f')} | {fmt(r['domain_fid'], '.3f')} | "
                     f"{fmt(r.get('psnr'), '.2f')} | {fmt(r.get('ssim'), '.4f')} | {fmt(cos, '.5f')} |")
    lines += ["", f"INT8 rows: {a.calib_size} CFG calibration batches over {a.calib_steps}-step runs (the same for both; "
              "NNCF preset mixed). "
              "PSNR/SSIM: against the ORT fp32 images of the same prompt and seed (inf = identical).", "",
              f"Reproduce: `python benchmarks/openvino_quality.py {' '.join(sys.argv[1:])}`"]
    outp.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
