"""``ldm-prune``: structured pruning of an SD-class U-Net -> a diffusers pipeline directory."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import cli_entry

EPILOG = """\
methods:
  channels  Torch-Pruning DepGraph channel pruning: every coupled group (residual adds, skip
            concatenations, GroupNorm groups, attention heads) loses the same share, in whole
            GroupNorm groups / whole heads, so the result is a plain diffusers config; --ratio is
            the share of channels (default 0.3; rounded to whole heads, e.g. 1/8 steps for SD1.5)
  blocks    BK-SDM-style removal of whole blocks: by default one resnet+attention pair per stage
            and the mid block (BK-SDM-Small); with --ratio R, blocks (pairs, mid, per-stage
            attentions) ranked by output sensitivity until R of the MACs are removed
keep patterns: a module name ('mid_block', 'down_blocks.1'), a glob ('*.attentions.*') or
  're:<regex>'; a pattern matching no module is an error. With channels only the time
  embedding can be kept (always kept): widths are tied per stage by the diffusers config.

examples:
  ldm-prune --model tiny -o tiny-pruned/ --ratio 0.3 --importance taylor --distill-steps 1000
  ldm-prune --model sd15-random -o sd15-bk/ --method blocks
  ldm-prune --model ./my-pipeline -o small/ --method blocks --ratio 0.3 --keep mid_block --distill-steps 500
  ldm-export --model tiny-pruned/ -o tiny-pruned-onnx/
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ldm-prune",
        description="Structured pruning of the U-Net of a Stable Diffusion 1.x-class pipeline (channels with "
        "Torch-Pruning, or whole blocks BK-SDM-style), optional recovery by distillation from the unpruned "
        "teacher, written as a diffusers pipeline directory that from_pretrained loads and ldm-export exports.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="alias, hub id, local pipeline dir, or built-in model name")
    p.add_argument("-o", "--output", type=Path, required=True, help="pipeline directory to write")
    p.add_argument("--method", choices=("channels", "blocks"), default="channels", help="what to remove (default channels)")
    p.add_argument("--ratio", type=float, help="channels: share of channels to remove (default 0.3); "
                   "blocks: share of MACs to remove (default: the BK-SDM-Small recipe)")
    p.add_argument("--importance", choices=("l1", "l2", "taylor"),
                   help="channels: weight magnitude (l1, default; l2) or gradient-based taylor over timesteps")
    p.add_argument("--keep", nargs="+", action="extend", default=[], metavar="PATTERN",
                   help="leave these modules intact (name, glob or re:<regex>)")
    p.add_argument("--distill-steps", type=int, default=0, help="knowledge-distillation steps from the teacher (default 0)")
    p.add_argument("--data", default="generator",
                   help="prompts for taylor/sensitivity/distillation: 'generator' (shapes captions) or a text file")
    p.add_argument("--data-size", type=int, default=64, help="prompts, i.e. teacher latents generated (default 64)")
    p.add_argument("--sample-steps", type=int, default=20, help="DDIM steps per teacher latent (default 20)")
    p.add_argument("--guidance", type=float, default=7.5, help="CFG scale of the teacher sampling (default 7.5)")
    p.add_argument("--batch-size", type=int, default=16, help="distillation / importance batch (default 16)")
    p.add_argument("--lr", type=float, default=1e-4, help="distillation learning rate (default 1e-4)")
    p.add_argument("--taylor-timesteps", type=int, default=8, help="timesteps along the trajectory for taylor (default 8)")
    p.add_argument("--count-size", type=int, help="image side for the MAC counts (default: the model's native size)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the final line (no progress bars)")
    return p


@cli_entry("ldm-prune")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .run import PruneOptions, check_options, prune_model

    opts = PruneOptions(
        method=args.method, ratio=args.ratio, importance=args.importance, keep=tuple(args.keep),
        distill_steps=args.distill_steps, data=args.data, data_size=args.data_size, sample_steps=args.sample_steps,
        guidance=args.guidance, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
        taylor_timesteps=args.taylor_timesteps, count_size=args.count_size, device=args.device, threads=args.threads,
        progress=not args.quiet,
    )
    check_options(opts)  # before the heavy imports
    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    m = prune_model(args.model, args.output, opts, overwrite=args.overwrite, log=log)
    p = m["prune"]
    b, a = p["before"], p["after"]
    what = (f"channels {p['channels']['ratio_effective']:.4g} ({p['importance']})" if p["method"] == "channels"
            else f"blocks {', '.join(p['blocks']['removed'])}")
    d = p.get("distillation")
    dist = (f"; distilled {d['steps']} steps, KD loss {d['kd_out_loss_before']:.4g} -> {d['kd_out_loss_after']:.4g}"
            if d else "; not distilled")
    print(f"wrote {args.output} ({what}: params {b['params'] / 1e6:.2f}M -> {a['params'] / 1e6:.2f}M, GMACs at "
          f"{p['count_size']}px {b['macs'] / 1e9:.3f} -> {a['macs'] / 1e9:.3f}{dist}; {m['stats']['prune_seconds']} s)")
    return 0


if __name__ == "__main__":
    main()
