"""Suite files (TOML): parse, check everything before any work starts, and name the bad line.

A suite has a ``[settings]`` table (resolution, batch, steps, guidance, warm-up and repeat counts),
an optional ``[quality]`` table (prompt set, number of images, reference variant) and one
``[[variant]]`` table per variant. Paths are relative to the suite file; ``${VAR}`` and
``${VAR:-default}`` in strings come from the environment. See ``benchmarks/suites/*.toml``.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import LdmDeployError
from ..prompts import read_prompt_file
from .locate import Locator
from .schema import (
    BUILD_KINDS,
    QUALITY,
    SETTINGS,
    VARIANT_COMMON,
    VARIANT_FIELDS,
    check_table,
)

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    try:
        import tomli as tomllib  # type: ignore[no-redef]
    except ModuleNotFoundError:
        tomllib = None  # type: ignore[assignment]

TOP_LEVEL = ("name", "description", "settings", "quality", "variant")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


class SuiteError(LdmDeployError):
    """A bad suite file: the message starts with ``FILE:LINE:``."""


@dataclass
class Variant:
    """One ``[[variant]]``: ``options`` are the kind's checked keys, ``build`` the recipe (or None)."""

    name: str
    kind: str
    options: dict[str, Any]
    build: dict[str, Any] | None = None
    python: str = ""
    description: str = ""
    line: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Variant:
        return cls(**d)


@dataclass
class Suite:
    path: Path
    text: str
    name: str
    description: str
    settings: dict[str, Any]
    quality: dict[str, Any] | None
    variants: list[Variant] = field(default_factory=list)

    @property
    def base(self) -> Path:
        return self.path.parent

    def variant(self, name: str) -> Variant:
        return next(v for v in self.variants if v.name == name)

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "name": self.name, "description": self.description,
                "settings": self.settings, "quality": self.quality,
                "variants": [v.to_dict() for v in self.variants], "text": self.text}


class _Checker:
    """Carries the file name and the line locator for error messages."""

    def __init__(self, path: Path, text: str):
        self.path, self.loc = path, Locator(text)

    def fail(self, msg: str, table: str = "", index: int | None = None, key: str | None = None,
             sub: str | None = None) -> SuiteError:
        return SuiteError(f"{self.path}:{self.loc.line(table, index, key, sub)}: {msg}")

    def table(self, data: Any, fields: dict, where: str, table: str, index: int | None = None,
              sub_of: str | None = None) -> dict[str, Any]:
        if not isinstance(data, dict):
            raise self.fail(f"{where} must be a table", table, index, sub_of)
        values, key, msg = check_table(data, fields, where)
        if msg:
            if sub_of is not None:
                raise self.fail(msg, table, index, sub_of, key)
            raise self.fail(msg, table, index, key)
        return values


def resolve_path(base: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p)


def load_suite(path: str | Path) -> Suite:
    """Read and validate a suite; raises :class:`SuiteError` naming the offending line."""
    path = Path(path)
    if not path.is_file():
        raise SuiteError(f"suite file {path} does not exist")
    text = path.read_text()
    if tomllib is None:
        raise SuiteError("reading suite files on Python 3.10 needs tomli: pip install 'ldm-deploy[bench]'")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        line = re.search(r"line (\d+)", str(e))
        raise SuiteError(f"{path}:{line.group(1) if line else 1}: invalid TOML: {e}") from None
    c = _Checker(path, text)
    for key in data:
        if key not in TOP_LEVEL:
            tbl = key if isinstance(data[key], (dict, list)) else ""
            raise c.fail(f"unknown top-level key or table '{key}' (expected {', '.join(TOP_LEVEL)})",
                         tbl, None if tbl != "variant" else 0, None if tbl else key)
    for key in ("name", "description"):
        if key in data and not isinstance(data[key], str):
            raise c.fail(f"{key} must be a string", "", None, key)
    settings = c.table(data.get("settings", {}), SETTINGS, "[settings]", "settings")
    quality = None
    if "quality" in data:
        quality = c.table(data["quality"], QUALITY, "[quality]", "quality")
    raw_variants = data.get("variant")
    if not isinstance(raw_variants, list) or not raw_variants:
        raise c.fail("a suite needs at least one [[variant]] table")
    base = path.parent
    variants: list[Variant] = []
    for i, raw in enumerate(raw_variants):
        variants.append(_variant(c, raw, i, variants, base, settings))
    if settings["warmup"] < 1 and any(v.options.get("compile") for v in variants):
        raise c.fail("variants with compile = true need warmup >= 1 (the first call compiles)", "settings",
                     None, "warmup")
    if quality is not None:
        _check_quality(c, quality, settings, variants, base)
    _check_batches(c, settings, quality, variants, base)
    name = data.get("name") or path.stem
    return Suite(path, text, name, data.get("description", ""), settings, quality, variants)


