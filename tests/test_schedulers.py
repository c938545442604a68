"""The numpy DPM-Solver++ 2M, Euler and Euler-ancestral schedulers and the scheduler registry, against
diffusers' schedulers and pipelines (issue #15)."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from conftest import ROOT  # noqa: E402
from ldm_deploy.errors import LdmDeployError  # noqa: E402
from ldm_deploy.runtime import (  # noqa: E402
    SCHEDULERS,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    Pipeline,
    make_scheduler,
)
from ldm_deploy.runtime.cli import main as generate_main  # noqa: E402

# The DDIM config the artifacts carry (SD1.5's): users switch schedulers with `X.from_config(this)`.
SD15 = json.loads((ROOT / "ldm_deploy/assets/tiny/scheduler/scheduler_config.json").read_text())
SIGMA_SCHEDULERS = ["dpm++2m", "dpm++2m-karras", "euler", "euler-a"]
PROMPTS = ["a small red circle on a blue background, top left", "a large green square"]
SHAPE = (2, 4, 8, 8)


def reference(name: str, config: dict):
    """diffusers' scheduler for a registry name, built from the same config dict."""
    if name.startswith("dpm++2m"):
        return diffusers.DPMSolverMultistepScheduler.from_config(config, use_karras_sigmas=name.endswith("karras"))
    if name == "ddim":
        return diffusers.DDIMScheduler.from_config(config)
    cls = diffusers.EulerDiscreteScheduler if name == "euler" else diffusers.EulerAncestralDiscreteScheduler
    return cls.from_config(config)


def fake_model(x: np.ndarray, t: float) -> np.ndarray:
    """A deterministic stand-in for the U-Net: a smooth function of the (scaled) sample and the timestep."""
    x = np.asarray(x, dtype=np.float32)
    return (0.9 * np.tanh(x) + 0.05 * np.sin(3 * x + np.float32(t) / 100)).astype(np.float32)


def ancestral_noise(monkeypatch, draw) -> None:
    """Make diffusers' Euler-ancestral steps add the noise `draw(shape)` gives (float32 numpy)."""
    from diffusers.schedulers import scheduling_euler_ancestral_discrete as module

    monkeypatch.setattr(module, "randn_tensor", lambda shape, **kw: torch.from_numpy(draw(tuple(shape))))


def assert_same_schedule(ours, ref) -> None:
    """Identical integer timesteps; fractional ones (Euler on Karras sigmas) and sigmas to float32 precision:
    torch's float32 sqrt is not always correctly rounded, so the last bit of a sigma may differ."""
    expected = ref.timesteps.numpy()
    assert ours.timesteps.dtype == expected.dtype
    if expected.dtype == np.int64 or np.array_equal(expected, expected.round()):
        np.testing.assert_array_equal(ours.timesteps, expected)
    else:
        np.testing.assert_allclose(ours.timesteps, expected, rtol=1e-6)
    np.testing.assert_allclose(ours.sigmas, ref.sigmas.numpy(), rtol=2e-6)


def run_pair(ours, ref, steps: int, monkeypatch, seed: int = 0, feed_reference: bool = False) -> float:
    """Both schedulers through a whole loop with the fake model and the same noise; the largest step error
    relative to the scale of the step's input sample. Timesteps must be identical and sigmas equal to float32
    precision. With `feed_reference`, each step starts from diffusers' previous sample (single steps are
    checked); otherwise the two chains run on their own (the accumulated error is checked)."""
    ours.set_timesteps(steps)
    ref.set_timesteps(steps)
    assert_same_schedule(ours, ref)
    assert ours.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(SHAPE) * ours.init_noise_sigma).astype(np.float32)
    x_ref = torch.from_numpy(x.copy())
    noise: list[np.ndarray] = []
    ancestral_noise(monkeypatch, lambda shape: noise[-1])
    worst = 0.0
    for t, t_ref in zip(ours.timesteps, ref.timesteps):
        if feed_reference:
            x = x_ref.numpy().copy()
        out = fake_model(ours.scale_model_input(x, t), t)
        out_ref = torch.from_numpy(fake_model(ref.scale_model_input(x_ref, t_ref).numpy(), float(t_ref)))
        noise.append(rng.standard_normal(SHAPE).astype(np.float32))
        scale = max(1.0, float(np.abs(x).max()))  # float32 rounding is relative to a step's input
        x = ours.step(out, t, x, noise=noise[-1] if ours.stochastic else None)
        x_ref = ref.step(out_ref, t_ref, x_ref).prev_sample
        assert x.dtype == np.float32 and x.shape == SHAPE
        worst = max(worst, float(np.abs(x - x_ref.numpy()).max()) / scale)
    return worst


