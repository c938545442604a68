"""TensorRT backend: ``ldm-build`` (one engine per component, cached in the artifact) and the
``tensorrt`` runtime backend (``Pipeline.load(path, backend="tensorrt")``).

Layout:

- ``profiles``  optimization profiles from the component specs, ``--batch``/``--size`` parsing (pure)
- ``cache``     engine cache keys, ``engines/index.json``, stale/foreign detection (pure)
- ``ops``       TensorRT ONNX-parser operator table (``data/onnx_trt_ops.json``) and graph checks
- ``builder``   the real build with the TensorRT Python API
- ``engine``    the runtime: engines, shared device memory, CUDA graphs (tensorrt + cuda-python)
- ``cli``       ``ldm-build``

Nothing here imports ``tensorrt`` or ``cuda`` at module import time: they are imported by
:func:`require_tensorrt` / :func:`require_cudart` when a build or a load actually needs them, so
the rest of the toolchain works on machines without them.
"""

from __future__ import annotations

from typing import Any

from ..errors import LdmDeployError, first_line

INSTALL_HINT = (
    "install it with `pip install 'ldm-deploy[tensorrt]'` on a Linux machine with an NVIDIA GPU and "
    "CUDA driver (TensorRT wheels come from NVIDIA's index, pypi.nvidia.com)"
)


class TensorRTUnavailable(LdmDeployError):
    """TensorRT (or cuda-python, or a GPU) is missing: the message says how to get it."""


def require_tensorrt() -> Any:
    """Import and return the ``tensorrt`` module, or raise :class:`TensorRTUnavailable` with one
    line saying how to install it."""
    try:
        import tensorrt as trt  # noqa: PLC0415
    except Exception as e:  # ImportError, or OSError from missing CUDA/TensorRT libraries
        raise TensorRTUnavailable(f"TensorRT is not available ({first_line(e, 1000)}): {INSTALL_HINT}") from None
    if not hasattr(trt, "Builder"):  # the PyPI placeholder package, or something shadowing it
        raise TensorRTUnavailable(f"the installed 'tensorrt' package is not NVIDIA TensorRT: {INSTALL_HINT}")
    return trt


def require_cudart() -> Any:
    """Import and return cuda-python's runtime bindings (``cuda.bindings.runtime``, or the older
    ``cuda.cudart``), or raise :class:`TensorRTUnavailable`."""
    try:
        from cuda.bindings import runtime as cudart  # noqa: PLC0415  (cuda-python >= 12.6)
    except Exception:
        try:
            from cuda import cudart  # type: ignore[no-redef]  # noqa: PLC0415
        except Exception as e:
            raise TensorRTUnavailable(f"cuda-python is not available ({first_line(e, 1000)}): {INSTALL_HINT}") from None
    return cudart


def tensorrt_available() -> bool:
    try:
        require_tensorrt()
    except TensorRTUnavailable:
        return False
    return True


__all__ = ["INSTALL_HINT", "TensorRTUnavailable", "require_tensorrt", "require_cudart", "tensorrt_available"]