def _variant(c: _Checker, raw: Any, i: int, earlier: list[Variant], base: Path, settings: dict) -> Variant:
    where = f"variant #{i + 1}"
    if not isinstance(raw, dict):
        raise c.fail(f"{where} must be a table", "variant", i)
    kind = raw.get("kind")
    if kind not in VARIANT_FIELDS:
        what = f"unknown variant kind {kind!r}" if "kind" in raw else "missing kind"
        raise c.fail(f"{where}: {what} (choose {', '.join(VARIANT_FIELDS)})", "variant", i,
                     "kind" if "kind" in raw else None)
    plain = {k: v for k, v in raw.items() if k != "build" or kind != "runtime"}
    checked = c.table(plain, {**VARIANT_COMMON, **VARIANT_FIELDS[kind]}, where, "variant", i)
    name = checked["name"]
    where = f"variant '{name}'"
    if not _NAME.match(name):
        raise c.fail(f"{where}: names may use letters, digits and _.+- only", "variant", i, "name")
    if any(v.name == name for v in earlier):
        raise c.fail(f"{where}: duplicate variant name", "variant", i, "name")
    options = {k: v for k, v in checked.items() if k in VARIANT_FIELDS[kind]}
    python = checked["python"]
    if python and not (os.path.isfile(python) and os.access(python, os.X_OK)):
        raise c.fail(f"{where}: python {python!r} is not an executable file", "variant", i, "python")
    build = None
    if kind == "runtime":
        build = _runtime_source(c, raw, i, where, options, earlier, base)
    else:
        options["model"] = _check_model(c, options["model"], where, i, base)
        if kind == "diffusers" and options["dtype"] != "fp32" and options["device"] == "cpu":
            raise c.fail(f"{where}: dtype {options['dtype']} needs device = \"cuda\"", "variant", i, "dtype")
    return Variant(name, kind, options, build, python, checked["description"], c.loc.line("variant", i))


def _runtime_source(c: _Checker, raw: dict, i: int, where: str, options: dict, earlier: list[Variant],
                    base: Path) -> dict[str, Any] | None:
    has_build, artifact = "build" in raw, options["artifact"]
    if has_build == bool(artifact):
        raise c.fail(f"{where}: give exactly one of artifact = \"DIR\" or a build recipe", "variant", i,
                     "artifact" if artifact else None)
    if artifact:
        p = resolve_path(base, artifact)
        if not p.is_dir():
            raise c.fail(f"{where}: artifact directory {p} does not exist (and there is no build recipe)",
                         "variant", i, "artifact")
        if not (p / "manifest.json").is_file():
            raise c.fail(f"{where}: {p} is not an ldm-deploy artifact (no manifest.json)", "variant", i, "artifact")
        options["artifact"] = str(p.resolve())
        if options["backend"] == "tensorrt" and not (p / "engines").is_dir():
            raise c.fail(f"{where}: {p} has no TensorRT engines (run ldm-build, or use build = {{ engines = ... }})",
                         "variant", i, "backend")
        return None
    recipe = raw["build"]
    kinds = [k for k in BUILD_KINDS if isinstance(recipe, dict) and k in recipe]
    if len(kinds) != 1:
        raise c.fail(f"{where}: build must be a table with exactly one of {', '.join(BUILD_KINDS)}", "variant", i,
                     "build")
    bkind = kinds[0]
    build = c.table(recipe, BUILD_KINDS[bkind], f"{where}: build", "variant", i, sub_of="build")
    source = build[bkind]
    runtime_names = {v.name for v in earlier if v.kind == "runtime"}
    if bkind == "export":
        build["export"] = _check_model(c, source, where, i, base, key="build", sub="export")
    elif bkind == "quantize" and source not in runtime_names:
        p = resolve_path(base, source)
        if not (p / "manifest.json").is_file():
            raise c.fail(f"{where}: quantize = {source!r} is neither an earlier runtime variant nor an artifact "
                         "directory", "variant", i, "build", "quantize")
        build["quantize"] = str(p.resolve())
    elif bkind == "engines":
        if source not in runtime_names:
            raise c.fail(f"{where}: engines = {source!r} must name an earlier runtime variant", "variant", i,
                         "build", "engines")
        if options["backend"] != "tensorrt":
            raise c.fail(f"{where}: an engines build needs backend = \"tensorrt\"", "variant", i, "build", "engines")
    return {"kind": bkind, **build}


