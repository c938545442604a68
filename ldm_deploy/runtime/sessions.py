"""ONNX Runtime sessions: provider selection by name and memory-lean session options."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnxruntime as ort

from ..errors import LdmDeployError

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "dml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
}


def resolve_provider(name: str) -> str:
    """Map a short name (``cpu``, ``cuda``, ``tensorrt``) or a full ORT provider name to the ORT
    provider name, failing clearly when this onnxruntime build lacks it."""
    full = PROVIDERS.get(name.lower(), name)
    available = ort.get_available_providers()
    if full not in available:
        hint = " (install onnxruntime-gpu: pip install 'ldm-deploy[gpu]')" if full in (
            "CUDAExecutionProvider", "TensorrtExecutionProvider") else ""
        raise LdmDeployError(
            f"execution provider '{name}' is not available in this onnxruntime build{hint}; "
            f"available: {', '.join(available)}"
        )
    return full


def session_options(threads: int = 0, low_memory: bool = False) -> ort.SessionOptions:
    """Session options for large diffusion graphs.

    By default ORT's CPU memory arena serves the activations: after the first call at a shape,
    a step allocates nothing from the OS. ``low_memory`` turns the arena off (its grow-only chunks
    hold on to the peak of every shape ever run), so every activation is a fresh ``malloc``; with
    :func:`~ldm_deploy.runtime.memory.limit_heap_retention` the large ones are returned to the OS
    on free. That costs page faults on every step: measured on the sd15-random U-Net at 512x512
    (2 threads), 4.1-4.5 s -> 4.3-6.0 s per fp32 step and 2.1-2.3 s -> 3.0-3.5 s per INT8 step
    (``benchmarks/int8_speed.py --low-memory``).
    """
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
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
    provider_options: dict[str, Any] | None = None,
    threads: int = 0,
    low_memory: bool = False,
) -> ort.InferenceSession:
    full = resolve_provider(provider)
    providers: list[Any] = [(full, provider_options or {})]
    if full != "CPUExecutionProvider":
        providers.append("CPUExecutionProvider")
    try:
        return ort.InferenceSession(str(path), sess_options=session_options(threads, low_memory), providers=providers)
    except Exception as e:  # onnxruntime raises its own exception types for bad files
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise LdmDeployError(f"could not load {path} in ONNX Runtime ({full}): {first}") from None
