"""Timing statistics and memory sampling (host RSS with psutil, device memory with NVML)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from typing_extensions import Self


def summarize(samples: list[float]) -> dict[str, Any]:
    """median, p90, min, max and mean of timed samples (seconds), plus the samples."""
    a = np.asarray(samples, dtype=np.float64)
    if a.size == 0:
        return {"n": 0}
    return {"median": float(np.median(a)), "p90": float(np.percentile(a, 90)), "min": float(a.min()),
            "max": float(a.max()), "mean": float(a.mean()), "n": int(a.size), "samples": [float(x) for x in a]}


def timed(fn: Callable[[], Any], sync: Callable[[], None] | None = None) -> float:
    """Seconds one call of ``fn`` takes (``sync`` waits for queued device work before each clock read)."""
    if sync:
        sync()
    t0 = time.perf_counter()
    fn()
    if sync:
        sync()
    return time.perf_counter() - t0


def session_step_times(session: Any, feeds: dict[str, Any], iters: int, warmup: int = 1) -> list[float]:
    """Seconds of ``iters`` calls of an ONNX Runtime ``session`` on ``feeds``, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        session.run(None, feeds)
    return [timed(lambda: session.run(None, feeds)) for _ in range(iters)]


class _Nvml:
    """Device memory of this process (or, where the driver does not report it, used minus baseline)."""

    def __init__(self) -> None:
        self.handle: Any = None
        self.note = ""
        try:
            import pynvml
        except ImportError:
            self.note = "pynvml (nvidia-ml-py) is not installed: pip install 'ldm-deploy[gpu]'"
            return
        try:
            pynvml.nvmlInit()
            if pynvml.nvmlDeviceGetCount() < 1:
                self.note = "NVML reports no GPU"
                return
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
            index = int(visible) if visible.isdigit() else 0
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self.name = pynvml.nvmlDeviceGetName(self.handle)
        except pynvml.NVMLError as e:
            self.note = f"no NVIDIA GPU/driver (NVML: {e})"
            return
        self.nvml = pynvml
        self.pid = os.getpid()
        self.baseline = self._used()
        self.note = f"NVML on {self.name!s}"

    def _used(self) -> int:
        return int(self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used)

    def sample(self) -> tuple[int, bool]:
        """(bytes, whether they are this process's own)."""
        try:
            for p in self.nvml.nvmlDeviceGetComputeRunningProcesses(self.handle):
                if p.pid == self.pid and p.usedGpuMemory is not None:
                    return int(p.usedGpuMemory), True
        except self.nvml.NVMLError:
            pass
        return max(0, self._used() - self.baseline), False


class MemorySampler:
    """Samples this process's RSS (and device memory via NVML when a GPU exists) in a background
    thread every ``interval`` seconds; use as a context manager, then read :meth:`result`."""

    def __init__(self, interval: float = 0.01, device: bool = True):
        try:
            import psutil

            proc = psutil.Process()
            self._rss: Callable[[], int] = lambda: int(proc.memory_info().rss)
            self.rss_source = "psutil"
        except ImportError:  # e.g. a separate interpreter for an Optimum variant
            self._rss, self.rss_source = _statm_rss, "/proc/self/statm (psutil not installed)"
        self.interval = interval
        self.peak_rss = 0
        self.n = 0
        self.peak_device: int | None = None
        self.device_own = False
        self.gpu = _Nvml() if device else None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="ldm-bench-memory", daemon=True)

    def _take(self) -> None:
        self.peak_rss = max(self.peak_rss, self._rss())
        self.n += 1
        if self.gpu is not None and self.gpu.handle is not None:
            used, own = self.gpu.sample()
            self.peak_device = max(self.peak_device or 0, used)
            self.device_own = own

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._take()

    def __enter__(self) -> Self:
        self._take()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._take()

    def rss_now(self) -> int:
        return self._rss()

    def result(self) -> dict[str, Any]:
        # (not ru_maxrss: on Linux it keeps the parent's RSS at fork time when that was larger)
        out: dict[str, Any] = {"peak_rss_bytes": int(self.peak_rss), "rss_samples": self.n,
                               "rss_source": self.rss_source, "sample_interval_s": self.interval}
        if self.gpu is None:
            out.update(peak_device_bytes=None, device_note="not sampled")
        elif self.gpu.handle is None:
            out.update(peak_device_bytes=None, device_note=self.gpu.note)
        else:
            how = "this process" if self.device_own else "device used minus the baseline at start"
            out.update(peak_device_bytes=self.peak_device, device_note=f"{self.gpu.note}, {how}")
        return out


def _statm_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def dir_bytes(path: str | os.PathLike[str], parts: tuple[str, ...] | None = None) -> int:
    """Bytes of the files under ``path`` (only under the sub-directories ``parts`` when given)."""
    from pathlib import Path

    root = Path(path)
    roots = [root / p for p in parts] if parts else [root]
    return sum(f.stat().st_size for r in roots if r.exists() for f in r.rglob("*") if f.is_file())
