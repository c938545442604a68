"""Optimum interop, both directions, on the embedded trained ``tiny`` model.

    LDM_OPTIMUM_PYTHON=/work/venv-optimum/bin/python python benchmarks/optimum_interop.py \
        [--steps 10] [--guidance 5] [-o benchmarks/results/optimum_interop]

A. ``ldm-export tiny`` -> ``to_optimum`` -> Optimum's ``ORTStableDiffusionPipeline.from_pretrained``
   (run by the interpreter with optimum) generates from the same initial latents, with a DDIM
   scheduler from the same config, as our runtime on the original artifact.
B. ``python -m ldm_deploy.models save tiny DIR`` -> ``optimum-cli export onnx --model DIR OUT``
   -> ``from_optimum(OUT)`` -> our runtime, against our own export of ``tiny``, same latents.

Each direction passes at PSNR >= 40 dB on every prompt. Optimum conflicts with this project's
transformers/diffusers versions, so it lives in another interpreter (``--optimum-python`` or
``$LDM_OPTIMUM_PYTHON``); this file is also that interpreter's entry point (``child`` mode, which
imports only optimum, diffusers, torch and numpy). Writes ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "a large red circle on a blue background, top left",
    "a small green square on a white background, bottom right",
    "a yellow triangle on a black background, center",
]
THRESHOLD_DB = 40.0


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR of two float images in [0, 1]."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


# --- the Optimum side (runs in the optimum interpreter) --------------------------------------------
def child(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=("generate", "export"))
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--latents")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--guidance", type=float, default=5.0)
    a = p.parse_args(argv)
    if a.mode == "export":
        cli = Path(sys.executable).parent / "optimum-cli"
        subprocess.run([str(cli), "export", "onnx", "--model", a.src, "--task", "text-to-image", a.out], check=True)
        return
    import torch
    from diffusers import DDIMScheduler
    from optimum.onnxruntime import ORTStableDiffusionPipeline

    pipe = ORTStableDiffusionPipeline.from_pretrained(a.src)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    latents = np.load(a.latents)
    size = latents.shape[-1] * pipe.vae_scale_factor
    images = []
    for prompt, lat in zip(PROMPTS, latents):
        out = pipe(prompt, num_inference_steps=a.steps, guidance_scale=a.guidance, height=size, width=size,
                   latents=torch.from_numpy(lat[None]), output_type="np")
        images.append(out.images[0])
    np.save(a.out, np.stack(images).astype(np.float32))


def run_child(python: str, *args: str) -> None:
    r = subprocess.run([python, __file__, "child", *args], capture_output=True, text=True, timeout=1800)
    if r.returncode:
        raise RuntimeError(f"optimum interpreter failed ({r.returncode}): {r.stderr[-3000:]}")


def optimum_available(python: str | None) -> str | None:
    """None when ``python`` can import optimum.onnxruntime and diffusers, else why not."""
    if not python:
        return "LDM_OPTIMUM_PYTHON is not set (an interpreter with optimum-onnx[onnxruntime] and diffusers)"
    try:
        r = subprocess.run([python, "-c", "import optimum.onnxruntime, diffusers"], capture_output=True, text=True,
                           timeout=300)
    except OSError as e:
        return f"cannot run {python}: {e}"
    return None if r.returncode == 0 else f"{python} cannot import optimum.onnxruntime: {r.stderr.strip()[-300:]}"


# --- our side ------------------------------------------------------------------------------------
def ours(artifact: Path, latents: np.ndarray, steps: int, guidance: float) -> np.ndarray:
    from ldm_deploy.runtime import Pipeline

    pipe = Pipeline.load(artifact, threads=1, components=("text_encoder", "unet", "vae_decoder"))
    return np.stack([pipe(p, latents=lat[None], num_inference_steps=steps, guidance_scale=guidance,
                          output_type="np").images[0] for p, lat in zip(PROMPTS, latents)])


def run(python: str, work: Path, steps: int, guidance: float, log=print) -> dict:  # type: ignore[no-untyped-def]
    """Both directions in ``work``; returns the results (``passed`` per direction)."""
    from ldm_deploy.export.exporter import ExportOptions, export_model
    from ldm_deploy.interop.optimum import from_optimum, to_optimum

    t0 = time.perf_counter()
    art = work / "tiny-onnx"
    export_model("tiny", art, ExportOptions(), log=lambda s: None)
    latents = np.random.default_rng(0).standard_normal((len(PROMPTS), 4, 8, 8)).astype(np.float32)
    np.save(work / "latents.npy", latents)
    reference = ours(art, latents, steps, guidance)
    results: dict = {"prompts": PROMPTS, "steps": steps, "guidance": guidance, "scheduler": "DDIM",
                     "threshold_db": THRESHOLD_DB}

    log("A: to_optimum -> ORTStableDiffusionPipeline")
    t = time.perf_counter()
    to_optimum(art, work / "tiny-optimum")
    convert_s = time.perf_counter() - t
    run_child(python, "generate", str(work / "tiny-optimum"), str(work / "a.npy"), "--latents",
              str(work / "latents.npy"), "--steps", str(steps), "--guidance", str(guidance))
    a = np.load(work / "a.npy")
    psnr_a = [float(psnr(x, y)) for x, y in zip(a, reference)]
    results["A_ours_to_optimum"] = {"psnr_db": psnr_a, "max_abs_pixel": float(np.abs(a - reference).max()),
                                    "convert_seconds": round(convert_s, 2),
                                    "passed": bool(min(psnr_a) >= THRESHOLD_DB)}

    log("B: optimum-cli export onnx -> from_optimum -> our runtime")
    subprocess.run([sys.executable, "-m", "ldm_deploy.models", "save", "tiny", str(work / "tiny-diffusers")],
                   check=True, capture_output=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    t = time.perf_counter()
    run_child(python, "export", str(work / "tiny-diffusers"), str(work / "optimum-cli-out"))
    export_s = time.perf_counter() - t
    t = time.perf_counter()
    manifest = from_optimum(work / "optimum-cli-out", work / "tiny-imported")
    import_s = time.perf_counter() - t
    b = ours(work / "tiny-imported", latents, steps, guidance)
    psnr_b = [float(psnr(x, y)) for x, y in zip(b, reference)]
    results["B_optimum_to_ours"] = {"psnr_db": psnr_b, "max_abs_pixel": float(np.abs(b - reference).max()),
                                    "optimum_cli_seconds": round(export_s, 1), "import_seconds": round(import_s, 2),
                                    "imported_long_prompts": manifest["long_prompts"],
                                    "imported_specs": {c: e["spec"] for c, e in manifest["components"].items()},
                                    "passed": bool(min(psnr_b) >= THRESHOLD_DB)}
    results["seconds"] = round(time.perf_counter() - t0, 1)
    return results


def versions(python: str) -> dict[str, str]:
    code = ("import json, importlib.metadata as m; print(json.dumps({n: m.version(n) for n in "
            "('optimum', 'optimum-onnx', 'diffusers', 'transformers', 'onnxruntime', 'torch')}))")
    r = subprocess.run([python, "-c", code], capture_output=True, text=True)
    return json.loads(r.stdout) if r.returncode == 0 else {}


def write_report(results: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    a, b = results["A_ours_to_optimum"], results["B_optimum_to_ours"]
    fmt = lambda xs: ", ".join("inf" if x == float("inf") else f"{x:.1f}" for x in xs)  # noqa: E731
    lines = [
        "# Optimum interop (tiny, DDIM, same latents)", "",
        f"{len(results['prompts'])} prompts, {results['steps']} DDIM steps, guidance {results['guidance']}, "
        f"pass: PSNR >= {results['threshold_db']} dB per image. Optimum side: {results.get('optimum_versions')}.", "",
        "| direction | PSNR per prompt (dB) | max abs pixel diff | passed |", "|---|---|---|---|",
        f"| A: our export -> to_optimum -> ORTStableDiffusionPipeline vs our runtime | {fmt(a['psnr_db'])} | "
        f"{a['max_abs_pixel']:.2e} | {a['passed']} |",
        f"| B: optimum-cli export onnx -> from_optimum -> our runtime vs our export | {fmt(b['psnr_db'])} | "
        f"{b['max_abs_pixel']:.2e} | {b['passed']} |", "",
        f"to_optimum: {a['convert_seconds']} s; optimum-cli export: {b['optimum_cli_seconds']} s; from_optimum: "
        f"{b['import_seconds']} s; whole run {results['seconds']} s on {results.get('machine')}.", "",
        "Reproduce: `LDM_OPTIMUM_PYTHON=/path/to/venv-with-optimum/bin/python python benchmarks/optimum_interop.py`",
    ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        child(sys.argv[2:])
        return 0
    sys.path.insert(0, str(ROOT))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--optimum-python", default=os.environ.get("LDM_OPTIMUM_PYTHON"))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("-o", "--output", type=Path, default=ROOT / "benchmarks" / "results" / "optimum_interop")
    args = p.parse_args()
    why = optimum_available(args.optimum_python)
    if why:
        print(f"optimum_interop: error: {why}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        results = run(args.optimum_python, Path(tmp), args.steps, args.guidance)
    results["optimum_versions"] = versions(args.optimum_python)
    results["machine"] = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    write_report(results, args.output)
    print(args.output.with_suffix(".md").read_text())
    return 0 if results["A_ours_to_optimum"]["passed"] and results["B_optimum_to_ours"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
