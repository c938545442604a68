"""Load test of ldm-serve on loopback: throughput and latency by concurrency, batching vs none,
memory over many requests, and overload behaviour.

    ldm-export --model tiny -o /tmp/tiny-onnx
    python benchmarks/serve_load.py /tmp/tiny-onnx [-o benchmarks/results/serve_load]

Every phase starts its own ``ldm-serve`` subprocess on a free 127.0.0.1 port and stops it with
SIGTERM; each phase is bounded by a request count and a time limit, so the script always ends.

1. 1, 4, 8, 16 concurrent clients (closed loop, batching on): images/s, p50/p99 latency, failures.
2. 8 clients with ``--max-batch 1`` vs batching: the speed-up of shared U-Net calls.
3. 1000 requests (fewer steps): the server's RSS after a warm-up vs at the end.
4. Overload: 4x ``--queue`` requests in flight at once: 200s and 429s only, no 500, no hang.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a large red circle on a blue background, top left", "a small green square on a white background",
           "a yellow triangle on a black background, center", "a large blue circle on a yellow background"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``ldm-serve`` in a subprocess, up until :meth:`stop` (SIGTERM, waits for exit)."""

    def __init__(self, artifact: Path, *options: str):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen([sys.executable, "-m", "ldm_deploy.serve.cli", str(artifact), "--port",
                                      str(self.port), "--log-level", "warning", *options], env=env, cwd=ROOT)
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ldm-serve exited with {self.proc.returncode}")
            try:
                if httpx.get(f"{self.base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError("ldm-serve did not come up in 120 s")
            time.sleep(0.1)
        self.ps = psutil.Process(self.proc.pid)

    def rss_mib(self) -> float:
        return self.ps.memory_info().rss / 2**20

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return -9


async def closed_loop(base: str, clients: int, requests: int, seconds: float, steps: int,
                      seed0: int = 0, on_done: Any = None) -> dict[str, Any]:
    """``clients`` workers, each sending its next request when the last one is answered, until
    ``requests`` were sent or ``seconds`` passed."""
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    batch_sizes: list[int] = []
    sent = 0
    deadline = time.monotonic() + seconds

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal sent
        while sent < requests and time.monotonic() < deadline:
            i = sent
            sent += 1
            body = {"prompt": PROMPTS[i % len(PROMPTS)], "seed": seed0 + i, "steps": steps}
            t0 = time.perf_counter()
            try:
                r = await client.post(f"{base}/v1/generate?format=png", json=body)
                key = str(r.status_code)
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - t0)
                    batch_sizes.append(int(r.headers["x-batch-size"]))
            except httpx.TimeoutException:
                key = "timeout"
            except httpx.TransportError as e:
                key = type(e).__name__
            statuses[key] = statuses.get(key, 0) + 1
            if on_done is not None:
                on_done(sent)

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(clients)))
    wall = time.perf_counter() - t0
    ok = len(latencies)
    return {
        "clients": clients, "requests": sent, "ok": ok, "failed": sent - ok, "statuses": statuses,
        "seconds": round(wall, 2), "images_per_s": round(ok / wall, 2),
        "p50_s": round(float(np.percentile(latencies, 50)), 3) if latencies else None,
        "p99_s": round(float(np.percentile(latencies, 99)), 3) if latencies else None,
        "mean_batch": round(float(np.mean(batch_sizes)), 2) if batch_sizes else None,
    }


