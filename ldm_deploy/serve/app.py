"""The HTTP routes: ``POST /v1/generate``, ``POST /sdapi/v1/txt2img`` (AUTOMATIC1111's API, see
:mod:`.a1111`), ``GET /health``, ``GET /metrics`` and the page at ``/``."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import secrets
import time
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response

from ..errors import LdmDeployError, first_line, one_line
from ..runtime.pipeline import Pipeline
from . import a1111
from .batcher import Draining, Job, JobResult, MicroBatcher, QueueFull, text_windows
from .config import ServeConfig
from .metrics import Metrics
from .schema import GenerateRequest, GenerateResponse, validation_message


def load_pipeline(config: ServeConfig) -> Pipeline:
    """The text-to-image pipeline of ``config.artifact`` (no VAE encoder: no img2img here)."""
    return Pipeline.load(config.artifact, backend=config.backend, threads=config.threads, verify=config.verify,
                         components=("text_encoder", "unet", "unet_shallow", "vae_decoder"),
                         long_prompts=config.long_prompts)


def max_batch_of(config: ServeConfig, pipe: Pipeline) -> int:
    """``--max-batch`` checked against the artifact's batch range (default: its maximum)."""
    top = pipe.ranges.batch[2]
    if config.max_batch is None:
        return top
    if config.max_batch > top:
        raise LdmDeployError(f"--max-batch {config.max_batch} exceeds the artifact's max batch {top}")
    return config.max_batch