# --- (a) step by step against diffusers' schedulers -------------------------------------------------------

@pytest.mark.parametrize("steps", [5, 8, 10, 15, 25])
@pytest.mark.parametrize("name", SIGMA_SCHEDULERS)
def test_sd15_steps_match_diffusers(name, steps, monkeypatch):
    assert run_pair(make_scheduler(name, SD15), reference(name, SD15), steps, monkeypatch) < 2e-6


COSINE = {"beta_schedule": "squaredcos_cap_v2"}
OTHER_CONFIGS = {
    "v-pred": {"prediction_type": "v_prediction"},
    "trailing": {"timestep_spacing": "trailing", "steps_offset": 0},
    "linspace": {"timestep_spacing": "linspace"},
    "linear": {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
    "cosine": COSINE,
    "zero-snr": {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction", "timestep_spacing": "trailing"},
}


@pytest.mark.parametrize("name, config", [
    pytest.param(name, config, id=f"{name}-{label}") for name in SIGMA_SCHEDULERS
    for label, config in OTHER_CONFIGS.items() if (name, label) != ("dpm++2m-karras", "cosine")  # see below
])
def test_other_configs_match_diffusers(name, config, monkeypatch):
    config = {**SD15, **config}  # zero-SNR starts at sigma 4096: diffusers' float32 error there carries on,
    for steps in (7, 12):        # so single steps are compared
        ours, ref = make_scheduler(name, config), reference(name, config)
        assert run_pair(ours, ref, steps, monkeypatch, feed_reference=True) < 2e-6


@pytest.mark.parametrize("steps", [7, 12])
def test_dpm_karras_on_the_cosine_schedule(steps):
    """diffusers truncates (does not round) these timesteps, and repeats the first: it then skips a step and
    fails at the last one. Same timesteps and sigmas here; every step runs."""
    config = {**SD15, **COSINE}
    ours, ref = make_scheduler("dpm++2m-karras", config), reference("dpm++2m-karras", config)
    ours.set_timesteps(steps)
    ref.set_timesteps(steps)
    assert_same_schedule(ours, ref)
    assert ours.timesteps[0] == ours.timesteps[1]
    x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    for t in ours.timesteps:
        x = ours.step(fake_model(x, t), t, x)
    assert np.isfinite(x).all()


@pytest.mark.parametrize("steps", [5, 10, 25])
def test_euler_karras_matches_diffusers(steps, monkeypatch):
    config = {**SD15, "use_karras_sigmas": True}
    ours = EulerDiscreteScheduler.from_config(config)
    assert ours.timesteps.dtype == np.int64  # before set_timesteps; after it, fractional float32 timesteps
    assert run_pair(ours, diffusers.EulerDiscreteScheduler.from_config(config), steps, monkeypatch) < 2e-6
    assert not np.array_equal(ours.timesteps, ours.timesteps.round())


def test_the_parity_check_can_fail(monkeypatch):
    """Against a reference it does not match, `run_pair` fails or reports a large error."""
    with pytest.raises(AssertionError):  # other timesteps and sigmas
        run_pair(make_scheduler("dpm++2m", SD15), reference("dpm++2m-karras", SD15), 10, monkeypatch)
    # same timesteps and sigmas, first instead of second order: the step comparison itself catches it
    first_order = DPMSolverMultistepScheduler.from_config({**SD15, "solver_order": 1})
    assert run_pair(first_order, reference("dpm++2m", SD15), 10, monkeypatch) > 1e-3

    class Flipped(EulerAncestralDiscreteScheduler):  # adds other noise than diffusers does
        def step(self, model_output, timestep, sample, generator=None, noise=None):  # type: ignore[no-untyped-def]
            return super().step(model_output, timestep, sample, noise=-noise)

    assert run_pair(Flipped.from_config(SD15), reference("euler-a", SD15), 10, monkeypatch) > 1e-2


@pytest.mark.parametrize("name", SIGMA_SCHEDULERS)
@pytest.mark.parametrize("strength", [0.3, 0.75, 1.0])
def test_img2img_timesteps_and_add_noise_match_diffusers(name, strength):
    """The tail img2img runs and the noised init latents, as diffusers' img2img pipeline computes them."""
    ours, ref = make_scheduler(name, SD15), reference(name, SD15)
    tail = ours.img2img_timesteps(10, strength)
    ref.set_timesteps(10)
    start = 10 - min(int(10 * strength), 10)
    ref.set_begin_index(start)
    np.testing.assert_array_equal(tail, ref.timesteps[start:].numpy())
    rng = np.random.default_rng(1)
    x0, noise = rng.standard_normal((2, *SHAPE)).astype(np.float32)
    got = ours.add_noise(x0, noise, tail[:1])
    expected = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(tail[:1].copy()))
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-5, atol=1e-5)
    assert got.dtype == np.float32 and np.abs(got - x0).max() > 0.1
    # outside img2img, each batch item's timestep picks its sigma
    ours, ref = make_scheduler(name, SD15), reference(name, SD15)
    ours.set_timesteps(10)
    ref.set_timesteps(10)
    ts = ours.timesteps[[0, 6]]
    got = ours.add_noise(x0, noise, ts)
    expected = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(ts.copy()))
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-5, atol=1e-5)
    assert np.abs(got[0] - got[1]).max() > 0.1


