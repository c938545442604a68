"""INT8 post-training quantization of artifacts (``ldm-quantize``).

* :mod:`.calibration` - U-Net inputs recorded from real CFG sampling runs of the runtime;
* :mod:`.ranges` - streaming, memory-bounded activation ranges (in-graph min/max, chunked
  fixed-bin histograms for percentile / MSE);
* :mod:`.recipes` - per-target recipes (``cpu``: U8S8 QDQ for ORT CPU; ``tensorrt``: symmetric
  INT8 QDQ), exclusion patterns, and the hand-off of ranges to ONNX Runtime's quantizer;
* :mod:`.build` - :func:`quantize_artifact`, the whole stage.
"""

from __future__ import annotations

from typing import Any

__all__ = ["quantize_artifact", "collect_calibration", "collect_ranges", "recipe"]


def __getattr__(name: str) -> Any:  # lazy: keep `import ldm_deploy.quantize` cheap
    if name == "quantize_artifact":
        from .build import quantize_artifact

        return quantize_artifact
    if name == "collect_calibration":
        from .calibration import collect_calibration

        return collect_calibration
    if name == "collect_ranges":
        from .ranges import collect_ranges

        return collect_ranges
    if name == "recipe":
        from .recipes import recipe

        return recipe
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
