"""Seconds per denoising step and peak RSS: diffusers + torch eager vs the ldm-deploy runtime.

Each variant runs in its own subprocess (so peak RSS is its own), one after the other in one run:

    python benchmarks/runtime_vs_torch.py --model sd15-random --artifact /path/to/sd15-random-onnx \
        --steps 3 --size 512 -o benchmarks/results/runtime_sd15_cpu

The artifact must be an fp32 export of the same model (``ldm-export --model sd15-random``).
Writes ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PROMPT = "a photograph of an astronaut riding a horse"


def run_torch(model: str, steps: int, size: int, threads: int) -> dict:
    import torch

    from ldm_deploy.models import load_model

    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    pipe = load_model(model).diffusers_pipeline()
    pipe.set_progress_bar_config(disable=True)
    load_s = time.perf_counter() - t0
    unet_times: list[float] = []
    unet = pipe.unet
    original = unet.forward

    def timed(*a, **k):  # type: ignore[no-untyped-def]
        t = time.perf_counter()
        out = original(*a, **k)
        unet_times.append(time.perf_counter() - t)
        return out

    unet.forward = timed  # type: ignore[method-assign]
    step_times: list[float] = []
    cb_t = [0.0]

    def on_step(p, i, t, kw):  # type: ignore[no-untyped-def]
        now = time.perf_counter()
        step_times.append(now - cb_t[0])
        cb_t[0] = now
        return kw

    with torch.no_grad():
        t0 = time.perf_counter()
        cb_t[0] = t0
        images = pipe(PROMPT, num_inference_steps=steps, guidance_scale=7.5, height=size, width=size,
                      latents=torch.from_numpy(initial_latents(size)), output_type="np",
                      callback_on_step_end=on_step).images
        total = time.perf_counter() - t0
    return {"load_s": load_s, "total_s": total, "unet_s": unet_times, "step_s": step_times}, images


def run_runtime(artifact: str, steps: int, size: int, threads: int) -> dict:
    from ldm_deploy.runtime import Pipeline

    t0 = time.perf_counter()
    pipe = Pipeline.load(artifact, threads=threads, components=("text_encoder", "unet", "vae_decoder"))
    load_s = time.perf_counter() - t0
    steps_t: list[float] = []
    last = [0.0]

    def progress(i: int, n: int) -> None:
        now = time.perf_counter()
        steps_t.append(now - last[0])
        last[0] = now

    t0 = time.perf_counter()
    last[0] = t0
    out = pipe(PROMPT, num_inference_steps=steps, guidance_scale=7.5, height=size, width=size,
               latents=initial_latents(size), output_type="np", progress=progress)
    total = time.perf_counter() - t0
    weights = sum(
        info["bytes"] for rel, info in pipe.artifact.manifest["files"].items()
        if rel.split("/")[0] in ("text_encoder", "unet", "vae_decoder")
    )
    return {"load_s": load_s, "total_s": total, "timings": out.timings, "steps": out.steps, "step_s": steps_t,
            "weight_bytes": weights}, out.images


def initial_latents(size: int) -> np.ndarray:
    """The same starting noise for both variants."""
    return np.random.default_rng(0).standard_normal((1, 4, size // 8, size // 8)).astype(np.float32)


def child(args: argparse.Namespace) -> None:
    fn = run_torch if args.variant == "torch" else run_runtime
    src = args.model if args.variant == "torch" else args.artifact
    result, images = fn(src, args.steps, args.size, args.threads)
    np.save(args.images, np.asarray(images, dtype=np.float32))
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("RESULT " + json.dumps(result))


def median(xs: list[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2] if s else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="sd15-random")
    p.add_argument("--artifact", required=True)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("-o", "--out", type=Path, default=Path("benchmarks/results/runtime_sd15_cpu"))
    p.add_argument("--variant", choices=("torch", "runtime"), help=argparse.SUPPRESS)
    p.add_argument("--images", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        return child(args)

    results = {}
    tmp = tempfile.mkdtemp()
    for variant in ("torch", "runtime"):
        print(f"running {variant} ...", file=sys.stderr, flush=True)
        cmd = [sys.executable, __file__, "--variant", variant, "--model", args.model, "--artifact", args.artifact,
               "--steps", str(args.steps), "--size", str(args.size), "--threads", str(args.threads),
               "--images", os.path.join(tmp, f"{variant}.npy")]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not line:
            sys.exit(f"{variant} failed:\n{proc.stderr[-3000:]}")
        results[variant] = json.loads(line[0][7:])

    t, r = results["torch"], results["runtime"]
    a, b = (np.load(os.path.join(tmp, f"{v}.npy")).astype(np.float64) for v in ("torch", "runtime"))
    mse = float(np.mean((a - b) ** 2))
    image_psnr = float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)
    # step time: median over steps of the wall time between step callbacks (U-Net + guidance + scheduler)
    # the first step interval also holds text encoding: use the later ones when there are any
    torch_step = median(t["step_s"][1:] or t["step_s"])
    rt_step = median(r["step_s"][1:] or r["step_s"])
    rt_unet = r["timings"]["unet"] / r["steps"]
    rt_other = r["timings"]["scheduler_and_guidance"] / r["steps"]
    summary = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "python": platform.python_version()},
        "settings": {"model": args.model, "artifact": args.artifact, "steps": args.steps, "size": args.size,
                     "guidance": 7.5, "cfg_batch": 2},
        "torch_eager": {"step_s": torch_step, "unet_s": median(t["unet_s"]), "peak_rss_gb": t["peak_rss_bytes"] / 2**30,
                        "load_s": t["load_s"], "total_s": t["total_s"]},
        "runtime": {"step_s": rt_step, "unet_s": rt_unet, "outside_unet_s": rt_other,
                    "outside_unet_share": rt_other / (rt_unet + rt_other), "peak_rss_gb": r["peak_rss_bytes"] / 2**30,
                    "weight_gb": r["weight_bytes"] / 2**30, "rss_over_weights": r["peak_rss_bytes"] / r["weight_bytes"],
                    "load_s": r["load_s"], "total_s": r["total_s"], "timings": r["timings"]},
        "image_psnr_db": image_psnr,
        "raw": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    rt = summary["runtime"]
    md = [
        f"# Runtime vs diffusers + torch eager ({args.model}, {args.size}x{args.size}, CFG batch 2, CPU)",
        "",
        f"Machine: {summary['machine']['cores']} cores, {summary['machine']['cpu']}. Steps: {args.steps}. "
        f"Command: `python benchmarks/runtime_vs_torch.py --model {args.model} --artifact ARTIFACT --steps {args.steps} --size {args.size}`",
        "",
        "| variant | s / denoising step (median) | U-Net s / step | outside U-Net per step | peak RSS (GiB) | load (s) |",
        "|---|---|---|---|---|---|",
        f"| diffusers + torch eager fp32 | {torch_step:.2f} | {summary['torch_eager']['unet_s']:.2f} | – | "
        f"{summary['torch_eager']['peak_rss_gb']:.2f} | {t['load_s']:.1f} |",
        f"| ldm-deploy runtime, ORT CPU fp32 | {rt_step:.2f} | {rt_unet:.2f} | {rt_other * 1000:.1f} ms "
        f"({rt['outside_unet_share'] * 100:.3f}%) | {rt['peak_rss_gb']:.2f} | {r['load_s']:.1f} |",
        "",
        f"Runtime peak RSS / weight bytes of the loaded graphs ({rt['weight_gb']:.2f} GiB): {rt['rss_over_weights']:.2f}x.",
        f"End-to-end parity (same initial latents, {args.steps} DDIM steps, guidance 7.5): PSNR of the runtime's "
        f"image vs diffusers' = {image_psnr:.1f} dB.",
    ]
    args.out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
