"""``ldm-generate``: images from an exported artifact with the torch-free runtime."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..artifact import Artifact, check_output_path
from ..errors import LdmDeployError, cli_entry
from .backends import BACKENDS
from .feature_cache import check_cache_interval
from .presets import describe_preset, resolve_sampling
from .scheduler import SCHEDULERS, make_scheduler


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ldm-generate",
        description="Generate images from an ldm-deploy artifact (DDIM, DPM-Solver++ or Euler sampling with "
        "classifier-free guidance on ONNX Runtime or TensorRT, no PyTorch).",
        epilog='example: ldm-generate tiny-onnx/ "a small red circle on a blue background, top left" -o out.png',
    )
    p.add_argument("artifact", type=Path, help="artifact directory written by ldm-export / ldm-quantize")
    p.add_argument("prompt", help="text prompt")
    p.add_argument("-o", "--output", type=Path, default=Path("out.png"),
                   help="output PNG; with several images, _0, _1, ... are appended (default out.png)")
    p.add_argument("--negative", default=None, help="negative prompt")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default 25; --fast: its preset)")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale; <= 1 disables it (default 7.5)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--height", type=int, help="image height (default: the artifact's export size)")
    p.add_argument("--width", type=int, help="image width (default: the artifact's export size)")
    p.add_argument("--num-images", type=int, default=1, help="images for the prompt (default 1)")
    p.add_argument("--scheduler", default=None, metavar="NAME",
                   help=f"sampler: {', '.join(SCHEDULERS)} (default ddim)")
    p.add_argument("--cache-interval", type=int, default=None, metavar="N",
                   help="feature caching (DeepCache; artifacts exported with --deepcache): the full U-Net every N-th "
                   "step, its shallow graph in between (default 1: off)")
    p.add_argument("--fast", action="store_true",
                   help="the measured best quality per second: " + describe_preset("fast")
                   + " (explicit --scheduler/--steps/--cache-interval win)"),
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0: deterministic; ddim only)")
    p.add_argument("--image", type=Path, help="init image for img2img")
    p.add_argument("--strength", type=float, default=0.8, help="img2img strength in (0, 1] (default 0.8)")
    p.add_argument("--backend", default="ort-cpu", choices=list(BACKENDS), metavar="NAME",
                   help="where the graphs run: " + "; ".join(f"{b.name}: {b.description}" for b in BACKENDS.values())
                   + " (default ort-cpu)")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (default: all cores)")
    p.add_argument("--low-memory", action="store_true",
                   help="ONNX Runtime without its memory arena: lower peak RSS across image sizes, slower steps")
    p.add_argument("--ov-precision", default="default", choices=("default", "f32", "bf16"),
                   help="openvino backend: inference precision hint (default: OpenVINO's choice for this CPU; bf16 "
                   "needs a CPU with bf16)")
    p.add_argument("--static", action="store_true",
                   help="openvino backend: compile the graphs for this call's batch and size only (fastest)")
    p.add_argument("--no-compile-cache", action="store_true",
                   help="openvino backend: do not cache compiled models in ARTIFACT/openvino-cache/")
    p.add_argument("--long-prompts", action="store_true",
                   help="encode prompts over 77 tokens in 77-token windows instead of truncating them (artifacts "
                   "exported with ldm-export --long-prompts)")
    p.add_argument("--no-verify", action="store_true", help="skip checking file hashes against the manifest")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return p


@cli_entry("ldm-generate")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from PIL import Image

    from .pipeline import Pipeline

    check_output_path(args.output)  # before any work: not under a regular file, writable
    has_deepcache = "unet_shallow" in Artifact.open(args.artifact).components
    sampling = resolve_sampling("fast" if args.fast else None, args.scheduler, args.steps, args.cache_interval,
                                has_deepcache)
    # an unknown scheduler or an interval the artifact cannot run fails here, before loading the graphs
    make_scheduler(sampling.scheduler, {})
    if not has_deepcache:
        check_cache_interval(sampling.cache_interval, {}, has_graph=False)
    init = None
    if args.image is not None:
        if not args.image.is_file():
            raise LdmDeployError(f"init image {args.image} does not exist")
        try:
            init = Image.open(args.image)
            init.load()  # float ("F") images stay as they are: the pipeline checks their pixels
        except (OSError, ValueError) as e:
            raise LdmDeployError(f"cannot read init image {args.image}: {e}") from None
    components = ("text_encoder", "unet", "vae_decoder") + (("vae_encoder",) if init is not None else ()) + (
        ("unet_shallow",) if sampling.cache_interval > 1 else ())
    ov_options = {}
    if args.backend == "openvino":
        static = None
        if args.static:
            h, w = _call_size(args.artifact, args.height, args.width, init)
            static = (args.num_images, h, w)
        ov_options = dict(precision_hint=args.ov_precision, static_shape=static, compile_cache=not args.no_compile_cache)
    elif args.static or args.ov_precision != "default" or args.no_compile_cache:
        raise LdmDeployError("--ov-precision, --static and --no-compile-cache apply to --backend openvino only")
    pipe = Pipeline.load(args.artifact, backend=args.backend, threads=args.threads, verify=not args.no_verify,
                         components=components, low_memory=args.low_memory, long_prompts=args.long_prompts,
                         **ov_options)
    out = pipe(
        args.prompt,
        negative_prompt=args.negative,
        num_inference_steps=sampling.steps,
        guidance_scale=args.guidance,
        height=args.height,
        width=args.width,
        num_images_per_prompt=args.num_images,
        seed=args.seed,
        eta=args.eta,
        scheduler=sampling.scheduler,
        cache_interval=sampling.cache_interval,
        image=init,
        strength=args.strength,
        progress=not args.quiet,
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    paths = [args.output] if len(out.images) == 1 else [
        args.output.with_name(f"{args.output.stem}_{i}{args.output.suffix or '.png'}") for i in range(len(out.images))
    ]
    tmps = [path.with_name(f".{path.name}.tmp") for path in paths]
    try:  # all images or none: a failed write (a full disk) leaves no output behind
        for im, tmp in zip(out.images, tmps):
            im.save(tmp, format="PNG")
        for tmp, path in zip(tmps, paths):
            tmp.replace(path)
    finally:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
    t = out.timings
    caching = f", full U-Net every {sampling.cache_interval}" if sampling.cache_interval > 1 else ""
    print(f"wrote {', '.join(map(str, paths))} ({out.steps} {sampling.scheduler} steps{caching}, U-Net {t['unet']:.2f} s, "
          f"total {sum(t.values()):.2f} s)")
    return 0


def _call_size(artifact: Path, height: int | None, width: int | None, init: object) -> tuple[int, int]:
    """The image size the call will use (what the pipeline would default to)."""
    from .pipeline import image_size

    if init is not None:
        dh, dw = image_size(init)
    else:
        ranges = Artifact.open(artifact).shape_ranges
        dh, dw = ranges.image_height[1], ranges.image_width[1]
    return (dh if height is None else height, dw if width is None else width)


if __name__ == "__main__":
    main()
