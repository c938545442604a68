"""Where the time of one component goes on ONNX Runtime CPU: seconds per call by operator type
(ORT's own profiler), for one or more artifacts side by side.

    python benchmarks/ort_profile.py sd15-fp32/ sd15-int8/ --component unet --size 512 \\
        -o benchmarks/results/ort_profile_sd15_unet

Each artifact's component runs ``--runs`` times after one warm-up call on the same seeded inputs
at ``--size`` (batch 1, or the CFG batch 2 for the U-Net of a CFG artifact), one artifact at a
time. Kernel times are summed per operator type over the profiled runs and divided by their
number. Writes ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

from ldm_deploy.artifact import Artifact
from ldm_deploy.inputs import example_inputs
from ldm_deploy.runtime.sessions import session_options


def profile_component(path: Path, component: str, size: int, runs: int, threads: int, low_memory: bool = False) -> dict[str, Any]:
    import onnxruntime as ort

    art = Artifact.open(path)
    spec = art.spec(component)
    sizes = dict(art.shape_ranges.sizes("opt"))
    f = art.shape_ranges.vae_scale
    sizes.update(batch=1, unet_batch=2 if art.shape_ranges.cfg else 1, height=size // f, width=size // f,
                 image_height=size, image_width=size)
    feeds = example_inputs(spec, sizes, art.io_dtype)
    with tempfile.TemporaryDirectory(prefix="ortprof-") as tmp:
        so = session_options(threads, low_memory)
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tmp) / "prof")
        sess = ort.InferenceSession(str(art.model_file(component)), so, providers=["CPUExecutionProvider"])
        sess.run(None, feeds)  # warm-up (profiled too; dropped below by run index)
        walls = []
        for _ in range(runs):
            t0 = time.perf_counter()
            sess.run(None, feeds)
            walls.append(time.perf_counter() - t0)
        events = json.loads(Path(sess.end_profiling()).read_text())
    # model_run events mark each call; keep kernel events after the warm-up call ends
    run_ends = sorted(e["ts"] + e["dur"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    warm_end = run_ends[0] if run_ends else 0
    by_op: collections.Counter[str] = collections.Counter()
    count: collections.Counter[str] = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time") and e["ts"] >= warm_end:
            op = e.get("args", {}).get("op_name", "?")
            by_op[op] += e["dur"]
            count[op] += 1
    ops = {op: {"seconds": us / 1e6 / runs, "nodes": count[op] // runs} for op, us in by_op.most_common()}
    q = art.manifest.get("quantization") or {}
    return {"artifact": str(path), "precision": art.manifest.get("precision"), "quantization": q.get("method"),
            "inputs": {k: list(v.shape) for k, v in feeds.items()}, "wall_s": walls,
            "kernel_s": sum(v["seconds"] for v in ops.values()), "ops": ops}


def to_markdown(res: list[dict[str, Any]], args: argparse.Namespace, machine: str) -> str:
    names = [Path(r["artifact"]).name or r["artifact"] for r in res]
    ops = sorted({op for r in res for op in r["ops"]}, key=lambda o: -max(r["ops"].get(o, {}).get("seconds", 0) for r in res))
    lines = [
        f"# ONNX Runtime CPU profile: `{args.component}` at {args.size}x{args.size}",
        "",
        f"{machine}. {args.runs} profiled calls after one warm-up, {args.threads} intra-op threads, "
        f"{'low-memory sessions (no ORT arena)' if args.low_memory else 'ORT memory arena'}; inputs "
        f"{res[0]['inputs']}. Seconds per call summed over the kernels of each operator type (ORT profiler).",
        "",
        "| | " + " | ".join(f"`{n}` ({r['precision']}{', ' + r['quantization'] if r['quantization'] else ''})"
                            for n, r in zip(names, res)) + " |",
        "|---|" + "---|" * len(res),
        "| wall s / call (min) | " + " | ".join(f"{min(r['wall_s']):.3f}" for r in res) + " |",
        "| kernel s / call | " + " | ".join(f"{r['kernel_s']:.3f}" for r in res) + " |",
    ]
    for op in ops:
        cells = []
        for r in res:
            v = r["ops"].get(op)
            cells.append("–" if v is None else f"{v['seconds']:.3f} ({100 * v['seconds'] / r['kernel_s']:.1f}%, {v['nodes']})")
        lines.append(f"| {op} | " + " | ".join(cells) + " |")
    lines += ["", "Cells: seconds per call (share of the kernel time, number of nodes).", "",
              f"Reproduce: `python benchmarks/ort_profile.py {' '.join(r['artifact'] for r in res)} --component "
              f"{args.component} --size {args.size} --runs {args.runs} --threads {args.threads}"
              f"{' --low-memory' if args.low_memory else ''}`"]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifacts", nargs="+", type=Path, help="artifact directories to profile")
    ap.add_argument("--component", default="unet")
    ap.add_argument("--size", type=int, default=512, help="image side in pixels")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--low-memory", action="store_true",
                    help="sessions without ORT's memory arena (the runtime's --low-memory mode)")
    ap.add_argument("-o", "--out", type=Path, default=Path("benchmarks/results/ort_profile"))
    args = ap.parse_args()
    machine = f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} CPUs".replace("  ", " ")
    res = []
    for a in args.artifacts:
        print(f"profiling {a} ({args.component}, {args.size}px) ...", flush=True)
        res.append(profile_component(a, args.component, args.size, args.runs, args.threads, args.low_memory))
        print(f"  {min(res[-1]['wall_s']):.3f} s / call", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps({"machine": machine, "component": args.component,
                                                   "size": args.size, "threads": args.threads, "results": res}, indent=1))
    md = to_markdown(res, args, machine)
    Path(f"{args.out}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
