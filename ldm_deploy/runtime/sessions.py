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


def session_options(threads: int = 0, low_memory: bool = True) -> ort.SessionOptions:
    """Session options for large diffusion graphs.

    ``low_memory`` turns off the CPU memory arena (its grow-only chunks hold on to the peak of
    every shape ever run) and lets large initializers be used in place from memory-mapped
    external data rather than copied.
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
    low_memory: bool = True,
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