def test_uniform_interface():
    for name in SCHEDULERS:
        sched = make_scheduler(name, SD15)
        assert sched.order == 1 and sched.stochastic == (name == "euler-a")
        sched.set_timesteps(4)
        assert len(sched.timesteps) == 4 and sched.init_noise_sigma >= 1.0
        x = np.ones(SHAPE, np.float32)
        scaled = sched.scale_model_input(x, sched.timesteps[0])
        assert scaled.dtype == np.float32
        assert np.allclose(scaled, x) == (name in ("ddim", "dpm++2m", "dpm++2m-karras"))
        rng = np.random.default_rng(0) if sched.stochastic else None
        for t in sched.timesteps:
            x = sched.step(fake_model(sched.scale_model_input(x, t), t), t, x, generator=rng)
        assert np.isfinite(x).all()


def test_registry_names_mean_what_they_say():
    dpm_config = {**SD15, "_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": True}
    assert make_scheduler("dpm++2m", dpm_config).use_karras_sigmas is False
    assert make_scheduler("dpm++2m-karras", SD15).use_karras_sigmas is True
    # Euler-ancestral has no Karras sigmas in diffusers: the key is ignored, as diffusers ignores it
    a, b = make_scheduler("euler-a", {**SD15, "use_karras_sigmas": True}), make_scheduler("euler-a", SD15)
    a.set_timesteps(10)
    b.set_timesteps(10)
    np.testing.assert_array_equal(a.sigmas, b.sigmas)


def test_euler_ancestral_noise_from_generator_or_array():
    sched = EulerAncestralDiscreteScheduler.from_config(SD15)
    x, out = np.random.default_rng(0).standard_normal((2, *SHAPE)).astype(np.float32)
    results = []
    for kw in ({"generator": np.random.default_rng(7)}, {"noise": np.random.default_rng(7).standard_normal(SHAPE)},
               {"generator": np.random.default_rng(8)}):
        sched.set_timesteps(10)
        results.append(sched.step(out, sched.timesteps[0], x, **kw))
    np.testing.assert_allclose(results[0], results[1], rtol=1e-6)
    assert np.abs(results[0] - results[2]).max() > 0.1
    sched.set_timesteps(10)
    with pytest.raises(ValueError, match="exactly one of"):
        sched.step(out, sched.timesteps[0], x)


