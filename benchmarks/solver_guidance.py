"""Few-step solvers against guidance strength on the embedded `tiny`: is a solver's quality loss a property of the
solver or of the guided model?

    python benchmarks/solver_guidance.py [--n 200] [--guidance 2 3 4 5 7.5] \
        [--runs ddim:25 ddim:10 dpm++2m:10 dpm++2m-karras:10 euler:10] [-o benchmarks/results/solver_guidance_tiny]

Every run (SCHEDULER:STEPS) is generated at every guidance scale from the same latents as
``solver_quality.py`` (prompt i starts from numpy seed i). Adherence and domain FID come from the quality harness;
the delta column is against the first run at the same guidance. Writes ``<out>.json``, ``<out>.md`` and
``<out>.png`` (adherence vs guidance, one line per run).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from solver_quality import generate  # noqa: E402


def plot(rows: list[dict], runs: list[str], path: Path, n: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        pts = sorted((r["guidance"], r["adherence"]) for r in rows if r["run"] == run)
        ax.plot(*zip(*pts), marker="o", label=run.replace(":", " "))
    ax.set_xlabel("classifier-free guidance scale")
    ax.set_ylabel(f"prompt adherence ({n} prompts)")
    ax.set_title("tiny: solver quality vs guidance")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--guidance", type=float, nargs="+", default=[2.0, 3.0, 4.0, 5.0, 7.5])
    p.add_argument("--runs", nargs="+", default=["ddim:25", "ddim:10", "dpm++2m:10", "dpm++2m-karras:10", "euler:10"],
                   help="SCHEDULER:STEPS; the first is the reference of the delta column")
    p.add_argument("--artifact", type=Path, help="a tiny fp32 artifact (default: export one)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("-o", "--out", type=Path, default=Path("benchmarks/results/solver_guidance_tiny"))
    args = p.parse_args()

    from ldm_deploy.data.shapes import caption, eval_prompts
    from ldm_deploy.export.exporter import ExportOptions, export_model
    from ldm_deploy.quality import evaluate
    from ldm_deploy.runtime import Pipeline

    attrs = eval_prompts(args.n)
    prompts = [caption(a) for a in attrs]
    latents = np.stack([np.random.default_rng(i).standard_normal((4, 8, 8)).astype(np.float32) for i in range(args.n)])
    runs = [(r.split(":")[0], int(r.split(":")[1])) for r in args.runs]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        art = args.artifact
        if art is None:
            art = Path(tmp) / "tiny"
            export_model("tiny", art, ExportOptions(), log=lambda s: None)
        pipe = Pipeline.load(art, components=("text_encoder", "unet", "vae_decoder"), threads=args.threads)
        for g in args.guidance:
            ref = None
            for sched, steps in runs:
                t0 = time.perf_counter()
                imgs = generate(pipe, prompts, latents, steps, g, sched, 1)
                r = evaluate(imgs, attrs, inception=False)
                ref = r["adherence"] if ref is None else ref
                rows.append({"run": f"{sched}:{steps}", "scheduler": sched, "steps": steps, "guidance": g,
                             "adherence": r["adherence"], "delta_points": 100 * (r["adherence"] - ref),
                             "domain_fid": r["domain_fid"], "seconds": time.perf_counter() - t0})
                print(f"guidance {g} {sched} {steps}: adherence {r['adherence']:.3f}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = vars(args) | {"out": str(args.out), "artifact": str(args.artifact) if args.artifact else None}
    args.out.with_suffix(".json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=2,
                                                        default=float) + "\n")
    plot(rows, args.runs, args.out.with_suffix(".png"), args.n)
    head = " | ".join(r.replace(":", " ") for r in args.runs)
    md = [f"# Solvers vs guidance on `tiny` ({args.n} prompts, 64x64)", "",
          f"Adherence (domain FID); points vs {runs[0][0]} {runs[0][1]} at the same guidance in brackets.", "",
          f"| guidance | {head} |", "|---|" + "---|" * len(runs)]
    for g in args.guidance:
        cells = []
        for run in args.runs:
            r = next(x for x in rows if x["run"] == run and x["guidance"] == g)
            cells.append(f"{r['adherence']:.3f} ({r['domain_fid']:.0f}) [{r['delta_points']:+.1f}]")
        md.append(f"| {g:g} | " + " | ".join(cells) + " |")
    md += ["", f"![adherence vs guidance]({args.out.with_suffix('.png').name})", "",
           f"Reproduce: `python benchmarks/solver_guidance.py --n {args.n} --guidance "
           f"{' '.join(f'{g:g}' for g in args.guidance)} --runs {' '.join(args.runs)}`"]
    args.out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
