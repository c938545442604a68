"""Feature caching (DeepCache): the full and shallow U-Net graphs, their export, the runtime's
cached sampling loop, quantization and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import run_cli
from ldm_deploy.errors import LdmDeployError
from ldm_deploy.export.deepcache import DeepCacheFull, DeepCacheShallow, deepcache_dims
from ldm_deploy.runtime import Pipeline, PipelineObserver

PROMPTS = ["a small red circle on a blue background, top left", "a large green square"]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


@pytest.fixture(scope="session")
def tiny_random_deepcache(tmp_path_factory):
    from ldm_deploy.export.exporter import ExportOptions, export_model

    out = tmp_path_factory.mktemp("artifacts") / "tiny-random-deepcache"
    export_model("tiny-random", out, ExportOptions(deepcache=1), log=lambda s: None)
    return out


@pytest.fixture(scope="module")
def pipe(tiny_random_deepcache) -> Pipeline:
    return Pipeline.load(tiny_random_deepcache)


def _two_layer_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8).eval()


# --------------------------------------------------------------------------- the torch modules


@pytest.mark.parametrize("depth", [1, 2])
def test_full_graph_is_the_unet_and_shallow_graph_reproduces_it(depth):
    unet = _two_layer_unet()
    dims = deepcache_dims(unet, depth)
    x, t, ctx = torch.randn(2, 4, 16, 16), torch.tensor([700.0]), torch.randn(2, 77, 16)
    with torch.no_grad():
        ref = unet(x, t, ctx, return_dict=False)[0]
        out, feature = DeepCacheFull(unet, depth)(x, t, ctx)
        shallow = DeepCacheShallow(unet, depth)(x, t, ctx, feature)
        stale = DeepCacheShallow(unet, depth)(x, t, ctx, torch.zeros_like(feature))
    assert feature.shape == (2, dims.channels, 16, 16)
    assert dims.channels == (16 if depth == 1 else 32)  # depth 2 caches the (upsampled) output of the deeper up block
    assert torch.equal(out, ref)
    assert torch.allclose(shallow, ref, atol=1e-5)
    assert not torch.allclose(stale, ref, atol=1e-3)  # the shallow graph really depends on the cached feature


def test_depth_out_of_range_is_one_line(tiny_random_torch):
    with pytest.raises(LdmDeployError, match=r"depth must be an integer in \[1, 1\]"):
        deepcache_dims(tiny_random_torch.unet, 2)


# --------------------------------------------------------------------------- export


def test_export_writes_and_validates_both_graphs(tiny_random_deepcache):
    m = json.loads((tiny_random_deepcache / "manifest.json").read_text())
    assert m["deepcache"] == {"depth": 1, "channels": 32, "full": "unet", "shallow": "unet_shallow"}
    unet, shallow = m["components"]["unet"]["spec"], m["components"]["unet_shallow"]["spec"]
    assert [o["name"] for o in unet["outputs"]] == ["noise_pred", "cache_feature"]
    assert [i["name"] for i in shallow["inputs"]] == ["sample", "timestep", "encoder_hidden_states", "cache_feature"]
    assert shallow["inputs"][3]["shape"] == ["unet_batch", 32, "height", "width"]
    for c in ("unet", "unet_shallow"):
        assert m["validation"][c]["status"] == "passed", m["validation"][c]
    assert m["validation"]["unet"]["other_outputs"]["cache_feature"]["cosine"] > 0.99999
    import onnx

    graph = onnx.load(str(tiny_random_deepcache / "unet_shallow" / "model.onnx"))
    dims = [d.dim_param or d.dim_value for d in graph.graph.input[3].type.tensor_type.shape.dim]
    assert dims == ["unet_batch", 32, "height", "width"]


def test_onnx_shallow_graph_given_the_same_step_feature_equals_the_full_graph(pipe):
    from ldm_deploy.inputs import example_inputs

    spec = pipe.artifact.spec("unet")
    x = example_inputs(spec, {"unet_batch": 2, "height": 8, "width": 8}, seed=3)
    noise, feature = pipe.components["unet"].device_binding().run_all(**x)
    shallow = pipe.components["unet_shallow"](**x, cache_feature=feature)
    np.testing.assert_allclose(shallow, noise, atol=1e-4)
    assert np.abs(pipe.components["unet_shallow"](**x, cache_feature=feature * 0) - noise).max() > 1e-3


# --------------------------------------------------------------------------- runtime


class _Graphs(PipelineObserver):
    def __init__(self):
        self.calls: list[str] = []

    def on_component(self, name, inputs):
        if name.startswith("unet"):
            self.calls.append(name)


@pytest.mark.parametrize("interval", [2, 3, 5])
def test_cache_interval_runs_the_full_graph_every_nth_step(pipe, interval):
    log = _Graphs()
    pipe(PROMPTS[0], num_inference_steps=7, cache_interval=interval, observer=log, output_type="np")
    assert log.calls == ["unet" if i % interval == 0 else "unet_shallow" for i in range(7)]


def test_interval_one_equals_the_plain_artifact(pipe, tiny_random_fp32):
    plain = Pipeline.load(tiny_random_fp32)
    kw = dict(num_inference_steps=4, guidance_scale=7.5, seed=5, output_type="np")
    a = pipe(PROMPTS, **kw).images
    b = plain(PROMPTS, **kw).images
    assert psnr(a, b) >= 60, psnr(a, b)


@pytest.mark.parametrize("scheduler", ["ddim", "dpm++2m"])
def test_cached_loop_matches_a_torch_deepcache_reference(pipe, tiny_random_torch, scheduler, monkeypatch):
    """diffusers' pipeline with its U-Net call replaced by the torch full/shallow modules under the
    same schedule gives our runtime's images from the same latents."""

    sd = tiny_random_torch.diffusers_pipeline()
    if scheduler == "dpm++2m":
        from diffusers import DPMSolverMultistepScheduler

        sd.scheduler = DPMSolverMultistepScheduler.from_config(sd.scheduler.config)
    sd.set_progress_bar_config(disable=True)
    unet = sd.unet
    full, shallow = DeepCacheFull(unet, 1), DeepCacheShallow(unet, 1)
    state = {"i": 0, "feature": None}

    def cached_forward(sample, timestep, encoder_hidden_states, *args, return_dict=True, **kwargs):
        t = torch.as_tensor(timestep, dtype=torch.float32).reshape(1)
        if state["i"] % 3 == 0:
            out, state["feature"] = full(sample, t, encoder_hidden_states)
        else:
            out = shallow(sample, t, encoder_hidden_states, state["feature"])
        state["i"] += 1
        return (out,)

    monkeypatch.setattr(unet, "forward", cached_forward)  # the session's model: restored after the test
    latents = np.random.default_rng(3).standard_normal((2, 4, 8, 8)).astype(np.float32)
    with torch.no_grad():
        ref = sd(PROMPTS, num_inference_steps=7, guidance_scale=7.5, latents=torch.from_numpy(latents),
                 output_type="np", height=64, width=64).images
    assert state["i"] == 7
    ours = pipe(PROMPTS, num_inference_steps=7, guidance_scale=7.5, latents=latents, scheduler=scheduler,
                cache_interval=3, output_type="np").images
    assert psnr(ours, ref) >= 40.0, psnr(ours, ref)
    uncached = pipe(PROMPTS, num_inference_steps=7, guidance_scale=7.5, latents=latents, scheduler=scheduler,
                    output_type="np").images
    assert psnr(uncached, ours) < psnr(ours, ref)  # caching changes the images: the comparison can fail


