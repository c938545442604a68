"""Seconds per CFG U-Net step and peak RSS: fp32 artifact vs INT8 artifact on ONNX Runtime CPU
(plus diffusers + torch eager fp32 for reference), side by side in one run.

Each variant runs in its own subprocess (its peak RSS is its own), one after the other, on the same
random CFG inputs (batch 2B, latent size/8). With ``--rounds R`` the ORT variants run R times in
turn (fp32, int8, fp32, int8, ...), so a slow spell of a shared CPU lands on all of them; the
speedup is also reported per round:

    python benchmarks/int8_speed.py --fp32 sd15-onnx/ --int8 sd15-int8/ --torch-model sd15-random \\
        --size 512 --iters 3 -o benchmarks/results/int8_speed_sd15_cpu

Writes ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from ldm_deploy.artifact import peak_rss_bytes
from ldm_deploy.bench.measure import session_step_times


def _inputs(batch: int, size: int, hidden: int, channels: int = 4):  # type: ignore[no-untyped-def]
    import numpy as np

    rng = np.random.default_rng(0)
    lat = size // 8
    return {
        "sample": rng.standard_normal((2 * batch, channels, lat, lat)).astype(np.float32),
        "timestep": np.array([501.0], dtype=np.float32),
        "encoder_hidden_states": rng.standard_normal((2 * batch, 77, hidden)).astype(np.float32),
    }




def worker_ort(artifact: str, batch: int, size: int, iters: int, warmup: int, threads: int,
               low_memory: bool = False) -> dict:
    from ldm_deploy.artifact import Artifact
    from ldm_deploy.runtime.sessions import make_session

    art = Artifact.open(artifact)
    t0 = time.perf_counter()
    sess = make_session(art.model_file("unet"), "cpu", threads, low_memory)
    load_s = time.perf_counter() - t0
    feeds = _inputs(batch, size, int(art.manifest["model_dims"]["text_hidden"]))
    times = session_step_times(sess, feeds, iters, warmup)
    q = art.manifest.get("quantization") or {}
    return {"load_s": load_s, "step_s": times, "precision": art.manifest.get("precision"),
            "target": q.get("target"), "method": q.get("method"), "peak_rss_bytes": peak_rss_bytes()}


def worker_torch(model: str, batch: int, size: int, iters: int, warmup: int, threads: int) -> dict:
    import torch

    from ldm_deploy.models import load_model

    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    unet = load_model(model).diffusers_pipeline().unet.eval()
    load_s = time.perf_counter() - t0
    feeds = {k: torch.from_numpy(v) for k, v in _inputs(batch, size, unet.config.cross_attention_dim).items()}
    times = []
    with torch.no_grad():
        for i in range(warmup + iters):
            t = time.perf_counter()
            unet(feeds["sample"], feeds["timestep"], encoder_hidden_states=feeds["encoder_hidden_states"])
            if i >= warmup:
                times.append(time.perf_counter() - t)
    return {"load_s": load_s, "step_s": times, "precision": "fp32", "peak_rss_bytes": peak_rss_bytes()}


def _median(xs: list[float]) -> float:
    return float(sorted(xs)[len(xs) // 2])


def _spawn(args: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    p = subprocess.run([sys.executable, __file__, "--_worker", *args], capture_output=True, text=True, env=env)
    if p.returncode != 0:
        return {"error": (p.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fp32", help="fp32 artifact (ldm-export)")
    ap.add_argument("--int8", nargs="+", default=[], help="INT8 artifact(s) (ldm-quantize)")
    ap.add_argument("--torch-model", help="model name for the torch eager reference (e.g. sd15-random, tiny-random)")
    ap.add_argument("--size", type=int, default=512, help="image side in pixels (latent = size/8)")
    ap.add_argument("--batch", type=int, default=1, help="prompts per step (U-Net batch 2x with CFG)")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=1, help="run the ORT variants this many times in turn")
    ap.add_argument("--low-memory", action="store_true",
                    help="ORT sessions without the memory arena (the runtime's --low-memory mode)")
    ap.add_argument("-o", "--output", default="benchmarks/results/int8_speed")
    ap.add_argument("--_worker", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    common = (a.batch, a.size, a.iters, a.warmup, a.threads)
    if a._worker:
        kind, target = a._worker
        res = worker_torch(target, *common) if kind == "torch" else worker_ort(target, *common, a.low_memory)
        print(json.dumps(res))
        return
    flags = ["--size", str(a.size), "--batch", str(a.batch), "--iters", str(a.iters), "--warmup", str(a.warmup),
             "--threads", str(a.threads)] + (["--low-memory"] if a.low_memory else [])
    variants: list[tuple[str, list[str]]] = []
    if a.fp32:
        variants.append(("ORT CPU fp32", ["ort", a.fp32, *flags]))
    for p in a.int8:
        variants.append((f"ORT CPU int8 ({Path(p).name})", ["ort", p, *flags]))
    rows = []
    if a.torch_model:  # slow and only for reference: once
        print(f"running torch eager fp32 ({a.torch_model}) ...", file=sys.stderr, flush=True)
        rows.append({**_spawn(["torch", a.torch_model, *flags]), "variant": f"torch eager fp32 ({a.torch_model})"})
    runs: dict[str, list[dict]] = {name: [] for name, _ in variants}
    for k in range(max(1, a.rounds)):
        for name, args in variants:
            print(f"round {k + 1}/{a.rounds}: running {name} ...", file=sys.stderr, flush=True)
            runs[name].append(_spawn(args))
    for name, rs in runs.items():
        ok = [r for r in rs if "step_s" in r]
        if len(ok) < len(rs):
            rows.append({"variant": name, "error": next(r["error"] for r in rs if "error" in r)})
            continue
        rows.append({"variant": name, "step_s": [t for r in ok for t in r["step_s"]],
                     "round_median_s": [_median(r["step_s"]) for r in ok],
                     "load_s": ok[0]["load_s"], "peak_rss_bytes": max(r["peak_rss_bytes"] for r in ok),
                     **{k: ok[0][k] for k in ("precision", "target", "method") if k in ok[0]}})
    for r in rows:
        if "step_s" in r:
            r["median_step_s"] = _median(r["step_s"])
    base = next((r for r in rows if r["variant"] == "ORT CPU fp32" and "median_step_s" in r), None)
    for r in rows:
        if base and "median_step_s" in r:
            r["speedup_vs_ort_fp32"] = base["median_step_s"] / r["median_step_s"]
            if "round_median_s" in r:
                r["speedup_per_round"] = [f / q for f, q in zip(base["round_median_s"], r["round_median_s"])]
    result = {"benchmark": "int8_speed", "size": a.size, "unet_batch": 2 * a.batch, "iters": a.iters,
              "rounds": a.rounds,
              "warmup": a.warmup, "threads": a.threads or os.cpu_count(), "low_memory": a.low_memory, "machine": platform.processor() or platform.machine(),
              "cpu_count": os.cpu_count(), "fp32": a.fp32, "int8": a.int8, "rows": rows}
    out = Path(a.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    mode = "low-memory sessions (no ORT arena)" if a.low_memory else "ORT memory arena"
    rounds = f", {a.rounds} rounds" if a.rounds > 1 else ""
    lines = [f"# INT8 vs fp32 U-Net speed ({a.size}x{a.size}, CFG batch {2 * a.batch}, {a.iters} iters{rounds})", "",
             f"{result['machine']}, {result['threads']} threads, {mode}. Each variant in its own process, one after "
             "the other (the ORT variants in turn, once per round); median of the timed iterations after the "
             "warm-up. Per round: fp32 median / this variant's median in the same round.", "",
             "| variant | s / CFG step (median) | speedup vs ORT fp32 | per round | peak RSS GiB | load s |",
             "|---|---:|---:|---|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | error: {r['error']} | | | | |")
            continue
        sp = f"{r['speedup_vs_ort_fp32']:.2f}x" if "speedup_vs_ort_fp32" in r else ""
        per = " ".join(f"{x:.2f}" for x in r.get("speedup_per_round", []))
        lines.append(f"| {r['variant']} | {r['median_step_s']:.4f} | {sp} | {per} | {r['peak_rss_bytes'] / 2**30:.2f} | "
                     f"{r['load_s']:.1f} |")
    lines += ["", "Timed iterations (s): " + "; ".join(
        f"{r['variant']}: {', '.join(f'{x:.2f}' for x in r['step_s'])}" for r in rows if "step_s" in r), "",
        f"Reproduce: `python benchmarks/int8_speed.py {' '.join(sys.argv[1:])}`"]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
