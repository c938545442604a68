"""``ldm-build``: TensorRT engines for an artifact's components, cached in ``ARTIFACT/engines``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import LdmDeployError, cli_entry
from ..specs import COMPONENTS, OPTIONAL_COMPONENTS

EPILOG = """\
ranges: N (static) or MIN:OPT:MAX. --batch counts prompts per call (the U-Net gets 2x with
classifier-free guidance); --size is the image side in pixels (height and width). Both must stay
inside the ranges the ONNX graphs were exported for (see the artifact's manifest).

engines are cached as ARTIFACT/engines/<component>-<key>.plan (+ .json sidecar, engines/index.json),
keyed by ONNX hash, TensorRT version, GPU, profile, precision and flags: an up-to-date engine is
reused, a stale one rebuilt; manifest.json is not modified.

examples:
  ldm-build sd15-fp16/                               # fp16, the artifact's exported ranges
  ldm-build sd15-fp16/ --batch 1:1:2 --size 512 --static
  ldm-build sd15-int8-trt/ --precision int8          # QDQ artifact from ldm-quantize --target tensorrt
  ldm-build sd15-fp16/ --check                       # report engine status, build nothing
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ldm-build",
        description="Build one TensorRT engine per component of an ldm-deploy artifact (TensorRT Python API), "
        "with optimization profiles derived from the component specs, and cache them in the artifact.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("artifact", type=Path, help="artifact directory (from ldm-export or ldm-quantize)")
    p.add_argument("--precision", choices=("fp32", "fp16", "int8", "best"),
                   help="fp16 (default), fp32, int8 (INT8 QDQ artifacts: explicit quantization; the default for "
                   "them) or best (fp16, plus int8 for QDQ artifacts)")
    p.add_argument("--batch", metavar="MIN:OPT:MAX", help="prompts per call (default: the exported range)")
    p.add_argument("--size", metavar="MIN:OPT:MAX", help="image side in pixels, height and width (default: exported)")
    p.add_argument("--height", metavar="MIN:OPT:MAX", help="image height only (overrides --size)")
    p.add_argument("--width", metavar="MIN:OPT:MAX", help="image width only (overrides --size)")
    p.add_argument("--static", action="store_true", help="min = opt = max (enables CUDA graphs at run time)")
    p.add_argument("--timing-cache", type=Path, metavar="PATH",
                   help="timing cache to load and update (default: ARTIFACT/engines/timing-trt<ver>-sm<cc>.cache)")
    p.add_argument("--no-timing-cache", action="store_true", help="do not load or save a timing cache")
    p.add_argument("--workspace", type=float, metavar="GB", help="builder workspace memory pool limit in GiB")
    p.add_argument("--components", default=",".join(COMPONENTS + OPTIONAL_COMPONENTS),
                   help="comma-separated subset (default: all the artifact has)")
    p.add_argument("--strongly-typed", action="store_true",
                   help="strongly typed network: the graph's own types decide precision (no fp16/int8 flags)")
    p.add_argument("--opt-level", type=int, help="builder optimization level 0-5 (default 3, 4 for int8)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--force", action="store_true", help="rebuild even up-to-date engines")
    g.add_argument("--check", action="store_true",
                   help="build nothing: report each engine (up to date / missing / stale / foreign), exit 1 if any "
                   "is not up to date")
    p.add_argument("-v", "--verbose", action="store_true", help="verbose TensorRT log")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the final line")
    return p


@cli_entry("ldm-build")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from . import require_cudart, require_tensorrt

    trt = require_tensorrt()  # one clear line (with the install command) where TensorRT is missing
    require_cudart()

    from ..artifact import Artifact
    from .builder import build_artifact, default_timing_cache, resolve_flags
    from .engine import machine_environment
    from .profiles import build_ranges, component_profile, describe

    art = Artifact.open(args.artifact)
    wanted = [c.strip() for c in args.components.split(",") if c.strip()]
    unknown = [c for c in wanted if c not in COMPONENTS + OPTIONAL_COMPONENTS]
    if unknown:
        raise LdmDeployError(f"unknown components {unknown}; choose from {', '.join(COMPONENTS + OPTIONAL_COMPONENTS)}")
    explicit = args.components != build_parser().get_default("components")
    absent = [c for c in wanted if c not in art.components]
    if absent and explicit:
        raise LdmDeployError(f"artifact {art.path} has no component(s) {absent}")
    components = [c for c in wanted if c in art.components]
    if "shape_ranges" not in art.manifest:
        raise LdmDeployError(f"{art.path}/manifest.json has no shape_ranges")
    ranges = build_ranges(art.shape_ranges, batch=args.batch, size=args.size, height=args.height,
                          width=args.width, static=args.static)
    flags = resolve_flags(args.precision, art.manifest, args.strongly_typed, args.opt_level)
    profiles = {c: component_profile(art.spec(c), ranges, static=args.static) for c in components}
    env = machine_environment()
    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    log(f"TensorRT {trt.__version__} on {env['gpu_name']} (sm {env['compute_capability']}); {flags.precision}, "
        f"{describe(ranges)}{', static' if args.static else ''}")

    cache = None if args.no_timing_cache else (args.timing_cache or default_timing_cache(art.path, env))
    rebuild = "never" if args.check else ("always" if args.force else "stale")
    results = build_artifact(art, components, profiles, flags, env, args.workspace, cache, rebuild,
                             args.verbose, log)
    refused = [r for r in results if r.status == "refused"]
    if args.check:
        for r in results:
            print(f"{r.component}: {'up to date' if r.status == 'cached' else r.message}")
        return 1 if refused else 0
    built = [r.component for r in results if r.status == "built"]
    cached = [r.component for r in results if r.status == "cached"]
    print(f"engines in {art.path / 'engines'}: built {', '.join(built) or 'none'}"
          + (f"; up to date {', '.join(cached)}" if cached else ""))
    return 0


if __name__ == "__main__":
    main()