# --------------------------------------------------------------------------- quantization


def test_quantize_calibrates_and_quantizes_both_graphs(tiny_random_deepcache, tmp_path):
    from ldm_deploy.quantize.build import quantize_artifact

    out = tmp_path / "int8"
    m = quantize_artifact(tiny_random_deepcache, out, calib_size=4, calib_steps=4, holdout=2, quality_prompts=0)
    q = m["quantization"]
    assert q["components"] == ["unet", "unet_shallow"]
    assert q["per_component"]["unet_shallow"]["calibration_batches"] == 4
    assert q["per_component"]["unet_shallow"]["quantize_linear"] > 0
    assert q["quality"]["unet_shallow_heldout"]["cosine"] > 0.99
    fp32 = Pipeline.load(tiny_random_deepcache)
    int8 = Pipeline.load(out)
    kw = dict(num_inference_steps=6, cache_interval=3, seed=1, output_type="np")
    a, b = fp32(PROMPTS[0], **kw).images, int8(PROMPTS[0], **kw).images
    assert 25.0 <= psnr(a, b) < float("inf"), psnr(a, b)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "3"])
def test_bad_cache_interval(pipe, value):
    with pytest.raises(LdmDeployError, match="cache_interval must be an integer >= 1"):
        pipe(PROMPTS[0], num_inference_steps=2, cache_interval=value)


def test_cache_interval_needs_the_deepcache_graphs(tiny_random_fp32, tmp_path):
    plain = Pipeline.load(tiny_random_fp32)
    with pytest.raises(LdmDeployError, match="ldm-export --deepcache"):
        plain(PROMPTS[0], num_inference_steps=2, cache_interval=3)
    plain(PROMPTS[0], num_inference_steps=2, cache_interval=1)  # no caching: any artifact
    proc = run_cli("ldm-generate", str(tiny_random_fp32), "a red circle", "-o", str(tmp_path / "x.png"),
                   "--cache-interval", "3", "-q")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("ldm-generate: error:"), proc.stderr
    assert "--deepcache" in lines[0]
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("flag, needle", [("0", "positive integer"), ("2", "[1, 1]")])
def test_bad_deepcache_depth_fails_before_writing(tmp_path, flag, needle):
    out = tmp_path / "a"
    proc = run_cli("ldm-export", "--model", "tiny-random", "--deepcache", flag, "-o", str(out), "-q")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("ldm-export: error:"), proc.stderr
    assert needle in lines[0]
    assert not out.exists()


def test_generate_cli_with_cache_interval(tiny_random_deepcache, tmp_path):
    proc = run_cli("ldm-generate", str(tiny_random_deepcache), "a red circle", "-o", str(tmp_path / "x.png"),
                   "--steps", "6", "--cache-interval", "3", "--scheduler", "dpm++2m", "-q")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "x.png").is_file()
    assert "U-Net" in proc.stdout


def test_fast_preset_and_explicit_flags_win(tiny_random_deepcache, tmp_path):
    from ldm_deploy.runtime.presets import PRESETS, resolve_sampling

    fast = PRESETS["fast"]
    assert resolve_sampling("fast") == fast
    assert resolve_sampling("fast", steps=4, cache_interval=2, has_deepcache=True).steps == 4
    assert resolve_sampling(None).scheduler == "ddim" and resolve_sampling(None).steps == 25
    proc = run_cli("ldm-generate", str(tiny_random_deepcache), "a red circle", "-o", str(tmp_path / "f.png"),
                   "--fast", "--steps", "3", "-q")
    assert proc.returncode == 0, proc.stderr
    assert f"3 {fast.scheduler} steps" in proc.stdout
