"""The benchmark's results: what ``results.json`` holds and how its numbers are read. Shared by
the markdown/CSV report (:mod:`.report`) and the plots (:mod:`.plots`)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..errors import LdmDeployError

OPS = (("text_encoder", "text encoder"), ("unet_step", "U-Net step"), ("vae_decode", "VAE decode"),
       ("end_to_end", "end to end"))
QUALITY_KEYS = ("adherence", "adherence_seen", "adherence_heldout", "domain_fid", "psnr", "ssim", "inception_fid",
                "clip_score")
#: Quality metric on the Pareto chart, in order of preference: (key, label, higher is better); the
#: first one that tells at least two variants apart is used.
PARETO_METRICS = (("adherence", "prompt adherence", True), ("attribute_accuracy", "mean attribute accuracy", True),
                  ("clip_score", "CLIP score", True), ("inception_fid", "Inception FID", False),
                  ("psnr", "PSNR vs reference (dB)", True), ("domain_fid", "domain FID", False))


def quality_value(q: dict[str, Any], key: str) -> float | None:
    """A metric of a variant's quality dict (``attribute_accuracy``: mean of the per-attribute ones)."""
    if key == "attribute_accuracy":
        per = q.get("per_attribute") or {}
        return sum(per.values()) / len(per) if per else None
    value = q.get(key)
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def pareto_metric(ok: list[dict[str, Any]]) -> tuple[str, str, bool] | None:
    """The first of :data:`PARETO_METRICS` that tells at least two variants apart."""
    for key, label, higher in PARETO_METRICS:
        if len({quality_value(v.get("quality") or {}, key) for v in ok} - {None}) >= 2:
            return key, label, higher
    return None


def load_results(results_dir: Path) -> dict[str, Any]:
    f = Path(results_dir) / "results.json"
    if not f.is_file():
        raise LdmDeployError(f"{results_dir} has no results.json (not an ldm-bench results directory)")
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise LdmDeployError(f"{f} is not valid JSON: {e}") from None
