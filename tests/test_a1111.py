"""ldm-serve's AUTOMATIC1111-compatible route ``POST /sdapi/v1/txt2img``: a request body as an A1111
client sends it gets the images ``/v1/generate`` gives for the same settings and seeds."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="ldm-serve needs the serve extra (pip install 'ldm-deploy[serve]')")
httpx = pytest.importorskip("httpx", reason="the serve tests need httpx (serve extra)")

from test_serve import artifact, pipe, png_array, psnr, running_server  # noqa: E402,F401 (fixtures)

from ldm_deploy.errors import LdmDeployError  # noqa: E402
from ldm_deploy.serve.a1111 import SAMPLERS, Txt2ImgRequest, sampler_of  # noqa: E402

FIXTURE = Path(__file__).parent / "data" / "a1111_txt2img.json"


def _images(body: dict) -> list[np.ndarray]:
    return [png_array(base64.b64decode(im)) for im in body["images"]]


def test_a1111_body_gets_the_images_of_v1_generate(pipe, artifact):  # noqa: F811
    request = json.loads(FIXTURE.read_text())
    with running_server(pipe, artifact, max_wait_ms=500) as base:
        r = httpx.post(f"{base}/sdapi/v1/txt2img", json=request, timeout=120)
        assert r.status_code == 200, r.text
        body = r.json()
        info = json.loads(body["info"])
        assert info["all_seeds"] == [1234, 1235] and info["sampler_name"] == "DPM++ 2M Karras"
        assert info["width"] == 64 and "do_not_save_samples" in info["ignored"] and "enable_hr" not in info["ignored"]
        assert body["parameters"]["prompt"] == request["prompt"] and len(body["images"]) == 2
        got = _images(body)
        for i, seed in enumerate((1234, 1235)):
            ref = httpx.post(f"{base}/v1/generate?format=png", timeout=60, json={
                "prompt": request["prompt"], "negative_prompt": "blurry", "steps": 10, "guidance_scale": 5.0,
                "seed": seed, "scheduler": "dpm++2m-karras", "height": 64, "width": 64})
            assert ref.status_code == 200
            assert psnr(got[i], png_array(ref.content)) >= 40.0  # batched vs alone: ORT's last bits
        assert psnr(got[0], got[1]) < 30.0  # two seeds, two images

        # seed -1: a random seed, reported, that reproduces the image; n_iter loops on seed + i
        r = httpx.post(f"{base}/sdapi/v1/txt2img", timeout=120, json={
            "prompt": request["prompt"], "seed": -1, "steps": 6, "cfg_scale": 5, "sampler_name": "Euler",
            "batch_size": 1, "n_iter": 2})
        info = json.loads(r.json()["info"])
        s = info["seed"]
        assert r.status_code == 200 and info["all_seeds"] == [s, s + 1]
        ref = httpx.post(f"{base}/v1/generate?format=png", timeout=60, json={
            "prompt": request["prompt"], "steps": 6, "guidance_scale": 5.0, "seed": s + 1, "scheduler": "euler"})
        assert psnr(_images(r.json())[1], png_array(ref.content)) >= 40.0


def test_a1111_refuses_what_would_change_the_image(pipe, artifact):  # noqa: F811
    request = json.loads(FIXTURE.read_text())
    with running_server(pipe, artifact) as base:
        def post(**changes) -> httpx.Response:
            return httpx.post(f"{base}/sdapi/v1/txt2img", json={**request, **changes}, timeout=60)

        r = post(sampler_name="LMS", scheduler="Automatic")
        assert r.status_code == 422 and "'LMS' is not supported" in r.json()["error"]
        assert all(f"'{name}'" in r.json()["error"] for name in SAMPLERS)
        r = post(enable_hr=True)
        assert r.status_code == 422 and "enable_hr=True" in r.json()["error"]
        assert post(styles=["cinematic"]).status_code == 422
        assert post(override_settings={"CLIP_stop_at_last_layers": 2}).status_code == 422
        assert post(scheduler="Exponential").status_code == 422
        r = post(width=100)
        assert r.status_code == 422 and "100" in r.json()["error"]


@pytest.mark.parametrize("fields, ours", [
    ({"sampler_name": "DDIM"}, "ddim"),
    ({"sampler_name": "DPM++ 2M Karras"}, "dpm++2m-karras"),  # before A1111 1.9
    ({"sampler_name": "DPM++ 2M", "scheduler": "Karras"}, "dpm++2m-karras"),  # A1111 >= 1.9
    ({"sampler_name": "DPM++ 2M", "scheduler": "Automatic"}, "dpm++2m"),
    ({"sampler_name": "Euler a"}, "euler-a"),
    ({"sampler_index": "Euler"}, "euler"),  # old clients name it sampler_index
    ({}, "euler"),  # A1111's API default
])
def test_sampler_names_map_to_ours(fields, ours):
    assert sampler_of(Txt2ImgRequest(**fields))[1] == ours


def test_unknown_scheduler_combination_is_refused():
    with pytest.raises(LdmDeployError, match="not supported"):
        sampler_of(Txt2ImgRequest(sampler_name="Euler", scheduler="Karras"))
