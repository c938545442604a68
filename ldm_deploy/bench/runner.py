"""``ldm-bench run``: check variants, build missing artifacts, measure each variant in its own
process, generate quality images (locally or on Ray), score them and write the results
directory atomically (a crashed run leaves nothing that looks complete)."""

from __future__ import annotations

import os
import platform
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from ..artifact import (
    _TMP_PREFIX,
    _remove_stale_temps,
    library_versions,
    utc_now,
    write_json,
)
from ..errors import LdmDeployError
from .prepare import build_all, needed_builds, run_worker
from .suite import Suite, Variant

EXTRA_VERSIONS = ("psutil", "matplotlib", "ray", "optimum", "optimum-onnx", "nvidia-ml-py", "scipy", "tqdm")


@contextmanager
def results_dir(out: Path, overwrite: bool) -> Iterator[Path]:
    """A hidden sibling to write into, renamed to ``out`` only when the block succeeds."""
    out = out.absolute()
    if out.exists() and not overwrite:
        raise LdmDeployError(f"{out} already exists (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(out)
    tmp = out.parent / f"{_TMP_PREFIX}{out.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    (tmp / ".pid").write_text(str(os.getpid()))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    (tmp / ".pid").unlink()
    old = out.parent / f"{_TMP_PREFIX}{out.name}-old-{uuid.uuid4().hex[:8]}"
    if out.exists():
        os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def machine_info() -> dict[str, Any]:
    import psutil

    from .measure import _Nvml

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    nvml = _Nvml()
    return {"platform": platform.platform(), "cpu": cpu, "logical_cpus": os.cpu_count(),
            "physical_cpus": psutil.cpu_count(logical=False), "memory_bytes": psutil.virtual_memory().total,
            "gpu": str(nvml.name) if nvml.handle is not None else None,
            "gpu_note": None if nvml.handle is not None else nvml.note}


def default_threads() -> int:
    import psutil

    return int(psutil.cpu_count(logical=False) or os.cpu_count() or 1)


def check_variant(v: Variant, tmp: Path) -> str | None:
    """Why ``v`` cannot run here (None if it can), asked in the variant's own interpreter."""
    if not v.python or os.path.abspath(v.python) == os.path.abspath(sys.executable):  # (venv pythons are symlinks)
        from .variants import unavailable_reason

        return unavailable_reason(v.kind, v.options)
    res = run_worker("check", {"kind": v.kind, "options": v.options}, tmp, python=v.python, timeout=300)
    if "error" in res:
        return f"checking in {v.python} failed: {res['error']}"
    return res["reason"]


def _loadavg() -> float | None:
    """1-minute system load average (other processes competing for the CPUs show up here)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_suite(suite: Suite, out: Path, work_dir: Path | None = None, ray: str | None = None,
              overwrite: bool = False, rebuild: bool = False, progress: bool = True, command: str = "") -> dict[str, Any]:
    """Run ``suite`` and write ``out`` (results.json, results.csv, results.md, latency.png, pareto.png)."""
    from .report import render_all

    started, t_start, load_start = utc_now(), time.perf_counter(), _loadavg()
    s = dict(suite.settings)
    threads = s["threads"] or default_threads()
    s["threads_used"] = threads
    with results_dir(out, overwrite) as tmp_out, _work(work_dir) as work:
        reasons = {v.name: check_variant(v, work) for v in suite.variants}
        for name, why in reasons.items():
            if why:
                _log(f"[skip] {name}: {why}")
        runnable = {n for n, why in reasons.items() if not why}
        builds = build_all(suite, needed_builds(suite, runnable), work / "artifacts" if work_dir is None else work,
                           rebuild, _log)
        qjob = _quality_job(suite)
        rows = []
        for i, v in enumerate(suite.variants, 1):
            row: dict[str, Any] = {"name": v.name, "kind": v.kind, "spec": v.to_dict(), "build": builds.get(v.name)}
            if reasons[v.name]:
                rows.append({**row, "status": "skipped", "reason": reasons[v.name]})
                continue
            _log(f"[{i}/{len(suite.variants)}] {v.name}")
            local_q = qjob if qjob is not None and (ray is None or v.python) else None
            job = {"variant": v.to_dict(), "settings": s, "threads": threads, "quality": local_q,
                   "images": str(work / f"images-{v.name}.npy"), "progress": progress}
            res = run_worker("run", job, work, python=v.python)
            if "error" in res:
                _log(f"[fail] {v.name}: {res['error']}")
                rows.append({**row, "status": "failed", "reason": res["error"]})
                continue
            rows.append({**row, "status": "ok", **res})
        if qjob is not None:
            _quality(suite, qjob, rows, work, s, threads, ray, progress)
        results = {"format": "ldm-bench-results", "format_version": 1, "suite": suite.to_dict(),
                   "suite_file": str(suite.path), "command": command, "started": started, "finished": utc_now(),
                   "wall_s": time.perf_counter() - t_start,
                   "machine": machine_info() | {"loadavg_1min_start": load_start, "loadavg_1min_end": _loadavg()},
                   "versions": library_versions() | library_versions(EXTRA_VERSIONS), "ray": ray,
                   "threads": threads, "variants": rows}
        results["suite"]["settings"] = s
        write_json(tmp_out / "results.json", results)
        render_all(results, tmp_out)
    return results


@contextmanager
def _work(work_dir: Path | None) -> Iterator[Path]:
    if work_dir is not None:
        work_dir.mkdir(parents=True, exist_ok=True)
        yield work_dir
        return
    tmp = Path(tempfile.mkdtemp(prefix="ldm-bench-work-"))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _quality_job(suite: Suite) -> dict[str, Any] | None:
    from .quality import chunks, quality_prompts

    q = suite.quality
    if q is None:
        return None
    prompts = quality_prompts(q)
    return {"prompts": prompts, "chunks": chunks(len(prompts), q["batch"], q["seed"]), "steps": q["steps"],
            "guidance": q["guidance"]}


def _quality(suite: Suite, qjob: dict[str, Any], rows: list[dict[str, Any]], work: Path, s: dict[str, Any],
             threads: int, ray: str | None, progress: bool) -> None:
    """Ray generation for the variants that did not generate locally, then scoring of all."""
    from tqdm.auto import tqdm

    from .quality import score

    q = dict(suite.quality or {})
    ok = [r for r in rows if r["status"] == "ok"]
    for r in ok:
        if "quality_images" in r:
            continue
        from .shard import generate_on_ray

        _log(f"[ray] {r['name']}: {len(qjob['chunks'])} chunks on {ray}")
        t0 = time.perf_counter()
        with tqdm(total=len(qjob["chunks"]), desc=f"{r['name']} quality images (ray)", leave=False,
                  disable=not progress) as bar:
            images, shards = generate_on_ray(str(ray), r["spec"], s, threads, qjob, on_chunk=bar.update)
        np.save(work / f"images-{r['name']}.npy", images)
        r["quality_images"] = {"source": "ray", "address": ray, "shards": shards, "n": len(images),
                               "seconds": time.perf_counter() - t0}
    images = {r["name"]: np.load(work / f"images-{r['name']}.npy") for r in ok}
    ref = images.get(q["reference"]) if q["reference"] else None
    classifier = None
    if q["prompts"] == "shapes" and ok:
        from ..quality import load_default_classifier

        classifier = load_default_classifier()
    for r in tqdm(ok, desc="scoring quality", leave=False, disable=not progress):
        other = ref if r["name"] != q["reference"] else None
        r["quality"] = score(images[r["name"]], qjob["prompts"], q, other, classifier)
