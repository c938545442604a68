"""The cpu target's graph rewrites keep the maths: outputs before and after agree."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper
from onnx import TensorProto as T

from ldm_deploy.quantize.ranges import calibration_targets, collect_ranges, load_structure
from ldm_deploy.quantize.recipes import quantize_onnx, recipe
from ldm_deploy.quantize.rewrites import fold_matmul_bias, split_geglu


def _run(model: onnx.ModelProto | str, feeds: dict[str, np.ndarray]) -> np.ndarray:
    data = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def _unet_feeds(seed: int = 0) -> dict[str, np.ndarray]:
    r = np.random.default_rng(seed)
    return {"sample": r.standard_normal((2, 4, 8, 8)).astype(np.float32),
            "timestep": np.array([401.0], np.float32),
            "encoder_hidden_states": r.standard_normal((2, 77, 32)).astype(np.float32)}


def _geglu_graph(first: tuple[int, int], second: tuple[int, int]) -> onnx.ModelProto:
    """x @ W + b sliced into two halves with constant bounds, then value * gelu(gate)."""
    r = np.random.default_rng(0)
    w, b = r.standard_normal((8, 12)).astype(np.float32), r.standard_normal(12).astype(np.float32)
    c = lambda name, v: numpy_helper.from_array(np.array(v, np.int64), name)  # noqa: E731
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"], name="proj/MatMul"),
             helper.make_node("Add", ["b", "mm"], ["y"], name="proj/Add"),
             helper.make_node("Slice", ["y", "s0", "e0", "ax"], ["value"], name="s0"),
             helper.make_node("Slice", ["y", "s1", "e1", "ax"], ["gate"], name="s1"),
             helper.make_node("Sigmoid", ["gate"], ["g"]),
             helper.make_node("Mul", ["value", "g"], ["out"])]
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b"), c("s0", [first[0]]),
             c("e0", [first[1]]), c("s1", [second[0]]), c("e1", [second[1]]), c("ax", [-1])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", T.FLOAT, [2, 3, 8])],
                          [helper.make_tensor_value_info("out", T.FLOAT, [2, 3, None])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


def test_split_geglu_on_constant_halves_only():
    x = {"x": np.random.default_rng(1).standard_normal((2, 3, 8)).astype(np.float32)}
    m = _geglu_graph((0, 6), (6, 1 << 62))
    ref = _run(m, x)
    assert split_geglu(m) == {"proj/MatMul": ["proj/MatMul_value", "proj/MatMul_gate"]}
    assert "Slice" not in {n.op_type for n in m.graph.node} and "w" not in {t.name for t in m.graph.initializer}
    onnx.checker.check_model(m)
    np.testing.assert_allclose(_run(m, x), ref, rtol=1e-6, atol=1e-6)
    # unequal pieces are not a GEGLU split: left alone
    m = _geglu_graph((0, 5), (5, 12))
    assert split_geglu(m) == {} and sum(n.op_type == "Slice" for n in m.graph.node) == 2


def test_split_geglu_on_the_exported_unet(tiny_random_fp32):
    path = str(tiny_random_fp32 / "unet" / "model.onnx")
    m = onnx.load(path)
    feeds = _unet_feeds()
    ref = _run(path, feeds)
    blocks = [n.name for n in m.graph.node if n.op_type == "MatMul" and "/ff/net.0/proj/" in n.name]
    renamed = split_geglu(m)
    assert blocks and sorted(renamed) == sorted(blocks)  # torch's chunk(): bounds computed from Shape
    left = {n.op_type for n in m.graph.node if "/ff/net.0/" in n.name}
    assert "Slice" not in left and "Shape" not in left
    np.testing.assert_allclose(_run(m, feeds), ref, rtol=1e-4, atol=1e-5)


def test_cpu_rewrites_match_plain_quantization(tiny_random_fp32, tmp_path):
    """The same ranges quantized with and without the rewrites give the same U-Net output; the
    folded graph has the bias inside MatMulIntegerToFloat; excluding a split projection by its old
    name keeps both halves in float."""
    src = tiny_random_fp32 / "unet" / "model.onnx"
    feeds = _unet_feeds(1)
    st = load_structure(src)
    rng = collect_ranges(src, [feeds, _unet_feeds(2)], calibration_targets(st), "minmax").ranges()
    plain = dataclasses.replace(recipe("cpu"), rewrites=())
    proj = next(n.name for n in st.graph.node if n.op_type == "MatMul" and "/ff/net.0/proj/" in n.name)
    quantize_onnx(src, tmp_path / "plain.onnx", rng, plain, nodes_to_exclude=[proj])
    summary = quantize_onnx(src, tmp_path / "rw.onnx", rng, recipe("cpu"), nodes_to_exclude=[proj])
    rw = onnx.load(str(tmp_path / "rw.onnx"))
    n_proj = sum("/ff/net.0/proj/" in n.name and n.op_type == "MatMul" for n in st.graph.node)
    assert summary["rewrites"]["split_geglu"] == n_proj
    fused = [n for n in rw.graph.node if n.op_type == "MatMulIntegerToFloat"]
    assert len(fused) == summary["rewrites"]["fold_matmul_bias"] > 0 and all(len(n.input) == 7 for n in fused)
    by_name = {n.name: n for n in rw.graph.node}
    for half in (proj + "_value", proj + "_gate"):
        assert by_name[half].op_type == "MatMul"  # excluded: float weights, no DQ in front
        assert all(i in {t.name for t in rw.graph.initializer} or "QuantizeLinear" not in i for i in by_name[half].input)
    a, b = _run(str(tmp_path / "plain.onnx"), feeds), _run(str(tmp_path / "rw.onnx"), feeds)
    assert np.abs(a - b).max() <= 1e-3 * np.abs(a).max()


def test_fold_matmul_bias_leaves_unbiased_matmuls():
    r = np.random.default_rng(0)
    xq = helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"])
    dx = helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"])
    dw = helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=1)
    mm = helper.make_node("MatMul", ["xd", "wd"], ["y"], name="mm")
    inits = [numpy_helper.from_array(np.float32(0.05), "xs"), numpy_helper.from_array(np.uint8(128), "xz"),
             numpy_helper.from_array(r.integers(-127, 128, (8, 4)).astype(np.int8), "wq"),
             numpy_helper.from_array(np.full(4, 0.01, np.float32), "ws"), numpy_helper.from_array(np.zeros(4, np.int8), "wz"),
             numpy_helper.from_array(r.standard_normal(4).astype(np.float32), "b")]
    out = [helper.make_tensor_value_info("z", T.FLOAT, None)]
    x = {"x": r.standard_normal((3, 8)).astype(np.float32)}
    for with_bias in (False, True):
        nodes = [xq, dx, dw, mm] + ([helper.make_node("Add", ["y", "b"], ["z"])] if with_bias else
                                    [helper.make_node("Relu", ["y"], ["z"])])
        m = helper.make_model(helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", T.FLOAT, [3, 8])],
                                                out, inits), opset_imports=[helper.make_opsetid("", 18)])
        ref = _run(m, x)
        assert fold_matmul_bias(m) == int(with_bias)
        np.testing.assert_allclose(_run(m, x), ref, rtol=1e-5, atol=1e-5)
