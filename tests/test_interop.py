"""Optimum's ONNX layout, both ways (ldm_deploy.interop.optimum).

Fast tests in this environment: a tiny-random artifact converted to Optimum's layout has Optimum's
names, dtypes and files; the runtime refuses that directory with a line naming the import
command; importing it back gives an artifact whose images equal the original's. The acceptance
test against Optimum itself needs an interpreter with optimum (``LDM_OPTIMUM_PYTHON``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT

onnx = pytest.importorskip("onnx", reason="the Optimum converter needs onnx (export extra)")

from ldm_deploy.artifact import Artifact, hash_tree  # noqa: E402
from ldm_deploy.errors import LdmDeployError  # noqa: E402
from ldm_deploy.interop import graph_io  # noqa: E402
from ldm_deploy.interop.optimum import from_optimum, to_optimum  # noqa: E402
from ldm_deploy.runtime import Pipeline  # noqa: E402

PROMPT = "a red circle on a blue background"


def _io(path: Path) -> tuple[dict, dict]:
    g = onnx.load(str(path), load_external_data=False).graph
    return ({v.name: (graph_io.io_dtype(v), graph_io.io_dims(v)) for v in g.input},
            {v.name: (graph_io.io_dtype(v), graph_io.io_dims(v)) for v in g.output})


@pytest.fixture(scope="module")
def optimum_dir(tiny_random_fp32, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("interop") / "optimum"
    before = hash_tree(tiny_random_fp32, skip=())
    to_optimum(tiny_random_fp32, out)
    assert hash_tree(tiny_random_fp32, skip=()) == before  # the source artifact is never written
    return out


def images(pipe: Pipeline, **kw) -> np.ndarray:
    return pipe(PROMPT, num_inference_steps=4, guidance_scale=5.0, seed=3, output_type="np", **kw).images


def test_optimum_layout_has_optimums_files_and_names(optimum_dir):
    index = json.loads((optimum_dir / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"] and index["scheduler"][0] == "diffusers"
    assert not (optimum_dir / "manifest.json").exists()
    for c in ("text_encoder", "unet", "vae_encoder", "vae_decoder"):
        assert (optimum_dir / c / "model.onnx").is_file() and (optimum_dir / c / "config.json").is_file()
    assert json.loads((optimum_dir / "text_encoder" / "config.json").read_text())["num_hidden_layers"] >= 1
    assert "scaling_factor" in json.loads((optimum_dir / "vae_decoder" / "config.json").read_text())
    ins, outs = _io(optimum_dir / "unet" / "model.onnx")
    assert list(ins) == ["sample", "timestep", "encoder_hidden_states"] and list(outs) == ["out_sample"]
    assert ins["timestep"] == ("float32", ())  # a scalar, as Optimum exports it
    ins, outs = _io(optimum_dir / "text_encoder" / "model.onnx")
    assert list(ins) == ["input_ids"] and list(outs) == ["last_hidden_state", "pooler_output"]
    assert (list(_io(optimum_dir / "vae_decoder" / "model.onnx")[0]), list(_io(optimum_dir / "vae_decoder" / "model.onnx")[1])) \
        == (["latent_sample"], ["sample"])
    assert list(_io(optimum_dir / "vae_encoder" / "model.onnx")[1]) == ["latent_parameters"]


def test_converted_graphs_compute_what_ours_do(tiny_random_fp32, optimum_dir):
    """pooler_output is the hidden state at the first end-of-text token (CLIP's pooling); the
    scalar-timestep U-Net gives our U-Net's output."""
    import onnxruntime as ort

    pipe = Pipeline.load(tiny_random_fp32, threads=1)
    ids = pipe.tokenizer([PROMPT, "x y z"])
    te = ort.InferenceSession(str(optimum_dir / "text_encoder" / "model.onnx"))
    hidden, pooled = te.run(None, {"input_ids": ids})
    eos = [list(row).index(pipe.tokenizer.eos_token_id) for row in ids]
    np.testing.assert_array_equal(pooled, hidden[np.arange(2), eos])
    np.testing.assert_array_equal(hidden, pipe.components["text_encoder"](input_ids=ids))
    rng = np.random.default_rng(0)
    feeds = {"sample": rng.standard_normal((2, 4, 8, 8)).astype(np.float32),
             "encoder_hidden_states": hidden.astype(np.float32)}
    un = ort.InferenceSession(str(optimum_dir / "unet" / "model.onnx"))
    theirs = un.run(None, {**feeds, "timestep": np.array(500.0, dtype=np.float32)})[0]
    ours = pipe.components["unet"](**feeds, timestep=np.array([500.0], dtype=np.float32))
    np.testing.assert_array_equal(theirs, ours)


def test_runtime_names_the_import_command_for_an_optimum_dir(optimum_dir):
    with pytest.raises(LdmDeployError, match="from-optimum") as e:
        Pipeline.load(optimum_dir)
    assert "\n" not in str(e.value) and "Optimum ONNX export" in str(e.value)
    r = subprocess.run([sys.executable, "-m", "ldm_deploy.runtime.cli", str(optimum_dir), "x", "-o", "/tmp/x.png"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1 and r.stderr.startswith("ldm-generate: error: ") and "from-optimum" in r.stderr


def test_round_trip_gives_identical_images(tiny_random_fp32, optimum_dir, tmp_path):
    before = hash_tree(optimum_dir, skip=())
    manifest = from_optimum(optimum_dir, tmp_path / "back")
    assert hash_tree(optimum_dir, skip=()) == before  # the user's directory is never written
    assert manifest["stage"] == "import-optimum" and manifest["long_prompts"] is False
    art = Artifact.open(tmp_path / "back")
    art.verify()
    assert art.shape_ranges == Artifact.open(tiny_random_fp32).shape_ranges
    assert _io(tmp_path / "back" / "unet" / "model.onnx")[0]["timestep"] == ("float32", (1,))
    a = Pipeline.load(tiny_random_fp32, threads=1)
    b = Pipeline.load(tmp_path / "back", threads=1)
    np.testing.assert_array_equal(images(a), images(b))


def test_import_of_an_optimum_cli_style_dir(optimum_dir, tiny_random_fp32, tmp_path):
    """What optimum-cli writes differs from our converter's output: int64 token ids, a dynamic
    text sequence in the U-Net, only the slow tokenizer's files. The import handles all three
    (the dynamic sequence makes a long-prompt artifact)."""
    fake = tmp_path / "optimum-cli-like"
    shutil.copytree(optimum_dir, fake)
    (fake / "tokenizer" / "tokenizer.json").unlink()
    te = onnx.load(str(fake / "text_encoder" / "model.onnx"))
    graph_io.adapt_input(te.graph, "input_ids", "int64", ("batch_size", "sequence_length"))
    onnx.save(te, str(fake / "text_encoder" / "model.onnx"))
    un = onnx.load(str(fake / "unet" / "model.onnx"))
    ehs = next(v for v in un.graph.input if v.name == "encoder_hidden_states")
    graph_io.set_dims(ehs, ("batch_size", "sequence_length", graph_io.io_dims(ehs)[2]))
    onnx.save(un, str(fake / "unet" / "model.onnx"))
    manifest = from_optimum(fake, tmp_path / "imported")
    assert manifest["long_prompts"] is True and tuple(manifest["shape_ranges"]["sequence"]) == (77, 77, 231)
    assert manifest["components"]["text_encoder"]["spec"]["inputs"][0]["dtype"] == "int64"
    assert (tmp_path / "imported" / "tokenizer" / "tokenizer.json").is_file()
    ref = images(Pipeline.load(tiny_random_fp32, threads=1))
    np.testing.assert_array_equal(images(Pipeline.load(tmp_path / "imported", threads=1)), ref)
    long = Pipeline.load(tmp_path / "imported", threads=1, long_prompts=True)
    assert images(long).shape == ref.shape


def test_bad_inputs_are_one_line_errors(tiny_random_fp32, optimum_dir, tmp_path):
    with pytest.raises(LdmDeployError, match="already an ldm-deploy artifact"):
        from_optimum(tiny_random_fp32, tmp_path / "x")
    with pytest.raises(LdmDeployError, match="not an Optimum ONNX export"):
        from_optimum(tmp_path, tmp_path / "x")
    with pytest.raises(LdmDeployError, match="already exists"):
        to_optimum(tiny_random_fp32, optimum_dir)
    sdxl = tmp_path / "sdxl"
    shutil.copytree(optimum_dir, sdxl)
    index = json.loads((sdxl / "model_index.json").read_text())
    (sdxl / "model_index.json").write_text(json.dumps({**index, "text_encoder_2": ["transformers", "X"]}))
    with pytest.raises(LdmDeployError, match="only Stable Diffusion 1.x/2.x"):
        from_optimum(sdxl, tmp_path / "y")
    r = subprocess.run([sys.executable, "-m", "ldm_deploy.interop.optimum", "from-optimum", str(tmp_path / "nope"),
                        str(tmp_path / "z")], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0
    assert r.stderr.startswith("python -m ldm_deploy.interop.optimum: error: ")
    assert not (tmp_path / "z").exists()


# --- against Optimum itself ------------------------------------------------------------------------
def test_optimum_loads_our_export_and_we_run_optimums(tmp_path):
    """Acceptance (benchmarks/optimum_interop.py): Optimum's ORTStableDiffusionPipeline on our
    converted export, and our runtime on an optimum-cli export, each >= 40 dB PSNR against our
    runtime on our export of `tiny` from the same latents."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import optimum_interop

    python = os.environ.get("LDM_OPTIMUM_PYTHON")
    why = optimum_interop.optimum_available(python)
    if why:
        pytest.skip(why)
    results = optimum_interop.run(python, tmp_path, steps=10, guidance=5.0, log=lambda s: None)
    assert results["A_ours_to_optimum"]["passed"], results["A_ours_to_optimum"]
    assert results["B_optimum_to_ours"]["passed"], results["B_optimum_to_ours"]


def test_ldm_export_layout_optimum(tmp_path):
    from conftest import run_cli

    out = tmp_path / "tiny-random-optimum"
    r = run_cli("ldm-export", "--model", "tiny-random", "--layout", "optimum", "--components",
                "text_encoder,unet,vae_decoder", "-o", str(out), "-q")
    assert r.returncode == 0, r.stderr
    assert "Optimum layout" in r.stdout and (out / "model_index.json").is_file()
    assert not (out / "manifest.json").exists() and not (out / "vae_encoder").exists()
    assert list(_io(out / "unet" / "model.onnx")[1]) == ["out_sample"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-random-optimum"]  # no staging left behind
    r = run_cli("ldm-export", "--model", "tiny-random", "--layout", "optimum", "-o", str(out))
    assert r.returncode == 1 and r.stderr.startswith("ldm-export: error: ") and "already exists" in r.stderr


def test_ldm_quantize_names_the_import_command(optimum_dir, tmp_path):
    r = subprocess.run([sys.executable, "-m", "ldm_deploy.quantize.cli", str(optimum_dir), "-o", str(tmp_path / "q")],
                       capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 1 and r.stderr.startswith("ldm-quantize: error: ") and "from-optimum" in r.stderr, r.stderr
    assert not (tmp_path / "q").exists()