async def burst(base: str, n: int, steps: int) -> dict[str, Any]:
    """``n`` requests in flight at once; every one must end (status or timeout) within the client timeout."""
    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=n + 4)
    statuses: dict[str, int] = {}
    retry_after: list[int] = []
    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        async def one(i: int) -> None:
            try:
                r = await client.post(f"{base}/v1/generate?format=png",
                                      json={"prompt": PROMPTS[i % 4], "seed": i, "steps": steps})
                key = str(r.status_code)
                if r.status_code == 429:
                    retry_after.append(int(r.headers["retry-after"]))
            except httpx.TimeoutException:
                key = "timeout"
            except httpx.TransportError as e:
                key = type(e).__name__
            statuses[key] = statuses.get(key, 0) + 1

        await asyncio.gather(*(one(i) for i in range(n)))
        after = await client.post(f"{base}/v1/generate?format=png", json={"prompt": PROMPTS[0], "seed": 0, "steps": steps})
    return {"in_flight": n, "statuses": statuses, "seconds": round(time.perf_counter() - t0, 2),
            "retry_after_s": sorted(set(retry_after)), "served_afterwards": after.status_code}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifact", type=Path, help="an ldm-deploy artifact (ldm-export --model tiny -o /tmp/tiny-onnx)")
    p.add_argument("--steps", type=int, default=25, help="denoising steps per request (default 25)")
    p.add_argument("--requests", type=int, default=64, help="requests per concurrency level (default 64)")
    p.add_argument("--seconds", type=float, default=40, help="time limit per level (default 40)")
    p.add_argument("--soak", type=int, default=1000, help="requests of the memory phase (default 1000)")
    p.add_argument("--soak-steps", type=int, default=5, help="steps per request in the memory phase (default 5)")
    p.add_argument("--queue", type=int, default=8, help="--queue of the overload phase (default 8)")
    p.add_argument("--max-wait-ms", type=float, default=20)
    p.add_argument("--threads", type=int, default=1,
                   help="the server's ONNX Runtime threads (default 1: on a CPU shared with other processes, "
                   "ORT's spinning thread pool loses far more than a second thread gains)")
    p.add_argument("-o", "--out", type=Path, default=Path("benchmarks/results/serve_load"))
    args = p.parse_args()
    common = ["--no-verify", "--max-wait-ms", str(args.max_wait_ms), "--threads", str(args.threads)]
    results: dict[str, Any] = {
        "artifact": str(args.artifact), "steps": args.steps, "threads": args.threads, "python": platform.python_version(),
        "cpus": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
        "note": "loopback; the load generator runs on the same CPUs as the server, and the machine's 2 cores "
                "are shared with other workers, so absolute numbers are noisy",
    }

    # 1 + 2: concurrency levels with batching; 8 clients without
    server = Server(args.artifact, *common)
    asyncio.run(closed_loop(server.base, 4, 8, 30, args.steps))  # warm-up
    results["levels"] = []
    for clients in (1, 4, 8, 16):
        r = asyncio.run(closed_loop(server.base, clients, args.requests, args.seconds, args.steps, seed0=1000 * clients))
        print(f"batching, {clients:2d} clients: {r}", flush=True)
        results["levels"].append(r)
    results["max_batch"] = httpx.get(f"{server.base}/health").json()["max_batch"]
    results["exit_code_batching"] = server.stop()
    server = Server(args.artifact, *common, "--max-batch", "1")
    asyncio.run(closed_loop(server.base, 2, 4, 30, args.steps))
    unbatched = asyncio.run(closed_loop(server.base, 8, args.requests, args.seconds, args.steps, seed0=8000))
    print(f"max-batch 1, 8 clients: {unbatched}", flush=True)
    results["exit_code_unbatched"] = server.stop()
    batched8 = next(r for r in results["levels"] if r["clients"] == 8)
    results["batching_vs_none_8_clients"] = {
        "max_batch_1": unbatched, "batching": batched8,
        "speedup": round(batched8["images_per_s"] / unbatched["images_per_s"], 2) if unbatched["images_per_s"] else None,
    }

    # 3: memory over many requests
    server = Server(args.artifact, *common)
    marks: dict[str, float] = {}

    def mark(done: int) -> None:
        if done == 100:
            marks["after_100"] = server.rss_mib()

    marks["start"] = server.rss_mib()
    soak = asyncio.run(closed_loop(server.base, 8, args.soak, 600, args.soak_steps, seed0=100_000, on_done=mark))
    marks["end"] = server.rss_mib()
    growth = (marks["end"] - marks["after_100"]) / marks["after_100"] if "after_100" in marks else None
    results["memory"] = {"requests": soak["requests"], "ok": soak["ok"], "steps": args.soak_steps,
                         "rss_mib": {k: round(v, 1) for k, v in marks.items()},
                         "growth_after_warmup": round(growth, 4) if growth is not None else None,
                         "statuses": soak["statuses"], "images_per_s": soak["images_per_s"]}
    print(f"memory: {results['memory']}", flush=True)
    results["exit_code_memory"] = server.stop()

    # 4: overload
    server = Server(args.artifact, *common, "--queue", str(args.queue))
    over = asyncio.run(burst(server.base, 4 * args.queue, args.steps))
    over["queue"] = args.queue
    print(f"overload: {over}", flush=True)
    results["overload"] = over
    results["exit_code_overload"] = server.stop()

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(results))
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.md')}")


def markdown(r: dict[str, Any]) -> str:
    lines = [
        "# ldm-serve load test", "",
        f"`python benchmarks/serve_load.py {r['artifact']} --threads {r['threads']}` ({r['steps']} steps, 64x64, artifact max batch "
        f"{r['max_batch']}, server `--threads {r['threads']}`, {r['cpus']} CPUs, Python {r['python']}). "
        f"{r['note'][0].upper() + r['note'][1:]}.", "",
        "## Concurrency (batching on, closed loop)", "",
        "| clients | requests | failed | images/s | p50 s | p99 s | mean batch |", "|---|---|---|---|---|---|---|",
    ]
    for x in r["levels"]:
        lines.append(f"| {x['clients']} | {x['requests']} | {x['failed']} | {x['images_per_s']} | {x['p50_s']} | "
                     f"{x['p99_s']} | {x['mean_batch']} |")
    b = r["batching_vs_none_8_clients"]
    m = r["memory"]
    o = r["overload"]
    lines += [
        "", "## Batching vs none, 8 clients", "",
        "| server | images/s | p50 s | p99 s | failed |", "|---|---|---|---|---|",
        f"| `--max-batch 1` | {b['max_batch_1']['images_per_s']} | {b['max_batch_1']['p50_s']} | "
        f"{b['max_batch_1']['p99_s']} | {b['max_batch_1']['failed']} |",
        f"| batching (max batch {r['max_batch']}) | {b['batching']['images_per_s']} | {b['batching']['p50_s']} | "
        f"{b['batching']['p99_s']} | {b['batching']['failed']} |",
        "", f"Speed-up: **{b['speedup']}x** (goal >= 1.5x).", "",
        "## Memory", "",
        f"{m['requests']} requests ({m['steps']} steps, 8 clients, {m['ok']} answered 200): server RSS "
        f"{m['rss_mib']['start']} MiB at start, {m['rss_mib'].get('after_100')} MiB after 100 requests, "
        f"{m['rss_mib']['end']} MiB at the end: growth after warm-up **{100 * (m['growth_after_warmup'] or 0):.2f}%** "
        "(goal < 5%).", "",
        "## Overload", "",
        f"{o['in_flight']} requests in flight at once against `--queue {o['queue']}`: statuses {o['statuses']} in "
        f"{o['seconds']} s (Retry-After {o['retry_after_s']} s); the next request got {o['served_afterwards']}.", "",
        f"Every server exited {r['exit_code_batching']}/{r['exit_code_unbatched']}/{r['exit_code_memory']}/"
        f"{r['exit_code_overload']} on SIGTERM.", "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
