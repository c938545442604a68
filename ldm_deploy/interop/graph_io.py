"""Edits of an ONNX graph's inputs and outputs (names, dims, dtypes) that leave its computation
alone: what moving a graph between two naming conventions needs. Needs ``onnx`` (export extra)."""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import numpy as np

from ..specs import TensorSpec

_DTYPES = {"float32": 1, "int32": 6, "int64": 7, "float16": 10}  # onnx.TensorProto enums


def _subgraphs(graph: Any) -> Iterable[Any]:
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield attr.g
            yield from attr.graphs


def rename_values(graph: Any, mapping: Mapping[str, str]) -> None:
    """Rename values everywhere in ``graph`` (and its subgraphs): I/O, node inputs/outputs,
    value_info and initializers. Refuses a new name that the graph already uses."""
    if not mapping:
        return
    used = _all_value_names(graph) - set(mapping)
    clash = sorted(set(mapping.values()) & used)
    if clash:
        raise ValueError(f"cannot rename to {clash}: the graph already has values with these names")
    _rename(graph, dict(mapping))


def _rename(graph: Any, mapping: dict[str, str]) -> None:
    for v in list(graph.input) + list(graph.output) + list(graph.value_info):
        v.name = mapping.get(v.name, v.name)
    for t in graph.initializer:
        t.name = mapping.get(t.name, t.name)
    for node in graph.node:
        node.input[:] = [mapping.get(n, n) for n in node.input]
        node.output[:] = [mapping.get(n, n) for n in node.output]
    for sub in _subgraphs(graph):
        _rename(sub, mapping)


def _all_value_names(graph: Any) -> set[str]:
    names = {v.name for v in list(graph.input) + list(graph.output) + list(graph.value_info)}
    names |= {t.name for t in graph.initializer}
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
    for sub in _subgraphs(graph):
        names |= _all_value_names(sub)
    return names - {""}


def io_dims(value: Any) -> tuple[int | str | None, ...]:
    """A graph input/output's dims: ints, dim_param names, or None where unknown."""
    out: list[int | str | None] = []
    for d in value.type.tensor_type.shape.dim:
        out.append(d.dim_value if d.HasField("dim_value") else d.dim_param if d.HasField("dim_param") else None)
    return tuple(out)


def io_dtype(value: Any) -> str:
    enum = value.type.tensor_type.elem_type
    for name, e in _DTYPES.items():
        if e == enum:
            return name
    raise ValueError(f"graph value {value.name} has unsupported element type {enum}")


def set_dims(value: Any, dims: Iterable[int | str]) -> None:
    """Make a graph input/output's shape exactly ``dims`` (ints static, strings named axes)."""
    shape = value.type.tensor_type.shape
    shape.ClearField("dim")
    for want in dims:
        d = shape.dim.add()
        if isinstance(want, int):
            d.dim_value = want
        else:
            d.dim_param = want


def adapt_input(graph: Any, name: str, dtype: str, dims: tuple[int | str, ...]) -> None:
    """Give the graph input ``name`` another dtype and/or static shape (rank changes such as a
    scalar timestep <-> shape [1]) by feeding the old input through Cast / Reshape nodes."""
    from onnx import helper, numpy_helper

    value = next(v for v in graph.input if v.name == name)
    old_dtype, old_dims = io_dtype(value), io_dims(value)
    if old_dtype == dtype and old_dims == tuple(dims):
        return
    used = _all_value_names(graph)
    inner = next(f"{name}__ldm_adapted{i or ''}" for i in range(len(used) + 1)
                 if not any(u.startswith(f"{name}__ldm_adapted{i or ''}") for u in used))
    _rename(graph, {name: inner})
    nodes, current = [], name
    if old_dtype != dtype:
        nodes.append(helper.make_node("Cast", [current], [f"{inner}__cast"], to=_DTYPES[old_dtype]))
        current = f"{inner}__cast"
    if len(old_dims) != len(dims):
        if any(not isinstance(d, int) for d in old_dims):
            raise ValueError(f"cannot reshape {name} to a different rank: its dims {old_dims} are not all static")
        shape_name = f"{inner}__shape"
        graph.initializer.append(numpy_helper.from_array(np.array(old_dims, dtype=np.int64), shape_name))
        nodes.append(helper.make_node("Reshape", [current, shape_name], [f"{inner}__reshaped"]))
        current = f"{inner}__reshaped"
    if nodes:
        nodes[-1].output[0] = inner
    else:  # only the dims' names differ
        nodes.append(helper.make_node("Identity", [current], [inner]))
    for n in reversed(nodes):
        graph.node.insert(0, n)
    value.name = name
    value.type.tensor_type.elem_type = _DTYPES[dtype]
    set_dims(value, dims)


