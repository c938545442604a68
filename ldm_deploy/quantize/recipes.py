"""Quantization recipes per deployment target, exclusion patterns, and the hand-off of
precomputed ranges to ONNX Runtime's quantizer.

Targets
-------
``cpu``
    ONNX Runtime CPU (x86 with AVX512-VNNI): U8S8 (uint8 asymmetric activations, int8 symmetric
    per-channel weights), QDQ format, Conv + MatMul + Gemm. The outputs of the quantized ops are
    quantized too: ORT's CPU QDQ fusions turn ``DQ -> Conv -> Q`` into ``QLinearConv`` and
    ``DQ -> MatMul (-> Q)`` into ``QLinearMatMul`` / ``MatMulIntegerToFloat``; without the output
    Q the Convs would stay fp32 behind a DequantizeLinear (slower than fp32). The activation x
    activation attention MatMuls are left in fp32 when ``MatMulConstBOnly`` (measured faster on the
    per-head attention of this exporter); see :func:`recipe`.
``tensorrt``
    Explicit-quantization graph for TensorRT: symmetric INT8 activations (zero point 0),
    per-channel symmetric int8 weights (Conv axis 0, MatMul/Gemm the output-channel axis), QDQ
    only on the inputs of Conv/MatMul/Gemm (no output QDQ: TensorRT fuses the following ops
    itself), a dedicated Q/DQ pair per consumer, weights kept in float behind a Q/DQ pair,
    biases left in float.

Ranges reach ORT's quantizer as a ``TensorsData`` (``CalibrationMethod.MinMax`` with our
``lowest``/``highest`` per tensor, whatever method produced them) handed directly to
``QDQQuantizer`` / ``ONNXQuantizer`` — the object ``quantize_static`` would otherwise build with
its in-memory calibrator.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import onnx

from ..errors import LdmDeployError
from ..patterns import name_matcher

TARGETS = ("cpu", "tensorrt")

#: Kept in higher precision by default (node-name globs against the TorchScript exporter's
#: ``/unet/<module path>/<Op>`` names). Softmax is never quantized (not a quantized op type).
DEFAULT_EXCLUDES: dict[str, str] = {
    "time_embedding": "*/time_embedding/*",
    "time_emb_proj": "*/time_emb_proj/*",
    "conv_in": "*/conv_in/*",
    "conv_out": "*/conv_out/*",
    "conv_shortcut": "*/conv_shortcut/*",
}
#: Cross-attention K/V projections of the text tokens (outliers): excluded unless --quantize-cross-kv.
CROSS_KV_EXCLUDES: dict[str, str] = {
    "cross_attn_k": "*/attn2/to_k/*",
    "cross_attn_v": "*/attn2/to_v/*",
}


@dataclass(frozen=True)
class Recipe:
    target: str
    quant_format: str  # "qdq" | "qoperator"
    activation_type: str  # "uint8" | "int8"
    weight_type: str  # "int8"
    per_channel: bool
    symmetric_activations: bool
    op_types: tuple[str, ...]
    extra_options: dict[str, Any] = field(default_factory=dict)
    #: graph rewrites applied around ORT's quantizer (see :mod:`.rewrites`)
    rewrites: tuple[str, ...] = ()
    #: 7-bit weights ([-64, 63]): the u8s8 kernels of CPUs without VNNI (AVX2's VPMADDUBSW) add
    #: pairs of u8 x s8 products in int16, which saturates with full-range weights
    reduce_range: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def recipe(target: str, quant_format: str | None = None, attention_matmuls: bool | None = None,
           reduce_range: bool = False) -> Recipe:
    """The recipe of a target. ``attention_matmuls``: quantize activation x activation MatMuls
    (default: no on cpu, yes on tensorrt). ``reduce_range``: 7-bit weights for CPUs without VNNI
    (cpu target only)."""
    if target not in TARGETS:
        raise LdmDeployError(f"unknown target {target!r} (choose from {', '.join(TARGETS)})")
    ops = ("Conv", "MatMul", "Gemm")
    if target == "cpu":
        fmt = quant_format or "qdq"
        if fmt not in ("qdq", "qoperator"):
            raise LdmDeployError(f"unknown quantization format {fmt!r}")
        attn = False if attention_matmuls is None else attention_matmuls
        return Recipe("cpu", fmt, "uint8", "int8", True, False, ops, {
            "MatMulConstBOnly": not attn,
            "WeightSymmetric": True,
            # MatMul -> MatMulIntegerToFloat needs no output Q; keeping MatMul outputs float also keeps
            # Softmax out of Q/DQ (ORT would otherwise fuse it into QLinearSoftmax).
            "OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm"],
        }, rewrites=("split_geglu", "fold_matmul_bias") if fmt == "qdq" else ("split_geglu",),
            reduce_range=reduce_range)
    if reduce_range:
        raise LdmDeployError("--reduce-range is for the cpu target (ORT's u8s8 kernels on CPUs without VNNI)")
    if quant_format not in (None, "qdq"):
        raise LdmDeployError("the tensorrt target writes QDQ graphs only")
    attn = True if attention_matmuls is None else attention_matmuls
    return Recipe("tensorrt", "qdq", "int8", "int8", True, True, ops, {
        "ActivationSymmetric": True,
        "WeightSymmetric": True,
        "OpTypesToExcludeOutputQuantization": list(ops),
        "DedicatedQDQPair": True,
        "AddQDQPairToWeight": True,
        "QuantizeBias": False,
        "MatMulConstBOnly": not attn,
    })


# --------------------------------------------------------------------------- exclusions


def _matcher(pattern: str):  # type: ignore[no-untyped-def]
    """``re:<regex>`` (search), a glob with * ? [ ], or a plain substring."""
    return name_matcher(pattern, lambda p, name: p in name, "exclude")


def match_nodes(node_names: Iterable[str], patterns: Sequence[str], strict: bool = True) -> dict[str, list[str]]:
    """Nodes matched by each pattern; ``strict``: a pattern matching nothing is an error."""
    names = list(node_names)
    out: dict[str, list[str]] = {}
    for p in patterns:
        m = _matcher(p)
        hits = [n for n in names if m(n)]
        if strict and not hits:
            raise LdmDeployError(f"exclude pattern {p!r} matches no node of the graph")
        out[p] = hits
    return out


def exclusion_patterns(user: Sequence[str] = (), defaults: bool = True, quantize_cross_kv: bool = False) -> list[str]:
    pats: list[str] = []
    if defaults:
        pats += list(DEFAULT_EXCLUDES.values())
        if not quantize_cross_kv:
            pats += list(CROSS_KV_EXCLUDES.values())
    return pats + [p for p in user if p not in pats]


def activation_matmuls(model: onnx.ModelProto) -> list[str]:
    """MatMul nodes whose B input is not a constant (attention scores / probabilities x V)."""
    consts = {i.name for i in model.graph.initializer} | {
        o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] not in consts]


def quantizable_nodes(model: onnx.ModelProto, op_types: Sequence[str], const_b_only: bool = False) -> list[str]:
    """Nodes the recipe may quantize (before exclusions)."""
    skip = set(activation_matmuls(model)) if const_b_only else set()
    return [n.name for n in model.graph.node if n.op_type in op_types and n.name not in skip]


# --------------------------------------------------------------------------- quantize


def _qtype(name: str):  # type: ignore[no-untyped-def]
    from onnxruntime.quantization import QuantType

    return {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}[name]


def _shape_inferred(model_path: Path) -> onnx.ModelProto:
    """Load ``model_path`` with shape inference run on the graph before its external data is read
    (the graph alone stays far below protobuf's 2 GB limit; the source is never written to)."""
    src = Path(model_path).absolute()
    model = onnx.shape_inference.infer_shapes(onnx.load(str(src), load_external_data=False))
    onnx.load_external_data_for_model(model, str(src.parent))
    return model


def quantize_onnx(
    model_path: Path | str,
    out_path: Path | str,
    ranges: dict[str, tuple[float, float]],
    rcp: Recipe,
    nodes_to_exclude: Sequence[str] = (),
    nodes_to_quantize: Sequence[str] = (),
    external_data: bool | None = None,
) -> dict[str, Any]:
    """Write the INT8 model of ``model_path`` to ``out_path`` with ``ranges`` (tensor -> (lo, hi))
    as the activation ranges. Returns a summary (counts of Q/DQ nodes, quantized nodes)."""
    import logging

    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData
    from onnxruntime.quantization.onnx_quantizer import ONNXQuantizer
    from onnxruntime.quantization.qdq_quantizer import QDQQuantizer
    from onnxruntime.quantization.quant_utils import QuantizationMode

    from .rewrites import fold_matmul_bias, split_geglu

    model = _shape_inferred(Path(model_path))
    renamed = split_geglu(model) if "split_geglu" in rcp.rewrites else {}
    if renamed:  # a node list naming a split projection names both halves
        nodes_to_exclude = [m for n in nodes_to_exclude for m in renamed.get(n, [n])]
        nodes_to_quantize = [m for n in nodes_to_quantize for m in renamed.get(n, [n])]
    if rcp.extra_options.get("MatMulConstBOnly"):  # ORT's QDQ quantizer ignores this option: do it here
        nodes_to_exclude = list(nodes_to_exclude) + activation_matmuls(model)
    tensors = TensorsData(CalibrationMethod.MinMax, {
        k: TensorData(lowest=np.float32(lo), highest=np.float32(hi)) for k, (lo, hi) in ranges.items()
    })
    extra = dict(rcp.extra_options)
    wt, at = _qtype(rcp.weight_type), _qtype(rcp.activation_type)
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # ORT's quantizer warns per tensor
    try:
        if rcp.quant_format == "qoperator":
            q = ONNXQuantizer(model, rcp.per_channel, rcp.reduce_range, QuantizationMode.QLinearOps, True, wt, at,
                              tensors,
                              list(nodes_to_quantize), list(nodes_to_exclude), list(rcp.op_types), extra)
        else:
            q = QDQQuantizer(model, rcp.per_channel, rcp.reduce_range, wt, at, tensors, list(nodes_to_quantize),
                             list(nodes_to_exclude), list(rcp.op_types), extra)
        q.quantize_model()
        q.model.topological_sort()  # dedicated Q/DQ pairs are appended out of order
    finally:
        logging.getLogger().setLevel(level)
    qm = q.model.model
    folded = fold_matmul_bias(qm) if "fold_matmul_bias" in rcp.rewrites and rcp.quant_format == "qdq" else 0
    # (ByteSize() itself fails past 2 GB: sum the initializers instead)
    size = sum(len(t.raw_data) or 4 * int(np.prod(t.dims)) for t in qm.graph.initializer)
    use_ext = external_data if external_data is not None else size > 1_800_000_000
    out_path = Path(out_path)
    if use_ext:
        onnx.save_model(qm, str(out_path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=out_path.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(qm, str(out_path))
    ops: dict[str, int] = {}
    for n in qm.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return {
        "quantize_linear": ops.get("QuantizeLinear", 0),
        "dequantize_linear": ops.get("DequantizeLinear", 0),
        "qlinear_ops": {k: v for k, v in ops.items() if k.startswith("QLinear") or "Integer" in k},
        "external_data": bool(use_ext),
        "rewrites": {"split_geglu": len(renamed), "fold_matmul_bias": folded},
    }
