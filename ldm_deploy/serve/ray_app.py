"""The same app as a Ray Serve deployment: N replicas, each with its own pipeline and micro-batcher.

In code::

    import ray
    from ray import serve
    from ldm_deploy.serve.config import ServeConfig
    from ldm_deploy.serve.ray_app import deployment

    ray.init()
    serve.start(http_options={"host": "127.0.0.1", "port": 8000})
    serve.run(deployment(ServeConfig(artifact="/abs/path/tiny-onnx", threads=1), replicas=2),
              name="ldm-serve", route_prefix="/")

Ray's proxy spreads requests over the replicas; each replica batches what it receives.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

from .config import ServeConfig


def deployment(config: ServeConfig, replicas: int = 1, cpus_per_replica: float = 1.0) -> Any:
    """A bound Ray Serve application (``serve.run`` it) of ``replicas`` copies of the app."""
    from ray import serve

    from .app import create_app

    # enough concurrent requests per replica for the batcher to fill batches and its queue to bound them
    ongoing = config.queue + (config.max_batch or 64)

    @serve.deployment(name="ldm-serve", num_replicas=replicas, max_ongoing_requests=ongoing,
                      ray_actor_options={"num_cpus": cpus_per_replica})
    @serve.ingress()
    class LdmServe:
        def __init__(self, config: ServeConfig) -> None:
            self.config = config

        def __serve_build_asgi_app__(self) -> Any:
            return create_app(self.config)  # loads the pipeline in the app's startup, on the replica

    return LdmServe.bind(config)


def run_ray(config: ServeConfig, host: str, port: int, replicas: int) -> int:
    """``ldm-serve --ray``: start (or join, with ``RAY_ADDRESS``) a Ray cluster, serve until
    SIGTERM/SIGINT, then shut Serve down (replicas finish their in-flight requests)."""
    import ray
    from ray import serve

    stop = threading.Event()
    ray.init(ignore_reinit_error=True, log_to_driver=False)
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(deployment(config, replicas), name="ldm-serve", route_prefix="/")
        for sig in (signal.SIGTERM, signal.SIGINT):  # after ray.init, which installs its own (fatal) handlers
            signal.signal(sig, lambda s, f: stop.set())
        print(f"ldm-serve: {config.artifact} on http://{host}:{port} (Ray Serve, {replicas} replicas)", flush=True)
        stop.wait()
        serve.shutdown()
    finally:
        ray.shutdown()
    return 0
