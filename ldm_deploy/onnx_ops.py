"""Which operators an ONNX graph uses, and the one check every non-ONNX-Runtime consumer shares:
no ONNX Runtime-only operators (``com.microsoft`` contrib ops such as the fused
``MultiHeadAttention`` of fp32 CPU exports). Needs ``onnx`` (imported lazily)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from .errors import LdmDeployError

ONNX_DOMAINS = ("", "ai.onnx")
#: What to export instead (plain MatMul/Softmax attention, no ORT fusions).
PORTABLE_EXPORT_HINT = "re-export with `ldm-export --attention full` or `--optimize tensorrt`"


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


def load_structure(onnx_path: Path | str | Any) -> Any:
    """A ``ModelProto`` without its weights (node types only); a loaded model is returned as is."""
    if not isinstance(onnx_path, (str, Path)):
        return onnx_path
    import onnx

    p = Path(onnx_path)
    if not p.is_file():
        raise LdmDeployError(f"ONNX file {p} does not exist")
    return onnx.load(str(p), load_external_data=False)


def graph_ops(model: Any) -> set[tuple[str, str]]:
    """(domain, op_type) of every node; calls to the model's local functions are expanded."""
    model = load_structure(model)
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


def foreign_ops(model: Path | str | Any) -> list[str]:
    """``domain::Op`` of every operator outside the ONNX standard domain, sorted."""
    return sorted(f"{dom}::{op}" for dom, op in graph_ops(model) if dom != "ai.onnx")


def check_no_ort_only_ops(model: Path | str | Any, component: str, consumer: str) -> None:
    """One-line :class:`LdmDeployError` when ``component``'s graph uses ONNX Runtime-only operators
    that ``consumer`` (e.g. "OpenVINO") cannot run."""
    foreign = foreign_ops(model)
    if foreign:
        raise LdmDeployError(f"{component} uses ONNX Runtime-only operators ({', '.join(foreign)}) that {consumer} "
                             f"cannot run; {PORTABLE_EXPORT_HINT}")
