"""One variant in its own process (so that its memory peak is its own):
``python -m ldm_deploy.bench.worker run|check|build JOB.json``.

``run`` loads the variant, times warm-up + repeat rounds of text encoding, one U-Net step, VAE
decoding and a whole call while sampling memory, optionally generates the quality images, and
writes ``job["result"]`` (JSON) and ``job["images"]`` (.npy). Errors go into the result file.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np


def _bar(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="it", leave=False, disable=not enabled, file=sys.stderr)


def measure_latency(runner: Any, s: dict[str, Any], progress: bool = True, label: str = "") -> dict[str, Any]:
    """Per-round seconds of each operation after ``s["warmup"]`` untimed rounds."""
    from .measure import summarize, timed
    from .quality import initial_latents

    cfg = s["guidance"] > 1.0
    prompts = [s["prompt"]] * s["batch"]
    lat = initial_latents([s["seed"] + i for i in range(s["batch"])], runner.latent_channels,
                          s["height"] // runner.vae_scale, s["width"] // runner.vae_scale)
    samples: dict[str, list[float]] = {"text_encoder": [], "unet_step": [], "vae_decode": [], "end_to_end": []}
    context: list[Any] = [None]
    ops = {
        "text_encoder": lambda: context.__setitem__(0, runner.encode(prompts, cfg)),
        "unet_step": lambda: runner.unet_step(lat, context[0], cfg),
        "vae_decode": lambda: runner.decode(lat),
        "end_to_end": lambda: runner.generate(prompts, lat, s["steps"], s["guidance"]),
    }
    rounds = s["warmup"] + s["repeats"]
    with _bar(rounds, f"{label} latency", progress) as bar:
        for r in range(rounds):
            for name, fn in ops.items():
                t = timed(fn, runner.sync)
                if r >= s["warmup"]:
                    samples[name].append(t)
            bar.update(1)
    out = {k: summarize(v) for k, v in samples.items()}
    e2e = out["end_to_end"]["median"]
    return {"latency": out, "throughput_images_per_s": s["batch"] / e2e if e2e > 0 else None}


def run(job: dict[str, Any]) -> dict[str, Any]:
    from .measure import MemorySampler
    from .quality import generate_chunks
    from .variants import make_runner

    v, s, q = job["variant"], job["settings"], job.get("quality")
    progress = job.get("progress", True)
    result: dict[str, Any] = {}
    sampler = MemorySampler(s["memory_interval_ms"] / 1000.0)
    with sampler:
        t0 = time.perf_counter()
        runner = make_runner(v["kind"], v["options"], s, job["threads"])
        result["load_s"] = time.perf_counter() - t0
        result["rss_after_load_bytes"] = sampler.rss_now()
        result.update(measure_latency(runner, s, progress, v["name"]))
        if q is not None:
            parts = [tuple(p) for p in q["chunks"]]
            t0 = time.perf_counter()
            with _bar(len(parts), f"{v['name']} quality images", progress) as bar:
                images = generate_chunks(runner, q["prompts"], parts, q["steps"], q["guidance"], s["height"],
                                         s["width"], on_chunk=lambda: bar.update(1))
            result["quality_images"] = {"source": "local", "seconds": time.perf_counter() - t0, "n": len(images)}
            np.save(job["images"], images)
    result["memory"] = sampler.result()
    result["size"] = getattr(runner, "size", {"bytes": None, "note": "unknown"})
    return result


def check(job: dict[str, Any]) -> dict[str, Any]:
    from .variants import unavailable_reason

    return {"reason": unavailable_reason(job["kind"], job["options"])}


def build(job: dict[str, Any]) -> dict[str, Any]:
    from .prepare import build_now

    return build_now(job["recipe"], Path(job["source"]) if job.get("source") else None, Path(job["out"]))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    mode, job_path = argv[0], Path(argv[1])
    job = json.loads(job_path.read_text())
    try:
        result = {"run": run, "check": check, "build": build}[mode](job)
    except Exception as e:  # noqa: BLE001  (any failure is recorded for the parent; traceback on stderr)
        from ..errors import LdmDeployError, first_line

        if not isinstance(e, LdmDeployError):  # a user error needs no traceback
            traceback.print_exc()
        first = first_line(e, 500) if str(e).strip() else ""
        result = {"error": f"{type(e).__name__}: {first}"[:500]}
    Path(job["result"]).write_text(json.dumps(result, default=float))
    return 0 if "error" not in result else 1


if __name__ == "__main__":
    sys.exit(main())
