"""The openvino backend and ldm-quantize --target openvino on tiny-random artifacts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ldm_deploy.errors import LdmDeployError
from ldm_deploy.numerics import psnr, to_uint8
from ldm_deploy.runtime import Pipeline

pytest.importorskip("openvino", reason="openvino is not installed (pip install 'ldm-deploy[openvino]')")

from ldm_deploy.runtime.openvino import cache_entries  # noqa: E402

PROMPT = "a small red circle on a blue background, top left"
GRAPHS = ("text_encoder", "unet", "vae_decoder")


@pytest.fixture(scope="module")
def full_attention(tmp_path_factory) -> Path:
    """fp32 export with plain attention (no ORT-only operators)."""
    from ldm_deploy.export.exporter import ExportOptions, export_model

    out = tmp_path_factory.mktemp("ov") / "tiny-random-full"
    export_model("tiny-random", out, ExportOptions(attention="full"), log=lambda s: None)
    return out


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("openvino-cache"))
    return dst


def _images(pipe: Pipeline, steps: int = 6, **kw) -> np.ndarray:
    return pipe(PROMPT, num_inference_steps=steps, guidance_scale=5.0, seed=0, output_type="np", **kw).images


def test_openvino_images_match_ort_fp32(full_attention, tmp_path):
    art = _copy(full_attention, tmp_path)
    ref = _images(Pipeline.load(art, components=GRAPHS))
    for hint in ("default", "f32"):
        ov = Pipeline.load(art, backend="openvino", precision_hint=hint, components=GRAPHS)
        got = _images(ov)
        assert np.abs(got - ref).max() < 2e-3, hint
        assert psnr(to_uint8(got), to_uint8(ref)) > 45


def test_component_protocol_and_multi_output(full_attention):
    from ldm_deploy.runtime.components import Component

    ort = Pipeline.load(full_attention, components=("unet",)).components["unet"]
    ov = Pipeline.load(full_attention, backend="openvino", components=("unet",)).components["unet"]
    assert isinstance(ov, Component) and ov.device == "cpu"
    rng = np.random.default_rng(0)
    x = {"sample": rng.standard_normal((2, 4, 8, 8)).astype(np.float32), "timestep": np.array([500], np.float32)}
    ctx = rng.standard_normal((2, 77, ov.spec.inputs[2].shape[2])).astype(np.float32)
    a = ort.device_binding(encoder_hidden_states=ctx).run_all(**x)
    b = ov.device_binding(encoder_hidden_states=ctx).run_all(**x)
    assert len(a) == len(b) == len(ov.spec.output_names)
    for r, g in zip(a, b):
        assert g.dtype == np.float32 and np.allclose(g, r, atol=1e-4)


def test_deepcache_graphs_run_on_openvino(tmp_path):
    from ldm_deploy.export.exporter import ExportOptions, export_model

    art = tmp_path / "dc"
    export_model("tiny-random", art, ExportOptions(attention="full", deepcache=1), log=lambda s: None)
    parts = GRAPHS + ("unet_shallow",)
    ref = _images(Pipeline.load(art, components=parts), cache_interval=2)
    ov = Pipeline.load(art, backend="openvino", components=parts)
    assert len(ov.components["unet"].spec.output_names) == 2  # noise_pred + cache_feature: run_all
    got = _images(ov, cache_interval=2)
    assert np.abs(got - ref).max() < 2e-3


def test_mha_graph_is_refused_in_one_line(tiny_random_fp32):
    with pytest.raises(LdmDeployError) as e:
        Pipeline.load(tiny_random_fp32, backend="openvino", components=("unet",))
    msg = str(e.value)
    assert "\n" not in msg and "com.microsoft::MultiHeadAttention" in msg and "--attention full" in msg


def test_compiled_cache_is_reused_and_invalidated(full_attention, tmp_path):
    import onnx
    from onnx import numpy_helper

    from ldm_deploy.artifact import sha256_file

    art = _copy(full_attention, tmp_path)
    first = Pipeline.load(art, backend="openvino", components=("unet",)).components["unet"]
    assert first.info["loaded_from_cache"] is False
    [entry] = cache_entries(art, "unet")
    blobs = sorted(p.name for p in Path(entry["dir"]).iterdir())
    assert any(b != "key.json" for b in blobs)
    second = Pipeline.load(art, backend="openvino", components=("unet",)).components["unet"]
    assert second.info["loaded_from_cache"] is True and second.info["cache_dir"] == entry["dir"]
    assert sorted(p.name for p in Path(entry["dir"]).iterdir()) == blobs  # nothing recompiled
    # another precision hint or static shape: another key
    Pipeline.load(art, backend="openvino", components=("unet",), precision_hint="f32")
    assert len(cache_entries(art, "unet")) == 2

    # a changed ONNX (new weights, manifest updated as an export would): a fresh compile, stale dirs gone
    path = art / "unet" / "model.onnx"
    model = onnx.load(str(path))
    init = model.graph.initializer[0]
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.5, init.name))
    onnx.save(model, str(path))
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["files"]["unet/model.onnx"] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    (art / "manifest.json").write_text(json.dumps(manifest))
    third = Pipeline.load(art, backend="openvino", components=("unet",)).components["unet"]
    assert third.info["loaded_from_cache"] is False
    [fresh] = cache_entries(art, "unet")
    assert fresh["graph_sha256"] == sha256_file(path) and fresh["dir"] != entry["dir"]


def test_static_shape(full_attention, tmp_path):
    art = _copy(full_attention, tmp_path)
    h, w = Pipeline.load(art, components=("unet",)).default_size
    pipe = Pipeline.load(art, backend="openvino", components=GRAPHS, static_shape=(1, h, w))
    unet = pipe.components["unet"]
    assert all(s.is_static for s in (p.get_partial_shape() for p in unet.compiled.inputs))
    assert unet.static["sample"] == (2, 4, h // pipe.vae_scale, w // pipe.vae_scale)
    ref = _images(Pipeline.load(art, components=GRAPHS))
    assert np.abs(_images(pipe) - ref).max() < 2e-3
    with pytest.raises(LdmDeployError, match="static shape"):
        _images(pipe, num_images_per_prompt=2)
    assert cache_entries(art, "unet")[0]["static_shape"] == [1, h, w]


@pytest.mark.parametrize("kwargs, match", [
    (dict(precision_hint="fp8"), "unknown OpenVINO precision hint"),
    (dict(static_shape=(1, 64)), "static_shape must be"),
    (dict(static_shape=(0, 64, 64)), "static_shape must be"),
    (dict(static_shape=(1, 60, 64)), "60"),
])
def test_bad_openvino_options_one_line(full_attention, kwargs, match):
    with pytest.raises(LdmDeployError, match=match) as e:
        Pipeline.load(full_attention, backend="openvino", components=("unet",), **kwargs)
    assert "\n" not in str(e.value)


def test_openvino_options_refused_on_other_backends(full_attention):
    with pytest.raises(LdmDeployError, match="static_shape does not apply to backend 'ort-cpu'"):
        Pipeline.load(full_attention, components=("unet",), static_shape=(1, 64, 64))


def test_bf16_refused_where_the_cpu_lacks_it(full_attention):
    import openvino as ov

    if "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        pipe = Pipeline.load(full_attention, backend="openvino", components=GRAPHS, precision_hint="bf16")
        assert np.isfinite(_images(pipe, steps=2)).all()
    else:
        with pytest.raises(LdmDeployError, match="no bf16 support"):
            Pipeline.load(full_attention, backend="openvino", components=("unet",), precision_hint="bf16")


def test_generate_cli_openvino_flags(full_attention, tmp_path):
    from conftest import run_cli

    art = _copy(full_attention, tmp_path)
    out = tmp_path / "x.png"
    r = run_cli("ldm-generate", str(art), PROMPT, "-o", str(out), "--steps", "2", "-q", "--backend", "openvino",
                "--ov-precision", "f32", "--static")
    assert r.returncode == 0, r.stderr
    assert out.is_file() and cache_entries(art, "unet")[0]["precision_hint"] == "f32"
    r = run_cli("ldm-generate", str(art), PROMPT, "-o", str(out), "--static")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "--backend openvino only" in r.stderr


# --------------------------------------------------------------------------- NNCF


@pytest.fixture(scope="module")
def nncf_int8(full_attention, tmp_path_factory) -> tuple[Path, dict]:
    pytest.importorskip("nncf", reason="nncf is not installed (pip install 'ldm-deploy[openvino]')")
    from ldm_deploy.quantize.build import quantize_artifact

    out = tmp_path_factory.mktemp("ov") / "nncf-int8"
    m = quantize_artifact(full_attention, out, target="openvino", calib_size=4, calib_steps=4, holdout=2,
                          quality_prompts=1)
    return out, m


def test_nncf_quantize_runs_and_stays_close(nncf_int8, full_attention):
    out, m = nncf_int8
    q = m["quantization"]
    assert q["target"] == "openvino" and q["recipe"]["tool"] == "nncf" and q["recipe"]["preset"] == "mixed"
    assert q["recipe"]["subset_size"] == {"unet": 4} and q["recipe"]["model_type"]["unet"] == "transformer"
    assert any("time_embedding" in p for p in q["recipe"]["ignored_scope"]["patterns"])
    assert q["per_component"]["unet"]["fake_quantize"] > 10
    assert m["backends"] == ["openvino"] and m["components"]["unet"]["file"] == "unet/model.xml"
    assert (out / "unet" / "model.bin").is_file() and not (out / "unet" / "model.onnx").exists()
    assert q["quality"]["unet_heldout"]["cosine"] > 0.99
    assert q["quality"]["images"]["psnr_mean"] > 25
    ref = _images(Pipeline.load(full_attention, components=GRAPHS))
    got = _images(Pipeline.load(out, backend="openvino", components=GRAPHS))
    assert psnr(to_uint8(got), to_uint8(ref)) > 25


def test_nncf_artifact_refused_by_ort_in_one_line(nncf_int8):
    out, _ = nncf_int8
    with pytest.raises(LdmDeployError, match="runs only on backend 'openvino'") as e:
        Pipeline.load(out, backend="ort-cpu")
    assert "\n" not in str(e.value)


def test_nncf_target_bad_input(full_attention, tiny_random_fp32, tmp_path):
    pytest.importorskip("nncf")
    from ldm_deploy.quantize.build import quantize_artifact

    with pytest.raises(LdmDeployError, match="--attention full"):
        quantize_artifact(tiny_random_fp32, tmp_path / "a", target="openvino")
    with pytest.raises(LdmDeployError, match="unknown NNCF preset"):
        quantize_artifact(full_attention, tmp_path / "b", target="openvino", nncf_preset="fast")
    with pytest.raises(LdmDeployError, match="NNCF estimates its own"):
        quantize_artifact(full_attention, tmp_path / "c", target="openvino", method="percentile")
    with pytest.raises(LdmDeployError, match="--reduce-range is for the cpu target"):
        quantize_artifact(full_attention, tmp_path / "rr", target="openvino", reduce_range=True)
    with pytest.raises(LdmDeployError, match="--ranges-from applies to the cpu and tensorrt"):
        quantize_artifact(full_attention, tmp_path / "r", target="openvino", ranges_from=str(tmp_path))
    with pytest.raises(LdmDeployError, match="quantizes unet"):
        quantize_artifact(full_attention, tmp_path / "d", target="openvino", components=["text_encoder"])
    assert not any(tmp_path.iterdir())


def test_openvino_speed_script_on_tiny_random(nncf_int8, full_attention, tiny_random_fp32, tmp_path):
    import subprocess
    import sys

    from conftest import ROOT
    from ldm_deploy.quantize.build import quantize_artifact

    ort_int8 = tmp_path / "ort-int8"
    quantize_artifact(tiny_random_fp32, ort_int8, calib_size=2, calib_steps=2, holdout=1, quality_prompts=0)
    out = tmp_path / "speed"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "openvino_speed.py"), "--ort-fp32",
                        str(tiny_random_fp32), "--ov-fp32", str(full_attention), "--ort-int8", str(ort_int8),
                        "--ov-int8", str(nncf_int8[0]), "--ort-int8-alt", f"again={ort_int8}", "--size", "64", "--iters", "1", "--warmup", "0",
                        "--rounds", "1", "--threads", "1", "-o", str(out)], capture_output=True, text=True,
                       cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr
    rows = {row["variant"]: row for row in json.loads(out.with_suffix(".json").read_text())["rows"]}
    assert set(rows) == {"ort-fp32", "ort-int8", "ort-int8-again", "ov-f32", "ov-default", "ov-nncf-int8"}
    assert all("error" not in row and row["unet_s_per_step"] > 0 for row in rows.values())
    assert rows["ov-f32"]["unet_cosine_vs_ort_fp32"] > 0.9999  # same fp32 weights, other attention form
    assert 0.9 < rows["ov-nncf-int8"]["unet_cosine_vs_ort_fp32"] < 1.0
    # the same artifact as an alternative recipe: the same outputs
    assert rows["ort-int8-again"]["unet_cosine_vs_ort_fp32"] == pytest.approx(rows["ort-int8"]["unet_cosine_vs_ort_fp32"])
