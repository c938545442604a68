"""ONNX Runtime plumbing, in one place: provider names, session options, dtype casting of feeds.

Every module that opens an ONNX Runtime session (the runtime's components, export validation,
INT8 range collection and assessment, the benchmark) goes through :func:`make_session` and
:func:`cast_feeds`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnxruntime as ort

from ..errors import LdmDeployError, first_line

#: Short names of the execution providers the project uses -> ONNX Runtime's names.
PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}

#: ONNX Runtime's input type strings -> numpy dtypes (anything else is fed as float32).
NUMPY_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
}

GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


def provider_unavailable(name: str) -> str | None:
    """Why the execution provider ``name`` (short or full) cannot be used here, or None."""
    full = PROVIDERS.get(name.lower(), name)
    available = ort.get_available_providers()
    if full in available:
        return None
    hint = " (install onnxruntime-gpu: pip install 'ldm-deploy[gpu]')" if full in GPU_PROVIDERS else ""
    return f"execution provider '{name}' is not available in this onnxruntime build{hint}; available: {', '.join(available)}"


def resolve_provider(name: str) -> str:
    """ONNX Runtime's provider name for a short one (``cpu``, ``cuda``, ``tensorrt``) or a full
    one, failing clearly when this onnxruntime build lacks it."""
    reason = provider_unavailable(name)
    if reason:
        raise LdmDeployError(reason)
    return PROVIDERS.get(name.lower(), name)


def check_threads(threads: int) -> None:
    """Intra-op threads: 0 (all cores) or a positive count; one clear line otherwise."""
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise LdmDeployError(f"threads must be 0 (all cores) or a positive number, got {threads!r}")


def session_options(threads: int = 0, low_memory: bool = False, optimization: str = "all") -> ort.SessionOptions:
    """Session options for large diffusion graphs.

    By default ORT's CPU memory arena serves the activations: after the first call at a shape,
    a step allocates nothing from the OS. ``low_memory`` turns the arena off (its grow-only chunks
    hold on to the peak of every shape ever run), so every activation is a fresh ``malloc``; with
    :func:`~ldm_deploy.runtime.memory.limit_heap_retention` the large ones are returned to the OS
    on free. That costs page faults on every step: measured on the sd15-random U-Net at 512x512
    (2 threads), 4.1-4.5 s -> 4.3-6.0 s per fp32 step and 2.1-2.3 s -> 3.0-3.5 s per INT8 step
    (``benchmarks/int8_speed.py --low-memory``).

    ``optimization="basic"`` keeps every named tensor of the graph (the fused kernels of the full
    level may drop or rename tensors that INT8 range collection reads).
    """
    check_threads(threads)
    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    }[optimization]
    if threads:
        so.intra_op_num_threads = threads
    so.log_severity_level = 3
    if low_memory:
        so.enable_cpu_mem_arena = False
        so.enable_mem_pattern = False
    return so


def make_session(
    path: Path | str,
    provider: str = "cpu",
    threads: int = 0,
    low_memory: bool = False,
    optimization: str = "all",
) -> ort.InferenceSession:
    """An ``InferenceSession`` on ``provider`` (with the CPU provider as fallback for GPU ones);
    a file ONNX Runtime cannot load is one :class:`LdmDeployError` line."""
    full = resolve_provider(provider)
    providers = [full] + (["CPUExecutionProvider"] if full != "CPUExecutionProvider" else [])
    options = session_options(threads, low_memory, optimization)
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as e:  # onnxruntime raises its own exception types for bad files
        raise LdmDeployError(f"could not load {path} in ONNX Runtime ({full}): {first_line(e, 300)}") from None


def input_types(session: ort.InferenceSession) -> dict[str, type]:
    """Graph input name -> the numpy dtype to feed it."""
    return {i.name: NUMPY_TYPES.get(i.type, np.float32) for i in session.get_inputs()}


def cast_feeds(types: Mapping[str, type], feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Contiguous arrays of the graph's dtypes for the ``feeds`` the graph has (others dropped)."""
    return {k: np.ascontiguousarray(v, dtype=types[k]) for k, v in feeds.items() if k in types}


def run_session(session: ort.InferenceSession, feeds: Mapping[str, np.ndarray],
                outputs: list[str] | None = None) -> list[Any]:
    """``session.run`` with the feeds cast to the graph's input types."""
    return session.run(outputs, cast_feeds(input_types(session), feeds))
