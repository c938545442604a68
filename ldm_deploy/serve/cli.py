"""``ldm-serve``: an artifact behind an HTTP API (uvicorn), or on Ray Serve with ``--ray``."""

from __future__ import annotations

import argparse
import signal
import socket
from pathlib import Path
from typing import Any, NoReturn

from ..errors import LdmDeployError, cli_entry
from ..runtime.backends import BACKENDS
from .config import ServeConfig


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one ``ldm-serve: error: ...`` line, exit 1 (via cli_entry)."""

    def error(self, message: str) -> NoReturn:
        raise LdmDeployError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="ldm-serve",
        description="Serve an ldm-deploy artifact over HTTP: POST /v1/generate (PNG or base64 JSON), GET /health, "
        "GET /metrics (Prometheus), a test page at /. Concurrent requests with the same size, steps and "
        "guidance share U-Net calls (micro-batching); SIGTERM finishes in-flight requests and exits 0.",
        epilog="example: ldm-serve tiny-onnx/ --port 8000 --max-wait-ms 20 && "
        "curl -s localhost:8000/v1/generate -H 'Accept: image/png' -d '{\"prompt\": \"a red circle\", \"seed\": 0}' > out.png",
    )
    p.add_argument("artifact", type=Path, help="artifact directory written by ldm-export / ldm-quantize")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", default="8000", help="TCP port, 1-65535 (default 8000)")
    p.add_argument("--max-batch", type=int, default=None,
                   help="images per pipeline call (default: the artifact's max batch; 1 disables batching)")
    p.add_argument("--max-wait-ms", type=float, default=20.0,
                   help="how long a request waits for others to share its batch (default 20)")
    p.add_argument("--queue", type=int, default=64, help="requests that may wait; beyond, 429 (default 64)")
    p.add_argument("--backend", default="ort-cpu", choices=list(BACKENDS), metavar="NAME",
                   help="where the graphs run: " + ", ".join(BACKENDS) + " (default ort-cpu)")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (default: all cores)")
    p.add_argument("--drain-timeout", type=float, default=60.0,
                   help="on SIGTERM, seconds to wait for in-flight requests (default 60)")
    p.add_argument("--long-prompts", action="store_true",
                   help="encode prompts over 77 tokens in 77-token windows (artifacts exported with --long-prompts)")
    p.add_argument("--no-verify", action="store_true", help="skip checking file hashes against the manifest")
    p.add_argument("--ray", action="store_true", help="run as a Ray Serve deployment (needs the ray extra)")
    p.add_argument("--replicas", type=int, default=1, help="Ray Serve replicas, each with its own pipeline (default 1)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn log level (default info)")
    return p


def parse_port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise LdmDeployError(f"--port must be an integer in [1, 65535], got {text!r}") from None
    if not 1 <= port <= 65535:
        raise LdmDeployError(f"--port must be an integer in [1, 65535], got {port}")
    return port


def listen(host: str, port: int) -> socket.socket:
    """A bound, listening socket (so a taken port is one clear line, not a uvicorn log)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise LdmDeployError(f"cannot resolve --host {host!r}: {e.strerror}") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise LdmDeployError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve_uvicorn(app: Any, sock: socket.socket, drain_timeout: float, log_level: str) -> None:
    """Run ``app`` with uvicorn on ``sock``. SIGTERM/SIGINT: the batcher stops accepting (new
    requests get 503), uvicorn stops listening and waits for in-flight requests, then the app's
    shutdown drains the batcher; the process then exits 0 (uvicorn would re-raise SIGTERM)."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            batcher = getattr(app.state, "batcher", None)
            if batcher is not None:
                batcher.stop_accepting()
            super().handle_exit(sig, frame)
            if sig == signal.SIGTERM:  # drained on request: exit 0, not death by the re-raised signal
                self._captured_signals = [s for s in self._captured_signals if s != signal.SIGTERM]

    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=drain_timeout,
                            access_log=log_level == "debug")
    Server(config).run(sockets=[sock])


@cli_entry("ldm-serve")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    port = parse_port(args.port)
    config = ServeConfig(artifact=args.artifact.resolve(), max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                         queue=args.queue, backend=args.backend, threads=args.threads, verify=not args.no_verify)
    config.check()
    if args.replicas < 1:
        raise LdmDeployError(f"--replicas must be >= 1, got {args.replicas}")
    if args.ray:
        from .app import load_pipeline, max_batch_of
        from .ray_app import run_ray

        max_batch_of(config, load_pipeline(config))  # fail here, in one line, not in every replica
        return run_ray(config, args.host, port, args.replicas)
    if args.replicas != 1:
        raise LdmDeployError("--replicas needs --ray")
    from .app import create_app, load_pipeline, max_batch_of

    pipe = load_pipeline(config)
    max_batch_of(config, pipe)
    sock = listen(args.host, port)
    print(f"ldm-serve: {config.artifact} on http://{args.host}:{port} (max batch {max_batch_of(config, pipe)}, "
          f"max wait {config.max_wait_ms:g} ms, queue {config.queue})", flush=True)
    serve_uvicorn(create_app(config, pipe), sock, args.drain_timeout, args.log_level)
    return 0


if __name__ == "__main__":
    main()
