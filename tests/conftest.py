"""Shared fixtures: tiny-random artifacts exported once per test session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a console script of this package in a subprocess (as a user would)."""
    module = {"ldm-export": "ldm_deploy.export.cli", "ldm-generate": "ldm_deploy.runtime.cli"}[args[0]]
    return subprocess.run(
        [sys.executable, "-m", module, *args[1:]],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}, cwd=ROOT,
    )


@pytest.fixture(scope="session")
def tiny_random_fp32(tmp_path_factory) -> Path:
    from ldm_deploy.export.exporter import ExportOptions, export_model

    out = tmp_path_factory.mktemp("artifacts") / "tiny-random-fp32"
    export_model("tiny-random", out, ExportOptions(), log=lambda s: None)
    return out


@pytest.fixture(scope="session")
def tiny_random_trt(tmp_path_factory) -> Path:
    """fp32 export for TensorRT: plain attention, portable clean-up, no ORT-only operators."""
    from ldm_deploy.export.exporter import ExportOptions, export_model

    out = tmp_path_factory.mktemp("artifacts") / "tiny-random-trt"
    export_model("tiny-random", out, ExportOptions(optimize="tensorrt"), log=lambda s: None)
    return out


@pytest.fixture(scope="session")
def tiny_random_fp16(tmp_path_factory) -> Path:
    from ldm_deploy.export.exporter import ExportOptions, export_model

    out = tmp_path_factory.mktemp("artifacts") / "tiny-random-fp16"
    export_model("tiny-random", out, ExportOptions(fp16=True), log=lambda s: None)
    return out


@pytest.fixture(scope="session")
def tiny_random_torch():
    from ldm_deploy.models import build_random

    return build_random("tiny-random")
