"""Quality harness for generated shapes images (any backend: PyTorch, ONNX Runtime, INT8, pruned).

* :func:`evaluate` - prompt adherence (overall / seen / held-out combos), per-attribute
  accuracy, domain FID on attribute-classifier features, PSNR/SSIM against another
  variant's images, and Inception FID when its weights are on disk;
* :class:`AttributeClassifier` / :func:`load_default_classifier` - the shipped CNN judge
  (``ldm_deploy/assets/quality/attribute_classifier.pt``), :func:`train_classifier`
  to rebuild it (``scripts/train_quality_classifier.py``);
* numpy/scipy metrics: :func:`frechet_distance`, :func:`psnr`, :func:`ssim`,
  :func:`prompt_adherence`.

Images are uint8 ``HxWx3`` arrays, ``[N, H, W, 3]`` batches or PIL images.

The metrics need only numpy/scipy; the classifier and harness names (which need
torch) are imported lazily on first access, so ``import ldm_deploy.quality`` works in
the torch-free runtime install.
"""

from __future__ import annotations

import importlib
from typing import Any

from ldm_deploy.quality.metrics import (
    feature_stats,
    frechet_distance,
    frechet_distance_from_stats,
    prompt_adherence,
    psnr,
    ssim,
)

__all__ = [
    "ATTRIBUTE_NAMES",
    "ATTRIBUTE_VALUES",
    "DEFAULT_WEIGHTS",
    "REFERENCE_SEED",
    "AttributeClassifier",
    "evaluate",
    "feature_stats",
    "find_inception_weights",
    "frechet_distance",
    "frechet_distance_from_stats",
    "inception_fid",
    "load_default_classifier",
    "measure_accuracy",
    "prompt_adherence",
    "psnr",
    "render_references",
    "ssim",
    "to_attributes",
    "to_uint8_batch",
    "train_classifier",
]

_LAZY = {
    **{name: "ldm_deploy.quality.classifier" for name in (
        "ATTRIBUTE_NAMES", "ATTRIBUTE_VALUES", "DEFAULT_WEIGHTS", "AttributeClassifier",
        "load_default_classifier", "measure_accuracy", "to_uint8_batch", "train_classifier")},
    **{name: "ldm_deploy.quality.harness" for name in (
        "REFERENCE_SEED", "evaluate", "find_inception_weights", "inception_fid", "render_references",
        "to_attributes")},
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