def create_app(config: ServeConfig, pipeline: Pipeline | None = None) -> FastAPI:
    """The ASGI app. ``pipeline``: an already loaded one (the CLI loads it first to fail early);
    otherwise it is loaded at startup (a Ray Serve replica). The batcher lives from startup to
    shutdown; shutdown drains it (every queued request is answered)."""
    config.check()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pipe = pipeline if pipeline is not None else await asyncio.to_thread(load_pipeline, config)
        batcher = MicroBatcher(pipe, max_batch_of(config, pipe), config.max_wait_ms / 1000.0, config.queue,
                               on_batch=metrics.on_batch)
        metrics.queue_depth = lambda: batcher.depth
        metrics.running = lambda: batcher.running
        app.state.pipe, app.state.batcher = pipe, batcher
        batcher.start()
        try:
            yield
        finally:
            await batcher.drain()

    app = FastAPI(title="ldm-serve", description="Stable Diffusion-class text-to-image on the ldm-deploy runtime",
                  lifespan=lifespan)
    app.state.metrics = metrics

    def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
        metrics.requests.labels(status=str(status)).inc()
        return JSONResponse({"error": one_line(message)}, status_code=status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error(422, validation_message(list(exc.errors())))

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(resources.files(__package__).joinpath("static/index.html").read_text(encoding="utf-8"))

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        batcher: MicroBatcher = request.app.state.batcher
        body = {"status": "ok" if batcher.accepting else "draining", "artifact": str(config.artifact),
                "max_batch": batcher.max_batch, "queue_depth": batcher.depth, "queue_size": batcher.queue_size}
        return JSONResponse(body, status_code=200 if batcher.accepting else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.post("/v1/generate", response_model=GenerateResponse,
              responses={200: {"content": {"image/png": {}}}, 422: {}, 429: {}, 503: {}})
    async def generate(body: GenerateRequest, request: Request, format: str | None = None) -> Response:
        """Text to image. PNG with ``Accept: image/png`` or ``?format=png`` (seed, batch size and
        timings in ``X-Seed``, ``X-Batch-Size``, ``X-Timings``), else JSON with base64 PNGs."""
        t0 = time.perf_counter()
        pipe: Pipeline = request.app.state.pipe
        batcher: MicroBatcher = request.app.state.batcher
        png = format == "png" or (format is None and "image/png" in request.headers.get("accept", ""))
        if format not in (None, "png", "json"):
            return error(422, f"format must be 'png' or 'json', got {format!r}")
        if png and body.num_images != 1:
            return error(422, "a PNG answer holds one image: ask for format=json or num_images=1")
        seed = body.seed if body.seed is not None else secrets.randbits(32)
        try:
            height, width, stochastic = pipe.check_call(
                body.prompt, body.negative_prompt, body.steps, body.guidance_scale, body.height, body.width,
                body.num_images, seed, body.eta, body.scheduler, body.cache_interval)
            if body.num_images > batcher.max_batch:
                raise LdmDeployError(f"num_images {body.num_images} exceeds this server's max batch "
                                     f"{batcher.max_batch}")
        except LdmDeployError as e:
            return error(422, str(e))
        job = Job(body.prompt, body.negative_prompt, body.steps, body.guidance_scale, height, width, seed,
                  body.eta, body.num_images, body.scheduler, body.cache_interval, stochastic,
                  windows=text_windows(pipe, body.prompt, body.negative_prompt))
        try:
            future = batcher.submit(job)
        except QueueFull:
            return error(429, f"the queue is full ({batcher.queue_size} requests waiting); retry later",
                         headers={"Retry-After": str(batcher.retry_after_s())})
        except Draining:
            return error(503, "the server is shutting down", headers={"Connection": "close"})
        try:
            result = await _until_done_or_gone(future, request)
        except Exception as e:  # noqa: BLE001 - the batch failed (the arguments were checked): a server error
            return error(500, f"generation failed: {first_line(e)}")
        if result is None:  # the client went away; nobody reads this
            metrics.requests.labels(status="499").inc()
            return Response(status_code=499)
        metrics.requests.labels(status="200").inc()
        metrics.latency.observe(time.perf_counter() - t0)
        return _answer(result, seed, png)

    @app.post("/sdapi/v1/txt2img", responses={422: {}, 429: {}, 503: {}})
    async def a1111_txt2img(body: a1111.Txt2ImgRequest, request: Request) -> Response:
        """AUTOMATIC1111's txt2img API on the same batcher: ``{images, parameters, info}``."""
        t0 = time.perf_counter()
        batcher: MicroBatcher = request.app.state.batcher
        try:
            plan = a1111.plan(body, request.app.state.pipe, secrets.randbits(32))
        except LdmDeployError as e:
            return error(422, str(e))
        futures: list[asyncio.Future[JobResult]] = []
        try:
            for job in plan.jobs:
                futures.append(batcher.submit(job))
        except (QueueFull, Draining) as e:
            for f in futures:
                f.cancel()
            if isinstance(e, Draining):
                return error(503, "the server is shutting down", headers={"Connection": "close"})
            return error(429, f"the queue is full ({batcher.queue_size} requests waiting); retry later",
                         headers={"Retry-After": str(batcher.retry_after_s())})
        try:
            results = await _all_done_or_gone(futures, request)
        except Exception as e:  # noqa: BLE001 - a batch failed (the arguments were checked): a server error
            return error(500, f"generation failed: {first_line(e)}")
        if results is None:
            metrics.requests.labels(status="499").inc()
            return Response(status_code=499)
        metrics.requests.labels(status="200").inc()
        metrics.latency.observe(time.perf_counter() - t0)
        images = [base64.b64encode(_png(im)).decode("ascii") for r in results for im in r.images]
        return JSONResponse(a1111.response(plan, images, Path(str(config.artifact)).name))

    return app


async def _all_done_or_gone(futures: "list[asyncio.Future[JobResult]]", request: Request) -> list[JobResult] | None:
    """Every job's result, or None if the client disconnected first (the jobs are then cancelled)."""
    gathered = asyncio.gather(*futures)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({gathered, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if gathered.done():
        return gathered.result()
    for f in futures:
        f.cancel()
    gathered.cancel()
    return None


async def _until_done_or_gone(future: "asyncio.Future[JobResult]", request: Request) -> JobResult | None:
    """The job's result, or None if the client disconnected first (the job is then cancelled:
    dropped from the queue if its batch has not started)."""
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({future, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if future.done():
        return future.result()
    future.cancel()
    return None


async def _disconnected(request: Request) -> None:
    """Returns once the client has closed its connection (the body is already read)."""
    while True:
        message = await request.receive()
        if message.get("type") == "http.disconnect":
            return


def _png(image: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _answer(result: JobResult, seed: int, png: bool) -> Response:
    timings = {k: round(v, 6) for k, v in result.timings.items()}
    if png:
        return Response(_png(result.images[0]), media_type="image/png", headers={
            "X-Seed": str(seed), "X-Batch-Size": str(result.batch_size), "X-Steps": str(result.steps),
            "X-Timings": json.dumps(timings, separators=(",", ":"))})
    body = GenerateResponse(images=[base64.b64encode(_png(im)).decode("ascii") for im in result.images],
                            seed=seed, steps=result.steps, batch_size=result.batch_size, timings=timings)
    return JSONResponse(body.model_dump())
