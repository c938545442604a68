"""The micro-batcher: concurrent requests with the same settings share one pipeline call.

Requests wait in a bounded FIFO. The batcher takes the oldest request and, for at most
``max_wait_s`` after it arrived, gathers the queued requests that are compatible with it (same
size, steps, guidance, scheduler and cache interval, deterministic sampling) up to ``max_batch`` images, then
runs them as one
:class:`~ldm_deploy.runtime.Pipeline` call in a worker thread. Each request's initial latents are
drawn from its own seed exactly as a single-prompt call draws them, so a batched image equals the
image that request gets alone (up to the last bits of ORT's batched kernels). Stochastic requests
(``eta > 0``, the euler-a scheduler) consume random numbers during sampling and therefore always run
alone.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..runtime.pipeline import Pipeline


class QueueFull(Exception):
    """The queue is at its bound: the caller should answer 429."""


class Draining(Exception):
    """The server is shutting down and takes no new work: the caller should answer 503."""


@dataclass
class Job:
    """One request: already checked, with its size and seed resolved."""

    prompt: str
    negative_prompt: str | None
    steps: int
    guidance_scale: float
    height: int
    width: int
    seed: int
    eta: float = 0.0
    num_images: int = 1
    scheduler: str = "ddim"
    cache_interval: int = 1
    stochastic: bool = False  # draws random numbers while sampling (Pipeline.check_call tells)
    windows: int = 1  # 77-token text windows (long prompts): only jobs with as many share a call
    enqueued: float = field(default_factory=time.monotonic)
    future: "asyncio.Future[JobResult] | None" = None
    key: tuple = ()

    def __post_init__(self) -> None:
        # the pipeline takes one size / steps / guidance / sampler per call; stochastic jobs never share
        self.key = (self.height, self.width, self.steps, float(self.guidance_scale), self.scheduler,
                    self.cache_interval, self.windows,
                    f"stochastic-{next(_unique)}" if self.stochastic or self.eta > 0 else "")


_unique = itertools.count()


@dataclass
class JobResult:
    """A job's images (PIL) and how its (possibly shared) call went."""

    images: list[Any]
    steps: int
    batch_size: int
    timings: dict[str, float]


def text_windows(pipe: Pipeline, prompt: str, negative_prompt: str | None) -> int:
    """The 77-token windows a call encodes this prompt in (1 unless the pipeline runs long prompts):
    a batch encodes every prompt in as many windows as its longest, so only jobs with the same
    count share a call and each image stays the one its request gets alone."""
    if not pipe.long_prompts:
        return 1
    return min(pipe.max_chunks, pipe.tokenizer.chunks_needed([prompt, negative_prompt or ""]))


