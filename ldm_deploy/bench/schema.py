"""Typed fields of a suite file: what each key accepts, its default, and its checks."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Any

from ..runtime.backends import BACKENDS
from ..runtime.scheduler import SCHEDULERS

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:-([^}]*))?\}")


class FieldError(ValueError):
    """A bad value; the suite loader adds the file and line."""


@dataclass(frozen=True)
class Field:
    """One key: ``kind`` is int, float, bool, str or strlist."""

    kind: str
    default: Any = None
    required: bool = False
    minimum: float | None = None
    multiple_of: int | None = None
    choices: tuple[str, ...] | None = None
    help: str = ""

    def check(self, key: str, value: Any) -> Any:
        """The value converted and checked, or :class:`FieldError`."""
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise FieldError(f"{key} must be true or false, got {value!r}")
            return value
        if self.kind == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                raise FieldError(f"{key} must be an integer, got {value!r}")
        elif self.kind == "float":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise FieldError(f"{key} must be a finite number, got {value!r}")
            value = float(value)
        elif self.kind == "str":
            if not isinstance(value, str):
                raise FieldError(f"{key} must be a string, got {value!r}")
            value = expand_env(value, key)
            if self.choices and value not in self.choices:
                raise FieldError(f"{key} = {value!r} is not one of {', '.join(self.choices)}")
            return value
        elif self.kind == "strlist":
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value) or not value:
                raise FieldError(f"{key} must be a string or a non-empty list of strings")
            return [expand_env(v, key) for v in value]
        if self.minimum is not None and value < self.minimum:
            raise FieldError(f"{key} must be >= {_num(self.minimum)}, got {value}")
        if self.multiple_of and value % self.multiple_of:
            raise FieldError(f"{key} must be a multiple of {self.multiple_of}, got {value}")
        return value


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def expand_env(text: str, key: str = "value") -> str:
    """``${NAME}`` (must be set) and ``${NAME:-default}`` from the environment."""

    def sub(m: re.Match[str]) -> str:
        name, has_default, default = m.group(1), m.group(2), m.group(3)
        if name in os.environ and (os.environ[name] or not has_default):
            return os.environ[name]
        if has_default is not None:
            return default or ""
        raise FieldError(f"{key} uses ${{{name}}}, which is not set in the environment")

    return _ENV.sub(sub, text)


def check_table(table: dict[str, Any], fields: dict[str, Field], where: str) -> tuple[dict[str, Any], str | None, str]:
    """Checked values with defaults filled in; on error ``(partial, key, message)``.

    Returns ``(values, None, "")`` when everything is valid."""
    out: dict[str, Any] = {}
    for key in table:
        if key not in fields:
            known = ", ".join(sorted(fields))
            return out, key, f"{where}: unknown key '{key}' (known: {known})"
    for key, f in fields.items():
        if key not in table:
            if f.required:
                return out, None, f"{where}: missing required key '{key}'"
            out[key] = f.default
            continue
        try:
            out[key] = f.check(key, table[key])
        except FieldError as e:
            return out, key, f"{where}: {e}"
    return out, None, ""


# --------------------------------------------------------------------------- the tables

SETTINGS: dict[str, Field] = {
    "height": Field("int", 512, minimum=8, multiple_of=8, help="image height in pixels"),
    "width": Field("int", 512, minimum=8, multiple_of=8, help="image width in pixels"),
    "batch": Field("int", 1, minimum=1, help="prompts per call"),
    "steps": Field("int", 25, minimum=1, help="denoising steps of an end-to-end call"),
    "guidance": Field("float", 7.5, minimum=0, help="classifier-free guidance scale (<= 1: no CFG)"),
    "prompt": Field("str", "a photograph of an astronaut riding a horse", help="prompt of the latency runs"),
    "seed": Field("int", 0, minimum=0, help="seed of the latency runs' initial latents"),
    "warmup": Field("int", 1, minimum=0, help="untimed rounds before the timed ones"),
    "repeats": Field("int", 5, minimum=1, help="timed rounds (each: text, one U-Net step, VAE, end to end)"),
    "threads": Field("int", 0, minimum=0, help="CPU threads for torch and ONNX Runtime (0: physical cores)"),
    "memory_interval_ms": Field("float", 10.0, minimum=1, help="RSS / device memory sampling period"),
}

QUALITY: dict[str, Field] = {
    "prompts": Field("str", "shapes", help="'shapes' (procedural eval prompts) or a prompt file (.txt / COCO .json)"),
    "n": Field("int", 64, minimum=1, help="number of prompts (images per variant)"),
    "steps": Field("int", None, minimum=1, help="denoising steps (default: settings.steps)"),
    "guidance": Field("float", None, minimum=0, help="guidance scale (default: settings.guidance)"),
    "batch": Field("int", None, minimum=1, help="prompts per call (default: settings.batch)"),
    "seed": Field("int", 0, minimum=0, help="prompt i starts from the latents of seed + i"),
    "prompt_seed": Field("int", 1234, minimum=0, help="seed of the procedural prompt set"),
    "reference": Field("str", "", help="variant whose images PSNR/SSIM (and FID for prompt files) compare to"),
    "reference_images": Field("str", "", help="directory of real images for Inception FID (prompt files)"),
    "clip_model": Field("str", "", help="local CLIP model directory for the CLIP score"),
    "inception": Field("bool", True, help="Inception FID when its weights are on disk"),
}

VARIANT_COMMON: dict[str, Field] = {
    "name": Field("str", required=True),
    "kind": Field("str", required=True, choices=("runtime", "diffusers", "optimum")),
    "description": Field("str", ""),
    "python": Field("str", "", help="interpreter that runs this variant (default: this one)"),
}

VARIANT_FIELDS: dict[str, dict[str, Field]] = {
    "runtime": {
        "artifact": Field("str", "", help="artifact directory (relative to the suite file)"),
        "backend": Field("str", "ort-cpu", choices=tuple(BACKENDS), help="runtime backend (ldm-generate --backend)"),
        "scheduler": Field("str", "ddim", choices=tuple(SCHEDULERS), help="sampler (ldm-generate --scheduler)"),
        "steps": Field("int", None, minimum=1, help="denoising steps of this variant (default: settings.steps / "
                       "quality.steps): compare samplers at their own step counts"),
        "cache_interval": Field("int", 1, minimum=1, help="DeepCache: full U-Net every N steps (needs an "
                                "artifact exported with deepcache)"),
        "precision_hint": Field("str", "default", choices=("default", "f32", "bf16"),
                                help="backend openvino: inference precision hint (ldm-generate --ov-precision)"),
        "static": Field("bool", False, help="backend openvino: compile for the suite's batch and size only"),
    },
    "diffusers": {
        "model": Field("str", required=True, help="model name or diffusers pipeline directory"),
        "device": Field("str", "cpu", choices=("cpu", "cuda")),
        "dtype": Field("str", "fp32", choices=("fp32", "fp16", "bf16")),
        "compile": Field("bool", False, help="torch.compile the U-Net"),
        "compile_mode": Field("str", "default", choices=("default", "reduce-overhead", "max-autotune")),
    },
    "optimum": {
        "model": Field("str", required=True, help="model name or diffusers pipeline directory"),
        "provider": Field("str", "cpu", help="ONNX Runtime execution provider"),
    },
}

BUILD_EXPORT: dict[str, Field] = {
    "export": Field("str", required=True, help="model to export with ldm-export"),
    "fp16": Field("bool", False),
    "opset": Field("int", 18, minimum=7),
    "height": Field("int", None, minimum=8, multiple_of=8),
    "width": Field("int", None, minimum=8, multiple_of=8),
    "batch": Field("int", 1, minimum=1),
    "max_batch": Field("int", 4, minimum=1),
    "min_size": Field("int", None, minimum=8, multiple_of=8),
    "max_size": Field("int", None, minimum=8, multiple_of=8),
    "optimize": Field("str", None, choices=("cpu", "cuda", "tensorrt")),
    "attention": Field("str", "auto", choices=("auto", "mha", "sliced", "full")),
    "exporter": Field("str", "torchscript", choices=("torchscript", "dynamo")),
    "validate": Field("bool", True),
    "deepcache": Field("int", None, minimum=1, help="also export the shallow U-Net of feature caching (depth)"),
}

BUILD_QUANTIZE: dict[str, Field] = {
    "quantize": Field("str", required=True, help="runtime variant (or artifact path) to quantize"),
    "target": Field("str", "cpu", choices=("cpu", "tensorrt", "openvino")),
    "method": Field("str", "minmax", choices=("minmax", "percentile", "mse")),
    "components": Field("strlist", ["unet"]),
    "calib_size": Field("int", 64, minimum=1),
    "calib_steps": Field("int", 20, minimum=1),
    "calib_per_run": Field("int", None, minimum=1),
    "calib_size_px": Field("int", None, minimum=8, multiple_of=8),
    "percentile": Field("float", 99.999, minimum=0),
    "holdout": Field("int", 4, minimum=0),
    "quality_prompts": Field("int", 2, minimum=0),
    "seed": Field("int", 0, minimum=0),
}

BUILD_ENGINES: dict[str, Field] = {
    "engines": Field("str", required=True, help="runtime variant whose artifact gets TensorRT engines (ldm-build)"),
    "precision": Field("str", "fp16", choices=("fp32", "fp16", "int8", "best")),
    "batch": Field("str", "", help="MIN:OPT:MAX prompts per call"),
    "size": Field("str", "", help="MIN:OPT:MAX image side"),
    "static": Field("bool", False),
}

BUILD_KINDS = {"export": BUILD_EXPORT, "quantize": BUILD_QUANTIZE, "engines": BUILD_ENGINES}
