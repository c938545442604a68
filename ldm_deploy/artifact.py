"""Artifact directories: written atomically, described by ``manifest.json``.

An artifact is complete exactly when its directory exists under its final name and holds a
``manifest.json``: a stage builds it in a hidden temporary sibling and renames it into place at
the end, so an interrupted stage (even by SIGKILL) never leaves something that looks finished.

Torch-free: the runtime reads artifacts with this module.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import shutil
import sys
import uuid
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable

from .errors import LdmDeployError
from .specs import ComponentSpec, ShapeRanges

MANIFEST = "manifest.json"
FORMAT = "ldm-deploy-artifact"
FORMAT_VERSION = 1
_TMP_PREFIX = ".ldm-tmp-"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def hash_tree(root: Path, skip: Iterable[str] = (MANIFEST,)) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file under ``root`` (relative posix paths)."""
    out: dict[str, dict[str, Any]] = {}
    skip = set(skip)
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel not in skip:
            out[rel] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    return out


def library_versions(names: Iterable[str] = (
    "ldm-deploy", "torch", "diffusers", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu",
    "onnxscript", "onnxconverter-common", "tokenizers", "numpy", "tensorrt",
)) -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for n in names:
        try:
            versions[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            pass
    return versions


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class ArtifactWriter:
    """Context manager that builds an artifact in a temporary sibling directory and renames it to
    ``out`` on success (removing the temporary directory on failure)::

        with ArtifactWriter(out, overwrite=False) as w:
            (w.path / "unet").mkdir(); ...
            w.manifest.update(...)
        # out/ now exists with manifest.json
    """

    def __init__(self, out: Path | str, overwrite: bool = False):
        self.out = Path(out).absolute()
        self.overwrite = overwrite
        self.manifest: dict[str, Any] = {"format": FORMAT, "format_version": FORMAT_VERSION}
        if self.out.exists() and not overwrite:
            raise LdmDeployError(f"output {out} already exists (pass --overwrite to replace it)")
        if self.out.exists() and not self.out.is_dir():
            raise LdmDeployError(f"output {out} exists and is not a directory")
        self.path = self.out.parent / f"{_TMP_PREFIX}{self.out.name}-{uuid.uuid4().hex[:8]}"

    def __enter__(self) -> "ArtifactWriter":
        self.out.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(self.out)
        self.path.mkdir()
        (self.path / ".pid").write_text(str(os.getpid()))
        return self

    def __exit__(self, exc_type, exc, tb) -> None:  # type: ignore[no-untyped-def]
        if exc_type is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            return
        (self.path / ".pid").unlink(missing_ok=True)
        self.manifest.setdefault("created", utc_now())
        self.manifest["files"] = hash_tree(self.path)
        write_json(self.path / MANIFEST, self.manifest)
        if self.out.exists():  # overwrite: move the old one aside first, then swap
            old = self.out.parent / f"{_TMP_PREFIX}{self.out.name}-old-{uuid.uuid4().hex[:8]}"
            os.rename(self.out, old)
            os.rename(self.path, self.out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(self.path, self.out)


def _remove_stale_temps(out: Path) -> None:
    """Remove temporary directories left by killed runs targeting the same output."""
    for p in out.parent.glob(f"{_TMP_PREFIX}{out.name}-*"):
        pid_file = p / ".pid"
        try:
            pid = int(pid_file.read_text())
        except (OSError, ValueError):
            pid = -1
        if pid > 0 and _alive(pid) and pid != os.getpid():
            continue
        shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


@dataclass
class Artifact:
    """A read-only view of a finished artifact directory."""

    path: Path
    manifest: dict[str, Any]

    @classmethod
    def open(cls, path: Path | str) -> "Artifact":
        path = Path(path)
        if not path.is_dir():
            raise LdmDeployError(f"artifact directory {path} does not exist")
        mf = path / MANIFEST
        if not mf.is_file():
            raise LdmDeployError(f"{path} is not an ldm-deploy artifact (no {MANIFEST})")
        try:
            manifest = json.loads(mf.read_text())
        except json.JSONDecodeError as e:
            raise LdmDeployError(f"{mf} is not valid JSON: {e}") from None
        if manifest.get("format") != FORMAT:
            raise LdmDeployError(f"{mf} is not an ldm-deploy manifest")
        return cls(path, manifest)

    @property
    def components(self) -> dict[str, dict[str, Any]]:
        return self.manifest.get("components", {})

    def spec(self, component: str) -> ComponentSpec:
        return ComponentSpec.from_dict(self.components[component]["spec"])

    def model_file(self, component: str) -> Path:
        if component not in self.components:
            raise LdmDeployError(f"artifact {self.path} has no component '{component}'")
        return self.path / self.components[component]["file"]

    @property
    def shape_ranges(self) -> ShapeRanges:
        return ShapeRanges.from_dict(self.manifest["shape_ranges"])

    @property
    def io_dtype(self) -> str:
        return self.manifest.get("io_dtype", "float32")

    def verify(self, files: Iterable[str] | None = None) -> None:
        """Check sizes and sha256 of the listed files (default: all) against the manifest."""
        recorded = self.manifest.get("files", {})
        for rel in files if files is not None else recorded:
            if rel not in recorded:
                raise LdmDeployError(f"{rel} is not recorded in {self.path / MANIFEST}")
            p = self.path / rel
            if not p.is_file():
                raise LdmDeployError(f"artifact file {p} is missing")
            if p.stat().st_size != recorded[rel]["bytes"] or sha256_file(p) != recorded[rel]["sha256"]:
                raise LdmDeployError(f"artifact file {p} does not match the hash in its manifest (corrupt or modified)")

    def component_files(self, component: str) -> list[str]:
        """Files of one component (its directory), relative to the artifact."""
        prefix = Path(self.components[component]["file"]).parent.as_posix() + "/"
        return [rel for rel in self.manifest.get("files", {}) if rel.startswith(prefix)]


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far."""
    import resource

    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb if sys.platform == "darwin" else kb * 1024
