"""The numpy DDIM scheduler against diffusers' torch DDIMScheduler."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from ldm_deploy.runtime.scheduler import DDIMScheduler  # noqa: E402

SD15 = {
    "_class_name": "DDIMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "num_train_timesteps": 1000,
    "trained_betas": None,
    "skip_prk_steps": True,
}
SHAPE = (2, 4, 8, 8)
REPO = Path(__file__).resolve().parents[1]


def make_pair(**config):
    return DDIMScheduler.from_config(config), diffusers.DDIMScheduler.from_config(config)


def assert_close(ours: np.ndarray, ref, rtol: float = 1e-5) -> None:
    ref = ref.numpy() if isinstance(ref, torch.Tensor) else np.asarray(ref)
    assert ours.shape == ref.shape
    err = np.max(np.abs(ours.astype(np.float64) - ref.astype(np.float64)))
    assert err <= rtol * max(1.0, float(np.max(np.abs(ref)))), f"max abs diff {err}"


def run_both(ours, ref, steps: int, eta: float, seed: int = 0, feed_reference: bool = False):
    """Run both samplers through `steps` steps with the same random model outputs (and noise).

    With `feed_reference`, each step starts from diffusers' previous sample (checks single steps); otherwise
    the two chains run independently (checks accumulated error)."""
    ours.set_timesteps(steps)
    ref.set_timesteps(steps)
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
    assert ours.timesteps.dtype == np.int64
    rng = np.random.default_rng(seed)
    x_ours = rng.standard_normal(SHAPE).astype(np.float32)
    x_ref = torch.from_numpy(x_ours.copy())
    for t in ours.timesteps:
        out = rng.standard_normal(SHAPE).astype(np.float32)
        noise = rng.standard_normal(SHAPE).astype(np.float32) if eta > 0 else None
        if feed_reference:
            x_ours = x_ref.numpy().copy()
        expected = ref.step(
            torch.from_numpy(out),
            int(t),
            x_ref,
            eta=eta,
            variance_noise=None if noise is None else torch.from_numpy(noise),
        ).prev_sample
        x_ours = ours.step(out, t, x_ours, eta=eta, noise=noise)
        assert x_ours.dtype == np.float32
        assert_close(x_ours, expected)
        x_ref = expected
    return x_ours


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps_offset", [0, 1])
@pytest.mark.parametrize("set_alpha_to_one", [True, False])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_steps_match_diffusers(spacing, steps_offset, set_alpha_to_one, prediction_type, eta):
    config = dict(
        SD15,
        timestep_spacing=spacing,
        steps_offset=steps_offset,
        set_alpha_to_one=set_alpha_to_one,
        prediction_type=prediction_type,
    )
    ours, ref = make_pair(**config)
    for steps in (10, 7):
        run_both(ours, ref, steps, eta, feed_reference=True)


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_sd15_full_loop(eta):
    ours, ref = make_pair(**SD15)
    final = run_both(ours, ref, 10, eta, seed=3)
    assert np.isfinite(final).all()


@pytest.mark.parametrize(
    "config",
    [
        {},  # diffusers defaults: linear betas, clip_sample=True, set_alpha_to_one=True
        {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "sample", "clip_sample_range": 0.5},
        {"beta_schedule": "linear", "prediction_type": "sample", "clip_sample": False, "num_train_timesteps": 500},
        {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction", "timestep_spacing": "trailing",
         **{k: SD15[k] for k in ("beta_start", "beta_end", "beta_schedule")}},
        {"trained_betas": np.linspace(1e-4, 0.03, 1000).tolist(), "clip_sample": False},
    ],
)
def test_other_configs_match_diffusers(config):
    ours, ref = make_pair(**config)
    np.testing.assert_allclose(ours.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=2e-6, atol=1e-9)
    run_both(ours, ref, 10, 0.0, feed_reference=True)
    run_both(ours, ref, 10, 0.5, seed=1)


def test_clipping_is_applied():
    ours, ref = make_pair()  # clip_sample=True
    ours.set_timesteps(10)
    ref.set_timesteps(10)
    x = np.full(SHAPE, 3.0, dtype=np.float32)
    out = np.full(SHAPE, -3.0, dtype=np.float32)  # x0 estimate far outside [-1, 1]
    t = int(ours.timesteps[5])
    got = ours.step(out, t, x)
    assert_close(got, ref.step(torch.from_numpy(out), t, torch.from_numpy(x)).prev_sample)
    unclipped = DDIMScheduler(clip_sample=False)
    unclipped.set_timesteps(10)
    assert np.abs(unclipped.step(out, t, x) - got).max() > 0.1


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps_offset", [0, 1])
def test_timesteps_match_diffusers(spacing, steps_offset):
    ours, ref = make_pair(**dict(SD15, timestep_spacing=spacing, steps_offset=steps_offset))
    for steps in (1, 2, 3, 7, 10, 20, 25, 30, 33, 50, 81, 100, 150, 333, 500, 999):
        ours.set_timesteps(steps)
        ref.set_timesteps(steps)
        np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy(), err_msg=f"{steps} steps")
        assert ours.timesteps.dtype == np.int64 and len(ours.timesteps) == steps


def test_sd15_known_timesteps():
    config = json.loads((REPO / "ldm_deploy/models/configs/sd15-random/scheduler.json").read_text())
    sched = DDIMScheduler.from_config(config)
    sched.set_timesteps(10)
    assert sched.timesteps.tolist() == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]
    assert sched.init_noise_sigma == 1.0


def test_from_config_ignores_unknown_keys_and_keeps_known():
    sched = DDIMScheduler.from_config(dict(SD15, prediction_type="v_prediction", timestep_spacing="trailing"))
    assert sched.prediction_type == "v_prediction" and sched.timestep_spacing == "trailing"
    assert sched.steps_offset == 1 and sched.clip_sample is False
    assert sched.final_alpha_cumprod == pytest.approx(float(sched.alphas_cumprod[0]))


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_output_dtype_follows_sample(dtype):
    ours, ref = make_pair(**SD15)
    ours.set_timesteps(10)
    ref.set_timesteps(10)
    rng = np.random.default_rng(0)
    x, out = rng.standard_normal((2, *SHAPE)).astype(dtype)
    got = ours.step(out, 501, x)
    assert got.dtype == dtype
    expected = ref.step(torch.from_numpy(out.astype(np.float32)), 501, torch.from_numpy(x.astype(np.float32)))
    assert_close(got.astype(np.float32), expected.prev_sample, rtol=2e-3 if dtype == np.float16 else 1e-5)


def test_generator_noise():
    sched = DDIMScheduler.from_config(SD15)
    sched.set_timesteps(10)
    rng = np.random.default_rng(0)
    x, out = rng.standard_normal((2, *SHAPE)).astype(np.float32)
    a = sched.step(out, 501, x, eta=1.0, generator=np.random.default_rng(42))
    b = sched.step(out, 501, x, eta=1.0, noise=np.random.default_rng(42).standard_normal(SHAPE))
    c = sched.step(out, 501, x, eta=1.0, generator=np.random.default_rng(43))
    np.testing.assert_allclose(a, b, rtol=1e-6)
    assert np.abs(a - c).max() > 1e-2
    assert np.abs(a - sched.step(out, 501, x)).max() > 1e-2  # eta changes the result


@pytest.mark.parametrize("timesteps", [[999, 500, 1], [0, 0, 0], [261, 261, 261]])
def test_add_noise_matches_diffusers(timesteps):
    ours, ref = make_pair(**SD15)
    rng = np.random.default_rng(5)
    x0, noise = rng.standard_normal((2, 3, *SHAPE[1:])).astype(np.float32)
    got = ours.add_noise(x0, noise, np.array(timesteps))
    assert got.dtype == np.float32
    expected = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.tensor(timesteps))
    assert_close(got, expected)
    # one int timestep broadcasts over the batch
    np.testing.assert_allclose(ours.add_noise(x0, noise, timesteps[0])[0], got[0], rtol=1e-6)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("steps", [10, 25, 50])
@pytest.mark.parametrize("strength", [0.0, 0.05, 0.3, 0.5, 0.75, 0.8, 1.0])
def test_img2img_timesteps_match_pipeline(spacing, steps, strength):
    from diffusers import StableDiffusionImg2ImgPipeline

    ours, ref = make_pair(**dict(SD15, timestep_spacing=spacing))
    ref.set_timesteps(steps)
    fake_pipe = SimpleNamespace(scheduler=ref)
    expected, n = StableDiffusionImg2ImgPipeline.get_timesteps(fake_pipe, steps, strength, "cpu")
    got = ours.img2img_timesteps(steps, strength)
    np.testing.assert_array_equal(got, expected.numpy())
    assert len(got) == n
    assert ours.num_inference_steps == steps  # step() keeps stepping by the full schedule's stride


def test_img2img_loop_matches_diffusers():
    ours, ref = make_pair(**SD15)
    timesteps = ours.img2img_timesteps(20, 0.6)
    ref.set_timesteps(20)
    rng = np.random.default_rng(9)
    x0, noise = rng.standard_normal((2, *SHAPE)).astype(np.float32)
    x = ours.add_noise(x0, noise, timesteps[:1].repeat(SHAPE[0]))
    latent_timestep = torch.from_numpy(timesteps[:1]).repeat(SHAPE[0])  # as the img2img pipeline does
    x_ref = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), latent_timestep)
    for t in timesteps:
        out = rng.standard_normal(SHAPE).astype(np.float32)
        x = ours.step(out, t, x)
        x_ref = ref.step(torch.from_numpy(out), int(t), x_ref).prev_sample
        assert_close(x, x_ref)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"thresholding": True},
        {"beta_schedule": "exp"},
        {"prediction_type": "flow"},
        {"timestep_spacing": "karras"},
        {"trained_betas": [0.1, 0.2]},
    ],
)
def test_bad_config_raises(kwargs):
    with pytest.raises(ValueError):
        DDIMScheduler(**kwargs)


def test_bad_calls_raise():
    sched = DDIMScheduler.from_config(SD15)
    x = np.zeros(SHAPE, dtype=np.float32)
    with pytest.raises(ValueError):
        sched.step(x, 999, x)  # set_timesteps not called yet
    for steps in (0, -1, 1001):
        with pytest.raises(ValueError):
            sched.set_timesteps(steps)
    with pytest.raises(ValueError):
        sched.set_timesteps(1000)  # leading + steps_offset=1 would need timestep 1000
    sched.set_timesteps(10)
    with pytest.raises(ValueError):
        sched.step(x, 901, x, eta=0.5)  # eta > 0 needs noise or a generator
    with pytest.raises(ValueError):
        sched.step(x, 901, x, eta=0.5, noise=x, generator=np.random.default_rng(0))
    with pytest.raises(ValueError):
        sched.step(x, 901, x, eta=0.5, noise=x[:1])
    with pytest.raises(ValueError):
        sched.step(x, 901, x, eta=-0.1)
    with pytest.raises(ValueError):
        sched.step(x, 1000, x)
    for strength in (-0.1, 1.5):
        with pytest.raises(ValueError):
            sched.img2img_timesteps(10, strength)
