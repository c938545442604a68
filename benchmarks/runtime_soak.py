"""Soak and thread-safety check of the runtime on tiny-random.

    python benchmarks/runtime_soak.py [--calls 200] [--steps 5] [-o benchmarks/results/runtime_soak]

Exports tiny-random to a temporary directory, then in one process: 200 calls with different
seeds (RSS after a warm-up of 20 calls vs after the last call), and 8 threads x 5 calls whose
images must equal the serial ones for the same seeds.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
from pathlib import Path

import numpy as np
import psutil


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("-o", "--out", type=Path, default=Path("benchmarks/results/runtime_soak"))
    args = p.parse_args()

    from ldm_deploy.export.exporter import ExportOptions, export_model
    from ldm_deploy.runtime import Pipeline

    proc = psutil.Process()
    with tempfile.TemporaryDirectory() as tmp:
        art = Path(tmp) / "tiny-random"
        export_model("tiny-random", art, ExportOptions(components=("text_encoder", "unet", "vae_decoder")),
                     log=lambda s: None)
        pipe = Pipeline.load(art)
        call = lambda seed: pipe(["a red circle", "a blue square"], num_inference_steps=args.steps,  # noqa: E731
                                 seed=seed, output_type="np").images
        warmup = 20
        rss = []
        for i in range(args.calls):
            call(i)
            if i + 1 == warmup or i + 1 == args.calls:
                rss.append(proc.memory_info().rss)
        growth = (rss[1] - rss[0]) / rss[0]

        serial = {s: call(1000 + s) for s in range(8)}
        results: dict[tuple[int, int], np.ndarray] = {}

        def worker(s: int) -> None:
            for k in range(5):
                results[(s, k)] = call(1000 + s)

        threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        equal = sum(np.array_equal(img, serial[s]) for (s, _), img in results.items())

    summary = {"calls": args.calls, "steps": args.steps, "rss_after_warmup_mb": rss[0] / 2**20,
               "rss_after_last_mb": rss[1] / 2**20, "rss_growth": growth,
               "threaded_calls": len(results), "threaded_equal_to_serial": int(equal)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    md = ["# Runtime soak (tiny-random, CPU)", "",
          f"- {args.calls} calls (2 prompts, {args.steps} steps, CFG) in one process: RSS after {warmup} warm-up calls "
          f"{rss[0] / 2**20:.1f} MiB, after call {args.calls} {rss[1] / 2**20:.1f} MiB: growth {growth * 100:+.2f}%",
          f"- 8 threads x 5 calls on one shared Pipeline: {equal}/{len(results)} images identical to the serial "
          "calls with the same seeds", "",
          f"Reproduce: `python benchmarks/runtime_soak.py --calls {args.calls} --steps {args.steps}`"]
    args.out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
