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
from ..onnx_ops import ONNX_DOMAINS, graph_ops, load_structure

TABLE = Path(__file__).parent / "data" / "onnx_trt_ops.json"


@functools.lru_cache(maxsize=1)
def op_table() -> dict[str, Any]:
    """The recorded table: ``tensorrt_version``, ``opset_range``, ``source``, ``operators``."""
    return json.loads(TABLE.read_text())


def supported_ops() -> frozenset[str]:
    return frozenset(name for name, e in op_table()["operators"].items() if e.get("supported"))


def _load(onnx_path: Path | str | Any) -> Any:
    return load_structure(onnx_path)


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
