"""Artifact directories: written atomically, described by ``manifest.json``.

An artifact is complete exactly when its directory exists under its final name and holds a
``manifest.json``: a stage builds it in a hidden temporary sibling and renames it into place at
the end, so an interrupted stage (even by SIGKILL) never leaves something that looks finished.

Torch-free: the runtime reads artifacts with this module.
"""

from __future__ import annotations

import ctypes
import datetime as _dt
import errno
import hashlib
import json
import os
import platform
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, fields
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable

from .errors import LdmDeployError, first_line
from .specs import ComponentSpec, ModelDims, ShapeRanges

MANIFEST = "manifest.json"
FORMAT = "ldm-deploy-artifact"
FORMAT_VERSION = 1
_TMP_PREFIX = ".ldm-tmp-"
_ACTIVE: set[Path] = set()  # temporary directories this process's writers are building
_OLD_PREFIX = ".ldm-old-"  # a replaced output, moved aside (never removed as a stale temporary)


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

    Without ``overwrite`` nothing at ``out`` is ever replaced, even what appears there while the
    stage runs (another run, the user): the final rename refuses an existing target
    (:func:`rename_noreplace`) and the stage fails with one line, leaving it untouched.
    """

    def __init__(self, out: Path | str, overwrite: bool = False):
        self.out = Path(out).absolute()
        self.overwrite = overwrite
        self.manifest: dict[str, Any] = {"format": FORMAT, "format_version": FORMAT_VERSION}
        check_output_path(self.out)
        if os.path.lexists(self.out) and not overwrite:
            raise LdmDeployError(f"output {out} already exists (pass --overwrite to replace it)")
        if os.path.lexists(self.out) and not self.out.is_dir():
            raise LdmDeployError(f"output {out} exists and is not a directory")
        self.path = self.out.parent / f"{_TMP_PREFIX}{self.out.name}-{uuid.uuid4().hex[:8]}"

    def __enter__(self) -> "ArtifactWriter":
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            _remove_stale_temps(self.out)
            self.path.mkdir()
            _ACTIVE.add(self.path)
            (self.path / ".pid").write_text(str(os.getpid()))
        except OSError as e:
            _ACTIVE.discard(self.path)
            shutil.rmtree(self.path, ignore_errors=True)
            raise LdmDeployError(f"cannot write {self.out}: {e.strerror or e}") from None
        return self

    def __exit__(self, exc_type, exc, tb) -> None:  # type: ignore[no-untyped-def]
        _ACTIVE.discard(self.path)
        if exc_type is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            return
        try:
            (self.path / ".pid").unlink(missing_ok=True)
            self.manifest.setdefault("created", utc_now())
            self.manifest["files"] = hash_tree(self.path)
            write_json(self.path / MANIFEST, self.manifest)
            self._publish()
        except BaseException:
            shutil.rmtree(self.path, ignore_errors=True)
            raise

    def _publish(self) -> None:
        """Rename the finished directory to ``out``: never over anything (what appeared at ``out``
        meanwhile stays), except the previous output with ``overwrite``, moved aside first."""
        old = None
        if self.overwrite and os.path.lexists(self.out):
            old = self.out.parent / f"{_OLD_PREFIX}{self.out.name}-{uuid.uuid4().hex[:8]}"
            try:
                os.rename(self.out, old)
            except FileNotFoundError:  # removed meanwhile
                old = None
        try:
            rename_noreplace(self.path, self.out)
        except FileExistsError:
            kept = ""
            if old is not None:  # the old output was moved aside and something took its place
                kept = f"; the previous output is kept at {old}"
            raise LdmDeployError(f"output {self.out} appeared while this stage ran and was left untouched; "
                                 f"nothing was written{kept} (pass --overwrite to replace it)") from None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def check_output_path(out: Path | str) -> None:
    """Fail early (one line) when ``out`` cannot be created: its nearest existing ancestor is not
    a directory (an output path under a regular file) or is not writable."""
    out = Path(out).absolute()
    p = out.parent
    while not os.path.lexists(p) and p != p.parent:
        p = p.parent
    if not p.is_dir():
        raise LdmDeployError(f"cannot create {out}: {p} is not a directory")
    if not os.access(p, os.W_OK | os.X_OK):
        raise LdmDeployError(f"cannot create {out}: {p} is not writable")


def _libc_renameat2() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc < 2.28, other libcs
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _libc_renameat2()
_AT_FDCWD, _RENAME_NOREPLACE = -100, 1


def rename_noreplace(src: Path | str, dst: Path | str) -> None:
    """Rename ``src`` to ``dst`` atomically, raising :class:`FileExistsError` when anything
    exists at ``dst`` (POSIX ``rename`` silently replaces an empty directory).

    Linux: ``renameat2(RENAME_NOREPLACE)``. Elsewhere, or on a file system without it, ``dst`` is
    reserved with ``mkdir`` (which fails if it exists) and ``src`` renamed over that empty
    directory: whatever anyone puts into it meanwhile makes the rename fail, so only the
    directory made here can be replaced. Windows' ``rename`` never replaces."""
    src, dst = os.fsencode(src), os.fsencode(dst)
    if _renameat2 is not None:
        if _renameat2(_AT_FDCWD, src, _AT_FDCWD, dst, _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(err, os.strerror(err), os.fsdecode(dst))
    if os.name == "nt":
        os.rename(src, dst)
        return
    os.mkdir(dst)
    try:
        os.rename(src, dst)
    except OSError as e:
        try:
            os.rmdir(dst)
        except OSError:
            pass  # someone wrote into it: theirs now
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fsdecode(dst)) from None
        raise


