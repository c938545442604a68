"""Cross-check on `tiny` with diffusers' own torch schedulers: do other few-step high-order solvers behave like
our DPM-Solver++ 2M port at 10 steps?

    python benchmarks/solver_diffusers_check.py [--n 200] [--guidance 5] [-o benchmarks/results/solver_diffusers_tiny]

Runs the embedded model's diffusers pipeline (torch, CPU) from the same latents as ``solver_quality.py``
(prompt i from numpy seed i) with each scheduler class built from the model's scheduler config plus the
listed overrides, and scores adherence with the quality harness. Writes ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

# (diffusers scheduler class, steps, config overrides)
RUNS: list[tuple[str, int, dict]] = [
    ("DDIMScheduler", 25, {}),
    ("DDIMScheduler", 10, {}),
    ("DPMSolverMultistepScheduler", 10, {}),
    ("DPMSolverMultistepScheduler", 10, {"solver_order": 1}),
    ("DPMSolverMultistepScheduler", 10, {"use_karras_sigmas": True}),
    ("DPMSolverMultistepScheduler", 10, {"solver_type": "heun"}),
    ("DPMSolverMultistepScheduler", 10, {"algorithm_type": "sde-dpmsolver++"}),
    ("DPMSolverMultistepScheduler", 10, {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}),
    ("DPMSolverSinglestepScheduler", 10, {}),
    ("UniPCMultistepScheduler", 10, {}),
    ("DEISMultistepScheduler", 10, {}),
    ("EulerDiscreteScheduler", 10, {}),
    ("HeunDiscreteScheduler", 5, {}),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("-o", "--out", type=Path, default=Path("benchmarks/results/solver_diffusers_tiny"))
    args = p.parse_args()

    import diffusers
    import torch

    from ldm_deploy.data.shapes import caption, eval_prompts
    from ldm_deploy.models import load_model
    from ldm_deploy.quality import evaluate

    torch.set_num_threads(args.threads)
    attrs = eval_prompts(args.n)
    prompts = [caption(a) for a in attrs]
    latents = np.stack([np.random.default_rng(i).standard_normal((4, 8, 8)).astype(np.float32) for i in range(args.n)])
    pipe = load_model("tiny").diffusers_pipeline()
    pipe.set_progress_bar_config(disable=True)
    config = dict(pipe.scheduler.config)
    rows = []
    for cls, steps, overrides in RUNS:
        pipe.scheduler = getattr(diffusers, cls).from_config(config, **overrides)
        t0 = time.perf_counter()
        images = []
        with torch.no_grad():
            for s in range(0, args.n, 8):
                out = pipe(prompts[s:s + 8], num_inference_steps=steps, guidance_scale=args.guidance,
                           latents=torch.from_numpy(latents[s:s + 8]), height=64, width=64, output_type="np",
                           generator=torch.Generator().manual_seed(s)).images
                images.append((out * 255).round().astype(np.uint8))
        r = evaluate(np.concatenate(images), attrs, inception=False)
        rows.append({"scheduler": cls, "steps": steps, "overrides": overrides, "order": pipe.scheduler.order,
                     "adherence": r["adherence"], "domain_fid": r["domain_fid"],
                     "seconds": time.perf_counter() - t0})
        print(f"{cls} {steps} {overrides}: adherence {r['adherence']:.3f}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"settings": vars(args) | {"out": str(args.out)},
                                                         "diffusers": diffusers.__version__, "rows": rows},
                                                        indent=2, default=float) + "\n")
    md = [f"# diffusers' schedulers on `tiny` ({args.n} prompts, guidance {args.guidance:g}, 64x64, "
          f"diffusers {diffusers.__version__})", "",
          "| scheduler | steps | config overrides | adherence | domain FID |", "|---|---:|---|---:|---:|"]
    for r in rows:
        ov = ", ".join(f"{k}={v}" for k, v in r["overrides"].items()) or "–"
        md.append(f"| {r['scheduler']} | {r['steps']} | {ov} | {r['adherence']:.3f} | {r['domain_fid']:.1f} |")
    md += ["", f"Reproduce: `python benchmarks/solver_diffusers_check.py --n {args.n} --guidance {args.guidance:g}`"]
    args.out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
