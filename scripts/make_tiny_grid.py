#!/usr/bin/env python
"""Draw a labelled grid of images from the tiny shapes model (``ldm_deploy/assets/tiny``).

Prompts come from :func:`ldm_deploy.data.shapes.eval_prompts`, half with held-out
(shape, colour) combinations (marked "[held-out]"), half with seen ones. Each cell
shows the generated image scaled up, with its prompt written under it.

    python scripts/make_tiny_grid.py                       # -> benchmarks/results/tiny_grid.png
    python scripts/make_tiny_grid.py --model /tmp/tiny_quick --out /tmp/grid.png
"""

from __future__ import annotations

import argparse
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ldm_deploy.data import shapes  # noqa: E402


def pick_prompts(n: int, seed: int) -> list[shapes.Attributes]:
    pool = shapes.eval_prompts(200, seed=seed)
    held = [a for a in pool if a.heldout][: n // 2]
    seen = [a for a in pool if not a.heldout][: n - len(held)]
    out = []
    for i in range(max(len(held), len(seen))):  # interleave seen / held-out
        out += seen[i:i + 1] + held[i:i + 1]
    return out[:n]


def label_cell(img: np.ndarray, text: str, cell: int, font, lines: int = 4) -> Image.Image:
    pic = Image.fromarray(img).resize((cell, cell), Image.NEAREST)
    line_h = 12
    canvas = Image.new("RGB", (cell, cell + lines * line_h + 4), (255, 255, 255))
    canvas.paste(pic, (0, 0))
    draw = ImageDraw.Draw(canvas)
    wrapped = textwrap.wrap(text, width=max(8, cell // 6))[:lines]
    for i, line in enumerate(wrapped):
        draw.text((2, cell + 2 + i * line_h), line, fill=(0, 0, 0), font=font)
    return canvas


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / "ldm_deploy" / "assets" / "tiny")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "tiny_grid.png")
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--cols", type=int, default=4)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--seed", type=int, default=0, help="generation seed")
    ap.add_argument("--prompt-seed", type=int, default=1234, help="seed of eval_prompts")
    ap.add_argument("--cell", type=int, default=160, help="cell size in pixels")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    from diffusers import DDIMScheduler, StableDiffusionPipeline

    torch.set_num_threads(args.threads)
    pipe = StableDiffusionPipeline.from_pretrained(str(args.model), dtype=torch.float32)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)

    attrs = pick_prompts(args.rows * args.cols, args.prompt_seed)
    prompts = [shapes.caption(a) for a in attrs]
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    images = pipe(prompts, num_inference_steps=args.steps, guidance_scale=args.guidance,
                  generator=gen, output_type="np").images
    dt = time.time() - t0
    images = (np.clip(images, 0, 1) * 255).round().astype(np.uint8)

    font = ImageFont.load_default()
    cells = [label_cell(img, p + (" [held-out]" if a.heldout else ""), args.cell, font)
             for img, p, a in zip(images, prompts, attrs)]
    cw, ch = cells[0].size
    pad = 4
    grid = Image.new("RGB", (args.cols * (cw + pad) + pad, args.rows * (ch + pad) + pad), (200, 200, 200))
    for i, c in enumerate(cells):
        r, k = divmod(i, args.cols)
        grid.paste(c, (pad + k * (cw + pad), pad + r * (ch + pad)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(args.out)
    print(f"{len(prompts)} images ({images.shape[1]}x{images.shape[2]}), {args.steps} DDIM steps, "
          f"guidance {args.guidance}, in {dt:.1f}s -> {args.out}")
    for a, p in zip(attrs, prompts):
        print(("  [held-out] " if a.heldout else "  [seen]     ") + p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
