"""``ldm-bench``: run benchmark suites and render their results."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from ..errors import LdmDeployError, cli_entry

EPILOG = """\
examples:
  ldm-bench run benchmarks/suites/cpu-smoke.toml -o benchmarks/results/cpu-smoke
  ldm-bench run benchmarks/suites/cpu-sd15.toml -o results/sd15 --work-dir ~/.cache/ldm-bench
  ldm-bench run my-suite.toml -o out/ --ray local        # quality images on a local Ray instance
  ldm-bench check my-suite.toml                          # validate only
  ldm-bench report out/                                  # re-render md/csv/png from results.json
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ldm-bench",
        description="Compare variants of a latent diffusion model (ldm-deploy artifacts on ONNX Runtime / "
        "TensorRT, diffusers + torch, Optimum) on latency per component and end to end, memory, artifact "
        "size and image quality, as declared by a suite file (TOML).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="run a suite and write a results directory")
    run.add_argument("suite", type=Path, help="suite file (TOML)")
    run.add_argument("-o", "--output", type=Path, help="results directory (default: results/<suite name>)")
    run.add_argument("--work-dir", type=Path,
                     help="keep built artifacts here and reuse them on later runs (default: a temporary directory)")
    run.add_argument("--rebuild", action="store_true", help="rebuild artifacts even if --work-dir has them")
    run.add_argument("--ray", metavar="ADDRESS",
                     help="generate the quality images on Ray: 'local' starts a local instance, 'auto' or "
                     "ray://HOST:PORT joins a cluster")
    run.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    check = sub.add_parser("check", help="validate a suite file and say which variants can run here")
    check.add_argument("suite", type=Path)
    report = sub.add_parser("report", help="re-render results.md, results.csv and the plots from results.json")
    report.add_argument("results", type=Path, help="results directory")
    return p


@cli_entry("ldm-bench")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd == "report":
        from .report import render_all
        from .results import load_results

        for path in render_all(load_results(args.results), args.results):
            print(f"wrote {path}")
        return 0
    from .suite import load_suite

    suite = load_suite(args.suite)  # every check happens here, before any work
    if args.cmd == "check":
        return _check(suite)
    from .plots import require_matplotlib
    from .runner import run_suite

    require_matplotlib()  # fail now, not after the measurements
    out = args.output or Path("results") / suite.name
    if out.exists() and not args.overwrite:
        raise LdmDeployError(f"{out} already exists (pass --overwrite to replace it)")
    if args.ray:
        from .shard import connect

        connect(args.ray)
    command = "ldm-bench " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    results = run_suite(suite, out, work_dir=args.work_dir, ray=args.ray, overwrite=args.overwrite,
                        rebuild=args.rebuild, progress=not args.no_progress, command=command)
    counts = {k: sum(v["status"] == k for v in results["variants"]) for k in ("ok", "skipped", "failed")}
    print(f"wrote {out} ({counts['ok']} measured, {counts['skipped']} skipped, {counts['failed']} failed; "
          f"{results['wall_s']:.0f} s): results.json, results.csv, results.md, latency.png, pareto.png")
    if counts["failed"]:
        failed = ", ".join(v["name"] for v in results["variants"] if v["status"] == "failed")
        raise LdmDeployError(f"variants failed: {failed} (reasons in {out / 'results.md'})")
    return 0


def _check(suite) -> int:  # type: ignore[no-untyped-def]
    import tempfile

    from .runner import check_variant

    with tempfile.TemporaryDirectory() as tmp:
        for v in suite.variants:
            why = check_variant(v, Path(tmp))
            print(f"{v.name} ({v.kind}): " + ("ok" if why is None else f"skipped: {why}"))
    return 0


if __name__ == "__main__":
    main()
