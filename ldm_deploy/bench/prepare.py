"""Build the artifacts a suite declares with ``build = {...}``: ``export`` (ldm-export's API),
``quantize`` (ldm-quantize's API) or ``engines`` (``ldm-build`` into the source artifact).

Artifacts go to a work directory under a name keyed by a fingerprint of the recipe, its source
and the package version, so a kept ``--work-dir`` is reused only for identical inputs. Each build
runs in a worker subprocess (the bench process stays small) and is atomic (the exporters write
through :class:`~ldm_deploy.artifact.ArtifactWriter`).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import LdmDeployError
from .suite import Suite, Variant


def needed_builds(suite: Suite, runnable: set[str]) -> list[Variant]:
    """Runtime variants with a recipe that a runnable variant needs (itself or as a source), in order."""
    needed = set(runnable)
    for v in reversed(suite.variants):
        if v.name in needed and v.build and v.build["kind"] in ("quantize", "engines"):
            needed.add(v.build[v.build["kind"]])
    return [v for v in suite.variants if v.build and v.name in needed]


def _model_fingerprint(model: str) -> list[Any]:
    from ..models import CONFIG_DIR, EMBEDDED, random_model_names

    if model in random_model_names():
        root = CONFIG_DIR / model
    elif model in EMBEDDED:
        root = EMBEDDED[model]
    elif Path(model).is_dir():
        root = Path(model)
    else:
        return [model]
    return [model] + [(p.relative_to(root).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
                      for p in sorted(root.rglob("*")) if p.is_file()]


def fingerprint(recipe: dict[str, Any], source: Path | None) -> str:
    from importlib import metadata

    try:
        version = metadata.version("ldm-deploy")
    except metadata.PackageNotFoundError:
        version = "unknown"
    # a quantize/engines recipe names its source variant; the source's manifest hash stands for it
    named = recipe["kind"] if source is not None else None
    parts: dict[str, Any] = {"recipe": {k: v for k, v in recipe.items() if k != named}, "version": version}
    if recipe["kind"] == "export":
        parts["model"] = _model_fingerprint(recipe["export"])
    if source is not None:
        parts["source"] = hashlib.sha256((source / "manifest.json").read_bytes()).hexdigest()
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def build_all(suite: Suite, variants: list[Variant], work_dir: Path, rebuild: bool = False,
              log: Any = print) -> dict[str, dict[str, Any]]:
    """Build (or reuse) each recipe; sets ``options["artifact"]`` of the variants. Returns build info."""
    info: dict[str, dict[str, Any]] = {}
    built: dict[str, Path] = {}  # fingerprint -> artifact of this run: identical recipes build once
    work_dir.mkdir(parents=True, exist_ok=True)
    for v in variants:
        recipe = dict(v.build or {})
        kind = recipe["kind"]
        source = None
        if kind in ("quantize", "engines"):
            ref = recipe[kind]
            src_variant = next((s for s in suite.variants if s.name == ref), None)
            source = Path(src_variant.options["artifact"] if src_variant else ref)
        key = fingerprint(recipe, source)
        out = source if kind == "engines" else built.get(key, work_dir / f"{v.name}-{key}")
        assert out is not None
        entry: dict[str, Any] = {"recipe": recipe, "artifact": str(out)}
        if kind != "engines" and key in built:
            log(f"[build] {v.name}: same recipe as an artifact built in this run, reusing {out}")
            entry.update(reused=True, seconds=0.0)
        elif kind != "engines" and (out / "manifest.json").is_file() and not rebuild:
            log(f"[build] {v.name}: reusing {out}")
            entry.update(reused=True, seconds=0.0)
        else:
            log(f"[build] {v.name}: {kind} -> {out}")
            t0 = time.perf_counter()
            res = run_worker("build", {"recipe": recipe, "source": str(source) if source else None, "out": str(out)},
                             work_dir)
            if "error" in res:
                raise LdmDeployError(f"building the artifact of variant '{v.name}' failed: {res['error']}")
            entry.update(reused=False, seconds=round(time.perf_counter() - t0, 2), **res)
        v.options["artifact"] = str(out)
        built.setdefault(key, out)
        info[v.name] = entry
    return info


def run_worker(mode: str, job: dict[str, Any], tmp: Path, python: str = "", env: dict[str, str] | None = None,
               timeout: float | None = None) -> dict[str, Any]:
    """Run ``python -m ldm_deploy.bench.worker MODE`` on ``job`` (its output, progress bars included, is
    shown) and return the result it wrote."""
    import os
    import tempfile

    fd, name = tempfile.mkstemp(prefix=f"ldm-bench-{mode}-", suffix=".json", dir=tmp)
    os.close(fd)
    job_file = Path(name)
    result_file = job_file.with_suffix(".result.json")
    job = {**job, "result": str(result_file)}
    job_file.write_text(json.dumps(job, default=str))
    run_env = dict(os.environ, **(env or {}))
    if python:  # another interpreter: make this package importable there
        root = str(Path(__file__).resolve().parents[2])
        run_env["PYTHONPATH"] = os.pathsep.join(p for p in (root, run_env.get("PYTHONPATH", "")) if p)
    try:
        proc = subprocess.run([python or sys.executable, "-m", "ldm_deploy.bench.worker", mode, str(job_file)],
                              check=False, env=run_env, timeout=timeout)
        if result_file.is_file():
            return json.loads(result_file.read_text())
        return {"error": f"worker exited with code {proc.returncode} and no result (killed, out of memory?)"}
    finally:
        job_file.unlink(missing_ok=True)
        result_file.unlink(missing_ok=True)


def build_now(recipe: dict[str, Any], source: Path | None, out: Path) -> dict[str, Any]:
    """The build itself (runs inside a worker)."""
    def log(s: str) -> None:
        print(s, file=sys.stderr, flush=True)

    kind = recipe["kind"]
    if kind == "export":
        from ..export.exporter import ExportOptions, export_model

        keys = ("fp16", "opset", "height", "width", "batch", "max_batch", "min_size", "max_size", "optimize",
                "attention", "exporter", "validate", "deepcache")
        m = export_model(recipe["export"], out, ExportOptions(**{k: recipe[k] for k in keys}), overwrite=True, log=log)
        return {"stats": m.get("stats", {})}
    if kind == "quantize":
        from ..quantize.build import quantize_artifact

        keys = ("target", "method", "components", "calib_size", "calib_steps", "calib_per_run", "percentile",
                "holdout", "quality_prompts", "seed")
        px = recipe["calib_size_px"]
        m = quantize_artifact(source, out, calib_height=px, calib_width=px, overwrite=True, log=log,
                              **{k: recipe[k] for k in keys})
        return {"stats": m.get("stats", {}), "quality": m.get("quantization", {}).get("quality", {})}
    args = [sys.executable, "-m", "ldm_deploy.tensorrt.cli", str(out), "--precision", recipe["precision"]]
    args += ["--batch", recipe["batch"]] if recipe["batch"] else []
    args += ["--size", recipe["size"]] if recipe["size"] else []
    args += ["--static"] if recipe["static"] else []
    proc = subprocess.run(args, check=False, stdout=sys.stderr)
    if proc.returncode:
        raise LdmDeployError(f"ldm-build exited with code {proc.returncode}")
    return {}
