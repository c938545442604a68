"""Prompts over 77 tokens: a warning when they are cut, and 77-token windows with
``ldm-export --long-prompts`` + ``Pipeline.load(long_prompts=True)`` on the trained ``tiny`` model."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli

from ldm_deploy.errors import LdmDeployError
from ldm_deploy.runtime import Pipeline
from ldm_deploy.specs import ComponentSpec, ModelDims, ShapeRanges, component_specs, trt_profile

FILLER = "simple flat clean picture"
STEPS = 12
COMPONENTS = ("text_encoder", "unet", "vae_decoder")


@pytest.fixture(scope="module")
def long_artifact(tmp_path_factory) -> Path:
    from ldm_deploy.export.exporter import ExportOptions, export_model

    out = tmp_path_factory.mktemp("long") / "tiny-long"
    export_model("tiny", out, ExportOptions(long_prompts=True, components=COMPONENTS), log=lambda s: None)
    return out


def pad(pipe: Pipeline, text: str, tokens: int) -> str:
    count = lambda t: len(pipe.tokenizer._tokenizer.encode(t, add_special_tokens=False).ids)  # noqa: E731
    while count(text + ", " + FILLER) <= tokens:
        text += ", " + FILLER
    while count(text + " ,") <= tokens:
        text += " ,"
    assert count(text) == tokens
    return text


def prompt(pipe: Pipeline, background: str, colour: str) -> str:
    """Background word in the first 75 tokens, colour word only after token 77 (~147 tokens)."""
    return (pad(pipe, f"a large circle on a {background} background, top left", 75) + " "
            + pad(pipe, f"a large {colour} circle, top left", 72))


def image(pipe: Pipeline, text: str, seed: int) -> np.ndarray:
    return np.asarray(pipe(text, num_inference_steps=STEPS, guidance_scale=5.0, seed=seed).images[0]).astype(float)


def test_long_prompt_windows_reach_the_unet(long_artifact):
    short = Pipeline.load(long_artifact, threads=1, components=COMPONENTS)
    long = Pipeline.load(long_artifact, threads=1, components=COMPONENTS, long_prompts=True)
    base, first, second = prompt(short, "white", "red"), prompt(short, "black", "red"), prompt(short, "white", "yellow")

    with pytest.warns(UserWarning, match=r"prompt 0 lost 72 tokens \('a large red circle"):
        truncated = image(short, base, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert np.abs(image(short, second, 0) - truncated).mean() == 0.0  # the second half never arrives
        assert np.abs(image(short, first, 0) - truncated).mean() > 5.0

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is cut: no warning
        ref = [image(long, base, s) for s in (0, 1)]
        first_mad = np.mean([np.abs(image(long, first, s) - r).mean() for s, r in zip((0, 1), ref)])
        second_mad = np.mean([np.abs(image(long, second, s) - r).mean() for s, r in zip((0, 1), ref)])
    assert first_mad > 5.0 and second_mad > 5.0, (first_mad, second_mad)


def test_long_context_is_chunked_and_negative_padded_to_match(long_artifact):
    pipe = Pipeline.load(long_artifact, threads=1, components=COMPONENTS, long_prompts=True)
    text = prompt(pipe, "white", "red")
    ids = pipe.tokenizer.chunked([text, "short"], 2)
    assert ids.shape == (2, 2, 77) and (ids[:, :, 0] == pipe.tokenizer.bos_token_id).all()
    assert ids[1, 1, 1] == pipe.tokenizer.eos_token_id  # an empty window: bos, eos, padding
    assert pipe.tokenizer.chunks_needed([text]) == 2 and pipe.tokenizer.chunks_needed(["x"]) == 1
    context = pipe.encode([text], "blurry", 1, cfg=True)
    assert context.shape == (2, 154, 32)
    # the first window of a long prompt is what a plain 77-token encoding of its first 75 tokens gives
    with pytest.warns(UserWarning, match="truncated"):
        plain = pipe.encode_prompt([text])[0]
    np.testing.assert_allclose(context[1, :77], plain, atol=1e-6)
    with pytest.warns(UserWarning, match="at most 3 windows"):
        pipe.tokenizer.chunked([" ".join(["red"] * 300)], 3)


def test_dynamic_sequence_unet_matches_torch_at_154_tokens(long_artifact):
    import torch

    from ldm_deploy.models import load_model

    unet = load_model("tiny").unet
    pipe = Pipeline.load(long_artifact, threads=1, components=COMPONENTS, long_prompts=True)
    rng = np.random.default_rng(0)
    x, ctx = rng.standard_normal((2, 4, 8, 8)).astype(np.float32), rng.standard_normal((2, 154, 32)).astype(np.float32)
    t = np.array([500.0], dtype=np.float32)
    with torch.no_grad():
        ref = unet(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample.numpy()
    np.testing.assert_allclose(pipe.components["unet"](sample=x, timestep=t, encoder_hidden_states=ctx), ref,
                               atol=1e-4)


def test_static_artifact_refuses_long_prompts(tiny_random_fp32):
    with pytest.raises(LdmDeployError, match="re-export it with ldm-export --long-prompts"):
        Pipeline.load(tiny_random_fp32, long_prompts=True)


def test_ldm_generate_long_prompts(long_artifact, tmp_path):
    pipe = Pipeline.load(long_artifact, threads=1, components=COMPONENTS)
    r = run_cli("ldm-generate", str(long_artifact), prompt(pipe, "white", "red"), "--long-prompts", "--steps", "2",
                "-q", "-o", str(tmp_path / "x.png"))
    assert r.returncode == 0 and "truncated" not in r.stderr, r.stderr
    assert (tmp_path / "x.png").is_file()


def test_sequence_axis_in_ranges_and_trt_profiles():
    ranges = ShapeRanges(batch=(1, 1, 4), image_height=(64, 64, 128), image_width=(64, 64, 128),
                         sequence=(77, 77, 231))
    spec = component_specs(ModelDims(text_hidden=32), long_prompts=True)["unet"]
    assert spec.inputs[2].shape == ("unet_batch", "sequence", 32)
    prof = trt_profile(ComponentSpec.from_dict(spec.to_dict()), ranges)
    assert prof.shapes["encoder_hidden_states"] == ((1, 77, 32), (2, 77, 32), (8, 231, 32))
    old = ranges.to_dict()
    del old["sequence"]  # a manifest written before the axis existed
    assert ShapeRanges.from_dict(old).sequence == (77, 77, 77)
    assert ShapeRanges.from_dict(ranges.to_dict()) == ranges
    assert component_specs(ModelDims())["unet"].inputs[2].shape == ("unet_batch", 77, 768)


def test_serve_batches_only_prompts_with_the_same_window_count(long_artifact):
    from ldm_deploy.serve.batcher import Job, run_batch, text_windows

    pipe = Pipeline.load(long_artifact, threads=1, components=COMPONENTS, long_prompts=True)
    long_text, short_text = prompt(pipe, "white", "red"), "a large red circle on a white background, top left"
    assert (text_windows(pipe, long_text, None), text_windows(pipe, short_text, None)) == (2, 1)
    a = Job(long_text, None, 4, 5.0, 64, 64, 0, windows=2)
    b = Job(short_text, None, 4, 5.0, 64, 64, 1, windows=1)
    assert a.key != b.key  # never one call: the short prompt would get an extra empty window
    alone = run_batch(pipe, [b])[0].images[0]
    direct = pipe(short_text, num_inference_steps=4, guidance_scale=5.0, seed=1).images[0]
    np.testing.assert_array_equal(np.asarray(alone), np.asarray(direct))
