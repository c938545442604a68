"""What the x86 CPU offers for INT8 (read from ``/proc/cpuinfo``; nothing elsewhere).

ONNX Runtime's u8s8 kernels (``QLinearConv``, ``MatMulIntegerToFloat``) use VNNI's
``VPDPBUSD`` (int32 accumulation) where the CPU has it, and otherwise AVX2's ``VPMADDUBSW``, which
adds pairs of u8 x s8 products in int16 and saturates when the weights use the full int8 range.
On this project's AVX2-only EPYC that doubled the SD1.5 U-Net's INT8 error (held-out rel L2
0.032 with exact QDQ arithmetic, 0.064 through the fused kernels); 7-bit weights
(``ldm-quantize --reduce-range``) stay below the limit.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The first processor's flags in ``/proc/cpuinfo`` (empty where there is none, e.g. macOS)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def u8s8_saturates(flags: frozenset[str] | None = None) -> bool:
    """True on an x86 CPU with AVX2 but no VNNI: full-range int8 weights saturate ORT's u8s8 kernels."""
    flags = cpu_flags() if flags is None else flags
    return "avx2" in flags and not flags & VNNI_FLAGS


def int8_saturation_warning(manifest: dict[str, Any], flags: frozenset[str] | None = None) -> str | None:
    """One line for a cpu-target INT8 artifact with full-range weights on a CPU that saturates them."""
    q = manifest.get("quantization") or {}
    if q.get("target") != "cpu" or q.get("recipe", {}).get("reduce_range") or not u8s8_saturates(flags):
        return None
    return ("this CPU has AVX2 but no VNNI: ONNX Runtime's u8s8 kernels saturate with this artifact's full-range "
            "int8 weights (about 2x the U-Net error measured at SD1.5 scale); re-quantize with "
            "`ldm-quantize --reduce-range` for this CPU")
