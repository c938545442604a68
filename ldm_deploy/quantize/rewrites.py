"""Graph rewrites of the ``cpu`` target that let ONNX Runtime's INT8 kernels do more of the work.

Both keep the maths of the graph; they only change which kernels compute it.

* :func:`split_geglu` (before quantization): the GEGLU feed-forward projects to ``2N`` columns and
  slices the result into the value and gate halves. In an INT8 graph the projection writes an fp32
  ``[B, S, 2N]`` tensor that two ``Slice`` nodes then copy; two ``N``-column projections write the
  halves directly (and ORT fuses the gate's bias into ``BiasGelu``).
* :func:`fold_matmul_bias` (after quantization): ``DQ(x) -> MatMul <- DQ(W)`` followed by a bias
  ``Add`` becomes one ``com.microsoft::MatMulIntegerToFloat`` with the bias applied in the GEMM's
  output stage. ORT builds that operator from the QDQ pattern itself, but leaves the bias ``Add``
  as a separate pass over the fp32 output.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

MS_DOMAIN = "com.microsoft"


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in graph.node for o in n.output}


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            out.setdefault(i, []).append(n)
    return out


def _constant(name: str, inits: dict[str, onnx.TensorProto], prod: dict[str, onnx.NodeProto]) -> np.ndarray | None:
    if name in inits:
        return numpy_helper.to_array(inits[name])
    node = prod.get(name)
    if node is not None and node.op_type == "Constant":
        for a in node.attribute:
            if a.name == "value":
                return numpy_helper.to_array(a.t)
    return None


def prune_dead_nodes(graph: onnx.GraphProto) -> int:
    """Remove nodes no graph output depends on, then unused initializers; returns nodes removed."""
    prod = _producers(graph)
    live: set[int] = set()
    stack = [o.name for o in graph.output]
    while stack:
        node = prod.get(stack.pop())
        if node is None or id(node) in live:
            continue
        live.add(id(node))
        stack.extend(node.input)
    keep = [n for n in graph.node if id(n) in live]
    removed = len(graph.node) - len(keep)
    del graph.node[:]
    graph.node.extend(keep)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for i in reversed(range(len(graph.initializer))):  # in place: extend() would copy every weight
        if graph.initializer[i].name not in used:
            del graph.initializer[i]
    return removed


def _cone_values(graph: onnx.GraphProto, source: str, width: int, names: list[str],
                 inits: dict[str, onnx.TensorProto], prod: dict[str, onnx.NodeProto],
                 cone: set[int] | None = None) -> list[np.ndarray] | None:
    """Evaluate ``names`` when they depend only on the *shape* of ``source`` (last dim ``width``)
    and on constants; None if they depend on anything else or on the leading dims. The ids of the
    nodes computing them are added to ``cone``."""
    from onnx.reference import ReferenceEvaluator

    consts = {n: _constant(n, inits, prod) for n in names}
    names_left = [n for n in names if consts[n] is None]
    if not names_left:
        return [consts[n] for n in names]  # type: ignore[misc]
    seen: set[int] = set()
    stack = list(names_left)
    while stack:
        t = stack.pop()
        if t == source or t in inits or t == "":
            continue
        node = prod.get(t)
        if node is None or node.op_type not in ("Shape", "Gather", "Add", "Sub", "Mul", "Div", "Constant",
                                                "Unsqueeze", "Squeeze", "Concat", "Cast", "Slice"):
            return None
        if id(node) not in seen:
            seen.add(id(node))
            stack.extend(node.input)
    order = [n for n in graph.node if id(n) in seen]  # graph order is topological
    used = {i for n in order for i in n.input}
    sub = helper.make_graph(
        order, "cone", [helper.make_tensor_value_info(source, onnx.TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info(n, onnx.TensorProto.UNDEFINED, None) for n in names_left],
        [t for n, t in inits.items() if n in used])
    model = helper.make_model(sub, opset_imports=[helper.make_opsetid("", 18)])
    results = []
    for lead in ((1, 1), (2, 3)):
        x = np.zeros((*lead, width), dtype=np.float32)
        results.append([np.asarray(v) for v in ReferenceEvaluator(model).run(None, {source: x})])
    if any(not np.array_equal(a, b) for a, b in zip(*results)):
        return None
    if cone is not None:
        cone.update(seen)
    computed = dict(zip(names_left, results[0]))
    return [consts[n] if consts[n] is not None else computed[n] for n in names]


def _geglu_halves(graph: onnx.GraphProto, y: str, width: int, inits: dict[str, onnx.TensorProto],
                  prod: dict[str, onnx.NodeProto], users: dict[str, list[onnx.NodeProto]]) -> list[str] | None:
    """The outputs holding ``y[..., :N]`` and ``y[..., N:]`` if the consumers of ``y`` are exactly
    two ``Slice`` nodes taking those halves (torch's ``chunk(2, -1)``); else None."""
    half = width // 2
    cons = users.get(y, [])
    shapes = [c for c in cons if c.op_type == "Shape"]  # feed the slice bounds of torch's chunk()
    cons = [c for c in cons if c.op_type != "Shape"]
    if len(cons) != 2 or any(c.op_type != "Slice" or len(c.input) < 4 for c in cons):
        return None
    ranges = []
    cone: set[int] = set()
    for s in cons:
        if len(s.input) > 4 and s.input[4] and np.any(_constant(s.input[4], inits, prod) != 1):
            return None
        axes = _constant(s.input[3], inits, prod)
        if axes is None or list(np.ravel(axes)) != [-1]:
            return None
        vals = _cone_values(graph, y, width, [s.input[1], s.input[2]], inits, prod, cone)
        if vals is None:
            return None
        start, end = (int(np.ravel(v)[0]) for v in vals)
        ranges.append((max(start, 0), min(end, width), s.output[0]))
    ranges.sort()
    if [(a, b) for a, b, _ in ranges] != [(0, half), (half, width)]:
        return None
    # y must die with the rewrite: every Shape of it may only feed these slice bounds
    inside = cone | {id(s) for s in cons}
    if any(id(sh) not in cone for sh in shapes) or any(
            id(u) not in inside for n in graph.node if id(n) in cone for o in n.output for u in users.get(o, [])):
        return None
    return [r[2] for r in ranges]


def split_geglu(model: onnx.ModelProto) -> dict[str, list[str]]:
    """Rewrite every ``MatMul(x, W[K, 2N]) + b`` whose result is only split in two halves along the
    last axis into two ``MatMul + Add`` with ``W``/``b`` split by columns. Needs the weights loaded.
    Returns ``{old MatMul name: [value MatMul, gate MatMul]}``."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    prod, cons = _producers(g), _consumers(g)
    infos = {v.name: v for v in g.value_info}
    renamed: dict[str, list[str]] = {}
    new_nodes: dict[int, list[onnx.NodeProto]] = {}
    drop: set[int] = set()
    for add in g.node:
        if add.op_type != "Add" or len(add.input) != 2:
            continue
        bias_name = next((i for i in add.input if i in inits), None)
        mm = prod.get(next((i for i in add.input if i != bias_name), ""))
        if bias_name is None or mm is None or mm.op_type != "MatMul" or mm.input[1] not in inits:
            continue
        w = numpy_helper.to_array(inits[mm.input[1]])
        b = numpy_helper.to_array(inits[bias_name])
        if w.ndim != 2 or b.shape != (w.shape[1],) or w.shape[1] % 2 or len(cons.get(mm.output[0], [])) != 1:
            continue
        halves = _geglu_halves(g, add.output[0], w.shape[1], inits, prod, cons)
        if halves is None:
            continue
        n = w.shape[1] // 2
        nodes: list[onnx.NodeProto] = []
        for part, (cols, out) in zip(("value", "gate"), ((slice(0, n), halves[0]), (slice(n, None), halves[1]))):
            wn, bn, mo = f"{mm.input[1]}_{part}", f"{bias_name}_{part}", f"{mm.output[0]}_{part}"
            g.initializer.extend([numpy_helper.from_array(np.ascontiguousarray(w[:, cols]), wn),
                                  numpy_helper.from_array(np.ascontiguousarray(b[cols]), bn)])
            nodes.append(helper.make_node("MatMul", [mm.input[0], wn], [mo], name=f"{mm.name}_{part}"))
            nodes.append(helper.make_node("Add", [mo, bn], [out], name=f"{add.name}_{part}"))
            if out in infos:  # the half's shape is also the new MatMul output's
                vi = onnx.ValueInfoProto()
                vi.CopyFrom(infos[out])
                vi.name = mo
                g.value_info.append(vi)
        renamed[mm.name] = [nodes[0].name, nodes[2].name]
        new_nodes[id(mm)] = nodes
        drop.add(id(add))
        drop.update(id(c) for c in cons[add.output[0]] if c.op_type != "Shape")  # Shapes: pruned as dead
    if not renamed:
        return renamed
    out_nodes: list[onnx.NodeProto] = []
    for node in g.node:  # the halves replace the MatMul in place: the order stays topological
        if id(node) in new_nodes:
            out_nodes.extend(new_nodes[id(node)])
        elif id(node) not in drop:
            out_nodes.append(node)
    del g.node[:]
    g.node.extend(out_nodes)
    prune_dead_nodes(g)  # the slice-bound arithmetic and the fused weights
    return renamed


def fold_matmul_bias(model: onnx.ModelProto) -> int:
    """``DQ(x_q) -> MatMul <- DQ(W_q)`` + constant bias ``Add`` -> ``MatMulIntegerToFloat`` with the
    bias input (QDQ graphs of the ``cpu`` target). Returns the number of MatMuls folded."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    prod, cons = _producers(g), _consumers(g)
    outputs = {o.name for o in g.output}
    replace: dict[int, onnx.NodeProto] = {}
    drop: set[int] = set()
    for mm in g.node:
        if mm.op_type != "MatMul" or mm.domain not in ("", "ai.onnx"):
            continue
        dx, dw = prod.get(mm.input[0]), prod.get(mm.input[1])
        users = cons.get(mm.output[0], [])
        if (dx is None or dw is None or dx.op_type != "DequantizeLinear" or dw.op_type != "DequantizeLinear"
                or dw.input[0] not in inits or len(users) != 1 or users[0].op_type != "Add"
                or mm.output[0] in outputs or len(dx.input) < 3 or len(dw.input) < 3):
            continue
        add = users[0]
        bias = next((i for i in add.input if i != mm.output[0]), "")
        wq = inits[dw.input[0]]
        x_scale = _constant(dx.input[1], inits, prod)
        w_scale = _constant(dw.input[1], inits, prod)
        w_axis = next((a.i for a in dw.attribute if a.name == "axis"), 1)
        per_column = w_scale is not None and (w_scale.size == 1 or w_axis in (1, -1))
        if (bias not in inits or len(wq.dims) != 2 or list(inits[bias].dims) != [wq.dims[1]]
                or inits[bias].data_type != onnx.TensorProto.FLOAT
                or x_scale is None or x_scale.size != 1 or not per_column):
            continue
        replace[id(mm)] = helper.make_node(
            "MatMulIntegerToFloat",
            [dx.input[0], dw.input[0], dx.input[1], dw.input[1], dx.input[2], dw.input[2], bias],
            [add.output[0]], name=mm.name, domain=MS_DOMAIN)
        drop.add(id(add))
    if not replace:
        return 0
    nodes = [replace.get(id(n), n) for n in g.node if id(n) not in drop]
    del g.node[:]
    g.node.extend(nodes)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    prune_dead_nodes(g)  # weight DQs left without consumers would otherwise run on every call
    return len(replace)
