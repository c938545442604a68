"""ldm-serve: real HTTP against uvicorn servers started here (a thread, or a subprocess for SIGTERM),
on the embedded ``tiny`` model exported once for this module."""

from __future__ import annotations

import base64
import concurrent.futures as cf
import contextlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from conftest import ROOT

pytest.importorskip("fastapi", reason="ldm-serve needs the serve extra (pip install 'ldm-deploy[serve]')")
pytest.importorskip("uvicorn", reason="ldm-serve needs the serve extra (pip install 'ldm-deploy[serve]')")
httpx = pytest.importorskip("httpx", reason="the serve tests need httpx (serve extra)")

from PIL import Image  # noqa: E402

from ldm_deploy.errors import LdmDeployError  # noqa: E402
from ldm_deploy.runtime import Pipeline  # noqa: E402
from ldm_deploy.serve.app import create_app  # noqa: E402
from ldm_deploy.serve.config import ServeConfig  # noqa: E402

PROMPTS = [
    "a large red circle on a blue background, top left",
    "a small green square on a white background, bottom right",
    "a yellow triangle on a black background, center",
    "a large blue circle on a yellow background, top right",
]
STEPS = 10


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    """The trained tiny model (text-to-image components only, no validation: it is not under test here)."""
    from ldm_deploy.export.exporter import ExportOptions, export_model

    out = tmp_path_factory.mktemp("serve") / "tiny"
    export_model("tiny", out, ExportOptions(validate=False, components=("text_encoder", "unet", "vae_decoder")),
                 log=lambda s: None)
    return out


