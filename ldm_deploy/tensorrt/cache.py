"""Engine cache inside an artifact (pure: no tensorrt, no numpy).

Layout::

    ARTIFACT/engines/index.json                  every engine built into this artifact
    ARTIFACT/engines/<component>-<digest>.plan   a serialized TensorRT engine
    ARTIFACT/engines/<component>-<digest>.json   its sidecar: the full key, plan sha256, build info

``<digest>`` is a hash of the :class:`EngineKey`: the component's ONNX hash (from the manifest),
the TensorRT version, the GPU name and compute capability, the profile shapes, the precision and
the builder flags. An engine is only ever deserialized when its recorded key equals the key
computed for this machine and artifact and its plan file still has the recorded sha256.

``manifest.json`` is never rewritten (its hashes describe the exported files); every write here
goes to a temporary file that is renamed into place, under a lock file, so an interrupted or
concurrent build never leaves a half-written plan or index behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ..artifact import Artifact, sha256_file, utc_now
from ..errors import LdmDeployError

ENGINES_DIR = "engines"
INDEX = "index.json"
INDEX_FORMAT = "ldm-deploy-engines"
INDEX_VERSION = 1

# Where a plan can be deserialized at all (TensorRT plans are tied to the TensorRT version and GPU).
ENV_FIELDS = ("tensorrt_version", "gpu_name", "compute_capability")
# What the plan was built from and how.
BUILD_FIELDS = ("onnx_sha256", "profile", "precision", "flags")


@dataclass(frozen=True)
class EngineKey:
    component: str
    onnx_sha256: str
    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # "major.minor", e.g. "8.9"
    profile: dict[str, Any] = field(default_factory=dict)  # profiles.profile_to_json
    precision: str = "fp16"
    flags: dict[str, Any] = field(default_factory=dict)  # builder flags that change the plan

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))  # tuples -> lists: the canonical JSON form

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EngineKey":
        try:
            return cls(**{k: d[k] for k in cls.__dataclass_fields__})
        except KeyError as e:
            raise LdmDeployError(f"engine record lacks key field {e}") from None

    def digest(self) -> str:
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def filename(self) -> str:
        return f"{self.component}-{self.digest()}.plan"

    def environment(self) -> str:
        return f"TensorRT {self.tensorrt_version} on {self.gpu_name} (compute capability {self.compute_capability})"


def key_differences(expected: EngineKey, found: EngineKey) -> list[str]:
    """Human-readable differences, e.g. ``["precision: fp16 (engine) != int8 (wanted)"]``."""
    a, b = found.to_dict(), expected.to_dict()
    out = []
    for k in ("component", *ENV_FIELDS, *BUILD_FIELDS):
        if a[k] != b[k]:
            fa, fb = (_short(a[k]), _short(b[k])) if k != "onnx_sha256" else (a[k][:12], b[k][:12])
            out.append(f"{k}: {fa} (engine) != {fb} (wanted)")
    return out


def _short(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v, sort_keys=True, separators=(",", ":"))


def classify(expected: EngineKey, found: EngineKey) -> str:
    """``fresh`` (same key), ``foreign`` (another TensorRT version or GPU: cannot be loaded here)
    or ``stale`` (built here, but from another ONNX file or with other shapes/precision/flags)."""
    if found.to_dict() == expected.to_dict():
        return "fresh"
    if any(getattr(found, f) != getattr(expected, f) for f in ENV_FIELDS):
        return "foreign"
    return "stale"


def onnx_digest(art: Artifact, component: str) -> str:
    """The sha256 recorded in the manifest for a component's ONNX file; with external data
    (several files) a hash over all of them."""
    files = art.manifest.get("files", {})
    rels = sorted(art.component_files(component)) if component in art.components else []
    if not rels or any(r not in files for r in rels):
        raise LdmDeployError(f"the manifest of {art.path} records no hash for component '{component}'")
    if len(rels) == 1:
        return files[rels[0]]["sha256"]
    h = hashlib.sha256()
    for r in rels:
        h.update(f"{r}:{files[r]['sha256']}\n".encode())
    return h.hexdigest()


# --- files -----------------------------------------------------------------------------------
def engines_dir(artifact: Path | str) -> Path:
    return Path(artifact) / ENGINES_DIR


def atomic_write(path: Path, data: bytes | bytearray | memoryview | Any) -> None:
    """Write ``data`` (anything with the buffer protocol) to a temporary sibling, fsync it and
    rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write(path, (json.dumps(data, indent=2) + "\n").encode())


@contextlib.contextmanager
def locked(artifact: Path | str) -> Iterator[Path]:
    """Exclusive lock on ``ARTIFACT/engines/.lock`` (a no-op where fcntl does not exist)."""
    d = engines_dir(artifact)
    d.mkdir(exist_ok=True)
    with open(d / ".lock", "a+") as f:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            yield d
            return
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield d
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def read_index(artifact: Path | str) -> dict[str, Any]:
    p = engines_dir(artifact) / INDEX
    if not p.is_file():
        return {"format": INDEX_FORMAT, "format_version": INDEX_VERSION, "engines": {}}
    try:
        idx = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise LdmDeployError(f"{p} is not valid JSON ({e}); delete {p.parent} and rebuild with ldm-build") from None
    if idx.get("format") != INDEX_FORMAT or not isinstance(idx.get("engines"), dict):
        raise LdmDeployError(f"{p} is not an ldm-deploy engine index")
    return idx