def initial_latents(pipe: Pipeline, job: Job) -> np.ndarray:
    """The noise a single-prompt call with ``job.seed`` starts from (see ``Pipeline.prepare_latents``)."""
    shape = (job.num_images, pipe.latent_channels, job.height // pipe.vae_scale, job.width // pipe.vae_scale)
    return np.random.default_rng(job.seed).standard_normal(shape).astype(np.float32)


def run_batch(pipe: Pipeline, jobs: list[Job]) -> list[JobResult]:
    """One pipeline call for ``jobs`` (all with the same key), split back into per-job results."""
    first = jobs[0]
    sampling = dict(num_inference_steps=first.steps, guidance_scale=first.guidance_scale, height=first.height,
                    width=first.width, scheduler=first.scheduler, cache_interval=first.cache_interval)
    if first.stochastic or first.eta > 0:  # alone, exactly as a direct call: the sampler draws from the seed
        assert len(jobs) == 1
        out = pipe(first.prompt, negative_prompt=first.negative_prompt, num_images_per_prompt=first.num_images,
                   seed=first.seed, eta=first.eta, **sampling)
        return [JobResult(list(out.images), out.steps, first.num_images, dict(out.timings))]
    prompts = [j.prompt for j in jobs for _ in range(j.num_images)]
    negatives = [j.negative_prompt or "" for j in jobs for _ in range(j.num_images)]
    latents = np.concatenate([initial_latents(pipe, j) for j in jobs])
    out = pipe(prompts, negative_prompt=negatives, latents=latents, **sampling)
    results, start = [], 0
    for j in jobs:
        results.append(JobResult(list(out.images[start:start + j.num_images]), out.steps, len(prompts),
                                 dict(out.timings)))
        start += j.num_images
    return results


class MicroBatcher:
    """Bounded queue + one batching loop on the running event loop; pipeline calls run in a thread.

    ``on_batch(images, seconds)`` is called after every pipeline call (metrics)."""

    def __init__(self, pipe: Pipeline, max_batch: int, max_wait_s: float, queue_size: int,
                 on_batch: Callable[[int, float], None] | None = None):
        self.pipe = pipe
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.queue_size = queue_size
        self.on_batch = on_batch or (lambda n, s: None)
        self._queue: deque[Job] = deque()
        self._wakeup = asyncio.Event()
        self._accepting = True
        self._closing = False
        self._task: asyncio.Task | None = None
        self.running = 0  # jobs in the pipeline call now
        self.last_batch_s = 0.0

    # --- the caller's side ----------------------------------------------------------------------
    @property
    def depth(self) -> int:
        """Requests waiting (not yet in a pipeline call)."""
        return len(self._queue)

    @property
    def accepting(self) -> bool:
        return self._accepting

    def submit(self, job: Job) -> "asyncio.Future[JobResult]":
        """Queue ``job``; its future resolves to a :class:`JobResult`. Cancelling the future before
        its batch starts removes the job from the queue (a client that went away)."""
        if not self._accepting:
            raise Draining()
        if len(self._queue) >= self.queue_size:
            raise QueueFull()
        if job.num_images > self.max_batch:
            raise ValueError(f"{job.num_images} images exceed the batcher's max batch {self.max_batch}")
        job.future = asyncio.get_running_loop().create_future()
        job.future.add_done_callback(lambda f, j=job: self._forget(j) if f.cancelled() else None)
        self._queue.append(job)
        self._wakeup.set()
        return job.future

    def retry_after_s(self) -> int:
        """A guess for Retry-After: the time to work off the queue at the last batch's pace."""
        batches = -(-max(1, len(self._queue)) // self.max_batch)
        return max(1, int(np.ceil(batches * self.last_batch_s)))

    def _forget(self, job: Job) -> None:
        try:
            self._queue.remove(job)
        except ValueError:
            pass  # already taken into a batch

    # --- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="ldm-serve-batcher")

    def stop_accepting(self) -> None:
        """New submissions raise :class:`Draining`; queued and running work goes on."""
        self._accepting = False

    async def drain(self) -> None:
        """Stop accepting, finish every queued and running job, then end the loop."""
        self._accepting = False
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task

    # --- the loop -------------------------------------------------------------------------------
    def _take(self) -> list[Job]:
        """The oldest job and the compatible queued jobs after it, up to ``max_batch`` images."""
        first = self._queue[0]
        batch, images = [], 0
        for job in list(self._queue):
            if job.key == first.key and images + job.num_images <= self.max_batch:
                batch.append(job)
                images += job.num_images
        for job in batch:
            self._queue.remove(job)
        return batch

    def _ready(self) -> bool:
        """The oldest job's batch is full (or cannot grow), its wait is over, or we are closing."""
        first = self._queue[0]
        if self._closing or first.key[-1] != "":  # stochastic jobs never get company: no wait
            return True
        images = sum(j.num_images for j in self._queue if j.key == first.key)
        return images >= self.max_batch or time.monotonic() >= first.enqueued + self.max_wait_s

    async def _loop(self) -> None:
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if not self._ready():
                self._wakeup.clear()
                timeout = self._queue[0].enqueued + self.max_wait_s - time.monotonic()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), max(0.0, timeout))
                except asyncio.TimeoutError:
                    pass
                continue
            batch = self._take()
            await self._run(batch)

    async def _run(self, batch: list[Job]) -> None:
        self.running = sum(j.num_images for j in batch)
        t0 = time.perf_counter()
        try:
            results = await asyncio.to_thread(run_batch, self.pipe, batch)
        except Exception as e:  # noqa: BLE001 - every waiting request gets the error
            for job in batch:
                if job.future is not None and not job.future.done():
                    job.future.set_exception(e)
            return
        finally:
            self.running = 0
        seconds = time.perf_counter() - t0
        self.last_batch_s = seconds
        self.on_batch(sum(j.num_images for j in batch), seconds)
        now = time.monotonic()
        for job, result in zip(batch, results):
            if job.future is not None and not job.future.done():
                result.timings["queue_wait"] = max(0.0, now - job.enqueued - seconds)
                job.future.set_result(result)
