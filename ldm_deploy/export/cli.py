"""``ldm-export``: an SD-class pipeline -> a validated ONNX artifact directory."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import cli_entry
from ..specs import COMPONENTS

EPILOG = """\
models: sd15, sd14 (hub aliases), any hub id, a local diffusers pipeline directory,
        tiny (embedded trained model), tiny-random, sd15-random (seeded random weights)

examples:
  ldm-export --model sd15 --fp16 -o sd15-fp16/
  ldm-export --model tiny -o tiny-onnx/
  ldm-export --model tiny --deepcache -o tiny-dc/     (then: ldm-generate tiny-dc/ "..." --cache-interval 3)
  ldm-export --model tiny --lora ldm_deploy/assets/lora/tiny-noir.safetensors:1.0 -o tiny-noir-onnx/
  ldm-export --model ./my-pipeline --height 768 --width 512 --max-batch 2 -o out/
  ldm-export --model tiny --layout optimum -o tiny-optimum/   (ORTStableDiffusionPipeline.from_pretrained)
  ldm-export --model tiny --long-prompts -o tiny-long/        (then: ldm-generate tiny-long/ "..." --long-prompts)
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ldm-export",
        description="Export the text encoder, U-Net, VAE encoder and VAE decoder of a Stable Diffusion "
        "1.x-class pipeline to ONNX with dynamic batch/height/width, check each against PyTorch, "
        "and write an artifact directory with a manifest.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="alias, hub id, local pipeline dir, or built-in model name")
    p.add_argument("-o", "--output", type=Path, help="artifact directory to write (default: ./<model>-onnx[-fp16])")
    p.add_argument("--fp16", action="store_true", help="fp16 weights and compute (converted graph on CPU-only machines)")
    p.add_argument("--fp16-io", action="store_true", help="with --fp16: fp16 graph inputs/outputs too (default: keep fp32 I/O)")
    p.add_argument("--opset", type=int, default=18,
                   help="ONNX opset (default 18; 14-20 with the torchscript exporter, 18-23 with dynamo)")
    p.add_argument("--height", type=int, help="image height the graphs are validated at (default: the model's native size)")
    p.add_argument("--width", type=int, help="image width (default: the model's native size)")
    p.add_argument("--batch", type=int, default=1, help="typical prompts per call, the opt point of the batch axis (default 1)")
    p.add_argument("--max-batch", type=int, default=4, help="largest prompts per call (the U-Net gets 2x with CFG; default 4)")
    p.add_argument("--min-size", type=int, help="smallest image side supported (default: half the export size)")
    p.add_argument("--max-size", type=int, help="largest image side supported (default: twice the export size)")
    p.add_argument("--optimize", nargs="?", const="cpu", choices=("cpu", "cuda", "tensorrt"),
                   help="graph optimisation for a target: cpu/tensorrt = portable clean-up, cuda = ORT fusions")
    p.add_argument("--attention", choices=("auto", "mha", "sliced", "full"), default="auto",
                   help="U-Net attention graph: mha (ONNX Runtime's fused MultiHeadAttention: fastest on CPU, "
                   "not for TensorRT), sliced (self-attention per head, low memory), or full (the pattern GPU "
                   "fusions and TensorRT match); auto = full for --optimize cuda/tensorrt or native fp16, "
                   "sliced for fp16 on CPU, else mha")
    p.add_argument("--exporter", choices=("torchscript", "dynamo"), default="torchscript",
                   help="torch.onnx exporter: torchscript (tracing, fast) or dynamo (torch.export)")
    p.add_argument("--components", default=",".join(COMPONENTS), help="comma-separated subset to export")
    p.add_argument("--deepcache", nargs="?", type=int, const=1, metavar="DEPTH",
                   help="feature caching (DeepCache): also export a shallow U-Net graph that reuses the full "
                   "graph's deep feature between steps (ldm-generate --cache-interval N); DEPTH = layers of the "
                   "first down block it runs (default 1: about a fifth of SD1.5's U-Net MACs)")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                   help="LoRA adapter (safetensors file or diffusers LoRA directory; kohya, diffusers or PEFT "
                   "format) fused into the U-Net and text encoder before export, at SCALE (default 1); repeat "
                   "for several")
    p.add_argument("--long-prompts", action="store_true",
                   help="export the U-Net with a dynamic text sequence (77 to 231 tokens) so that prompts over 77 "
                   "tokens can be encoded in 77-token windows (ldm-generate --long-prompts) instead of truncated")
    p.add_argument("--layout", choices=("ldm-deploy", "optimum"), default="ldm-deploy",
                   help="optimum: write the artifact in Optimum's ONNX layout (model_index.json, config.json per "
                   "component, Optimum's I/O names) for ORTStableDiffusionPipeline, instead of ldm-deploy's")
    p.add_argument("--no-validate", action="store_true", help="skip the parity check against PyTorch")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the final line")
    return p


@cli_entry("ldm-export")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .lora import parse_lora_arg

    loras = tuple(parse_lora_arg(a) for a in args.lora)
    from .exporter import ExportOptions, export_model  # heavy imports after --help

    out = args.output or Path(f"{Path(args.model).name}-onnx{'-fp16' if args.fp16 else ''}")
    opts = ExportOptions(
        fp16=args.fp16,
        keep_io_types=not args.fp16_io,
        opset=args.opset,
        height=args.height,
        width=args.width,
        batch=args.batch,
        max_batch=args.max_batch,
        min_size=args.min_size,
        max_size=args.max_size,
        optimize=args.optimize,
        attention=args.attention,
        exporter=args.exporter,
        validate=not args.no_validate,
        loras=loras,
        components=tuple(c.strip() for c in args.components.split(",") if c.strip()),
        deepcache=args.deepcache,
        long_prompts=args.long_prompts,
    )
    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    if args.layout == "optimum":
        return _export_optimum(args.model, out, opts, args.overwrite, log)
    manifest = export_model(args.model, out, opts, overwrite=args.overwrite, log=log)
    stats = manifest["stats"]
    statuses = {k: v["status"] for k, v in manifest["validation"].items()}
    print(f"wrote {out} ({manifest['precision']}, {stats['export_seconds']} s, peak RSS "
          f"{stats['peak_rss_bytes'] / 2**30:.2f} GiB; validation: "
          + ", ".join(f"{k} {v}" for k, v in statuses.items()) + ")")
    return 0


def _export_optimum(model: str, out: Path, opts, overwrite: bool, log) -> int:  # type: ignore[no-untyped-def]
    """Export (validated as usual) into a hidden sibling, then write Optimum's layout at ``out``."""
    import shutil
    import uuid

    from ..artifact import check_output_path
    from ..errors import LdmDeployError
    from ..interop.optimum import to_optimum
    from .exporter import export_model

    check_output_path(out)
    if out.exists() and not overwrite:
        raise LdmDeployError(f"output {out} already exists (pass --overwrite to replace it)")
    staging = out.absolute().parent / f".ldm-layout-{out.name}-{uuid.uuid4().hex[:8]}"
    try:
        manifest = export_model(model, staging, opts, log=log)
        log("writing Optimum's layout")
        to_optimum(staging, out, overwrite=overwrite, log=log)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    statuses = {k: v["status"] for k, v in manifest["validation"].items()}
    print(f"wrote {out} (Optimum layout for ORTStableDiffusionPipeline, {manifest['precision']}; validation: "
          + ", ".join(f"{k} {v}" for k, v in statuses.items()) + ")")
    return 0


if __name__ == "__main__":
    main()
