"""What one server (or one Ray Serve replica) is configured with."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import LdmDeployError


@dataclass(frozen=True)
class ServeConfig:
    """``max_batch``: images per pipeline call (None: the artifact's max batch); ``max_wait_ms``:
    how long the first request of a batch waits for company; ``queue``: requests that may wait
    (beyond: 429); ``backend``/``threads``/``verify``/``long_prompts``: as for :meth:`Pipeline.load`."""

    artifact: Path | str
    max_batch: int | None = None
    max_wait_ms: float = 20.0
    queue: int = 64
    backend: str = "ort-cpu"
    threads: int = 0
    verify: bool = True
    long_prompts: bool = False  # prompts over 77 tokens in 77-token windows (--long-prompts artifacts)

    def check(self) -> None:
        """One-line errors for values that cannot work."""
        if self.max_batch is not None and self.max_batch < 1:
            raise LdmDeployError(f"--max-batch must be >= 1, got {self.max_batch}")
        if not 0 <= self.max_wait_ms <= 60_000:
            raise LdmDeployError(f"--max-wait-ms must be in [0, 60000], got {self.max_wait_ms}")
        if self.queue < 1:
            raise LdmDeployError(f"--queue must be >= 1, got {self.queue}")
        if self.threads < 0:
            raise LdmDeployError(f"--threads must be >= 0, got {self.threads}")
