"""INT8 image quality per calibration method: adherence, domain FID, PSNR/SSIM vs fp32.

For each ``--method`` the fp32 artifact (an export of the embedded trained model, e.g.
``ldm-export --model tiny -o tiny-onnx/``; any fp32 artifact path works) is quantized with
``ldm-quantize`` into a temporary artifact; then images for ``eval_prompts(n)`` are generated with
fixed seeds through the fp32 artifact and every INT8 one and scored with
``ldm_deploy.quality.evaluate`` (INT8 images against the fp32 images for PSNR/SSIM)::

    python benchmarks/int8_quality.py --artifact tiny-onnx/ --methods minmax percentile mse \\
        --n 200 --steps 25 --target cpu -o benchmarks/results/int8_quality_tiny

Writes ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def generate(artifact: str, prompts: list[str], steps: int, seed: int, guidance: float, batch: int = 1,
             threads: int = 0, **load: object) -> np.ndarray:
    """uint8 images, prompt i from seed + i (``load``: more Pipeline.load options, e.g. a backend)."""
    from ldm_deploy.runtime import Pipeline

    pipe = Pipeline.load(artifact, components=("text_encoder", "unet", "vae_decoder"), threads=threads, **load)
    out = []
    for i, p in enumerate(prompts):
        img = pipe(p, num_inference_steps=steps, guidance_scale=guidance, seed=seed + i, output_type="np").images
        out.append(np.clip(np.round(img[0] * 255), 0, 255).astype(np.uint8))
    return np.stack(out)


def _clean(d: dict) -> dict:
    return {k: v for k, v in d.items() if k not in ("predictions", "correct")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", required=True, help="fp32 artifact of the trained model")
    ap.add_argument("--methods", nargs="+", default=["minmax", "percentile", "mse"])
    ap.add_argument("--target", choices=("cpu", "tensorrt"), default="cpu")
    ap.add_argument("--n", type=int, default=200, help="eval_prompts(n)")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance-scale", type=float, default=7.5)
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--calib-size", type=int, default=64)
    ap.add_argument("--calib-steps", type=int, default=20)
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more ldm-quantize arguments")
    ap.add_argument("-o", "--output", default="benchmarks/results/int8_quality")
    a = ap.parse_args()

    from ldm_deploy.data.shapes import caption, eval_prompts
    from ldm_deploy.quality import evaluate
    from ldm_deploy.quantize.cli import main as quantize_main

    attrs = eval_prompts(a.n)
    prompts = [caption(x) for x in attrs]
    t0 = time.perf_counter()
    ref = generate(a.artifact, prompts, a.steps, a.seed, a.guidance_scale, 1)
    rows = [{"variant": "fp32", "seconds": time.perf_counter() - t0, **_clean(evaluate(ref, attrs, inception=False))}]
    with tempfile.TemporaryDirectory(prefix="int8-quality-") as tmp:
        for method in a.methods:
            out = Path(tmp) / f"int8-{method}"
            t0 = time.perf_counter()
            try:
                quantize_main([a.artifact, "-o", str(out), "--target", a.target, "--method", method,
                               "--calib-size", str(a.calib_size), "--calib-steps", str(a.calib_steps),
                               "--quality-prompts", "0", "-q", *a.extra])
            except SystemExit as e:
                if e.code:
                    rows.append({"variant": f"int8 {method}", "error": f"ldm-quantize exited {e.code}"})
                    continue
            q_s = time.perf_counter() - t0
            manifest = json.loads((out / "manifest.json").read_text())
            t0 = time.perf_counter()
            imgs = generate(str(out), prompts, a.steps, a.seed, a.guidance_scale, 1)
            r = _clean(evaluate(imgs, attrs, reference_images=ref, inception=False))
            rows.append({"variant": f"int8 {method}", "quantize_seconds": q_s, "seconds": time.perf_counter() - t0,
                         "unet_heldout": manifest["quantization"].get("quality", {}).get("unet_heldout"), **r})
            print(f"{method}: adherence {r['adherence']:.3f} domain FID {r['domain_fid']:.3f} "
                  f"PSNR {r['psnr']:.2f} SSIM {r['ssim']:.4f}", file=sys.stderr, flush=True)
    result = {"benchmark": "int8_quality", "artifact": a.artifact, "target": a.target, "n": a.n, "steps": a.steps,
              "seed": a.seed, "guidance_scale": a.guidance_scale, "calib_size": a.calib_size,
              "calib_steps": a.calib_steps, "rows": rows}
    outp = Path(a.output)
    outp.parent.mkdir(parents=True, exist_ok=True)
    outp.with_suffix(".json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    fmt = lambda v, f: "" if v is None else format(v, f)  # noqa: E731
    lines = [f"# INT8 quality ({a.target}, {a.n} eval prompts, {a.steps} steps, seeds {a.seed}+i)", "",
             "| variant | adherence | seen | held-out | shape / colour / background / size / position | domain FID "
             "| PSNR vs fp32 | SSIM vs fp32 | U-Net cos (held-out) |",
             "|---|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | {r['error']} | | | | | | | |")
            continue
        cos = (r.get("unet_heldout") or {}).get("cosine")
        lines.append(f"| {r['variant']} | {fmt(r['adherence'], '.3f')} | {fmt(r['adherence_seen'], '.3f')} | "
                     f"{fmt(r['adherence_heldout'], '.3f')} | "
                     f"{' / '.join(format(v, '.2f') for v in r['per_attribute'].values())} | {fmt(r['domain_fid'], '.3f')} | "
                     f"{fmt(r.get('psnr'), '.2f')} | {fmt(r.get('ssim'), '.4f')} | {fmt(cos, '.5f')} |")
    lines += ["", f"Calibration: {a.calib_size} CFG batches over {a.calib_steps}-step sampling runs. "
              "PSNR/SSIM: INT8 images against the fp32 artifact's images for the same prompt and seed.", "",
              f"Reproduce: `python benchmarks/int8_quality.py {' '.join(sys.argv[1:])}`"]
    outp.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
