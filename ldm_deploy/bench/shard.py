"""Quality-image generation sharded over a Ray cluster (``ldm-bench run --ray ADDRESS``).

The chunks of a quality run (fixed prompt ranges with fixed seeds, see
:func:`~ldm_deploy.bench.quality.chunks`) are dealt out to Ray tasks; each task loads the variant
once and generates its chunks with the same code as a local run, so the images - and the metrics -
do not depend on the sharding. Artifact and model paths must be readable on the Ray nodes (a shared
file system, or a local instance: ``--ray local``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np


def _generate(variant: dict[str, Any], settings: dict[str, Any], threads: int, prompts: list[str],
              parts: list[tuple[int, int, list[int]]], steps: int, guidance: float) -> list[np.ndarray]:
    """Ray task body: one variant, several chunks (returned one array per chunk)."""
    from .quality import generate_chunks
    from .variants import make_runner

    runner = make_runner(variant["kind"], variant["options"], settings, threads)
    return [generate_chunks(runner, prompts, [p], steps, guidance, settings["height"], settings["width"])
            for p in parts]


def uses_gpu(variant: dict[str, Any]) -> bool:
    o = variant["options"]
    if variant["kind"] == "runtime":
        from ..runtime.backends import get_backend

        return get_backend(o["backend"]).device == "cuda"
    return o.get("device") == "cuda" or o.get("provider") in ("cuda", "tensorrt")


def connect(address: str) -> Any:
    """``ray`` connected to ``address`` ("local" starts a local instance; "auto" finds a running one)."""
    try:
        import ray
    except ImportError:
        from ..errors import LdmDeployError

        raise LdmDeployError("--ray needs Ray: pip install 'ldm-deploy[ray]'") from None
    if not ray.is_initialized():
        ray.init(address=None if address == "local" else address, include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
    return ray


def generate_on_ray(address: str, variant: dict[str, Any], settings: dict[str, Any], threads: int,
                    q: dict[str, Any], on_chunk: Callable[[int], None] | None = None) -> tuple[np.ndarray, int]:
    """All quality images of one variant, in prompt order, and the number of shards used."""
    ray = connect(address)
    parts = [tuple(p) for p in q["chunks"]]
    gpu = uses_gpu(variant)
    slots = int(ray.cluster_resources().get("GPU" if gpu else "CPU", 0))
    if slots < 1:
        from ..errors import LdmDeployError

        raise LdmDeployError(f"the Ray cluster at {address} has no {'GPU' if gpu else 'CPU'} for variant "
                             f"'{variant['name']}'")
    n_shards = min(len(parts), slots)
    shards = [parts[i::n_shards] for i in range(n_shards)]
    task = ray.remote(num_cpus=1, num_gpus=1 if gpu else 0)(_generate)
    refs = {task.remote(variant, settings, threads, q["prompts"], shard, q["steps"], q["guidance"]): shard
            for shard in shards}
    done: dict[int, np.ndarray] = {}
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        for ref in ready:
            for part, images in zip(refs[ref], ray.get(ref)):
                done[part[0]] = images
            if on_chunk:
                on_chunk(len(refs[ref]))
    return np.concatenate([done[p[0]] for p in parts]), n_shards
