"""Where a cpu-target INT8 U-Net loses accuracy: the output error (vs the fp32 source) that remains when
one group of activation Q/DQ pairs is taken out of the INT8 graph, on ldm-quantize's held-out trajectory
batches (as ``heldout_cosine.py`` rebuilds them).

Removing a pair (or the input quantization of a fused ``MatMulIntegerToFloat``) feeds the float tensor straight to its consumers, so a group's "error removed" is the
share of the INT8 error caused by quantizing those activations (weights stay INT8). Groups: by kind
(conv output, conv input, MatMul/Gemm input), by kind and layer role (``conv_out:conv2``,
``matmul_in:to_q``...) and by U-Net block. Speed is not measured here (a graph without some output Q
runs those Convs in fp32).

    python benchmarks/int8_error_sources.py --fp32 sd15-onnx --int8 sd15-int8 [--holdout 4] \
        [--cache heldout.npz] [-o benchmarks/results/int8_error_sources_sd15]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx

from heldout_cosine import heldout_batches

MATMULS = ("MatMul", "Gemm")


def activation_pairs(model: onnx.ModelProto) -> list[dict]:
    """Every quantized activation edge, with its producer and consumers: ``QuantizeLinear -> DequantizeLinear``
    pairs and ``QuantizeLinear -> MatMulIntegerToFloat`` inputs (the recipe's fused MatMul + bias)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for n in model.graph.node:
        for i in n.input:
            consumers[i].append(n)
    pairs = []
    for q in model.graph.node:
        if q.op_type != "QuantizeLinear":
            continue
        src = producer.get(q.input[0])
        edge = {"q": q.name, "tensor": q.input[0], "producer": src.op_type if src is not None else "input",
                "producer_name": src.name if src is not None else q.input[0]}
        for u in consumers[q.output[0]]:
            if u.op_type == "DequantizeLinear":
                users = consumers[u.output[0]]
                pairs.append({**edge, "dq": u.name, "dq_out": u.output[0],
                              "consumer_ops": sorted({c.op_type for c in users}),
                              "consumer_names": [c.name for c in users]})
            elif u.op_type == "MatMulIntegerToFloat":
                pairs.append({**edge, "mmi": u.name, "consumer_ops": ["MatMul"], "consumer_names": [u.name]})
    return pairs


def _float_matmul(n: onnx.NodeProto, x: str) -> list[onnx.NodeProto]:
    """``MatMulIntegerToFloat(A_q, B_q, sa, sb, za, zb[, bias])`` -> ``MatMul(x, DQ(B_q)) (+ bias)``."""
    from onnx import helper

    b = f"{n.name}/B_float"
    nodes = [helper.make_node("DequantizeLinear", [n.input[1], n.input[3], n.input[5]], [b], name=f"{n.name}/DQ_B",
                              axis=1)]
    has_bias = len(n.input) > 6 and n.input[6]
    mm_out = f"{n.name}/float_out" if has_bias else n.output[0]
    nodes.append(helper.make_node("MatMul", [x, b], [mm_out], name=f"{n.name}/float"))
    if has_bias:
        nodes.append(helper.make_node("Add", [mm_out, n.input[6]], [n.output[0]], name=f"{n.name}/float_bias"))
    return nodes


def _module(node_name: str) -> str:
    """``/unet/down_blocks.1/resnets.0/conv2/Conv`` -> ``conv2``."""
    parts = [p for p in node_name.split("/") if p]
    return parts[-2] if len(parts) >= 2 else node_name


def _block(node_name: str) -> str:
    """``/unet/down_blocks.1/resnets.0/conv2/Conv`` -> ``down_blocks.1``; ``other`` outside the blocks."""
    parts = [p for p in node_name.split("/") if p]
    return parts[1] if len(parts) > 2 and parts[1].startswith(("down_blocks.", "up_blocks.", "mid_block")) else "other"


def classify(p: dict) -> dict[str, str]:
    """Group keys of one pair: kind, role (kind + layer) and block."""
    if p["producer"] == "Conv":
        kind, where = "conv_out", p["producer_name"]
    elif any(op in MATMULS for op in p["consumer_ops"]):
        kind, where = "matmul_in", next(n for n in p["consumer_names"])
    elif "Conv" in p["consumer_ops"]:
        kind, where = "conv_in", next(n for n in p["consumer_names"])
    else:
        kind, where = "other", p["producer_name"]
    return {"kind": kind, "role": f"{kind}:{_module(where)}", "block": _block(where)}


def without_pairs(model: onnx.ModelProto, pairs: list[dict]) -> onnx.ModelProto:
    """A copy of the graph with ``pairs`` removed: their consumers read the float tensor (a
    ``MatMulIntegerToFloat`` becomes a float MatMul on its dequantized weight)."""
    rename = {p["dq_out"]: p["tensor"] for p in pairs if "dq" in p}
    drop = {p["dq"] for p in pairs if "dq" in p}
    to_float = {p["mmi"]: p["tensor"] for p in pairs if "mmi" in p}
    used = defaultdict(int)  # a Q node stays while a kept node reads it
    for n in model.graph.node:
        if n.name not in drop and n.name not in to_float:
            for i in n.input:
                used[i] += 1
    nodes = []
    for n in model.graph.node:
        if n.name in drop or (n.op_type == "QuantizeLinear" and not used[n.output[0]]):
            continue
        if n.name in to_float:
            nodes += _float_matmul(n, to_float[n.name])
            continue
        m = onnx.NodeProto()
        m.CopyFrom(n)
        for i, name in enumerate(m.input):
            if name in rename:
                m.input[i] = rename[name]
        nodes.append(m)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out


def run_graph(model: onnx.ModelProto, batches: list[dict], threads: int) -> list[np.ndarray]:
    from ldm_deploy.quantize.assess import onnx_outputs

    with tempfile.TemporaryDirectory(prefix="ldm-err-") as d:
        path = Path(d) / "model.onnx"
        onnx.save(model, str(path))
        return onnx_outputs(path, batches, threads)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fp32", required=True, help="fp32 artifact (the INT8 artifact's source)")
    ap.add_argument("--int8", required=True, help="cpu-target INT8 artifact (QDQ)")
    ap.add_argument("--holdout", type=int, default=4)
    ap.add_argument("--cache", help="npz of the held-out batches (written if missing)")
    ap.add_argument("--by", nargs="+", default=["kind", "role", "block"], choices=["kind", "role", "block"])
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("-o", "--output", default="benchmarks/results/int8_error_sources")
    a = ap.parse_args()

    from ldm_deploy.artifact import Artifact
    from ldm_deploy.numerics import compare, mean_errors
    from ldm_deploy.quantize.assess import onnx_outputs

    batches = heldout_batches(a.fp32, a.int8, a.holdout, a.threads, a.cache)
    ref = onnx_outputs(Artifact.open(a.fp32).model_file("unet"), batches, a.threads)
    model = onnx.load(str(Artifact.open(a.int8).model_file("unet")))
    pairs = activation_pairs(model)
    for p in pairs:
        p.update(classify(p))

    def error(drop: list[dict]) -> dict:
        t0 = time.perf_counter()
        outs = run_graph(without_pairs(model, drop) if drop else model, batches, a.threads)
        return {**mean_errors([compare(r, o) for r, o in zip(ref, outs)]), "seconds": round(time.perf_counter() - t0, 1)}

    base = error([])
    print(f"INT8 as built: rel L2 {base['rel_l2']:.4f}, cosine {base['cosine']:.5f}", flush=True)
    rows = [{"group": "(none removed)", "by": "-", "pairs": 0, **base}]
    groups = [("all activations", "-", pairs)]
    for by in a.by:
        keys = sorted({p[by] for p in pairs})
        groups += [(k, by, [p for p in pairs if p[by] == k]) for k in keys]
    for name, by, drop in groups:
        err = error(drop)
        rows.append({"group": name, "by": by, "pairs": len(drop), **err})
        print(f"{by:>5} {name:<28} pairs {len(drop):>4}  rel L2 {err['rel_l2']:.4f}  cosine {err['cosine']:.5f}",
              flush=True)

    out = Path(a.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"fp32": a.fp32, "int8": a.int8, "batches": len(batches),
                                                    "rows": rows}, indent=2, default=float) + "\n")
    lines = [f"# Where the INT8 U-Net's error comes from ({len(batches)} held-out trajectory batches)", "",
             "Each row removes one group of activation Q/DQ pairs from the INT8 graph (weights stay INT8); "
             "'error removed' is the drop in rel L2 vs fp32 relative to the INT8 graph as built.", "",
             "| group | by | pairs | rel L2 | cosine | error removed |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        removed = 1 - r["rel_l2"] / base["rel_l2"] if base["rel_l2"] else 0.0
        lines.append(f"| {r['group']} | {r['by']} | {r['pairs']} | {r['rel_l2']:.4f} | {r['cosine']:.5f} | "
                     f"{100 * removed:.0f}% |")
    lines += ["", f"Reproduce: `python benchmarks/int8_error_sources.py --fp32 {a.fp32} --int8 {a.int8} "
              f"--holdout {a.holdout}`"]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
