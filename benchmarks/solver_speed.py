"""Seconds per image, not per step: schedulers x feature caching x precision, side by side in one
run of the torch-free runtime (one image, classifier-free guidance).

    python benchmarks/solver_speed.py --artifacts fp32=sd15-dc/ int8=sd15-dc-int8/ --size 512 \
        --configs ddim:25:1 dpm++2m:10:1 dpm++2m:10:3 [--rounds 1] [--graph-iters 3] \
        [-o benchmarks/results/solver_speed_sd15_cpu]

``--configs`` are SCHEDULER:STEPS:CACHE_INTERVAL. The artifacts must be exported with
``ldm-export --deepcache`` (interval 1 runs only their full graph, which is the plain U-Net with
one more output). First the full and the shallow U-Net graph are timed on their own
(``--graph-iters`` calls each, same CFG inputs), then every (artifact, config) pair generates one
image, in turn, ``--rounds`` times; the pipeline's own timings give the U-Net seconds per image.
Writes ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from ldm_deploy.artifact import peak_rss_bytes

PROMPT = "a photograph of an astronaut riding a horse"


def graph_times(pipe, size: int, iters: int) -> dict[str, list[float]]:  # type: ignore[no-untyped-def]
    """Seconds per call of the full and the shallow U-Net graph on the same CFG inputs."""
    spec = pipe.artifact.spec("unet")
    lat = size // pipe.vae_scale
    rng = np.random.default_rng(0)
    x = {"sample": rng.standard_normal((2, pipe.latent_channels, lat, lat)).astype(np.float32),
         "timestep": np.array([501.0], dtype=np.float32),
         "encoder_hidden_states": rng.standard_normal((2,) + tuple(spec.inputs[2].shape[1:])).astype(np.float32)}
    full = pipe.components["unet"].device_binding()
    shallow = pipe.components["unet_shallow"].device_binding()
    _, feature = full.run_all(**x)  # warm-up, and the feature the shallow graph gets
    shallow.run(**x, cache_feature=feature)
    out: dict[str, list[float]] = {"full": [], "shallow": []}
    for _ in range(iters):
        for name, call in (("full", lambda: full.run_all(**x)), ("shallow", lambda: shallow.run(**x, cache_feature=feature))):
            t0 = time.perf_counter()
            call()
            out[name].append(time.perf_counter() - t0)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", nargs="+", required=True, metavar="LABEL=DIR")
    p.add_argument("--configs", nargs="+", default=["ddim:25:1", "dpm++2m:10:1", "dpm++2m:10:3"])
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--graph-iters", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("-o", "--out", type=Path, default=Path("benchmarks/results/solver_speed_sd15_cpu"))
    args = p.parse_args()

    from ldm_deploy.runtime import Pipeline

    arts = dict(a.split("=", 1) for a in args.artifacts)
    configs = [(s, int(n), int(k)) for s, n, k in (c.split(":") for c in args.configs)]
    pipes = {label: Pipeline.load(path, threads=args.threads,
                                  components=("text_encoder", "unet", "unet_shallow", "vae_decoder"))
             for label, path in arts.items()}
    graphs = {}
    for label, pipe in pipes.items():
        g = graph_times(pipe, args.size, args.graph_iters)
        graphs[label] = {k: {"median_s": statistics.median(v), "all_s": v} for k, v in g.items()}
        graphs[label]["shallow_share"] = graphs[label]["shallow"]["median_s"] / graphs[label]["full"]["median_s"]
        print(f"{label}: full {graphs[label]['full']['median_s']:.2f} s, shallow "
              f"{graphs[label]['shallow']['median_s']:.2f} s ({100 * graphs[label]['shallow_share']:.1f}%)", flush=True)
    runs: dict[str, list[dict]] = {}
    for r in range(args.rounds):
        for label, pipe in pipes.items():
            for sched, steps, k in configs:
                key = f"{label} {sched} {steps}" + (f" + DeepCache {k}" if k > 1 else "")
                out = pipe(PROMPT, num_inference_steps=steps, guidance_scale=args.guidance, height=args.size,
                           width=args.size, seed=0, scheduler=sched, cache_interval=k, output_type="np")
                t = out.timings
                runs.setdefault(key, []).append({"unet_s": t["unet"], "total_s": sum(t.values()), "timings": t,
                                                 "label": label, "scheduler": sched, "steps": steps,
                                                 "cache_interval": k})
                print(f"round {r + 1} {key}: U-Net {t['unet']:.1f} s, total {sum(t.values()):.1f} s", flush=True)
    rows = []
    for key, rs in runs.items():
        unet_s = statistics.median(x["unet_s"] for x in rs)
        total_s = statistics.median(x["total_s"] for x in rs)
        rows.append({"variant": key, **{k: rs[0][k] for k in ("label", "scheduler", "steps", "cache_interval")},
                     "unet_s_per_image": unet_s, "total_s_per_image": total_s,
                     "unet_s_per_step": unet_s / rs[0]["steps"], "rounds": rs})
    base = rows[0]
    for row in rows:
        row["unet_speedup_vs_first"] = base["unet_s_per_image"] / row["unet_s_per_image"]
        row["total_speedup_vs_first"] = base["total_s_per_image"] / row["total_s_per_image"]
    result = {"settings": vars(args) | {"out": str(args.out)}, "machine": {"cpu": platform.processor() or platform.machine()},
              "graphs": graphs, "rows": rows, "peak_rss_bytes": peak_rss_bytes()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    md = [f"# Seconds per image: schedulers, DeepCache and INT8 ({args.size}x{args.size}, CFG {args.guidance}, "
          f"{args.rounds} round(s), {args.threads or 'all'} threads)", "",
          "U-Net graphs on their own (median of "
          f"{args.graph_iters} calls, CFG batch 2):", "",
          "| artifact | full U-Net (s/call) | shallow U-Net (s/call) | shallow / full |", "|---|---|---|---|"]
    for label, g in graphs.items():
        md.append(f"| {label} | {g['full']['median_s']:.2f} | {g['shallow']['median_s']:.2f} | "
                  f"{100 * g['shallow_share']:.1f}% |")
    md += ["", f"One image each (speed-ups against `{base['variant']}`):", "",
           "| variant | U-Net calls (full + shallow) | U-Net s/image | U-Net speed-up | mean U-Net s/step | "
           "total s/image | total speed-up |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        n, k = row["steps"], row["cache_interval"]
        full = -(-n // k)
        md.append(f"| {row['variant']} | {full} + {n - full} | {row['unet_s_per_image']:.1f} | "
                  f"{row['unet_speedup_vs_first']:.2f}x | {row['unet_s_per_step']:.2f} | {row['total_s_per_image']:.1f} | "
                  f"{row['total_speedup_vs_first']:.2f}x |")
    md += ["", f"Peak RSS {peak_rss_bytes() / 2**30:.2f} GiB (all artifacts loaded in one process).", "",
           "Reproduce: `python benchmarks/solver_speed.py --artifacts " + " ".join(args.artifacts) + " --configs "
           + " ".join(args.configs) + f" --size {args.size} --rounds {args.rounds} --graph-iters {args.graph_iters}`"]
    args.out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
