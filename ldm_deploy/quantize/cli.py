"""``ldm-quantize``: an fp32 artifact -> a new artifact with INT8 QDQ components."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import LdmDeployError, cli_entry

EPILOG = """\
default exclusions (kept fp32): time_embedding, time_emb_proj, conv_in, conv_out, conv_shortcut,
  cross-attention attn2/to_k + attn2/to_v (unless --quantize-cross-kv); Softmax is never quantized.
exclude patterns: a glob on node names ('*/up_blocks.3/*'), 're:<regex>', or a plain substring;
  a pattern matching no node is an error.

examples:
  ldm-quantize tiny-onnx/ -o tiny-int8/
  ldm-quantize sd15-onnx-trt/ -o sd15-int8-trt/ --target tensorrt --method percentile --calib-size 64  # from ldm-export --optimize tensorrt
  ldm-quantize tiny-onnx-full/ -o tiny-ov-int8/ --target openvino   # from ldm-export --attention full
  ldm-quantize sd15-onnx/ -o sd15-int8/ --calib-prompts prompts.txt --exclude '*/mid_block/*' --sensitivity
"""


def _size(text: str) -> int:
    t = text.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    try:
        if t and t[-1] in mult:
            return int(float(t[:-1]) * mult[t[-1]])
        if t.endswith(("KB", "MB", "GB")):
            return int(float(t[:-2]) * mult[t[-2]])
        return int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 2G, 512M)") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ldm-quantize",
        description="INT8 post-training quantization of an fp32 artifact: calibrate on U-Net inputs recorded "
        "from real CFG sampling runs, collect activation ranges with bounded memory, write a new artifact "
        "with QDQ graphs for ONNX Runtime CPU or TensorRT (the source artifact is not modified).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("artifact", type=Path, help="fp32 artifact directory (ldm-export output)")
    p.add_argument("-o", "--output", type=Path, required=True, help="artifact directory to write")
    p.add_argument("--target", choices=("cpu", "tensorrt", "openvino"), default="cpu",
                   help="cpu: U8S8 QDQ for ORT CPU (VNNI); tensorrt: symmetric INT8 QDQ; openvino: NNCF INT8 as "
                   "OpenVINO IR for the openvino backend (source exported with --attention full) (default cpu)")
    p.add_argument("--nncf-preset", choices=("mixed", "performance"), default="mixed",
                   help="openvino target: NNCF preset (mixed: asymmetric activations, symmetric weights; default)")
    p.add_argument("--format", dest="quant_format", choices=("qdq", "qoperator"),
                   help="cpu graph format (default qdq; qoperator writes QLinear* ops)")
    p.add_argument("--components", default="unet", help="comma-separated: unet, text_encoder, vae_decoder (default unet; with a --deepcache export, "
                   "unet includes its shallow graph unet_shallow)")
    p.add_argument("--calib-prompts", type=Path, help="file with one calibration prompt per line (default: built-in list)")
    p.add_argument("--calib-size", type=int, default=64, help="U-Net batches kept for calibration (default 64)")
    p.add_argument("--calib-steps", type=int, default=20, help="sampling steps of each calibration run (default 20)")
    p.add_argument("--calib-per-run", type=int, help="batches kept per sampling run (default ceil(steps/4))")
    p.add_argument("--calib-size-px", type=int, help="calibration image side in pixels (default: the export size)")
    p.add_argument("--guidance-scale", type=float, default=7.5, help="CFG scale of the calibration runs (default 7.5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration runs (default 0)")
    p.add_argument("--method", choices=("minmax", "percentile", "mse"), default="minmax",
                   help="activation range: min/max, percentile of a histogram, or MSE-optimal clipping")
    p.add_argument("--percentile", type=float, default=99.999, help="for --method percentile (default 99.999)")
    p.add_argument("--exclude", nargs="+", action="extend", default=[], metavar="PATTERN",
                   help="also keep these nodes in fp32 (glob, re:<regex> or substring on node names)")
    p.add_argument("--no-default-exclusions", action="store_true",
                   help="quantize the default-excluded parts too (only --exclude patterns apply)")
    p.add_argument("--quantize-cross-kv", action="store_true", help="quantize cross-attention to_k/to_v too")
    p.add_argument("--attention-matmuls", choices=("auto", "on", "off"), default="auto",
                   help="quantize activation x activation attention MatMuls (auto: off for cpu, on for tensorrt)")
    p.add_argument("--reduce-range", action="store_true",
                   help="cpu target: 7-bit weights, for CPUs without VNNI (AVX2 only), where ORT's u8s8 kernels "
                        "saturate with full-range weights; same speed")
    p.add_argument("--sensitivity", action="store_true",
                   help="write a per-block sensitivity table (sensitivity_<component>.md/.json in OUT)")
    p.add_argument("--sensitivity-group", choices=("block", "layer"), default="block",
                   help="one row per block (default, cheap) or per quantizable node (one quantization each)")
    p.add_argument("--max-calib-memory", type=_size, default=2 << 30,
                   help="budget for the tensors exposed per run by histogram methods (default 2G)")
    p.add_argument("--ranges-from", metavar="ARTIFACT",
                   help="reuse the activation ranges of an earlier cpu/tensorrt ldm-quantize output of the same "
                        "source (no calibration runs: its calibration settings apply); for trying other --exclude "
                        "patterns at SD scale in minutes")
    p.add_argument("--holdout", type=int, default=4, help="held-out U-Net batches for the quality report (default 4)")
    p.add_argument("--quality-prompts", type=int, default=2, help="prompts for the image PSNR check (0 = skip)")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (default: all cores)")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the final line")
    return p


@cli_entry("ldm-quantize")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .build import quantize_artifact
    from ..prompts import read_prompt_file

    prompts = read_prompt_file(args.calib_prompts, "calibration prompt file") if args.calib_prompts is not None else None
    comps = [c.strip() for c in args.components.split(",") if c.strip()]
    if args.calib_size < 1 or args.calib_steps < 1:
        raise LdmDeployError("--calib-size and --calib-steps must be >= 1")
    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    px = args.calib_size_px
    m = quantize_artifact(
        args.artifact, args.output, target=args.target, components=comps, prompts=prompts,
        calib_size=args.calib_size, calib_steps=args.calib_steps, calib_per_run=args.calib_per_run,
        calib_height=px, calib_width=px, guidance_scale=args.guidance_scale, method=args.method,
        percentile=args.percentile, exclude=args.exclude, default_exclusions=not args.no_default_exclusions,
        quantize_cross_kv=args.quantize_cross_kv, quant_format=args.quant_format,
        attention_matmuls={"auto": None, "on": True, "off": False}[args.attention_matmuls],
        reduce_range=args.reduce_range, sensitivity=args.sensitivity, sensitivity_group=args.sensitivity_group,
        holdout=args.holdout,
        quality_prompts=args.quality_prompts, max_calib_memory=args.max_calib_memory, seed=args.seed,
        threads=args.threads, nncf_preset=args.nncf_preset, ranges_from=args.ranges_from, overwrite=args.overwrite,
        log=log,
    )
    q = m["quantization"]
    qual = q.get("quality", {})
    parts = []
    if "unet_heldout" in qual:
        parts.append(f"U-Net held-out cosine {qual['unet_heldout']['cosine']:.5f}")
    if "images" in qual:
        parts.append(f"image PSNR {qual['images']['psnr_mean']:.2f} dB")
    print(f"wrote {args.output} (int8 {args.target}, {q['method']}, {', '.join(q['components'])}; "
          f"{q['calibration']['size']} calibration batches; {m['stats']['quantize_seconds']} s, peak RSS "
          f"{m['stats']['peak_rss_bytes'] / 2**30:.2f} GiB" + ("; " + ", ".join(parts) if parts else "") + ")")
    return 0


if __name__ == "__main__":
    main()
