"""ONNX Runtime vs OpenVINO on the CPU, fp32 and INT8, side by side: seconds per CFG U-Net step,
VAE decode, peak RSS, build/quantize cost, and output cosine vs ORT fp32 on the same inputs.

Variants (each call of each variant in its own subprocess, so its peak RSS is its own):

========================  ==========================================================
``ort-fp32``              ``--ort-fp32`` artifact (default export: fused MHA) on ORT
``ort-int8``              ``--ort-int8`` (or ``ldm-quantize --target cpu`` of it, timed)
``ov-f32``                ``--ov-fp32`` artifact (``--attention full``), hint f32
``ov-default``            same, OpenVINO's default precision for the CPU
``ov-nncf-int8``          ``--ov-int8`` (or ``ldm-quantize --target openvino``, timed)
``ort-int8-NAME``         ``--ort-int8-alt NAME=PATH``: other cpu INT8 recipes, on ORT
========================  ==========================================================

Rounds are interleaved (every variant once per round, ``--rounds R`` times) so a slow spell of a
shared CPU lands on all of them; ratios vs ``ort-fp32`` are also given per round. OpenVINO
models are compiled without the artifact cache (the compile time is measured) and, with
``--static`` (default), for the one measured shape. The SD1.5-scale measurement the issue asks
for (not run here: it needs ~2 x 3.4 GB of exports and tens of minutes)::

    ldm-export --model sd15-random -o sd15-onnx && ldm-export --model sd15-random --attention full -o sd15-onnx-full
    python benchmarks/openvino_speed.py --ort-fp32 sd15-onnx --ov-fp32 sd15-onnx-full --size 512 --batch 1 \\
        --iters 3 --rounds 3 --threads 0 -o benchmarks/results/openvino_speed_sd15_cpu

Writes ``<out>.json`` and ``<out>.md``.
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
VARIANTS = ("ort-fp32", "ort-int8", "ov-f32", "ov-default", "ov-nncf-int8")


def _inputs(batch: int, size: int, hidden: int, vae_scale: int, channels: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    lat = size // vae_scale
    return {"sample": rng.standard_normal((2 * batch, channels, lat, lat)).astype(np.float32),
            "timestep": np.array([501.0], dtype=np.float32),
            "encoder_hidden_states": rng.standard_normal((2 * batch, 77, hidden)).astype(np.float32),
            "latent": rng.standard_normal((batch, channels, lat, lat)).astype(np.float32)}


def worker(job: dict) -> dict:
    """One variant, once: load (timed), U-Net and VAE decoder calls (timed), first outputs saved."""
    from ldm_deploy.artifact import Artifact, peak_rss_bytes

    art = Artifact.open(job["artifact"])
    dims = art.manifest["model_dims"]
    x = _inputs(job["batch"], job["size"], art.spec("unet").inputs[2].shape[2], int(dims["vae_scale"]),
                int(dims["latent_channels"]))
    t0 = time.perf_counter()
    if job["backend"] == "ort":
        from ldm_deploy.runtime.sessions import make_session, run_session

        sessions = {c: make_session(art.model_file(c), "cpu", job["threads"]) for c in ("unet", "vae_decoder")}
        run = {c: (lambda s: lambda feeds: run_session(s, feeds)[0])(s) for c, s in sessions.items()}
    else:
        import openvino as ov

        from ldm_deploy.runtime.openvino import load_component

        core = ov.Core()
        static = (job["batch"], job["size"], job["size"]) if job["static"] else None
        comps = {c: load_component(core, art, c, job["precision_hint"], job["threads"], static, use_cache=False)
                 for c in ("unet", "vae_decoder")}
        run = {c: (lambda m: lambda feeds: m(**feeds))(m) for c, m in comps.items()}
    load_s = time.perf_counter() - t0
    feeds = {"unet": {k: x[k] for k in ("sample", "timestep", "encoder_hidden_states")},
             "vae_decoder": {"latent": x["latent"]}}
    out: dict = {"load_seconds": load_s}
    for c in ("unet", "vae_decoder"):
        first = run[c](feeds[c])
        np.save(Path(job["outputs"]) / f"{job['name']}-{c}.npy", np.asarray(first, dtype=np.float32))
        for _ in range(job["warmup"]):
            run[c](feeds[c])
        times = []
        for _ in range(job["iters"]):
            t = time.perf_counter()
            run[c](feeds[c])
            times.append(time.perf_counter() - t)
        out[c] = times
    out["peak_rss_bytes"] = peak_rss_bytes()
    return out


def _subprocess(job: dict) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p))
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True, text=True,
                          env=env)
    if proc.returncode:
        return {"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _quantize(src: str, out: Path, target: str, calib_size: int, calib_steps: int, threads: int) -> dict:
    """``ldm-quantize`` in a subprocess: its wall time, and the stage's own time and peak RSS."""
    args = [sys.executable, "-m", "ldm_deploy.quantize.cli", src, "-o", str(out), "--target", target, "--calib-size",
            str(calib_size), "--calib-steps", str(calib_steps), "--threads", str(threads), "-q"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p))
    t0 = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"ldm-quantize --target {target} failed: {proc.stderr.strip()[-500:]}")
    m = json.loads((out / "manifest.json").read_text())
    q = m["quantization"]
    return {"wall_seconds": round(time.perf_counter() - t0, 2), **m["stats"], "quality": q.get("quality", {})}


