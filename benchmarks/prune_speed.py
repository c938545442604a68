"""Pruned vs unpruned U-Net: params, GMACs and seconds per CFG U-Net step of the exported fp32
ONNX graph on ONNX Runtime CPU, side by side in one run.

    python benchmarks/prune_speed.py --model sd15-random --size 512 -o benchmarks/results/prune_sd15

Variants: the unpruned model, ``ldm-prune --method channels --ratio R`` (default 0.3, l1
importance) and ``ldm-prune --method blocks`` (BK-SDM-Small recipe); no distillation (speed does
not depend on it). Each U-Net is exported with ``ldm-export``'s API (fp32, U-Net only, parity
check against PyTorch at SIZE) and timed through the runtime's session factory on the same
random CFG inputs (batch 2 x latent SIZE/8). Every stage runs in its own subprocess, one after
the other (peak RSS is per stage). Writes ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ldm_deploy.artifact import peak_rss_bytes
from ldm_deploy.bench.measure import session_step_times

ROOT = Path(__file__).resolve().parents[1]




def worker_export(source: str, out: str, size: int) -> dict:
    from ldm_deploy.export.exporter import ExportOptions, export_model

    t0 = time.perf_counter()
    m = export_model(source, Path(out), ExportOptions(height=size, width=size, components=("unet",)), log=lambda s: None)
    v = m["validation"]["unet"]
    return {"seconds": time.perf_counter() - t0, "validation": {k: v.get(k) for k in ("status", "cosine", "max_abs", "max_rel")},
            "peak_rss_bytes": peak_rss_bytes()}


def worker_time(artifact: str, size: int, iters: int, warmup: int, threads: int) -> dict:
    import numpy as np

    from ldm_deploy.artifact import Artifact
    from ldm_deploy.runtime.sessions import make_session

    art = Artifact.open(artifact)
    t0 = time.perf_counter()
    sess = make_session(art.model_file("unet"), "cpu", threads)
    load_s = time.perf_counter() - t0
    dims = art.manifest["model_dims"]
    rng = np.random.default_rng(0)
    lat = size // int(dims["vae_scale"])
    feeds = {
        "sample": rng.standard_normal((2, int(dims["latent_channels"]), lat, lat)).astype(np.float32),
        "timestep": np.array([501.0], dtype=np.float32),
        "encoder_hidden_states": rng.standard_normal((2, int(dims["seq_len"]), int(dims["text_hidden"]))).astype(np.float32),
    }
    times = session_step_times(sess, feeds, iters, warmup)
    return {"load_s": load_s, "step_s": times, "peak_rss_bytes": peak_rss_bytes()}


def _run(cmd: list[str], log: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, check=False)
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n{p.stdout}{p.stderr}\n")
    if p.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{(p.stderr.strip().splitlines() or ['?'])[-1]} (log: {log})")
    return p


def _worker(args: list[str], log: Path) -> dict:
    p = _run([sys.executable, __file__, "--_worker", json.dumps(args)], log)
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="sd15-random")
    ap.add_argument("--size", type=int, help="image side (default: the model's native size)")
    ap.add_argument("--ratio", type=float, default=0.3, help="channel ratio (default 0.3)")
    ap.add_argument("--iters", type=int, default=3, help="timed U-Net runs per variant and round")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=1, help="timing rounds (variants interleaved)")
    ap.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0: all cores)")
    ap.add_argument("--workdir", type=Path, help="keep the pruned pipelines and ONNX artifacts here (default: temp)")
    ap.add_argument("-o", "--output", type=Path, default=Path("benchmarks/results/prune_sd15"))
    ap.add_argument("--_worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._worker:
        kind, *rest = json.loads(a._worker)
        res = worker_export(*rest) if kind == "export" else worker_time(*rest)
        print(json.dumps(res))
        return

    from ldm_deploy.models import ALIASES, EMBEDDED, random_model_names

    if a.size is None:
        a.size = 512 if a.model in ("sd15-random", *ALIASES) else 64 if a.model in (*EMBEDDED, *random_model_names()) else 512
    tmp = None if a.workdir else tempfile.TemporaryDirectory(prefix="prune-speed-")
    work = a.workdir or Path(tmp.name)  # type: ignore[union-attr]
    work.mkdir(parents=True, exist_ok=True)
    log = work / "prune_speed.log"
    t_start = time.perf_counter()
    variants: dict[str, dict] = {"unpruned": {"source": a.model}}
    prune_cli = [sys.executable, "-m", "ldm_deploy.prune.cli", "--model", a.model, "--count-size", str(a.size), "-q",
                 "--overwrite"]
    for name, extra in ((f"channels {a.ratio}", ["--method", "channels", "--ratio", str(a.ratio)]),
                        ("blocks (BK-SDM-Small)", ["--method", "blocks"])):
        out = work / name.split()[0]
        print(f"[{time.perf_counter() - t_start:6.0f}s] ldm-prune {name}", flush=True)
        t0 = time.perf_counter()
        _run([*prune_cli, *extra, "-o", str(out)], log)
        m = json.loads((out / "manifest.json").read_text())
        variants[name] = {"source": str(out), "prune_seconds": time.perf_counter() - t0, "manifest": m}
    first = next(v["manifest"] for v in variants.values() if "manifest" in v)["prune"]
    variants["unpruned"]["counts"] = first["before"]
    for v in variants.values():
        if "manifest" in v:
            v["counts"] = v["manifest"]["prune"]["after"]
            v["prune_peak_rss_bytes"] = v["manifest"]["stats"]["peak_rss_bytes"]
    for name, v in variants.items():
        art = work / (name.split()[0] + "-onnx")
        print(f"[{time.perf_counter() - t_start:6.0f}s] export {name}", flush=True)
        if art.exists():
            import shutil

            shutil.rmtree(art)
        v["export"] = _worker(["export", v["source"], str(art), a.size], log)
        v["artifact"] = str(art)
        v["step_s"] = []
    for r in range(a.rounds):
        for name, v in variants.items():
            print(f"[{time.perf_counter() - t_start:6.0f}s] time {name} (round {r + 1})", flush=True)
            res = _worker(["time", v["artifact"], a.size, a.iters, a.warmup, a.threads], log)
            v["step_s"] += res["step_s"]
            v["time_peak_rss_bytes"] = max(v.get("time_peak_rss_bytes", 0), res["peak_rss_bytes"])
    base = statistics.median(variants["unpruned"]["step_s"])
    rows = []
    for name, v in variants.items():
        med = statistics.median(v["step_s"])
        c = v["counts"]
        rows.append({
            "variant": name, "params": c["params"], "gmacs_per_eval": c["macs"] / 1e9, "gmacs_per_cfg_step": 2 * c["macs"] / 1e9,
            "s_per_cfg_step": med, "step_s": v["step_s"], "speedup": base / med,
            "export": v["export"], "prune_seconds": v.get("prune_seconds"), "prune_peak_rss_bytes": v.get("prune_peak_rss_bytes"),
            "time_peak_rss_bytes": v["time_peak_rss_bytes"],
            "prune": None if "manifest" not in v else {k: v["manifest"]["prune"].get(k) for k in
                                                       ("method", "ratio", "importance", "channels", "blocks", "reduction")},
        })
    result = {
        "settings": {k: (str(val) if isinstance(val, Path) else val) for k, val in vars(a).items() if k != "_worker"},
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
        "total_seconds": time.perf_counter() - t_start,
        "variants": rows,
    }
    a.output.parent.mkdir(parents=True, exist_ok=True)
    a.output.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    md = [
        f"# Pruned U-Nets of `{a.model}`: params, GMACs and ORT CPU fp32 step time ({a.size}x{a.size})",
        "",
        (f"One run of `python benchmarks/prune_speed.py --model {a.model} --size {a.size} --ratio {a.ratio} --iters {a.iters} "
        f"--rounds {a.rounds}` ({result['total_seconds']:.0f} s; {os.cpu_count()} CPUs). Step = one CFG U-Net call "
        f"(batch 2, latent {a.size // 8}x{a.size // 8}), median of {a.iters * a.rounds} runs after {a.warmup} warm-up. "
        "No distillation (it does not change the speed)."),
        "",
        "| variant | U-Net params (M) | GMACs / eval | GMACs / CFG step | s / CFG step | speedup | export parity (cosine) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        val = r["export"]["validation"]
        md.append(f"| {r['variant']} | {r['params'] / 1e6:.4g} | {r['gmacs_per_eval']:.4g} | {r['gmacs_per_cfg_step']:.4g} | "
                  f"{r['s_per_cfg_step']:.3f} | {r['speedup']:.2f}x | {val['status']} ({val['cosine']:.7f}) |")
    ch = next((r for r in rows if r["prune"] and r["prune"]["method"] == "channels"), None)
    if ch:
        md += ["", (f"Channels: ratio {a.ratio} requested, {ch['prune']['channels']['ratio_effective']} effective "
               "(whole heads and GroupNorm groups; every layer keeps the same share).")]
    bl = next((r for r in rows if r["prune"] and r["prune"]["method"] == "blocks"), None)
    if bl:
        md += [f"Blocks removed: {', '.join(bl['prune']['blocks']['removed'])}."]
    md += ["", "Peak RSS per stage (GiB): " + "; ".join(
        (f"{r['variant']}: " + (f"prune {r['prune_peak_rss_bytes'] / 2**30:.2f}, " if r["prune_peak_rss_bytes"] else "")
         + f"export {r['export']['peak_rss_bytes'] / 2**30:.2f}, timing {r['time_peak_rss_bytes'] / 2**30:.2f}") for r in rows)]
    a.output.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
