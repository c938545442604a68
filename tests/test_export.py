"""ldm-export on tiny-random: valid graphs, dynamic axes, parity, manifest, fp16."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from ldm_deploy.artifact import Artifact, sha256_file
from ldm_deploy.export.validate import TOLERANCES, check, compare
from ldm_deploy.export.wrappers import component_module
from ldm_deploy.inputs import example_inputs
from ldm_deploy.specs import COMPONENTS

# two batch sizes x two resolutions (image 64x64 and 128x64), all inside the exported ranges
POINTS = [
    dict(batch=1, unet_batch=2, height=8, width=8, image_height=64, image_width=64),
    dict(batch=3, unet_batch=6, height=16, width=8, image_height=128, image_width=64),
]


def _torch(model, name, spec, feeds):
    module = component_module(name, model)
    with torch.no_grad():
        return module(*[torch.from_numpy(feeds[n]) for n in spec.input_names]).numpy()


@pytest.mark.parametrize("name", COMPONENTS)
def test_fp32_graph_is_valid_dynamic_and_matches_torch(tiny_random_fp32, tiny_random_torch, name):
    art = Artifact.open(tiny_random_fp32)
    spec = art.spec(name)
    path = art.model_file(name)
    onnx.checker.check_model(str(path))
    graph = onnx.load(str(path), load_external_data=False).graph
    for value, t in zip(list(graph.input) + list(graph.output), spec.inputs + spec.outputs):
        assert value.name == t.name
        dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
        assert dims == list(t.shape), (name, value.name, dims)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for point in POINTS:
        feeds = example_inputs(spec, point, seed=7)
        out = session.run(None, feeds)[0]
        assert out.shape == spec.outputs[0].concrete_shape(point)
        stats = compare(_torch(tiny_random_torch, name, spec, feeds), out)
        assert not check(stats, TOLERANCES["fp32"]), stats


def test_manifest_records_specs_hashes_and_validation(tiny_random_fp32):
    art = Artifact.open(tiny_random_fp32)
    m = art.manifest
    assert m["precision"] == "fp32" and m["source"]["model"] == "tiny-random"
    assert set(m["components"]) == set(COMPONENTS)
    for name in COMPONENTS:
        v = m["validation"][name]
        assert v["status"] == "passed" and v["cosine"] > 0.9999, v
        # validated at the export resolution with the CFG batch for the U-Net
        if name == "unet":
            assert v["shapes"]["sample"] == [2, 4, 8, 8]
    for rel, info in m["files"].items():
        assert sha256_file(tiny_random_fp32 / rel) == info["sha256"]
    assert "tokenizer/tokenizer.json" in m["files"]
    sched = json.loads((tiny_random_fp32 / "scheduler" / "scheduler_config.json").read_text())
    assert sched["beta_schedule"] == "scaled_linear"
    assert m["stats"]["peak_rss_bytes"] > 0 and m["versions"]["onnx"]
    assert m["shape_ranges"]["axes"]["unet_batch"] == [1, 2, 8]
    art.verify()


def test_fp16_graph_has_fp16_weights_fp32_io_and_parity(tiny_random_fp16, tiny_random_torch):
    art = Artifact.open(tiny_random_fp16)
    assert art.manifest["precision"] == "fp16" and art.io_dtype == "float32"
    for name in COMPONENTS:
        path = art.model_file(name)
        onnx.checker.check_model(str(path))
        model = onnx.load(str(path))
        kinds = {init.data_type for init in model.graph.initializer}
        assert onnx.TensorProto.FLOAT16 in kinds, name
        for value in list(model.graph.input) + list(model.graph.output):
            if value.name != "input_ids":
                assert value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT, (name, value.name)
        v = art.manifest["validation"][name]
        assert v["status"] == "passed" and "fp16" in v["how"], v
        spec = art.spec(name)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feeds = example_inputs(spec, POINTS[1], seed=3)
        stats = compare(_torch(tiny_random_torch, name, spec, feeds), session.run(None, feeds)[0])
        assert not check(stats, TOLERANCES["fp16"]), (name, stats)
        assert stats["max_rel"] > 1e-6, "fp16 graph should not be bit-identical to fp32"


def test_attention_modes_cpu_fused_and_tensorrt_plain(tiny_random_fp32, tiny_random_trt, tiny_random_fp16):
    """fp32 CPU exports fuse attention into ORT's MultiHeadAttention (and ldm-build refuses them in
    one clear line); the TensorRT export and fp16 graphs keep standard ONNX attention."""
    from ldm_deploy.errors import LdmDeployError
    from ldm_deploy.export.exporter import resolve_attention
    from ldm_deploy.tensorrt.ops import check_graph

    def ops(art):
        return {(n.domain, n.op_type) for n in onnx.load(str(art / "unet" / "model.onnx")).graph.node}

    assert ("com.microsoft", "MultiHeadAttention") in ops(tiny_random_fp32)
    assert ("", "Softmax") not in ops(tiny_random_fp32)
    for art in (tiny_random_trt, tiny_random_fp16):
        assert ("", "Softmax") in ops(art) and not any(d for d, _ in ops(art))
    assert Artifact.open(tiny_random_fp32).manifest["attention"] == "mha"
    with pytest.raises(LdmDeployError, match="--optimize tensorrt"):
        check_graph(tiny_random_fp32 / "unet" / "model.onnx", "unet")
    assert resolve_attention("auto", native=False, fp16=False, optimize="tensorrt") == "full"
    assert resolve_attention("auto", native=True, fp16=True, optimize=None) == "full"
    assert resolve_attention("auto", native=False, fp16=True, optimize=None) == "sliced"
    with pytest.raises(LdmDeployError, match="unknown attention"):
        resolve_attention("flash", native=False, fp16=False, optimize=None)


def test_validation_fails_on_a_wrong_graph():
    """The parity check must reject an output that is off by more than the tolerance."""
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    assert not check(compare(ref, ref + 1e-6), TOLERANCES["fp32"])
    assert check(compare(ref, ref * 1.01), TOLERANCES["fp32"])
    assert check(compare(ref, np.where(ref > 2, np.nan, ref)), TOLERANCES["fp16"])
