"""The torch-free runtime: parity with diffusers, CFG, img2img, threads, bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from conftest import ROOT, run_cli
from ldm_deploy.errors import LdmDeployError
from ldm_deploy.runtime import Pipeline, PipelineObserver

PROMPTS = ["a small red circle on a blue background, top left", "a large green square"]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


@pytest.fixture(scope="module")
def pipe(tiny_random_fp32) -> Pipeline:
    return Pipeline.load(tiny_random_fp32)


def test_runtime_imports_without_torch_diffusers_transformers():
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'diffusers', 'transformers'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import ldm_deploy.runtime, ldm_deploy.runtime.cli\n"
        "from ldm_deploy.runtime import Pipeline, DDIMScheduler, ClipTokenizer\n"
        "print('ok', sorted(m for m in sys.modules if m.split('.')[0] in ('torch','diffusers','transformers')))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok []"


@pytest.mark.parametrize("guidance", [7.5, 1.0])
def test_matches_diffusers_pipeline(pipe, tiny_random_torch, guidance):
    sd = tiny_random_torch.diffusers_pipeline()
    sd.set_progress_bar_config(disable=True)
    latents = np.random.default_rng(3).standard_normal((2, 4, 8, 8)).astype(np.float32)
    with torch.no_grad():
        ref = sd(PROMPTS, negative_prompt=["", "blurry"], num_inference_steps=3, guidance_scale=guidance,
                 latents=torch.from_numpy(latents), output_type="np", height=64, width=64).images
    ours = pipe(PROMPTS, negative_prompt=["", "blurry"], num_inference_steps=3, guidance_scale=guidance,
                latents=latents, output_type="np").images
    assert ours.shape == ref.shape == (2, 64, 64, 3)
    assert psnr(ours, ref) >= 40.0, psnr(ours, ref)
    # and a different seed really gives a different image (the comparison can fail)
    other = pipe(PROMPTS, num_inference_steps=3, guidance_scale=guidance, seed=99, output_type="np").images
    assert psnr(other, ref) < 40.0


class _Log(PipelineObserver):
    def __init__(self):
        self.calls: list[tuple[str, dict]] = []
        self.steps: list = []

    def on_component(self, name, inputs):
        self.calls.append((name, {k: v.shape for k, v in inputs.items()}))

    def on_step_end(self, info):
        self.steps.append(info)


def test_guidance_at_most_one_skips_the_unconditional_half(pipe):
    seen = []
    for g in (1.0, 3.0):
        log = _Log()
        pipe("a", num_inference_steps=2, guidance_scale=g, seed=0, observer=log)
        seen += [shapes["sample"][0] for name, shapes in log.calls if name == "unet"]
        # without guidance the empty negative prompt is not even encoded
        assert [n for n, _ in log.calls].count("text_encoder") == (1 if g == 1.0 else 2)
    assert seen == [1, 1, 2, 2]


def test_observer_sees_every_phase_and_step(pipe):
    log = _Log()
    out = pipe("a red circle", num_inference_steps=3, seed=2, output_type="np", observer=log)
    assert [n for n, _ in log.calls] == ["text_encoder", "text_encoder", "unet", "unet", "unet", "vae_decoder"]
    assert [s.index for s in log.steps] == [0, 1, 2] and all(s.total == 3 for s in log.steps)
    assert log.steps[0].timestep > log.steps[-1].timestep
    assert set(log.steps[0].unet_inputs) == {"sample", "timestep", "encoder_hidden_states"}
    # the observed final latents are what was decoded: decoding them again gives the same image
    again = np.clip(pipe.decode(log.steps[-1].latents) / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)
    assert np.array_equal(again, out.images)
    # observing changes nothing
    plain = pipe("a red circle", num_inference_steps=3, seed=2, output_type="np").images
    assert np.array_equal(plain, out.images)
    assert set(out.timings) == {"text_encoder", "unet", "scheduler_and_guidance", "vae_decoder"}
    assert all(isinstance(v, float) for v in out.timings.values())


def test_seed_reproducible_and_num_images(pipe):
    a = pipe("a red circle", num_inference_steps=2, seed=5, num_images_per_prompt=2, output_type="np").images
    b = pipe("a red circle", num_inference_steps=2, seed=5, num_images_per_prompt=2, output_type="np").images
    assert a.shape[0] == 2 and np.array_equal(a, b)
    assert not np.array_equal(a[0], a[1])


def test_img2img_runs_the_strength_tail(pipe):
    init = np.zeros((64, 64, 3), np.uint8)
    init[:32] = 255
    calls = []
    out = pipe("x", image=init, strength=0.5, num_inference_steps=10, seed=0, output_type="np",
               progress=lambda i, n: calls.append(n))
    assert out.steps == 5 and calls[-1] == 5
    assert out.images.shape == (1, 64, 64, 3)


def test_img2img_matches_diffusers_img2img(pipe, tiny_random_torch, monkeypatch):
    """Same init image, same posterior sample and same noise: diffusers' img2img pipeline and ours
    give the same pixels. Our pipeline draws the posterior noise, then the forward noise, from
    ``default_rng(seed)``; diffusers gets those two draws through its two random hooks."""
    from diffusers import StableDiffusionImg2ImgPipeline
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as img2img_mod
    from PIL import Image

    init = np.zeros((64, 64, 3), np.uint8)
    init[:32, :, 0] = 255
    init[32:, 20:50, 2] = 200
    seed, shape = 11, (1, 4, 8, 8)
    rng = np.random.default_rng(seed)
    posterior_eps, noise = rng.standard_normal(shape), rng.standard_normal(shape)
    to_torch = lambda a: torch.from_numpy(a.astype(np.float32))  # noqa: E731
    monkeypatch.setattr(img2img_mod, "retrieve_latents",
                        lambda out, generator=None, sample_mode="sample":
                        out.latent_dist.mean + out.latent_dist.std * to_torch(posterior_eps))
    monkeypatch.setattr(img2img_mod, "randn_tensor", lambda shape, **kw: to_torch(noise))

    sd = StableDiffusionImg2ImgPipeline(**tiny_random_torch.diffusers_pipeline().components)
    sd.set_progress_bar_config(disable=True)
    kwargs = dict(num_inference_steps=10, strength=0.6, guidance_scale=5.0, negative_prompt="blurry")
    with torch.no_grad():
        ref = sd(PROMPTS[0], image=Image.fromarray(init), output_type="np", **kwargs).images
    ours = pipe(PROMPTS[0], image=init, seed=seed, output_type="np", **kwargs).images
    assert ours.shape == ref.shape == (1, 64, 64, 3)
    assert psnr(ours, ref) >= 40.0, psnr(ours, ref)
    # the init image matters: another one gives other pixels (the comparison can fail)
    other = pipe(PROMPTS[0], image=255 - init, seed=seed, output_type="np", **kwargs).images
    assert psnr(other, ref) < 40.0


def test_threads_give_the_serial_images(pipe):
    seeds = list(range(8))
    serial = {s: pipe("a blue square", num_inference_steps=2, seed=s, output_type="np").images for s in seeds}
    results: dict[tuple[int, int], np.ndarray] = {}
    errors: list[BaseException] = []

    def worker(s: int) -> None:
        try:
            for k in range(5):
                results[(s, k)] = pipe("a blue square", num_inference_steps=2, seed=s, output_type="np").images
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(s,)) for s in seeds]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == 40
    for (s, _), img in results.items():
        assert np.array_equal(img, serial[s])


def test_low_memory_sessions_give_the_same_images(pipe, tiny_random_fp32):
    lean = Pipeline.load(tiny_random_fp32, low_memory=True)
    for c in ("text_encoder", "unet", "vae_decoder"):
        assert lean.components[c].session.get_session_options().enable_cpu_mem_arena is False
        assert pipe.components[c].session.get_session_options().enable_cpu_mem_arena is True
    a = pipe("a blue square", num_inference_steps=2, seed=3, output_type="np").images
    b = lean("a blue square", num_inference_steps=2, seed=3, output_type="np").images
    assert np.array_equal(a, b)


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(height=60), "not a multiple of 8"),
        (dict(width=72), "multiple of 64"),
        (dict(height=256), "outside the artifact's exported range"),
        (dict(num_inference_steps=0), "num_inference_steps"),
        (dict(guidance_scale=-1.0), "guidance_scale"),
        (dict(image=np.zeros((64, 64, 3), np.uint8), strength=0.0), "strength"),
        (dict(image=np.zeros((64, 64, 3), np.uint8), strength=1.5), "strength"),
        (dict(num_images_per_prompt=9), "max batch"),
    ],
)
def test_bad_arguments(pipe, kwargs, needle):
    with pytest.raises(LdmDeployError, match=needle):
        pipe("a", **{"num_inference_steps": 2, **kwargs})


def test_nan_output_is_detected(pipe, monkeypatch):
    unet = pipe.components["unet"]
    monkeypatch.setattr(unet, "session", _NanSession(unet.session))
    with pytest.raises(LdmDeployError, match="NaN"):
        pipe("a", num_inference_steps=2, seed=0)


class _NanSession:
    def __init__(self, inner):
        self.inner = inner

    def run(self, names, feeds):
        return [np.full_like(o, np.nan) for o in self.inner.run(names, feeds)]


def test_missing_corrupt_and_tampered_artifacts(tiny_random_fp32, tmp_path):
    art = tmp_path / "a"
    shutil.copytree(tiny_random_fp32, art)
    Pipeline.load(art)  # intact copy loads
    model = art / "vae_decoder" / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    with pytest.raises(LdmDeployError, match="does not match the hash"):
        Pipeline.load(art)
    model.write_bytes(bytes(data[: len(data) // 3]))  # truncated: not a loadable graph any more
    with pytest.raises(LdmDeployError, match="could not load"):
        Pipeline.load(art, verify=False)
    model.unlink()
    with pytest.raises(LdmDeployError, match="missing"):
        Pipeline.load(art)
    with pytest.raises(LdmDeployError, match="does not exist"):
        Pipeline.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LdmDeployError, match="no manifest.json"):
        Pipeline.load(tmp_path / "empty")


def test_missing_provider_is_a_clear_error(tiny_random_fp32):
    from ldm_deploy.runtime.backends import BACKENDS

    absent = [name for name in ("ort-cuda", "ort-trt") if BACKENDS[name].unavailable()]
    if not absent:
        pytest.skip("every ONNX Runtime GPU execution provider is available in this onnxruntime build")
    with pytest.raises(LdmDeployError, match="is not available in this onnxruntime build"):
        Pipeline.load(tiny_random_fp32, backend=absent[0])


def test_backend_registry_dispatches_load_and_cli(tiny_random_fp32, monkeypatch):
    """Pipeline.load goes through BACKENDS: a backend registered there is what runs, with the
    load options passed on; ldm-generate offers exactly the registered names."""
    from ldm_deploy.runtime import backends
    from ldm_deploy.runtime.cli import build_parser

    seen: dict = {}

    class Counting:
        def __init__(self, inner):
            self.inner, self.spec, self.device, self.calls = inner, inner.spec, inner.device, 0

        def __call__(self, **inputs):
            self.calls += 1
            return self.inner(**inputs)

        def device_binding(self, **constants):
            self.calls += 1
            return self.inner.device_binding(**constants)

    def load(art, names, opts):
        seen["names"], seen["opts"] = list(names), opts
        return {n: Counting(c) for n, c in backends.BACKENDS["ort-cpu"].load(art, names, opts).items()}

    fake = backends.Backend("counting", "ort-cpu behind a call counter", load, lambda: None)
    monkeypatch.setitem(backends.BACKENDS, "counting", fake)
    pipe = Pipeline.load(tiny_random_fp32, backend="counting", threads=1)
    assert seen["opts"].threads == 1 and "unet" in seen["names"]
    from ldm_deploy.runtime.components import Component

    assert all(isinstance(c, Component) for c in pipe.components.values())
    ours = pipe("a red circle", num_inference_steps=2, seed=3, output_type="np").images
    assert pipe.components["unet"].calls == 1 and pipe.components["text_encoder"].calls == 2
    assert pipe.components["vae_decoder"].calls == 1
    ref = Pipeline.load(tiny_random_fp32)("a red circle", num_inference_steps=2, seed=3, output_type="np").images
    assert np.array_equal(ours, ref)

    backend_arg = next(a for a in build_parser()._actions if "--backend" in a.option_strings)
    assert list(backend_arg.choices) == list(backends.BACKENDS)
    monkeypatch.delitem(backends.BACKENDS, "counting")
    assert set(backends.BACKENDS) >= {"ort-cpu", "ort-cuda", "ort-trt", "tensorrt"}
    with pytest.raises(LdmDeployError, match="unknown backend 'counting'"):
        Pipeline.load(tiny_random_fp32, backend="counting")


def test_generate_cli_reaches_the_native_tensorrt_backend(tiny_random_fp32, tmp_path):
    """``--backend tensorrt`` is the native TensorRT loader (not an ORT provider): without
    TensorRT it fails in one line naming what to install."""
    from ldm_deploy.runtime.backends import BACKENDS

    if BACKENDS["tensorrt"].unavailable() is None:
        pytest.skip("TensorRT is installed: tests/test_tensorrt.py runs the backend itself")
    out = tmp_path / "x.png"
    proc = run_cli("ldm-generate", str(tiny_random_fp32), "x", "-o", str(out), "--backend", "tensorrt", "-q")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("ldm-generate: error: TensorRT is not available") and not out.exists()


def test_generate_cli(tiny_random_fp32, tmp_path):
    out = tmp_path / "img.png"
    proc = run_cli("ldm-generate", str(tiny_random_fp32), "a red circle", "-o", str(out), "--steps", "2", "-q")
    assert proc.returncode == 0, proc.stderr
    from PIL import Image

    assert Image.open(out).size == (64, 64)
    bad = run_cli("ldm-generate", str(tiny_random_fp32), "x", "-o", str(tmp_path / "b.png"), "--strength", "2",
                  "--image", str(out))
    assert bad.returncode == 1 and bad.stderr.strip().splitlines()[-1].startswith("ldm-generate: error: strength")
    assert not (tmp_path / "b.png").exists()
    manifest = json.loads((tiny_random_fp32 / "manifest.json").read_text())
    assert manifest["format"] == "ldm-deploy-artifact"