def _remove_stale_temps(out: Path) -> None:
    """Remove temporary directories left by killed runs targeting the same output."""
    for p in out.parent.glob(f"{_TMP_PREFIX}{out.name}-*"):
        if p in _ACTIVE:  # another writer of this process (a thread) is still building it
            continue
        pid_file = p / ".pid"
        try:
            pid = int(pid_file.read_text())
        except (OSError, ValueError):
            pid = -1
        if pid > 0 and _alive(pid) and pid != os.getpid():
            continue
        if pid < 0 and _age_seconds(p) < 60:  # another run that has not written its .pid yet
            continue
        shutil.rmtree(p, ignore_errors=True)


def _age_seconds(p: Path) -> float:
    try:
        return time.time() - p.stat().st_mtime
    except OSError:
        return 0.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def optimum_layout(path: Path | str) -> bool:
    """Whether ``path`` looks like a Hugging Face Optimum ONNX diffusion export (``model_index.json``
    and ``unet/model.onnx``, no ``manifest.json``): see :mod:`ldm_deploy.interop.optimum`."""
    path = Path(path)
    return (not (path / MANIFEST).is_file() and (path / "model_index.json").is_file()
            and (path / "unet" / "model.onnx").is_file())


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; one :class:`LdmDeployError` line when it is missing, not JSON or
    not an object."""
    if not path.is_file():
        raise LdmDeployError(f"file {path} is missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LdmDeployError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise LdmDeployError(f"{path} is not a JSON object")
    return data


@dataclass
class Artifact:
    """A read-only view of a finished artifact directory.

    Every file is reached through :meth:`file` / :meth:`subdir`, which refuse a path that leaves
    the artifact (a symlink to elsewhere, ``..`` in the manifest), as ONNX Runtime does for
    external data; a missing or malformed manifest entry is one :class:`LdmDeployError` line."""

    path: Path
    manifest: dict[str, Any]

    @classmethod
    def open(cls, path: Path | str) -> "Artifact":
        path = Path(path)
        if not path.is_dir():
            raise LdmDeployError(f"artifact directory {path} does not exist")
        mf = path / MANIFEST
        if not mf.is_file() and optimum_layout(path):
            raise LdmDeployError(
                f"{path} is an Optimum ONNX export, not an ldm-deploy artifact: import it once with "
                f"python -m ldm_deploy.interop.optimum from-optimum {path} OUT, then use OUT")
        if not mf.is_file():
            raise LdmDeployError(f"{path} is not an ldm-deploy artifact (no {MANIFEST})")
        try:
            manifest = json.loads(mf.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise LdmDeployError(f"{mf} is not valid JSON: {e}") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise LdmDeployError(f"{mf} is not an ldm-deploy manifest")
        return cls(path, manifest)

    def _malformed(self, what: str, e: BaseException | None = None) -> LdmDeployError:
        detail = f" ({type(e).__name__}: {first_line(e)})" if e is not None else ""
        return LdmDeployError(f"{self.path / MANIFEST}: {what} is missing or malformed{detail}")

    def require(self, *keys: str) -> None:
        """Fail with one line unless the manifest has all of ``keys``."""
        missing = [k for k in keys if k not in self.manifest]
        if missing:
            raise LdmDeployError(f"{self.path / MANIFEST} lacks {', '.join(missing)} (not a complete artifact)")

    def file(self, rel: str) -> Path:
        """``rel`` inside the artifact; a path that resolves outside it (a symlink out of the
        artifact, ``..``) is refused rather than followed."""
        p = self.path / rel
        target = p.resolve()
        if not target.is_relative_to(self.path.resolve()):
            raise LdmDeployError(f"artifact file {p} leads outside the artifact (to {target}); refusing to follow it")
        return p

    def subdir(self, rel: str) -> Path:
        """The directory ``rel`` inside the artifact, after checking (as :meth:`file`) it and
        every entry under it."""
        d = self.file(rel)
        for p in d.rglob("*") if d.is_dir() else ():
            self.file(p.relative_to(self.path).as_posix())
        return d

    @property
    def components(self) -> dict[str, dict[str, Any]]:
        comps = self.manifest.get("components", {})
        if not isinstance(comps, dict):
            raise self._malformed("components")
        return comps

    def _component(self, component: str) -> dict[str, Any]:
        if component not in self.components:
            raise LdmDeployError(f"artifact {self.path} has no component '{component}'")
        entry = self.components[component]
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str) or "spec" not in entry:
            raise self._malformed(f"component '{component}'")
        return entry

    def spec(self, component: str) -> ComponentSpec:
        try:
            return ComponentSpec.from_dict(self._component(component)["spec"])
        except (KeyError, TypeError, ValueError) as e:
            raise self._malformed(f"the spec of component '{component}'", e) from None

    def model_file(self, component: str) -> Path:
        return self.file(self._component(component)["file"])

    @property
    def shape_ranges(self) -> ShapeRanges:
        try:
            return ShapeRanges.from_dict(self.manifest["shape_ranges"])
        except (KeyError, TypeError, ValueError) as e:
            raise self._malformed("shape_ranges", e) from None

    @property
    def model_dims(self) -> ModelDims:
        try:
            dims = self.manifest["model_dims"]
            return ModelDims(**{f.name: dims[f.name] for f in fields(ModelDims)})
        except (KeyError, TypeError) as e:
            raise self._malformed("model_dims", e) from None

    def check_runtime(self, components: Iterable[str]) -> None:
        """What the runtime reads, checked up front: the shape ranges, model sizes, the
        ``components``' entries, files and specs, and the tokenizer and scheduler folders."""
        self.require("shape_ranges", "model_dims", "components")
        self.shape_ranges, self.model_dims  # noqa: B018 (parsing is the check)
        for c in components:
            self.spec(c)
            self.model_file(c)
        for d in ("tokenizer", "scheduler"):
            self.subdir(d)

    @property
    def io_dtype(self) -> str:
        return self.manifest.get("io_dtype", "float32")

    def verify(self, files: Iterable[str] | None = None) -> None:
        """Check sizes and sha256 of the listed files (default: all) against the manifest."""
        recorded = self.manifest.get("files")
        if not isinstance(recorded, dict):
            raise self._malformed("the list of files and their hashes")
        for rel in files if files is not None else recorded:
            if rel not in recorded:
                raise LdmDeployError(f"{rel} is not recorded in {self.path / MANIFEST}")
            entry = recorded[rel]
            if not isinstance(entry, dict) or not {"bytes", "sha256"} <= entry.keys():
                raise self._malformed(f"the record of {rel}")
            p = self.file(rel)
            if not p.is_file():
                raise LdmDeployError(f"artifact file {p} is missing")
            if p.stat().st_size != entry["bytes"] or sha256_file(p) != entry["sha256"]:
                raise LdmDeployError(f"artifact file {p} does not match the hash in its manifest (corrupt or modified)")

    def component_files(self, component: str) -> list[str]:
        """Files of one component (its directory, its model file first), relative to the artifact."""
        model = self._component(component)["file"]
        prefix = Path(model).parent.as_posix() + "/"
        recorded = self.manifest.get("files")
        return [model] + [rel for rel in recorded or () if rel.startswith(prefix) and rel != model]


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far."""
    import resource

    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb if sys.platform == "darwin" else kb * 1024