def drop_outputs(graph: Any, keep: Iterable[str]) -> None:
    """Keep only the graph outputs named in ``keep`` and remove nodes nothing needs any more."""
    keep = set(keep)
    for v in [v for v in graph.output if v.name not in keep]:
        graph.output.remove(v)
    needed = {v.name for v in graph.output}
    live = []
    for node in reversed(list(graph.node)):
        if any(o in needed for o in node.output):
            live.append(node)
            needed.update(node.input)
            for sub in _subgraphs_of(node):
                needed |= _all_value_names(sub)
    live_ids = {id(n) for n in live}
    for node in [n for n in graph.node if id(n) not in live_ids]:
        graph.node.remove(node)
    for t in [t for t in graph.initializer if t.name not in needed]:
        graph.initializer.remove(t)


def _subgraphs_of(node: Any) -> Iterable[Any]:
    for attr in node.attribute:
        if attr.HasField("g"):
            yield attr.g
        yield from attr.graphs


def add_pooled_output(graph: Any, ids: str, hidden: str, pooled: str) -> None:
    """Add CLIP's pooled output to a text encoder graph: the hidden state at each row's first
    end-of-text token, found as the position of the largest token id (as transformers' CLIP does
    for SD's tokenizers, where end-of-text has the largest id)."""
    import onnx
    from onnx import helper, numpy_helper

    hid = next(v for v in graph.output if v.name == hidden)
    width = io_dims(hid)[-1]
    pre = f"{pooled}__ldm"
    graph.initializer.extend([
        numpy_helper.from_array(np.array([1], dtype=np.int64), f"{pre}_axis1"),
        numpy_helper.from_array(np.array([1, 1, int(width)], dtype=np.int64), f"{pre}_expand"),
    ])
    graph.node.extend([
        helper.make_node("Cast", [ids], [f"{pre}_ids64"], to=onnx.TensorProto.INT64),
        helper.make_node("ArgMax", [f"{pre}_ids64"], [f"{pre}_pos"], axis=1, keepdims=1),  # [B, 1]
        helper.make_node("Unsqueeze", [f"{pre}_pos", f"{pre}_axis1"], [f"{pre}_pos3"]),  # [B, 1, 1]
        helper.make_node("Expand", [f"{pre}_pos3", f"{pre}_expand"], [f"{pre}_index"]),  # [B, 1, D]
        helper.make_node("GatherElements", [hidden, f"{pre}_index"], [f"{pre}_gathered"], axis=1),
        helper.make_node("Squeeze", [f"{pre}_gathered", f"{pre}_axis1"], [pooled]),  # [B, D]
    ])
    batch = io_dims(hid)[0]
    graph.output.append(helper.make_tensor_value_info(pooled, hid.type.tensor_type.elem_type,
                                                      [batch if batch is not None else "batch", width]))


def specs_io(graph: Any, tensors: Iterable[TensorSpec], outputs: bool) -> None:
    """Set each named graph input (or output) to the dims of its spec (static ints, axis names)."""
    values = {v.name: v for v in (graph.output if outputs else graph.input)}
    for t in tensors:
        set_dims(values[t.name], t.shape)
