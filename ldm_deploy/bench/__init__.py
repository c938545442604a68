"""Benchmark suites (``ldm-bench``): latency per component and end to end, memory, artifact size
and quality across variants of one model.

* :mod:`.suite` / :mod:`.schema` / :mod:`.locate` - suite files (TOML), validated up front with
  the offending line named;
* :mod:`.variants` - runners per variant kind (runtime artifact, diffusers + torch, Optimum);
* :mod:`.prepare` - building declared artifacts (export / quantize / TensorRT engines);
* :mod:`.measure` - timing statistics, RSS (psutil) and device memory (NVML) sampling;
* :mod:`.worker` - one variant in its own process;
* :mod:`.quality` - prompts, seeded latents, chunked generation, scoring via :mod:`ldm_deploy.quality`;
* :mod:`.shard` - quality-image generation sharded over Ray;
* :mod:`.runner` - the whole run; :mod:`.report` / :mod:`.plots` - CSV, markdown, PNG; :mod:`.cli`.
"""

from __future__ import annotations

from .suite import Suite, SuiteError, Variant, load_suite

__all__ = ["Suite", "SuiteError", "Variant", "load_suite", "run_suite"]


def __getattr__(name: str):  # type: ignore[no-untyped-def]
    if name == "run_suite":
        from .runner import run_suite

        return run_suite
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
