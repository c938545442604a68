"""Quality per U-Net evaluation on the embedded `tiny`: every scheduler at several step counts,
and feature caching (DeepCache) at several intervals, on one exported artifact.

    python benchmarks/solver_quality.py [--n 200] [--guidance 5] [--steps 5 8 10 15 25] \
        [--schedulers ddim dpm++2m dpm++2m-karras euler euler-a] [--cache-intervals 2 3 5] \
        [--cache-runs ddim:25 dpm++2m:10] [--shallow-cost 0.224] [-o benchmarks/results/solver_quality_tiny]

Prompt i starts from the latents of numpy seed i in every configuration; prompts run 4 per call
(euler-a draws the step noise of call k from seed k). Adherence and domain FID come from the quality harness
(``ldm_deploy.quality.evaluate``); PSNR is against DDIM at the largest step count. The x axis of
the plot is the U-Net cost per image in full evaluations: a DeepCache run counts each shallow call
as ``--shallow-cost`` of a full one (default: the shallow graph's share of the SD1.5 U-Net's
multiply-accumulates at 512x512, depth 1, counted with torch's FLOP counter). Writes ``<out>.json``,
``<out>.md`` and ``<out>.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np


def generate(pipe, prompts: list[str], latents: np.ndarray, steps: int, guidance: float, scheduler: str,
             cache_interval: int, batch: int = 4) -> np.ndarray:  # type: ignore[no-untyped-def]
    """uint8 images, ``batch`` prompts per call (chunk k draws euler-a's step noise from seed k)."""
    out = []
    for k, s in enumerate(range(0, len(prompts), batch)):
        img = pipe(prompts[s:s + batch], num_inference_steps=steps, guidance_scale=guidance,
                   latents=latents[s:s + batch], seed=k, scheduler=scheduler, cache_interval=cache_interval,
                   output_type="np").images
        out.append((img * 255).round().astype(np.uint8))
    return np.concatenate(out)


def full_evals(steps: int, interval: int) -> int:
    """Full U-Net calls of a run: every ``interval``-th step, starting with the first."""
    return math.ceil(steps / interval)


def plot(rows: list[dict], path: Path, shallow_cost: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for sched in dict.fromkeys(r["scheduler"] for r in rows if r["cache_interval"] == 1):
        pts = sorted((r["unet_cost"], r["adherence"]) for r in rows if r["scheduler"] == sched and r["cache_interval"] == 1)
        ax.plot(*zip(*pts), marker="o", label=sched)
    cached = [r for r in rows if r["cache_interval"] > 1]
    for r in cached:
        ax.scatter(r["unet_cost"], r["adherence"], marker="*", s=120, color="black", zorder=5)
        ax.annotate(f"{r['scheduler']} {r['steps']} + DeepCache {r['cache_interval']}", (r["unet_cost"], r["adherence"]),
                    textcoords="offset points", xytext=(6, -10), fontsize=7)
    ax.set_xscale("log")
    ax.set_xticks([2, 3, 5, 8, 10, 15, 25])
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.get_xaxis().set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel(f"U-Net cost per image (full evaluations; a shallow DeepCache call = {shallow_cost:.3f})")
    ax.set_ylabel("prompt adherence (200 prompts)")
    ax.set_title("tiny: adherence vs U-Net evaluations per image")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--steps", type=int, nargs="+", default=[5, 8, 10, 15, 25])
    p.add_argument("--schedulers", nargs="+", default=["ddim", "dpm++2m", "dpm++2m-karras", "euler", "euler-a"])
    p.add_argument("--cache-intervals", type=int, nargs="+", default=[2, 3, 5])
    p.add_argument("--cache-runs", nargs="+", default=["ddim:25", "dpm++2m:10"],
                   help="SCHEDULER:STEPS runs repeated with each cache interval")
    p.add_argument("--shallow-cost", type=float, default=0.224)
    p.add_argument("--artifact", type=Path, help="a tiny artifact exported with --deepcache (default: export one)")
    p.add_argument("-o", "--out", type=Path, default=Path("benchmarks/results/solver_quality_tiny"))
    args = p.parse_args()

    from ldm_deploy.data.shapes import caption, eval_prompts
    from ldm_deploy.export.exporter import ExportOptions, export_model
    from ldm_deploy.quality import evaluate
    from ldm_deploy.runtime import Pipeline

    attrs = eval_prompts(args.n)
    prompts = [caption(a) for a in attrs]
    latents = np.stack([np.random.default_rng(i).standard_normal((4, 8, 8)).astype(np.float32) for i in range(args.n)])
    configs = [(s, n, 1) for s in args.schedulers for n in args.steps]
    for run in args.cache_runs:
        sched, steps = run.split(":")
        configs += [(sched, int(steps), k) for k in args.cache_intervals]
    with tempfile.TemporaryDirectory() as tmp:
        art = args.artifact
        if art is None:
            art = Path(tmp) / "tiny-dc"
            export_model("tiny", art, ExportOptions(deepcache=1), log=lambda s: None)
        pipe = Pipeline.load(art, components=("text_encoder", "unet", "unet_shallow", "vae_decoder"))
        images: dict[tuple, np.ndarray] = {}
        seconds: dict[tuple, float] = {}
        for cfg in configs:
            t0 = time.perf_counter()
            images[cfg] = generate(pipe, prompts, latents, cfg[1], args.guidance, cfg[0], cfg[2])
            seconds[cfg] = time.perf_counter() - t0
            print(f"{cfg}: {seconds[cfg]:.1f} s", flush=True)
    ref_cfg = ("ddim", max(args.steps), 1)
    rows = []
    for cfg, imgs in images.items():
        sched, steps, k = cfg
        r = evaluate(imgs, attrs, reference_images=images.get(ref_cfg) if cfg != ref_cfg else None, inception=False)
        full = full_evals(steps, k)
        rows.append({"scheduler": sched, "steps": steps, "cache_interval": k, "full_evals": full,
                     "shallow_evals": steps - full, "unet_cost": full + (steps - full) * args.shallow_cost,
                     "adherence": r["adherence"], "adherence_seen": r["adherence_seen"],
                     "adherence_heldout": r["adherence_heldout"], "per_attribute": r["per_attribute"],
                     "domain_fid": r["domain_fid"], "psnr_vs_ddim_ref": r.get("psnr"), "seconds": seconds[cfg]})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = vars(args) | {"out": str(args.out), "artifact": str(args.artifact) if args.artifact else None}
    args.out.with_suffix(".json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=2,
                                                        default=float) + "\n")
    plot(rows, args.out.with_suffix(".png"), args.shallow_cost)
    base = next(r for r in rows if (r["scheduler"], r["steps"], r["cache_interval"]) == ref_cfg)
    fmt = lambda v, f: "–" if v is None or (isinstance(v, float) and math.isinf(v)) else format(v, f)  # noqa: E731
    md = [f"# Schedulers and DeepCache on `tiny` ({args.n} prompts, guidance {args.guidance}, 64x64)", "",
          f"Adherence of DDIM {ref_cfg[1]} (the reference): {base['adherence']:.3f}. U-Net cost counts a shallow "
          f"DeepCache call as {args.shallow_cost} of a full one. PSNR is against DDIM {ref_cfg[1]}.", "",
          "| scheduler | steps | cache interval | full / shallow U-Net calls | U-Net cost | adherence | Δ vs DDIM "
          f"{ref_cfg[1]} (points) | seen / held-out | domain FID | PSNR vs ref (dB) | time (s) |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        delta = 100 * (r["adherence"] - base["adherence"])
        md.append(f"| {r['scheduler']} | {r['steps']} | {r['cache_interval'] if r['cache_interval'] > 1 else '–'} | "
                  f"{r['full_evals']} / {r['shallow_evals']} | {r['unet_cost']:.2f} | {r['adherence']:.3f} | "
                  f"{delta:+.1f} | {fmt(r['adherence_seen'], '.3f')} / {fmt(r['adherence_heldout'], '.3f')} | "
                  f"{fmt(r['domain_fid'], '.1f')} | {fmt(r['psnr_vs_ddim_ref'], '.1f')} | {r['seconds']:.0f} |")
    cmd = ("python benchmarks/solver_quality.py --n {n} --guidance {guidance} --steps {steps} --schedulers {sch} "
           "--cache-intervals {ci} --cache-runs {cr}").format(
        n=args.n, guidance=args.guidance, steps=" ".join(map(str, args.steps)), sch=" ".join(args.schedulers),
        ci=" ".join(map(str, args.cache_intervals)), cr=" ".join(args.cache_runs))
    md += ["", f"![adherence vs U-Net evaluations]({args.out.with_suffix('.png').name})", "", f"Reproduce: `{cmd}`"]
    args.out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
