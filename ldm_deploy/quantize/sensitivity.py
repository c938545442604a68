"""Per-block INT8 sensitivity: the output error when only one group of nodes is quantized."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..specs import COMPONENTS
from .assess import compare_models, onnx_outputs
from .recipes import Recipe, quantize_onnx


def block_of(node_name: str, depth: int = 3) -> str:
    """``/unet/down_blocks.0/resnets.0/conv1/Conv`` -> ``down_blocks.0/resnets.0`` (depth 3) -
    the group a node belongs to in the sensitivity table."""
    parts = [p for p in node_name.split("/") if p]
    if parts and parts[0] in COMPONENTS:
        parts = parts[1:]
    parts = parts[:-1] if len(parts) > 1 else parts  # drop the op name
    keep = depth - 1
    return "/".join(parts[:keep]) if parts else node_name


def sensitivity_table(
    model_path: Path, ranges: dict[str, tuple[float, float]], rcp: Recipe, candidates: Sequence[str],
    batches: Sequence[dict[str, np.ndarray]], group: str = "block", limit: int | None = None, threads: int = 0,
    log: Callable[[str], None] = lambda s: None,
) -> list[dict[str, Any]]:
    """Output error of the model when only one group of nodes (a block, or one ``layer``) is
    quantized, over ``batches``; sorted worst first."""
    groups: dict[str, list[str]] = {}
    for n in candidates:
        groups.setdefault(n if group == "layer" else block_of(n), []).append(n)
    items = list(groups.items())[: limit or None]
    refs = onnx_outputs(model_path, batches, threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="ldm-quant-sens-") as d:
        for i, (name, nodes) in enumerate(items):
            out = Path(d) / f"g{i}.onnx"
            quantize_onnx(model_path, out, ranges, rcp, nodes_to_quantize=nodes)
            err = compare_models(model_path, out, batches, threads, ref_outputs=refs)
            rows.append({"group": name, "nodes": len(nodes), **err})
            log(f"sensitivity: {name:<48} {len(nodes):>3} nodes  cos {err['cosine']:.6f}  rel_l2 {err['rel_l2']:.2e}")
            out.unlink()
    rows.sort(key=lambda r: r["rel_l2"], reverse=True)
    return rows


def sensitivity_markdown(rows: list[dict[str, Any]], component: str) -> str:
    lines = [f"# INT8 sensitivity: {component}", "",
             "Output error of the component when only this group is quantized (all else fp32), mean over "
             "calibration batches; worst first.", "",
             "| group | nodes | cosine | rel L2 | max abs |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| `{r['group']}` | {r['nodes']} | {r['cosine']:.6f} | {r['rel_l2']:.3e} | {r['max_abs']:.3e} |")
    return "\n".join(lines) + "\n"
