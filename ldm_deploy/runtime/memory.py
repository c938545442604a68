"""Keep freed activation memory from lingering in the process heap (glibc).

With its CPU arena off, ONNX Runtime allocates and frees every activation with ``malloc``.
glibc serves blocks below a *dynamic* threshold (which grows to 32 MiB after large frees) from
its heaps and keeps freed heap pages resident, so a diffusion step's many-MiB activations pile
up as RSS. Fixing the mmap threshold at 1 MiB makes every large block its own mapping, returned
to the OS on free. Measured on sd15-random at 512x512 (CPU, 2 steps): peak RSS 5.15 -> 4.72 GiB.
"""

from __future__ import annotations

import ctypes
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_done = False


def limit_heap_retention(mmap_threshold: int = 1 << 20) -> bool:
    """Apply the glibc settings once per process; returns whether they were applied.

    Process-wide: it affects every allocation of the host application (large blocks then cost
    an ``mmap``/``munmap`` each, negligible next to a U-Net call)."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1
        ok &= libc.mallopt(_M_TRIM_THRESHOLD, mmap_threshold) == 1
    except (OSError, AttributeError):
        return False
    _done = bool(ok)
    return _done
