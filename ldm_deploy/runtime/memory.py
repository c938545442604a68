"""Keep freed activation memory from lingering in the process heap (glibc).

With its CPU arena off, ONNX Runtime allocates and frees every activation with ``malloc``.
glibc serves blocks below a *dynamic* threshold (which grows to 32 MiB after large frees) from
its heaps and keeps freed heap pages resident, so a diffusion step's many-MiB activations pile
up as RSS. Fixing the mmap threshold makes every larger block its own mapping, returned to the
OS on free, at the cost of page faults when it is mapped again. Measured on sd15-random at
512x512 (CPU, 3 steps, one run each): default 5.40 GiB peak; 16 MiB threshold 5.05 GiB at about
the default step time; 4 MiB 4.74 GiB but ~25% slower steps. 16 MiB is the default.
"""

from __future__ import annotations

import ctypes
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_done = False


def limit_heap_retention(mmap_threshold: int = 16 << 20) -> bool:
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


def release_free_heap() -> None:
    """Hand free heap pages of every malloc arena back to the OS (glibc ``malloc_trim``): between
    the denoising loop and the VAE decoder, so the decoder's peak does not stack on the U-Net's
    freed-but-retained activations. A no-op off glibc."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