@pytest.fixture(scope="module")
def pipe(artifact) -> Pipeline:
    return Pipeline.load(artifact, threads=1, components=("text_encoder", "unet", "vae_decoder"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(pipe: Pipeline, artifact: Path, **options) -> Iterator[str]:
    """uvicorn in a thread serving ``create_app`` on a free port; yields the base URL (the app is
    ``running_server.app``)."""
    import uvicorn

    port = free_port()
    app = create_app(ServeConfig(artifact=artifact, threads=1, **options), pipe)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    running_server.app = app  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def png_array(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def direct(pipe: Pipeline, prompt: str, seed: int, **kw) -> np.ndarray:
    return np.asarray(pipe(prompt, num_inference_steps=kw.pop("steps", STEPS), seed=seed, **kw).images[0])


def metric_families(base: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{base}/metrics").text
    return {f.name: f for f in text_string_to_metric_families(text)}


def sample_value(families: dict, family: str, sample: str, **labels) -> float:
    for s in families[family].samples:
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    raise KeyError((family, sample, labels))


# --- generate -------------------------------------------------------------------------------------
def test_generate_png_and_json_equal_the_pipeline(pipe, artifact):
    expected = direct(pipe, PROMPTS[0], seed=3)
    with running_server(pipe, artifact) as base:
        r = httpx.post(f"{base}/v1/generate", json={"prompt": PROMPTS[0], "seed": 3, "steps": STEPS},
                       headers={"Accept": "image/png"}, timeout=60)
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        assert r.headers["x-seed"] == "3" and set(json.loads(r.headers["x-timings"])) >= {"unet", "vae_decoder"}
        np.testing.assert_array_equal(png_array(r.content), expected)

        r = httpx.post(f"{base}/v1/generate?format=json", json={"prompt": PROMPTS[0], "seed": 3, "steps": STEPS},
                       timeout=60)
        body = r.json()
        assert r.status_code == 200 and body["seed"] == 3 and body["steps"] == STEPS and body["batch_size"] == 1
        np.testing.assert_array_equal(png_array(base64.b64decode(body["images"][0])), expected)

        # no seed: a random one, returned, that reproduces the image
        r = httpx.post(f"{base}/v1/generate", json={"prompt": PROMPTS[1], "steps": STEPS}, timeout=60)
        seed = r.json()["seed"]
        assert isinstance(seed, int)
        np.testing.assert_array_equal(png_array(base64.b64decode(r.json()["images"][0])),
                                      direct(pipe, PROMPTS[1], seed=seed))


def test_concurrent_requests_share_batches_and_match_one_by_one(pipe, artifact):
    seeds = [11, 12, 13, 14]
    solo = [direct(pipe, p, s) for p, s in zip(PROMPTS, seeds)]
    stochastic = direct(pipe, PROMPTS[0], seed=5, eta=0.5)
    with running_server(pipe, artifact, max_wait_ms=1500) as base:
        def call(body: dict) -> httpx.Response:
            return httpx.post(f"{base}/v1/generate?format=png", json=body, timeout=60)

        bodies = [{"prompt": p, "seed": s, "steps": STEPS} for p, s in zip(PROMPTS, seeds)]
        bodies.append({"prompt": PROMPTS[0], "seed": 5, "steps": STEPS, "eta": 0.5})
        with cf.ThreadPoolExecutor(len(bodies)) as pool:
            responses = list(pool.map(call, bodies))
        assert [r.status_code for r in responses] == [200] * len(bodies)
        sizes = [int(r.headers["x-batch-size"]) for r in responses]
        assert max(sizes[:4]) > 1, sizes  # deterministic requests shared U-Net calls
        assert sizes[4] == 1  # eta > 0 runs alone ...
        np.testing.assert_array_equal(png_array(responses[4].content), stochastic)  # ... exactly as a direct call
        for r, expected in zip(responses[:4], solo):
            assert psnr(png_array(r.content), expected) >= 40.0
        families = metric_families(base)
        batches = sample_value(families, "ldm_serve_batch_size", "ldm_serve_batch_size_count")
        single = sample_value(families, "ldm_serve_batch_size", "ldm_serve_batch_size_bucket", le="1.0")
        assert batches - single >= 1  # the metrics show a batch of more than one image
        assert sample_value(families, "ldm_serve_images", "ldm_serve_images_total") == 5


def test_schedulers_batch_only_with_their_own_kind(pipe, artifact):
    """dpm++2m requests share a call with each other and match their direct calls; euler-a (which
    draws noise every step) runs alone and equals its direct call exactly."""
    seeds = [21, 22, 23]
    solo = [direct(pipe, p, s, scheduler="dpm++2m", steps=8) for p, s in zip(PROMPTS, seeds)]
    ancestral = direct(pipe, PROMPTS[0], seed=7, scheduler="euler-a", steps=8)
    with running_server(pipe, artifact, max_wait_ms=1500) as base:
        bodies = [{"prompt": p, "seed": s, "steps": 8, "scheduler": "dpm++2m"} for p, s in zip(PROMPTS, seeds)]
        bodies.append({"prompt": PROMPTS[0], "seed": 7, "steps": 8, "scheduler": "euler-a"})
        with cf.ThreadPoolExecutor(len(bodies)) as pool:
            responses = list(pool.map(lambda b: httpx.post(f"{base}/v1/generate?format=png", json=b, timeout=60),
                                      bodies))
        assert [r.status_code for r in responses] == [200] * len(bodies)
        sizes = [int(r.headers["x-batch-size"]) for r in responses]
        assert max(sizes[:3]) > 1 and sizes[3] == 1, sizes
        np.testing.assert_array_equal(png_array(responses[3].content), ancestral)
        for r, expected in zip(responses[:3], solo):
            assert psnr(png_array(r.content), expected) >= 40.0


def test_bad_requests_get_422_with_one_line(pipe, artifact):
    with running_server(pipe, artifact) as base:
        def post(body: object) -> httpx.Response:
            return httpx.post(f"{base}/v1/generate", json=body, timeout=30)

        with pytest.raises(LdmDeployError) as e:
            pipe.check_call("x", height=100)
        cases = {
            json.dumps({"prompt": "x", "height": 100}): str(e.value),  # the library's own message
            json.dumps({"prompt": "x", "steps": 0}): "num_inference_steps must be an integer in [1, 1000], got 0",
            json.dumps({"prompt": "x", "num_images": 5}): "5 images per call exceed the artifact's max batch 4",
            json.dumps({"prompt": "x", "steps": "many"}): "steps: Input should be a valid integer",
            json.dumps({"prompt": "x", "colour": "red"}): "colour: Extra inputs are not permitted",
            json.dumps({"steps": 3}): "prompt: Field required",
            json.dumps({"prompt": "x", "scheduler": "plms"}): "unknown scheduler 'plms'",
            json.dumps({"prompt": "x", "cache_interval": 3}): "cache_interval > 1 needs an artifact with the DeepCache",
        }
        for body, message in cases.items():
            r = httpx.post(f"{base}/v1/generate", content=body, headers={"content-type": "application/json"},
                           timeout=30)
            assert r.status_code == 422, body
            error = r.json()["error"]
            assert "\n" not in error and error.startswith(message), (body, error)
        r = httpx.post(f"{base}/v1/generate?format=gif", json={"prompt": "x"}, timeout=30)
        assert r.status_code == 422 and "format must be" in r.json()["error"]
        assert sample_value(metric_families(base), "ldm_serve_requests", "ldm_serve_requests_total", status="422") == 9


def test_queue_bound_gives_429_and_the_server_still_serves(pipe, artifact):
    with running_server(pipe, artifact, max_batch=1, max_wait_ms=0, queue=2) as base:
        def call(i: int) -> httpx.Response:
            return httpx.post(f"{base}/v1/generate", json={"prompt": PROMPTS[i % 4], "seed": i, "steps": 60},
                              timeout=120)

        with cf.ThreadPoolExecutor(12) as pool:
            codes = [r.status_code for r in pool.map(call, range(12))]
        assert set(codes) == {200, 429}, codes  # never a 500
        assert codes.count(200) >= 3  # one running + the two queue slots at least
        r = httpx.post(f"{base}/v1/generate", json={"prompt": PROMPTS[0], "seed": 3, "steps": STEPS},
                       headers={"Accept": "image/png"}, timeout=60)
        assert r.status_code == 200
        np.testing.assert_array_equal(png_array(r.content), direct(pipe, PROMPTS[0], seed=3))
        families = metric_families(base)
        assert sample_value(families, "ldm_serve_requests", "ldm_serve_requests_total", status="429") == codes.count(429)


def test_429_carries_retry_after(pipe, artifact):
    with running_server(pipe, artifact, max_batch=1, max_wait_ms=0, queue=1) as base:
        with cf.ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(httpx.post, f"{base}/v1/generate",
                                   json={"prompt": "x", "seed": i, "steps": 80}, timeout=120) for i in range(4)]
            rejected = [f.result() for f in futures if f.result().status_code == 429]
        assert rejected and all(int(r.headers["retry-after"]) >= 1 for r in rejected)
        assert "queue is full" in rejected[0].json()["error"]


def test_a_client_that_leaves_frees_its_queue_slot(pipe, artifact):
    with running_server(pipe, artifact, max_batch=1, max_wait_ms=0, queue=1) as base:
        with cf.ThreadPoolExecutor(1) as pool:
            long = pool.submit(httpx.post, f"{base}/v1/generate", json={"prompt": "x", "seed": 0, "steps": 600},
                               timeout=120)
            time.sleep(0.5)  # the long request is running: the queue is empty, one slot
            with pytest.raises(httpx.ReadTimeout):  # this one waits in the slot, then its client gives up
                httpx.post(f"{base}/v1/generate", json={"prompt": "y", "seed": 1, "steps": STEPS}, timeout=1.0)
            deadline = time.monotonic() + 10
            while httpx.get(f"{base}/health").json()["queue_depth"] != 0:
                assert time.monotonic() < deadline, "the abandoned request kept its slot"
                time.sleep(0.05)
            assert not long.done()  # the slot was freed while the long request still ran
            r = httpx.post(f"{base}/v1/generate", json={"prompt": "z", "seed": 2, "steps": STEPS}, timeout=120)
            assert r.status_code == 200
            assert long.result().status_code == 200
        assert sample_value(metric_families(base), "ldm_serve_images", "ldm_serve_images_total") == 2


def test_health_and_metrics(pipe, artifact):
    from prometheus_client.parser import text_string_to_metric_families

    with running_server(pipe, artifact, queue=7) as base:
        health = httpx.get(f"{base}/health").json()
        assert health == {"status": "ok", "artifact": str(artifact), "max_batch": 4, "queue_depth": 0,
                          "queue_size": 7}
        httpx.post(f"{base}/v1/generate", json={"prompt": "x", "steps": 2}, timeout=30).raise_for_status()
        r = httpx.get(f"{base}/metrics")
        assert r.headers["content-type"].startswith("text/plain")
        families = {f.name: f for f in text_string_to_metric_families(r.text)}
        assert {"ldm_serve_requests", "ldm_serve_request_latency_seconds", "ldm_serve_batch_size",
                "ldm_serve_queue_depth", "ldm_serve_batch_seconds"} <= set(families)
        assert sample_value(families, "ldm_serve_requests", "ldm_serve_requests_total", status="200") == 1
        assert sample_value(families, "ldm_serve_request_latency_seconds",
                            "ldm_serve_request_latency_seconds_count") == 1
        assert sample_value(families, "ldm_serve_queue_depth", "ldm_serve_queue_depth") == 0


def test_draining_server_answers_503(pipe, artifact):
    with running_server(pipe, artifact) as base:
        assert httpx.get(f"{base}/health").status_code == 200
        running_server.app.state.batcher.stop_accepting()  # what SIGTERM does first  # type: ignore[attr-defined]
        r = httpx.post(f"{base}/v1/generate", json={"prompt": "x", "steps": 2}, timeout=30)
        assert r.status_code == 503 and r.json() == {"error": "the server is shutting down"}
        assert httpx.get(f"{base}/health").json()["status"] == "draining"


# --- the process: CLI and SIGTERM -----------------------------------------------------------------
def serve_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "ldm_deploy.serve.cli", *args]


def test_cli_errors_are_one_line():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for args, message in ((["/nonexistent/artifact"], "artifact directory /nonexistent/artifact does not exist"),
                          (["/tmp", "--port", "70000"], "--port must be an integer in [1, 65535], got 70000"),
                          (["/tmp", "--port", "http"], "--port must be an integer in [1, 65535], got 'http'"),
                          (["/tmp", "--queue", "0"], "--queue must be >= 1, got 0")):
        p = subprocess.run(serve_cmd(*args), capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)
        assert p.returncode == 1 and p.stderr == f"ldm-serve: error: {message}\n", (args, p.stderr)
    p = subprocess.run(serve_cmd("--help"), capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)
    assert p.returncode == 0 and "/v1/generate" in p.stdout and "--max-wait-ms" in p.stdout


def test_sigterm_finishes_in_flight_requests_and_exits_0(artifact):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(serve_cmd(str(artifact), "--port", str(port), "--threads", "1", "--max-batch", "1",
                                      "--no-verify", "--log-level", "warning"),
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.communicate()
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{base}/health").status_code == 200:
                    break
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.1)
        with cf.ThreadPoolExecutor(3) as pool:
            inflight = [pool.submit(httpx.post, f"{base}/v1/generate", json={"prompt": "x", "seed": i, "steps": 150},
                                    timeout=120) for i in range(3)]
            while metric_families(base)["ldm_serve_queue_depth"].samples[0].value < 2:  # one runs, two wait
                time.sleep(0.02)
            proc.send_signal(signal.SIGTERM)
            codes = [f.result().status_code for f in inflight]
        assert codes == [200, 200, 200]  # the running one and the queued ones
        assert proc.wait(60) == 0
        with pytest.raises(httpx.TransportError):  # it no longer listens
            httpx.post(f"{base}/v1/generate", json={"prompt": "x"}, timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --- the page -------------------------------------------------------------------------------------
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium; .ci/run does)")
def test_web_page_shows_an_image_in_headless_chromium(pipe, artifact, tmp_path):
    with running_server(pipe, artifact) as base:
        url = f"{base}/?prompt={PROMPTS[2].replace(' ', '%20')}&seed=7&steps={STEPS}"
        p = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                            f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=30000",
                            "--dump-dom", url], capture_output=True, text=True, timeout=90)
        assert p.returncode == 0, p.stderr[-2000:]
        match = re.search(r'id="result"[^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"', p.stdout) or \
            re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"[^>]*id="result"', p.stdout)
        assert match, p.stdout[-2000:]
        assert "seed 7" in p.stdout
        np.testing.assert_array_equal(png_array(base64.b64decode(match.group(1))), direct(pipe, PROMPTS[2], seed=7))