def _check_model(c: _Checker, model: str, where: str, i: int, base: Path, key: str = "model",
                 sub: str | None = None) -> str:
    """A known model name as is, else the resolved pipeline directory."""
    from ..models import known_names

    if model in known_names():
        return model
    p = resolve_path(base, model)
    if not (p / "model_index.json").is_file():
        what = "does not exist" if not p.exists() else "is not a diffusers pipeline directory (no model_index.json)"
        raise c.fail(f"{where}: model {model!r} is not a known name ({', '.join(known_names())}) and {p} {what}",
                     "variant", i, key, sub)
    return str(p.resolve())


def _check_quality(c: _Checker, q: dict, settings: dict, variants: list[Variant], base: Path) -> None:
    for key in ("steps", "guidance", "batch"):
        if q[key] is None:
            q[key] = settings[key]
    names = [v.name for v in variants]
    if q["reference"] and q["reference"] not in names:
        raise c.fail(f"[quality]: reference {q['reference']!r} is not a variant ({', '.join(names)})", "quality",
                     None, "reference")
    if q["prompts"] != "shapes":
        p = resolve_path(base, q["prompts"])
        if not p.is_file():
            raise c.fail(f"[quality]: prompt file {p} does not exist (or use prompts = \"shapes\")", "quality", None,
                         "prompts")
        prompts = read_prompts(p)
        if len(prompts) < q["n"]:
            raise c.fail(f"[quality]: n = {q['n']} but {p} has only {len(prompts)} prompts", "quality", None, "n")
        q["prompts"] = str(p.resolve())
    for key in ("reference_images", "clip_model"):
        if q[key]:
            p = resolve_path(base, q[key])
            if not p.is_dir():
                raise c.fail(f"[quality]: {key} directory {p} does not exist", "quality", None, key)
            q[key] = str(p.resolve())


def _check_batches(c: _Checker, settings: dict, quality: dict | None, variants: list[Variant], base: Path) -> None:
    """Batch and image size against the exported ranges of existing artifacts and export recipes."""
    from ..artifact import Artifact

    batches = [("settings", settings["batch"])] + ([("quality", quality["batch"])] if quality else [])
    for i, v in enumerate(variants):
        if v.kind != "runtime":
            continue
        if v.build is None:
            ranges = Artifact.open(v.options["artifact"]).shape_ranges
            max_batch = ranges.batch[2]
            try:
                ranges.check_image(settings["height"], settings["width"])
            except LdmDeployError as e:
                label = str(e).split()[0]  # "height ..." or "width ..."
                raise c.fail(f"{e} (variant '{v.name}')", "settings", None, label) from None
        elif v.build["kind"] == "export":
            max_batch = v.build["max_batch"]
        else:
            continue
        for table, b in batches:
            if b > max_batch:
                raise c.fail(f"batch {b} exceeds the max batch {max_batch} of variant '{v.name}'", table, None, "batch")


def read_prompts(path: Path) -> list[str]:
    """Prompts from a text file (one per line, ``#`` comments) or COCO captions JSON."""
    try:
        return read_prompt_file(path)
    except LdmDeployError as e:
        raise SuiteError(str(e)) from None