# --- (b) end to end: our Pipeline against diffusers' StableDiffusionPipeline -------------------------------

@pytest.fixture(scope="module")
def pipe(tiny_random_fp32) -> Pipeline:
    return Pipeline.load(tiny_random_fp32)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


@pytest.fixture(scope="module")
def sd_pipes(tiny_random_torch):
    """diffusers' text-to-image and image-to-image pipelines over the same torch model (schedulers set per test)."""
    from diffusers import StableDiffusionImg2ImgPipeline

    text2img = tiny_random_torch.diffusers_pipeline()
    img2img = StableDiffusionImg2ImgPipeline(**text2img.components)
    for sd in (text2img, img2img):
        sd.set_progress_bar_config(disable=True)
    return text2img, img2img


def rng_draws(seed: int, *shapes: tuple[int, ...]):
    """What our pipeline draws from ``default_rng(seed)``, in order: the given shapes, then step noise."""
    rng = np.random.default_rng(seed)
    first = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    return first, lambda shape: rng.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("name", SIGMA_SCHEDULERS)
def test_matches_diffusers_pipeline(pipe, sd_pipes, name, monkeypatch):
    seed, steps = 4, 4  # DPM-Solver: first, second, second, first order
    latents = np.random.default_rng(3).standard_normal((2, 4, 8, 8)).astype(np.float32)
    _, draw = rng_draws(seed)  # latents are given: the pipeline's generator only feeds Euler-ancestral's steps
    ancestral_noise(monkeypatch, draw)
    sd = sd_pipes[0]
    sd.scheduler = reference(name, pipe.scheduler_config)
    kwargs = dict(negative_prompt=["", "blurry"], num_inference_steps=steps, guidance_scale=7.5, output_type="np")
    with torch.no_grad():
        ref = sd(PROMPTS, latents=torch.from_numpy(latents), height=64, width=64, **kwargs).images
    ours = pipe(PROMPTS, latents=latents, seed=seed, scheduler=name, **kwargs).images
    assert ours.shape == ref.shape == (2, 64, 64, 3)
    assert psnr(ours, ref) >= 40.0, psnr(ours, ref)
    # the comparison can fail: other latents give other pixels, and so does an Euler U-Net input left unscaled
    other = pipe(PROMPTS, latents=-latents, seed=seed, scheduler=name, **kwargs).images
    assert psnr(other, ref) < 40.0
    if name.startswith("euler"):
        monkeypatch.setattr(EulerDiscreteScheduler, "scale_model_input", lambda self, sample, t: sample)
        unscaled = pipe(PROMPTS, latents=latents, seed=seed, scheduler=name, **kwargs).images
        assert psnr(unscaled, ref) < 40.0


@pytest.mark.parametrize("name", SIGMA_SCHEDULERS)
def test_img2img_matches_diffusers_img2img(pipe, sd_pipes, name, monkeypatch):
    """(d) img2img with every scheduler, pixel for pixel as diffusers' img2img pipeline with the same draws:
    ours takes the posterior noise, the forward noise, then (Euler-ancestral) step noise from one generator."""
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as img2img_mod
    from PIL import Image

    init = np.zeros((64, 64, 3), np.uint8)
    init[:32, :, 0] = 255
    init[32:, 20:50, 2] = 200
    seed, shape = 11, (1, 4, 8, 8)
    (posterior_eps, noise), draw = rng_draws(seed, shape, shape)
    monkeypatch.setattr(img2img_mod, "retrieve_latents", lambda out, generator=None, sample_mode="sample":
                        out.latent_dist.mean + out.latent_dist.std * torch.from_numpy(posterior_eps))
    monkeypatch.setattr(img2img_mod, "randn_tensor", lambda shape, **kw: torch.from_numpy(noise))
    ancestral_noise(monkeypatch, draw)
    sd = sd_pipes[1]
    sd.scheduler = reference(name, pipe.scheduler_config)
    kwargs = dict(num_inference_steps=10, strength=0.4, guidance_scale=5.0, negative_prompt="blurry",
                  output_type="np")
    with torch.no_grad():
        ref = sd(PROMPTS[0], image=Image.fromarray(init), **kwargs).images
    calls: list[int] = []
    out = pipe(PROMPTS[0], image=init, seed=seed, scheduler=name, progress=lambda i, n: calls.append(n), **kwargs)
    assert out.steps == 4 and calls == [4] * 4
    assert psnr(out.images, ref) >= 40.0, psnr(out.images, ref)
    other = pipe(PROMPTS[0], image=255 - init, seed=seed, scheduler=name, **kwargs).images
    assert psnr(other, ref) < 40.0