# --- Ray Serve ------------------------------------------------------------------------------------
def test_ray_serve_two_replicas_serve_the_same_images(pipe, artifact):
    ray = pytest.importorskip("ray", reason="Ray Serve needs the ray extra (pip install 'ldm-deploy[ray]')")
    serve = pytest.importorskip("ray.serve", reason="Ray Serve needs ray[serve] (pip install 'ldm-deploy[ray]')")
    from ldm_deploy.serve.ray_app import deployment

    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(deployment(ServeConfig(artifact=artifact, threads=1, max_wait_ms=200), replicas=2),
                  name="ldm-serve", route_prefix="/")
        status = serve.status().applications["ldm-serve"].deployments["ldm-serve"]
        assert status.replica_states.get("RUNNING") == 2, status
        base = f"http://127.0.0.1:{port}"
        with cf.ThreadPoolExecutor(4) as pool:
            responses = list(pool.map(
                lambda i: httpx.post(f"{base}/v1/generate?format=png",
                                     json={"prompt": PROMPTS[i], "seed": 20 + i, "steps": STEPS}, timeout=60),
                range(4)))
        for i, r in enumerate(responses):
            assert r.status_code == 200, r.text
            assert psnr(png_array(r.content), direct(pipe, PROMPTS[i], seed=20 + i)) >= 40.0
        assert httpx.get(f"{base}/health").json()["status"] == "ok"
        assert httpx.post(f"{base}/v1/generate", json={"prompt": "x", "height": 100}, timeout=30).status_code == 422
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()


def test_a_deterministic_request_waits_for_company_and_a_stochastic_one_does_not(pipe):
    """The oldest deterministic job waits up to max_wait for compatible ones (a regression once made
    every job ready at once); a stochastic one never waits."""
    import asyncio

    from ldm_deploy.serve.batcher import Job, MicroBatcher

    async def check() -> None:
        batcher = MicroBatcher(pipe, max_batch=4, max_wait_s=60.0, queue_size=8)
        batcher._queue.append(Job("x", None, 4, 5.0, 64, 64, 0))
        assert not batcher._ready()
        batcher._queue.clear()
        batcher._queue.append(Job("x", None, 4, 5.0, 64, 64, 0, eta=0.5))
        assert batcher._ready()

    asyncio.run(check())
