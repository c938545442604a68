"""Which ONNX operators TensorRT's ONNX parser supports (no tensorrt needed).

The table in ``data/onnx_trt_ops.json`` is onnx-tensorrt's ``docs/operators.md`` recorded as
data, with the TensorRT version it describes and the commit it came from (see its ``source``).
It answers "will the parser accept these node types?" before a build; the parser itself remains
the authority (restrictions such as "weights must be initializers" are kept as text only).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Iterable

from ..errors import LdmDeployError

TABLE = Path(__file__).parent / "data" / "onnx_trt_ops.json"
ONNX_DOMAINS = ("", "ai.onnx")


@functools.lru_cache(maxsize=1)
def op_table() -> dict[str, Any]:
    """The recorded table: ``tensorrt_version``, ``opset_range``, ``source``, ``operators``."""
    return json.loads(TABLE.read_text())


def supported_ops() -> frozenset[str]:
    return frozenset(name for name, e in op_table()["operators"].items() if e.get("supported"))


def _nodes(graph: Any) -> Iterable[Any]:
    """All nodes of a graph, including those in subgraphs (If/Loop/Scan bodies)."""
    import onnx

    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _nodes(g)


def graph_ops(model: Any) -> set[tuple[str, str]]:
    """(domain, op_type) of every node; calls to the model's local functions are expanded."""
    functions = {(f.domain, f.name): f for f in model.functions}
    seen: set[tuple[str, str]] = set()
    out: set[tuple[str, str]] = set()

    def visit(nodes: Iterable[Any]) -> None:
        for n in nodes:
            key = (n.domain or "", n.op_type)
            if key in functions:
                if key not in seen:
                    seen.add(key)
                    visit(functions[key].node)
                continue
            out.add(("ai.onnx" if n.domain in ONNX_DOMAINS else n.domain, n.op_type))

    visit(_nodes(model.graph))
    return out


def _load(onnx_path: Path | str | Any) -> Any:
    if not isinstance(onnx_path, (str, Path)):
        return onnx_path
    import onnx

    p = Path(onnx_path)
    if not p.is_file():
        raise LdmDeployError(f"ONNX file {p} does not exist")
    return onnx.load(str(p), load_external_data=False)  # node types only: no weights needed


def unsupported_ops(onnx_path: Path | str | Any) -> list[str]:
    """Operators of the graph (a path or a loaded ``ModelProto``) that TensorRT's ONNX parser does
    not support, sorted. Domain ai.onnx ops are checked against the table; ops of any other
    domain (e.g. ``com.microsoft`` fusions from ``--optimize cuda``) need plugins TensorRT does
    not ship and are reported as ``domain::Op``."""
    ops = graph_ops(_load(onnx_path))
    ok = supported_ops()
    bad = {op for dom, op in ops if dom == "ai.onnx" and op not in ok}
    bad |= {f"{dom}::{op}" for dom, op in ops if dom != "ai.onnx"}
    return sorted(bad)


def opset_problem(onnx_path: Path | str | Any) -> str | None:
    """A message when the graph's ai.onnx opset lies outside the table's supported range."""
    model = _load(onnx_path)
    lo, hi = op_table()["opset_range"]
    for imp in model.opset_import:
        if imp.domain in ONNX_DOMAINS and not lo <= imp.version <= hi:
            return (f"opset {imp.version} is outside the range TensorRT {op_table()['tensorrt_version']}'s ONNX "
                    f"parser documents ({lo}..{hi})")
    return None


def check_graph(onnx_path: Path | str, component: str = "") -> None:
    """Raise a clear error when the graph uses operators TensorRT's parser lacks."""
    bad = unsupported_ops(onnx_path)
    if bad:
        t = op_table()
        raise LdmDeployError(
            f"{component or onnx_path} uses operators TensorRT's ONNX parser does not support "
            f"(TensorRT {t['tensorrt_version']} list): {', '.join(bad)}; re-export with --optimize tensorrt (plain attention, no ONNX Runtime fusions)"
        )