def test_euler_ancestral_is_seeded(pipe):
    run = lambda seed: pipe("a red circle", num_inference_steps=4, seed=seed, scheduler="euler-a",  # noqa: E731
                            output_type="np").images
    assert np.array_equal(run(1), run(1))
    latents = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    fixed = lambda seed: pipe("a red circle", num_inference_steps=4, seed=seed, latents=latents,  # noqa: E731
                              scheduler="euler-a", output_type="np").images
    assert not np.array_equal(fixed(1), fixed(2))  # same latents, other step noise


# --- (c) bad input ------------------------------------------------------------------------------------------

def test_unknown_scheduler_is_one_clear_line(pipe):
    with pytest.raises(LdmDeployError) as e:
        pipe("a", num_inference_steps=2, scheduler="dpm++3m")
    message = str(e.value)
    assert "\n" not in message and "'dpm++3m'" in message
    assert all(name in message for name in SCHEDULERS)
    with pytest.raises(LdmDeployError, match="unknown scheduler"):
        make_scheduler("DDIM", SD15)


@pytest.mark.parametrize("name", SIGMA_SCHEDULERS)
def test_eta_is_ddim_only(pipe, name):
    with pytest.raises(LdmDeployError, match="eta applies to the ddim scheduler only") as e:
        pipe("a", num_inference_steps=2, eta=0.5, scheduler=name)
    assert "\n" not in str(e.value) and repr(name) in str(e.value)
    pipe("a", num_inference_steps=2, eta=0.5, scheduler="ddim", output_type="np")  # DDIM keeps its eta


def test_unsupported_config_is_one_clear_line():
    with pytest.raises(LdmDeployError, match="use_lu_lambdas=True is not supported"):
        make_scheduler("dpm++2m", {**SD15, "use_lu_lambdas": True})
    with pytest.raises(LdmDeployError, match="prediction_type"):
        make_scheduler("euler", {**SD15, "prediction_type": "sample"})


def run_generate(capsys, *args) -> tuple[int, str]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        generate_main([str(a) for a in args])
    return done.value.code, capsys.readouterr().err


def test_cli_scheduler(tiny_random_fp32, tmp_path, capsys, monkeypatch):
    import ldm_deploy.runtime.pipeline as pipeline

    out = tmp_path / "out.png"
    common = (tiny_random_fp32, "a red circle", "--steps", "3", "-q", "-o", out)
    with monkeypatch.context() as m:  # an unknown name is refused before the graphs are loaded
        m.setattr(pipeline.Pipeline, "load", lambda *a, **k: pytest.fail("loaded before checking --scheduler"))
        code, err = run_generate(capsys, *common, "--scheduler", "nope")
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("ldm-generate: error: unknown scheduler 'nope'")
    assert "dpm++2m-karras" in lines[0] and not out.exists()
    code, err = run_generate(capsys, *common, "--scheduler", "euler", "--eta", "0.5")
    assert code == 1 and err.strip().startswith("ldm-generate: error: eta applies to the ddim scheduler only")
    code, err = run_generate(capsys, *common, "--scheduler", "dpm++2m-karras")
    assert code == 0 and out.is_file(), err
    from ldm_deploy.runtime.cli import build_parser

    assert all(name in build_parser().format_help() for name in SCHEDULERS)
