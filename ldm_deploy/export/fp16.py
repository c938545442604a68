"""fp32 -> fp16 graph conversion that works without a GPU (onnxconverter-common)."""

from __future__ import annotations

import os
from pathlib import Path

import onnx
from onnx import TensorProto, helper

# Ops kept in fp32: reductions and normalisations whose intermediate sums overflow fp16,
# softmax/exp (attention logits), the timestep embedding's sin/cos/exp (arguments up to ~1000),
# Resize (its scales input must stay float32) and random generators.
FP16_OP_BLOCK_LIST = (
    "Pow", "ReduceMean", "ReduceSum", "Sqrt", "Reciprocal", "Softmax", "Exp", "Sin", "Cos", "Range",
    "Erf", "InstanceNormalization", "GroupNormalization", "LayerNormalization", "Resize",
    "RandomNormalLike", "RandomNormal", "RandomUniformLike",
)
_SHAPE_INFER_LIMIT = 2_000_000_000


def convert_to_fp16(src: Path, dst: Path, keep_io_types: bool = True, op_block_list: tuple[str, ...] = FP16_OP_BLOCK_LIST) -> Path:
    """Convert the fp32 graph at ``src`` to fp16 at ``dst``.

    With ``keep_io_types`` the graph keeps float32 inputs and outputs (casts inside), so callers
    feed and read float32 whatever the precision."""
    from onnxruntime.transformers import float16

    size = sum(p.stat().st_size for p in src.parent.iterdir() if p.name.startswith(src.name))
    if size > _SHAPE_INFER_LIMIT:
        # The converter needs every value's type to put casts around blocked ops; in-memory shape
        # inference stops at 2 GB, the path-based one does not.
        inferred = src.parent / (src.stem + "-inferred.onnx")
        onnx.shape_inference.infer_shapes_path(str(src), str(inferred))
        model = onnx.load(str(inferred), load_external_data=True)
        inferred.unlink()
    else:
        model = onnx.load(str(src), load_external_data=True)
    _drop_initializer_identities(model.graph)
    model = float16.convert_float_to_float16(
        model,
        keep_io_types=keep_io_types,
        op_block_list=list(op_block_list),
        disable_shape_infer=size > _SHAPE_INFER_LIMIT,
    )
    want = TensorProto.FLOAT if keep_io_types else TensorProto.FLOAT16
    _force_output_types(model, want)
    _topological_sort(model.graph)
    dst.parent.mkdir(parents=True, exist_ok=True)
    large = model.ByteSize() > _SHAPE_INFER_LIMIT if size <= _SHAPE_INFER_LIMIT else True
    if large:
        data = dst.name + ".data"
        if (dst.parent / data).exists():
            os.remove(dst.parent / data)
        onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True, location=data, size_threshold=1024)
    else:
        onnx.save_model(model, str(dst))
    return dst


def _drop_initializer_identities(graph: onnx.GraphProto) -> None:
    """Remove ``Identity`` nodes that alias an initializer (the tracing exporter emits them for
    shared weights); the converter otherwise leaves their outputs typed float32."""
    inits = {t.name for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    alias = {n.output[0]: n.input[0] for n in graph.node
             if n.op_type == "Identity" and n.input[0] in inits and n.output[0] not in outputs}
    if not alias:
        return
    keep = [n for n in graph.node if not (n.op_type == "Identity" and n.output[0] in alias)]
    for n in keep:
        n.input[:] = [alias.get(i, i) for i in n.input]
    del graph.node[:]
    graph.node.extend(keep)
    vi = [v for v in graph.value_info if v.name not in alias]
    del graph.value_info[:]
    graph.value_info.extend(vi)


def _topological_sort(graph: onnx.GraphProto) -> None:
    """Order nodes so every input is produced before use (the converter appends its casts)."""
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        rest = []
        for node in pending:
            if all(i in ready for i in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise ValueError(f"graph has a cycle or a missing input near node {rest[0].name}")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


def _force_output_types(model: onnx.ModelProto, elem_type: int) -> None:
    """Append a Cast to any float output the converter left in the other float type."""
    graph = model.graph
    for out in graph.output:
        t = out.type.tensor_type
        if t.elem_type in (TensorProto.FLOAT, TensorProto.FLOAT16) and t.elem_type != elem_type:
            inner = out.name + "_before_cast"
            for node in graph.node:
                node.output[:] = [inner if o == out.name else o for o in node.output]
                node.input[:] = [inner if i == out.name else i for i in node.input]
            graph.node.append(helper.make_node("Cast", [inner], [out.name], to=elem_type, name=out.name + "_cast"))
            t.elem_type = elem_type