def entries(artifact: Path | str, component: str | None = None) -> list[dict[str, Any]]:
    """Index entries (``file``, ``key``, ``plan_sha256``, ``bytes``, ``built``...), newest first."""
    out = [dict(e, file=name) for name, e in read_index(artifact)["engines"].items()
           if component is None or e.get("key", {}).get("component") == component]
    return sorted(out, key=lambda e: e.get("built", ""), reverse=True)


def record_engine(artifact: Path | str, key: EngineKey, plan: Any, info: dict[str, Any] | None = None,
                  replace_superseded: bool = True) -> Path:
    """Store a built plan: plan file, sidecar, then the index entry, each written atomically.
    Engines of the same component built for the same TensorRT version and GPU but with another key
    (stale ones) are removed when ``replace_superseded``; engines for other GPUs are kept."""
    with locked(artifact) as d:
        plan_path = d / key.filename
        atomic_write(plan_path, plan)
        entry = {"key": key.to_dict(), "digest": key.digest(), "plan_sha256": sha256_file(plan_path),
                 "bytes": plan_path.stat().st_size, "built": utc_now(), **(info or {})}
        atomic_write_json(plan_path.with_suffix(".json"), entry)
        idx = read_index(artifact)
        if replace_superseded:
            for name, e in list(idx["engines"].items()):
                old = EngineKey.from_dict(e["key"])
                if name != key.filename and old.component == key.component and classify(key, old) == "stale":
                    del idx["engines"][name]
                    (d / name).unlink(missing_ok=True)
                    (d / name).with_suffix(".json").unlink(missing_ok=True)
        idx["engines"][key.filename] = entry
        atomic_write_json(d / INDEX, idx)
    return plan_path


@dataclass
class Lookup:
    """Result of looking an engine up: ``status`` is fresh | missing | stale | foreign | corrupt."""

    status: str
    path: Path | None = None
    entry: dict[str, Any] | None = None
    reasons: list[str] = field(default_factory=list)

    def message(self, component: str) -> str:
        why = "; ".join(self.reasons)
        return {
            "missing": f"no TensorRT engine for {component} in this artifact",
            "stale": f"the {component} engine is stale ({why})",
            "foreign": f"the {component} engine was built for another machine ({why})",
            "corrupt": f"the {component} engine file is corrupt or modified ({why})",
        }.get(self.status, f"{component} engine is {self.status}")


def check_plan(artifact: Path | str, entry: dict[str, Any]) -> list[str]:
    """Problems with a recorded plan file (missing, size or sha256 mismatch, sidecar mismatch)."""
    d = engines_dir(artifact)
    p = d / entry["file"]
    if not p.is_file():
        return [f"{p} is missing"]
    if p.stat().st_size != entry.get("bytes") or sha256_file(p) != entry.get("plan_sha256"):
        return [f"{p} does not match the sha256 recorded in {d / INDEX}"]
    side = p.with_suffix(".json")
    try:
        sidecar = json.loads(side.read_text())
    except (OSError, json.JSONDecodeError):
        return [f"sidecar {side} is missing or unreadable"]
    if sidecar.get("key") != entry.get("key") or sidecar.get("plan_sha256") != entry.get("plan_sha256"):
        return [f"sidecar {side} disagrees with {d / INDEX}"]
    return []


def lookup(artifact: Path | str, expected: EngineKey, verify: bool = True) -> Lookup:
    """Find the engine built with exactly ``expected``; otherwise say why the closest is unusable."""
    found = entries(artifact, expected.component)
    for e in found:
        if e.get("key") == expected.to_dict():
            problems = check_plan(artifact, e) if verify else []
            if problems:
                return Lookup("corrupt", engines_dir(artifact) / e["file"], e, problems)
            return Lookup("fresh", engines_dir(artifact) / e["file"], e)
    if not found:
        return Lookup("missing")
    # prefer one built for this machine (stale) over foreign ones when explaining
    ranked = sorted(found, key=lambda e: classify(expected, EngineKey.from_dict(e["key"])) != "stale")
    best = ranked[0]
    k = EngineKey.from_dict(best["key"])
    return Lookup(classify(expected, k), engines_dir(artifact) / best["file"], best, key_differences(expected, k))


def select_for_runtime(artifact: Path | str, component: str, environment: dict[str, str], onnx_sha256: str,
                       precision: str | None = None, verify: bool = True) -> Lookup:
    """The newest engine of ``component`` that this machine may load: same TensorRT version, GPU
    and compute capability, built from the artifact's current ONNX file (and ``precision`` if
    given). Anything else is refused with the reasons, never deserialized."""
    found = entries(artifact, component)
    if not found:
        return Lookup("missing")
    reasons: list[str] = []
    for e in found:
        k = EngineKey.from_dict(e["key"])
        diffs = [f"{f}: {getattr(k, f)} (engine) != {environment[f]} (this machine)" for f in ENV_FIELDS
                 if str(getattr(k, f)) != str(environment[f])]
        if diffs:
            reasons.append(f"{e['file']}: " + ", ".join(diffs))
            continue
        if k.onnx_sha256 != onnx_sha256:
            reasons.append(f"{e['file']}: built from another {component} ONNX file (sha256 {k.onnx_sha256[:12]}, "
                           f"artifact has {onnx_sha256[:12]})")
            continue
        if precision is not None and k.precision != precision:
            reasons.append(f"{e['file']}: precision {k.precision}, wanted {precision}")
            continue
        problems = check_plan(artifact, e) if verify else []
        if problems:
            return Lookup("corrupt", engines_dir(artifact) / e["file"], e, problems)
        return Lookup("fresh", engines_dir(artifact) / e["file"], e)
    foreign = all("(this machine)" in r for r in reasons)
    return Lookup("foreign" if foreign else "stale", None, None, reasons)