def _prebuilt(path: str) -> dict | None:
    """Build cost of an INT8 artifact made before this run, as its manifest recorded it."""
    m = json.loads((Path(path) / "manifest.json").read_text())
    if "quantization" not in m or "stats" not in m:  # not a stage's finished output: no cost recorded
        return None
    return {"prebuilt": True, **m.get("stats", {}), "quality": m["quantization"].get("quality", {})}


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        print(json.dumps(worker(json.loads(sys.argv[2]))))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ort-fp32", required=True, help="fp32 artifact (default export) for ONNX Runtime")
    ap.add_argument("--ov-fp32", required=True, help="fp32 artifact exported with --attention full")
    ap.add_argument("--ort-int8", help="INT8 artifact (ldm-quantize --target cpu); default: quantized here")
    ap.add_argument("--ort-int8-alt", nargs="+", default=[], metavar="NAME=PATH",
                    help="more cpu INT8 artifacts (other recipes) run as variants ort-int8-NAME")
    ap.add_argument("--ov-int8", help="NNCF INT8 artifact (ldm-quantize --target openvino); default: quantized here")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1, help="prompts (the U-Net gets 2x with CFG)")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--no-static", action="store_true", help="OpenVINO with dynamic shapes")
    ap.add_argument("--calib-size", type=int, default=32)
    ap.add_argument("--calib-steps", type=int, default=20)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("-o", "--output", default="benchmarks/results/openvino_speed")
    a = ap.parse_args()

    tmp = tempfile.TemporaryDirectory(prefix="ov-speed-")
    builds: dict[str, dict] = {}
    ort_int8, ov_int8 = a.ort_int8, a.ov_int8
    if ort_int8 is None and "ort-int8" in a.variants:
        ort_int8 = str(Path(tmp.name) / "ort-int8")
        builds["ort-int8"] = _quantize(a.ort_fp32, Path(ort_int8), "cpu", a.calib_size, a.calib_steps, a.threads)
    for name, path in (("ort-int8", ort_int8), ("ov-nncf-int8", ov_int8)):
        if path is not None and name in a.variants:
            builds[name] = _prebuilt(path)
    if ov_int8 is None and "ov-nncf-int8" in a.variants:
        ov_int8 = str(Path(tmp.name) / "ov-int8")
        builds["ov-nncf-int8"] = _quantize(a.ov_fp32, Path(ov_int8), "openvino", a.calib_size, a.calib_steps,
                                           a.threads)
    spec = {"ort-fp32": ("ort", a.ort_fp32, None), "ort-int8": ("ort", ort_int8, None),
            "ov-f32": ("ov", a.ov_fp32, "f32"), "ov-default": ("ov", a.ov_fp32, "default"),
            "ov-nncf-int8": ("ov", ov_int8, "default")}
    for alt in a.ort_int8_alt:
        name, _, path = alt.partition("=")
        spec[f"ort-int8-{name}"] = ("ort", path, None)
        builds[f"ort-int8-{name}"] = _prebuilt(path)
        last = max((i for i, v in enumerate(a.variants) if v.startswith("ort-int8")), default=len(a.variants) - 1)
        a.variants.insert(last + 1, f"ort-int8-{name}")
    runs: dict[str, list[dict]] = {v: [] for v in a.variants}
    for r in range(a.rounds):
        for v in a.variants:
            backend, art, hint = spec[v]
            res = _subprocess({"name": v, "backend": backend, "artifact": art, "precision_hint": hint,
                               "static": not a.no_static, "batch": a.batch, "size": a.size, "iters": a.iters,
                               "warmup": a.warmup, "threads": a.threads, "outputs": tmp.name})
            runs[v].append(res)
            step = f"{np.median(res['unet']):.4f} s/step" if "unet" in res else res["error"]
            print(f"round {r + 1}/{a.rounds} {v}: {step}", file=sys.stderr, flush=True)
    ok = [v for v in a.variants if all("error" not in x for x in runs[v])]
    rows = []
    base = "ort-fp32" if "ort-fp32" in ok else None
    for v in a.variants:
        row: dict = {"variant": v, "artifact": spec[v][1], "precision_hint": spec[v][2]}
        if v not in ok:
            row["error"] = next(x["error"] for x in runs[v] if "error" in x)
            rows.append(row)
            continue
        unet = [t for x in runs[v] for t in x["unet"]]
        vae = [t for x in runs[v] for t in x["vae_decoder"]]
        row.update(unet_s_per_step=float(np.median(unet)), vae_decode_s=float(np.median(vae)),
                   load_seconds=float(np.median([x["load_seconds"] for x in runs[v]])),
                   peak_rss_bytes=max(x["peak_rss_bytes"] for x in runs[v]), build=builds.get(v))
        if base:
            ref_u = np.load(Path(tmp.name) / f"{base}-unet.npy")
            ref_v = np.load(Path(tmp.name) / f"{base}-vae_decoder.npy")
            row["unet_cosine_vs_ort_fp32"] = _cosine(ref_u, np.load(Path(tmp.name) / f"{v}-unet.npy"))
            row["vae_cosine_vs_ort_fp32"] = _cosine(ref_v, np.load(Path(tmp.name) / f"{v}-vae_decoder.npy"))
            row["speedup_per_round"] = [float(np.median(b["unet"]) / np.median(x["unet"]))
                                        for b, x in zip(runs[base], runs[v])]
        rows.append(row)
    result = {"benchmark": "openvino_speed", "size": a.size, "batch": a.batch, "unet_batch": 2 * a.batch,
              "iters": a.iters, "warmup": a.warmup, "rounds": a.rounds, "threads": a.threads,
              "static": not a.no_static, "machine": {"cpu": platform.processor() or platform.machine(),
                                                     "cores": os.cpu_count()},
              "rows": rows, "runs": runs}
    outp = Path(a.output)
    outp.parent.mkdir(parents=True, exist_ok=True)
    outp.with_suffix(".json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    lines = [f"# ORT vs OpenVINO, U-Net at {a.size}x{a.size}, CFG batch {2 * a.batch} ({a.rounds} interleaved rounds "
             f"x {a.iters} calls, threads {a.threads or 'all'}, OpenVINO {'static' if not a.no_static else 'dynamic'})",
             "", "| variant | U-Net s/step | vs ORT fp32 (per round) | VAE decode s | load/compile s | peak RSS GiB | "
             "U-Net cos vs ORT fp32 | VAE cos | quantize s / peak RSS GiB |", "|---|---:|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | {r['error']} | | | | | | | |")
            continue
        b = r.get("build") or {}
        qcost = f"{b['quantize_seconds']} / {b['peak_rss_bytes'] / 2**30:.2f}" if b else ""
        per = ", ".join(f"{s:.2f}" for s in r.get("speedup_per_round", []))
        lines.append(f"| {r['variant']} | {r['unet_s_per_step']:.4f} | {per} | {r['vae_decode_s']:.4f} | "
                     f"{r['load_seconds']:.2f} | {r['peak_rss_bytes'] / 2**30:.2f} | "
                     f"{r.get('unet_cosine_vs_ort_fp32', float('nan')):.5f} | "
                     f"{r.get('vae_cosine_vs_ort_fp32', float('nan')):.5f} | {qcost} |")
    lines += ["", f"Reproduce: `python benchmarks/openvino_speed.py {' '.join(sys.argv[1:])}`"]
    outp.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    tmp.cleanup()


if __name__ == "__main__":
    main()
