"""Target-aware graph optimisation of exported components.

* ``cpu`` / portable: ONNX Runtime's *basic* offline optimisations (constant folding, redundant
  node elimination, semantics-preserving fusions). The result is plain ONNX that any execution
  provider, TensorRT included, can load.
* ``cuda``: ONNX Runtime's transformer optimizer with its diffusion fusions (attention,
  GroupNorm, BiasSplitGelu, ...). These produce ``com.microsoft`` contrib ops that only the CUDA
  execution provider implements, so such graphs are validated only where CUDA is available.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import onnxruntime as ort

TARGETS = ("cpu", "cuda", "tensorrt")
_ORT_MODEL_TYPES = {"unet": "unet", "unet_shallow": "unet", "vae_encoder": "vae", "vae_decoder": "vae", "text_encoder": "clip"}


def optimize_portable(src: Path, dst: Path, external_data: bool) -> Path:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(dst)
    so.log_severity_level = 3
    if external_data:
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", dst.name + ".data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(src), sess_options=so, providers=["CPUExecutionProvider"])
    return dst


def optimize_cuda(src: Path, dst: Path, component: str, external_data: bool, fp16: bool) -> Path:
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    model_type = _ORT_MODEL_TYPES[component]
    options = FusionOptions(model_type)
    try:
        m = optimize_model(str(src), model_type=model_type, opt_level=0, optimization_options=options, use_gpu=True)
    except TypeError as e:
        # onnxruntime's U-Net attention fusion fails to read the head count from some exported
        # graphs; the other fusions (NHWC conv, GroupNorm, BiasSplitGelu, ...) still apply.
        warnings.warn(f"{component}: attention fusion skipped ({e})", stacklevel=2)
        options.enable_attention = False
        m = optimize_model(str(src), model_type=model_type, opt_level=0, optimization_options=options, use_gpu=True)
    if fp16:
        m.convert_float_to_float16(keep_io_types=True)
    m.save_model_to_file(str(dst), use_external_data_format=external_data)
    return dst


def optimize(src: Path, dst: Path, component: str, target: str, fp16: bool = False) -> Path:
    """Optimise ``src`` for ``target`` into ``dst`` (a different path in the same folder)."""
    external = (src.parent / (src.name + ".data")).exists()
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        if target == "cuda":
            return optimize_cuda(src, dst, component, external, fp16)
        return optimize_portable(src, dst, external)
    except Exception as e:  # the optimisers raise many kinds of errors on graphs they do not expect
        from ..errors import LdmDeployError, first_line

        raise LdmDeployError(f"--optimize {target} failed on {component}: {type(e).__name__}: {first_line(e)}") from None
