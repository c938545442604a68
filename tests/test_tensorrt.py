"""TensorRT backend: profiles, engine cache, operator coverage, the no-TensorRT error path (fast,
everywhere), and build + run on a GPU (skipped, with the reason, where TensorRT or a GPU is missing)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from ldm_deploy.artifact import Artifact
from ldm_deploy.errors import LdmDeployError
from ldm_deploy.specs import ModelDims, ShapeRanges, component_specs
from ldm_deploy.tensorrt import cache, tensorrt_available
from ldm_deploy.tensorrt.builder import resolve_flags
from ldm_deploy.tensorrt.ops import op_table, supported_ops, unsupported_ops
from ldm_deploy.tensorrt.profiles import build_ranges, component_profile, is_static, parse_range, profile_to_json

ROOT = Path(__file__).resolve().parents[1]
SPECS = component_specs(ModelDims())
EXPORTED = ShapeRanges(batch=(1, 1, 4), image_height=(256, 512, 1024), image_width=(256, 512, 1024))
NO_TRT = "TensorRT is installed here: the missing-TensorRT path cannot be exercised"


# --- profiles ----------------------------------------------------------------------------------
@pytest.mark.parametrize("text,expected", [("1:2:4", (1, 2, 4)), ("2", (2, 2, 2)), (" 1 : 1 : 8 ", (1, 1, 8)),
                                           ("512:512:512", (512, 512, 512))])
def test_parse_range(text, expected):
    assert parse_range(text) == expected


@pytest.mark.parametrize("text", ["", "a", "1:2", "1:2:3:4", "4:2:1", "0:1:2", "1:3:2", "-1", "1.5"])
def test_parse_range_rejects(text):
    with pytest.raises(LdmDeployError, match="MIN:OPT:MAX"):
        parse_range(text, "batch")


def test_profiles_from_specs_double_unet_batch_for_cfg():
    prof = {c: component_profile(SPECS[c], EXPORTED).shapes for c in SPECS}
    assert prof["text_encoder"]["input_ids"] == ((1, 77), (1, 77), (4, 77))
    assert prof["unet"]["sample"] == ((1, 4, 32, 32), (2, 4, 64, 64), (8, 4, 128, 128))
    assert prof["unet"]["encoder_hidden_states"] == ((1, 77, 768), (2, 77, 768), (8, 77, 768))
    assert prof["unet"]["timestep"] == ((1,), (1,), (1,))
    assert prof["vae_decoder"]["latent"] == ((1, 4, 32, 32), (1, 4, 64, 64), (4, 4, 128, 128))
    assert prof["vae_encoder"]["image"] == ((1, 3, 256, 256), (1, 3, 512, 512), (4, 3, 1024, 1024))
    no_cfg = component_profile(SPECS["unet"], replace(EXPORTED, cfg=False)).shapes
    assert no_cfg["sample"] == ((1, 4, 32, 32), (1, 4, 64, 64), (4, 4, 128, 128))


def test_deepcache_graphs_get_profiles_for_the_cached_feature():
    from ldm_deploy.specs import DeepCacheDims

    specs = component_specs(ModelDims(), DeepCacheDims(depth=1, channels=320))
    full = component_profile(specs["unet"], EXPORTED).shapes
    shallow = component_profile(specs["unet_shallow"], EXPORTED).shapes
    assert full == component_profile(SPECS["unet"], EXPORTED).shapes  # the feature is an output only
    assert shallow["cache_feature"] == ((1, 320, 32, 32), (2, 320, 64, 64), (8, 320, 128, 128))
    assert shallow["sample"] == full["sample"]


def test_overrides_narrow_the_exported_ranges():
    r = build_ranges(EXPORTED, batch="1:2:2", size="512:512:768")
    assert (r.batch, r.image_height, r.image_width) == ((1, 2, 2), (512, 512, 768), (512, 512, 768))
    assert component_profile(SPECS["unet"], r).shapes["sample"] == ((1, 4, 64, 64), (4, 4, 64, 64), (4, 4, 96, 96))
    r = build_ranges(EXPORTED, size="512", width="256:512:1024")
    assert (r.image_height, r.image_width) == ((512, 512, 512), (256, 512, 1024))
    assert build_ranges(EXPORTED) == EXPORTED


@pytest.mark.parametrize("kw,match", [
    ({"batch": "1:1:8"}, "outside the range the ONNX graphs were exported for"),
    ({"size": "128:512:1024"}, "outside the range"),
    ({"size": "512:512:2048"}, "outside the range"),
    ({"height": "256:512:1088"}, "outside the range"),
    ({"size": "500"}, "not a multiple of 64"),
])
def test_overrides_outside_the_exported_range_are_rejected(kw, match):
    with pytest.raises(LdmDeployError, match=match):
        build_ranges(EXPORTED, **kw)


def test_static_profiles_pin_min_opt_max():
    r = build_ranges(EXPORTED, batch="1:2:4", size="256:768:1024", static=True)
    assert (r.batch, r.image_height) == ((2, 2, 2), (768, 768, 768))
    for c in SPECS:
        assert is_static(component_profile(SPECS[c], r, static=True)), c
    unet = component_profile(SPECS["unet"], r, static=True).shapes
    assert unet["sample"] == ((4, 4, 96, 96),) * 3  # CFG: 2B, not B, at every point
    assert not is_static(component_profile(SPECS["unet"], EXPORTED))


# --- build flags ---------------------------------------------------------------------------------
def test_build_flags_from_precision_and_manifest():
    fp32_art, qdq_art = {"precision": "fp32"}, {"precision": "fp32", "quantization": {"target": "tensorrt"}}
    f = resolve_flags(None, fp32_art)
    assert (f.precision, f.fp16, f.int8, f.strongly_typed, f.optimization_level) == ("fp16", True, False, False, 3)
    assert resolve_flags("fp32", fp32_art).fp16 is False
    assert resolve_flags("best", fp32_art).int8 is False  # no calibrator: INT8 only via Q/DQ
    f = resolve_flags(None, qdq_art)
    assert (f.precision, f.fp16, f.int8, f.optimization_level) == ("int8", True, True, 4)
    f = resolve_flags("int8", qdq_art, strongly_typed=True)
    assert (f.fp16, f.int8, f.strongly_typed) == (False, False, True)
    assert resolve_flags("fp16", {"precision": "fp16"}, strongly_typed=True).strongly_typed
    with pytest.raises(LdmDeployError, match="needs an INT8 QDQ artifact"):
        resolve_flags("int8", fp32_art)
    with pytest.raises(LdmDeployError, match="--precision int8"):
        resolve_flags("fp16", qdq_art)
    with pytest.raises(LdmDeployError, match="quantized for 'onnxruntime'"):
        resolve_flags(None, {"quantization": {"target": "onnxruntime"}})
    with pytest.raises(LdmDeployError, match="strongly-typed"):
        resolve_flags("fp16", fp32_art, strongly_typed=True)


# --- cache keys ------------------------------------------------------------------------------------
def _key(**kw) -> cache.EngineKey:
    base = dict(component="unet", onnx_sha256="ab" * 32, tensorrt_version="10.3.0", gpu_name="NVIDIA A100-SXM4-80GB",
                compute_capability="8.0", profile=profile_to_json(component_profile(SPECS["unet"], EXPORTED)),
                precision="fp16", flags=resolve_flags("fp16", {}).key_flags())
    return cache.EngineKey(**{**base, **kw})


def test_cache_key_is_stable():
    a, b = _key(), _key()
    assert a.digest() == b.digest() and len(a.digest()) == 16
    assert a.filename == f"unet-{a.digest()}.plan"
    assert cache.EngineKey.from_dict(json.loads(json.dumps(a.to_dict()))).digest() == a.digest()
    assert _key(profile=dict(reversed(list(a.profile.items())))).digest() == a.digest()  # canonical JSON


@pytest.mark.parametrize("change", [
    {"onnx_sha256": "cd" * 32}, {"tensorrt_version": "10.4.0"}, {"gpu_name": "NVIDIA H100 80GB HBM3"},
    {"compute_capability": "9.0"}, {"precision": "int8"}, {"component": "vae_decoder"},
    {"profile": profile_to_json(component_profile(SPECS["unet"], build_ranges(EXPORTED, static=True), static=True))},
    {"flags": resolve_flags("fp32", {}).key_flags()},
    {"flags": resolve_flags("fp16", {}, optimization_level=5).key_flags()},
])
def test_cache_key_changes_with_every_field(change):
    assert _key(**change).digest() != _key().digest()


def test_classify_stale_and_foreign():
    k = _key()
    assert cache.classify(k, _key()) == "fresh"
    assert cache.classify(k, _key(onnx_sha256="cd" * 32)) == "stale"
    assert cache.classify(k, _key(precision="fp32")) == "stale"
    assert cache.classify(k, _key(gpu_name="NVIDIA L4", compute_capability="8.9")) == "foreign"
    assert cache.classify(k, _key(tensorrt_version="8.6.1")) == "foreign"
    diffs = cache.key_differences(k, _key(tensorrt_version="8.6.1"))
    assert diffs == ["tensorrt_version: 8.6.1 (engine) != 10.3.0 (wanted)"]


@pytest.fixture()
def fake_artifact(tmp_path) -> Path:
    """A minimal artifact directory (manifest + one file) to exercise the cache's file handling.
    The 'plans' written into it are placeholder bytes that are only hashed, never deserialized."""
    from ldm_deploy.artifact import ArtifactWriter

    out = tmp_path / "art"
    with ArtifactWriter(out) as w:
        (w.path / "unet").mkdir()
        (w.path / "unet" / "model.onnx").write_bytes(b"onnx bytes")
        w.manifest["components"] = {"unet": {"file": "unet/model.onnx", "spec": SPECS["unet"].to_dict()}}
    return out


def test_engine_cache_lookup_stale_foreign_and_corrupt(fake_artifact):
    art = Artifact.open(fake_artifact)
    digest = cache.onnx_digest(art, "unet")
    assert digest == art.manifest["files"]["unet/model.onnx"]["sha256"]
    want = _key(onnx_sha256=digest)
    assert cache.lookup(fake_artifact, want).status == "missing"

    path = cache.record_engine(fake_artifact, want, b"placeholder plan", {"build_seconds": 1.0})
    assert path == fake_artifact / "engines" / want.filename
    assert path.with_suffix(".json").is_file()
    idx = json.loads((fake_artifact / "engines" / "index.json").read_text())
    assert idx["engines"][want.filename]["key"] == want.to_dict()
    assert cache.lookup(fake_artifact, want).status == "fresh"

    # the artifact was re-exported (other ONNX hash): stale, with the reason
    found = cache.lookup(fake_artifact, replace(want, onnx_sha256="ef" * 32))
    assert found.status == "stale" and "onnx_sha256" in found.message("unet")
    # another GPU / TensorRT version: foreign
    found = cache.lookup(fake_artifact, replace(want, gpu_name="NVIDIA L4", compute_capability="8.9"))
    assert found.status == "foreign" and "built for another machine" in found.message("unet")

    # runtime selection never picks an engine built for another machine or another ONNX file
    env = {"tensorrt_version": want.tensorrt_version, "gpu_name": want.gpu_name,
           "compute_capability": want.compute_capability}
    assert cache.select_for_runtime(fake_artifact, "unet", env, digest).status == "fresh"
    assert cache.select_for_runtime(fake_artifact, "unet", env, digest, precision="int8").status == "stale"
    foreign = cache.select_for_runtime(fake_artifact, "unet", {**env, "tensorrt_version": "10.5.0"}, digest)
    assert foreign.status == "foreign" and "10.5.0 (this machine)" in foreign.message("unet")
    stale = cache.select_for_runtime(fake_artifact, "unet", env, "ef" * 32)
    assert stale.status == "stale" and "another unet ONNX file" in stale.message("unet")

    # a modified plan file is detected before anyone could deserialize it
    path.write_bytes(b"tampered plan")
    assert cache.lookup(fake_artifact, want).status == "corrupt"
    assert cache.select_for_runtime(fake_artifact, "unet", env, digest).status == "corrupt"


def test_rebuilding_replaces_stale_engines_and_keeps_manifest(fake_artifact):
    art = Artifact.open(fake_artifact)
    manifest_before = (fake_artifact / "manifest.json").read_bytes()
    old = _key(onnx_sha256=cache.onnx_digest(art, "unet"))
    other_gpu = replace(old, gpu_name="NVIDIA L4", compute_capability="8.9")
    cache.record_engine(fake_artifact, old, b"old")
    cache.record_engine(fake_artifact, other_gpu, b"for another gpu")
    new = replace(old, precision="fp32", flags=resolve_flags("fp32", {}).key_flags())
    cache.record_engine(fake_artifact, new, b"new")
    names = {e["file"] for e in cache.entries(fake_artifact, "unet")}
    assert names == {new.filename, other_gpu.filename}  # the stale one is gone, the foreign one kept
    assert not (fake_artifact / "engines" / old.filename).exists()
    assert not list((fake_artifact / "engines").glob(".*.tmp-*"))  # no temporary leftovers
    assert (fake_artifact / "manifest.json").read_bytes() == manifest_before
    Artifact.open(fake_artifact).verify()  # exported files still match their hashes


def test_corrupt_index_is_a_clear_error(fake_artifact):
    (fake_artifact / "engines").mkdir()
    (fake_artifact / "engines" / "index.json").write_text("{not json")
    with pytest.raises(LdmDeployError, match="rebuild with ldm-build"):
        cache.entries(fake_artifact)


# --- operators ---------------------------------------------------------------------------------------
def test_op_table_records_version_and_source():
    t = op_table()
    assert t["tensorrt_version"].startswith("10.")
    assert t["source"]["repository"] == "https://github.com/onnx/onnx-tensorrt"
    assert t["source"]["path"] == "docs/operators.md" and len(t["source"]["commit"]) == 40
    ops = supported_ops()
    assert {"Conv", "MatMul", "Softmax", "LayerNormalization", "GroupNormalization", "QuantizeLinear",
            "DequantizeLinear", "Resize", "InstanceNormalization"} <= ops
    assert "Unique" not in ops and "Unique" in t["operators"]


def test_unsupported_ops_finds_foreign_and_nested_ops(tmp_path):
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    then = helper.make_graph([helper.make_node("Unique", ["x"], ["u"])], "then", [],
                             [helper.make_tensor_value_info("u", TensorProto.FLOAT, [4])])
    other = helper.make_graph([helper.make_node("Relu", ["x"], ["r"])], "else", [],
                              [helper.make_tensor_value_info("r", TensorProto.FLOAT, [4])])
    nodes = [
        helper.make_node("Constant", [], ["c"], value=helper.make_tensor("c", TensorProto.BOOL, [], [True])),
        helper.make_node("If", ["c"], ["a"], then_branch=then, else_branch=other),
        helper.make_node("BiasGelu", ["a", "a"], ["b"], domain="com.microsoft"),
        helper.make_node("Sigmoid", ["b"], ["y"]),
    ]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    assert unsupported_ops(path) == ["Unique", "com.microsoft::BiasGelu"]


@pytest.mark.parametrize("fixture", ["tiny_random_trt", "tiny_random_fp16"])
def test_exported_graphs_use_only_ops_tensorrt_parses(fixture, request):
    from ldm_deploy.tensorrt.ops import opset_problem

    art = Artifact.open(request.getfixturevalue(fixture))
    assert art.components
    for comp in art.components:
        path = art.model_file(comp)
        assert unsupported_ops(path) == [], f"{fixture} {comp}"
        assert opset_problem(path) is None, f"{fixture} {comp}"


# --- without TensorRT ------------------------------------------------------------------------------------
@pytest.mark.skipif(tensorrt_available(), reason=NO_TRT)
def test_ldm_build_without_tensorrt_fails_in_one_line(tiny_random_fp32):
    r = subprocess.run([sys.executable, "-m", "ldm_deploy.tensorrt.cli", str(tiny_random_fp32), "--precision", "fp16"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("ldm-build: error: TensorRT is not available")
    assert "pip install 'ldm-deploy[tensorrt]'" in lines[0] and "Traceback" not in r.stderr
    assert not (tiny_random_fp32 / "engines").exists()


def test_ldm_build_help_works_everywhere():
    r = subprocess.run([sys.executable, "-m", "ldm_deploy.tensorrt.cli", "--help"], capture_output=True, text=True,
                       timeout=60, cwd=ROOT)
    assert r.returncode == 0 and "--precision" in r.stdout and "MIN:OPT:MAX" in r.stdout


def test_runtime_imports_without_tensorrt():
    code = ("import sys, ldm_deploy.runtime, ldm_deploy.tensorrt.engine, ldm_deploy.tensorrt.cli; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorrt', 'cuda', 'torch')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


@pytest.mark.skipif(tensorrt_available(), reason=NO_TRT)
def test_pipeline_tensorrt_backend_without_tensorrt(tiny_random_fp32):
    from ldm_deploy.runtime import Pipeline

    with pytest.raises(LdmDeployError, match=r"pip install 'ldm-deploy\[tensorrt\]'"):
        Pipeline.load(tiny_random_fp32, backend="tensorrt")
    with pytest.raises(LdmDeployError, match="unknown backend"):
        Pipeline.load(tiny_random_fp32, backend="no-such-backend")


# --- with TensorRT and a GPU ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gpu_env():
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (pip install 'ldm-deploy[tensorrt]' on a CUDA machine)")
    pytest.importorskip("cuda", reason="cuda-python is not installed (part of ldm-deploy[tensorrt])")
    from ldm_deploy.tensorrt import TensorRTUnavailable
    from ldm_deploy.tensorrt.engine import machine_environment

    try:
        return machine_environment()
    except TensorRTUnavailable as e:
        pytest.skip(f"no usable GPU: {e}")


@pytest.fixture()
def trt_artifact(tiny_random_fp32, tmp_path, gpu_env) -> Path:
    out = tmp_path / "art"
    shutil.copytree(tiny_random_fp32, out)
    return out


def _build(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ldm_deploy.tensorrt.cli", *args], capture_output=True, text=True,
                          timeout=900, cwd=ROOT)


def test_build_cache_and_run_match_onnxruntime(trt_artifact):
    from ldm_deploy.runtime.components import OnnxComponent
    from ldm_deploy.tensorrt.engine import load_components

    r = _build(str(trt_artifact), "--precision", "fp32", "-q")
    assert r.returncode == 0, r.stderr
    assert "built text_encoder, unet, vae_encoder, vae_decoder" in r.stdout
    r = _build(str(trt_artifact), "--precision", "fp32", "-q")  # second run: everything cached
    assert r.returncode == 0 and "built none; up to date" in r.stdout, r.stdout + r.stderr
    assert _build(str(trt_artifact), "--precision", "fp32", "--check").returncode == 0
    assert _build(str(trt_artifact), "--precision", "fp16", "--check").returncode == 1  # not built yet

    art = Artifact.open(trt_artifact)
    art.verify()
    trt_c = load_components(art, ["text_encoder", "unet", "vae_decoder"], precision="fp32")
    rng = np.random.default_rng(0)
    feeds = {
        "text_encoder": {"input_ids": rng.integers(0, 1000, (2, 77)).astype(np.int32)},
        "unet": {"sample": rng.standard_normal((2, 4, 8, 8), np.float32), "timestep": np.array([500.0], np.float32),
                 "encoder_hidden_states": rng.standard_normal((2, 77, 32), np.float32)},
        "vae_decoder": {"latent": rng.standard_normal((1, 4, 16, 8), np.float32)},
    }
    for comp, inputs in feeds.items():
        ref = OnnxComponent.load(art.spec(comp), art.model_file(comp))(**inputs)
        out = trt_c[comp](**inputs)
        assert out.dtype == np.float32 and out.shape == ref.shape
        np.testing.assert_allclose(out, ref, atol=2e-2, rtol=2e-2, err_msg=comp)
    bound = trt_c["unet"].device_binding(encoder_hidden_states=feeds["unet"]["encoder_hidden_states"])
    a = bound.run(sample=feeds["unet"]["sample"], timestep=feeds["unet"]["timestep"])
    np.testing.assert_allclose(a, trt_c["unet"](**feeds["unet"]), atol=1e-5)
    with pytest.raises(LdmDeployError, match="outside the engine's profile"):
        trt_c["unet"](**{**feeds["unet"], "sample": np.zeros((9, 4, 8, 8), np.float32)})


def test_static_engine_uses_cuda_graphs_and_pipeline_backend(trt_artifact):
    from ldm_deploy.runtime import Pipeline

    r = _build(str(trt_artifact), "--precision", "fp16", "--static", "--batch", "1", "--size", "64", "-q")
    assert r.returncode == 0, r.stderr
    pipe = Pipeline.load(trt_artifact, backend="tensorrt")
    unet = pipe.components["unet"]
    assert unet.static and unet.use_cuda_graph
    ref = Pipeline.load(trt_artifact)
    a = pipe("a red circle", num_inference_steps=3, seed=0, output_type="np").images
    assert unet._graphs, "no CUDA graph was captured"
    b = ref("a red circle", num_inference_steps=3, seed=0, output_type="np").images
    assert a.shape == b.shape == (1, 64, 64, 3)
    assert np.abs(a - b).mean() < 0.05


def test_tampered_engine_is_refused(trt_artifact):
    from ldm_deploy.tensorrt.engine import load_components

    assert _build(str(trt_artifact), "--components", "vae_decoder", "--precision", "fp32", "-q").returncode == 0
    plan = next((trt_artifact / "engines").glob("vae_decoder-*.plan"))
    plan.write_bytes(plan.read_bytes()[:-16] + b"\0" * 16)
    with pytest.raises(LdmDeployError, match="corrupt or modified"):
        load_components(Artifact.open(trt_artifact), ["vae_decoder"])
