"""Prometheus metrics of one server (its own registry, so several apps can live in one process)."""

from __future__ import annotations

from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    """Request counts by status, request latency, batch sizes and durations, queue depth."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("ldm_serve_requests", "POST /v1/generate requests by HTTP status",
                                ["status"], registry=r)
        self.latency = Histogram("ldm_serve_request_latency_seconds",
                                 "time from receiving a generate request to its answer (status 200)",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("ldm_serve_batch_size", "images per pipeline call",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.batch_seconds = Histogram("ldm_serve_batch_seconds", "seconds per pipeline call",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.images = Counter("ldm_serve_images", "images generated", registry=r)
        #: set by the app once its batcher exists
        self.queue_depth: Callable[[], float] = lambda: 0
        self.running: Callable[[], float] = lambda: 0
        Gauge("ldm_serve_queue_depth", "requests waiting for a batch",
              registry=r).set_function(lambda: self.queue_depth())
        Gauge("ldm_serve_running_images", "images in the pipeline call now",
              registry=r).set_function(lambda: self.running())

    def on_batch(self, images: int, seconds: float) -> None:
        self.batch_size.observe(images)
        self.batch_seconds.observe(seconds)
        self.images.inc(images)

    def render(self) -> bytes:
        return generate_latest(self.registry)
