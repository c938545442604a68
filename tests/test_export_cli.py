"""ldm-export's command line: help, bad input (one clear line, exit != 0, no artifact) and
recovery from a SIGKILL mid-export."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, run_cli


def _one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0
    err = proc.stderr.strip().splitlines()
    assert err and err[-1].startswith("ldm-export: error:"), proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    for n in needles:
        assert n in err[-1], err[-1]


def test_help_lists_options():
    proc = run_cli("ldm-export", "--help")
    assert proc.returncode == 0
    for opt in ("--model", "--fp16", "--opset", "--height", "--max-batch", "--optimize", "--no-validate", "--overwrite"):
        assert opt in proc.stdout


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--model", "sd99"], ["unknown model 'sd99'"]),
        (["--model", "./does/not/exist"], ["does not exist"]),
        (["--model", "tiny-random", "--height", "100"], ["height 100", "multiple of 8"]),
        (["--model", "tiny-random", "--width", "72"], ["width 72", "multiple of 64"]),
        (["--model", "tiny-random", "--components", "unet,foo"], ["unknown component", "foo"]),
    ],
)
def test_bad_input_is_one_line_error(tmp_path, args, needles):
    out = tmp_path / "out"
    _one_line_error(run_cli("ldm-export", *args, "-o", str(out)), *needles)
    assert not out.exists()
    assert not list(tmp_path.glob(".ldm-tmp-*")), "temporary directory left behind"


def test_directory_that_is_not_a_pipeline(tmp_path):
    (tmp_path / "notapipe").mkdir()
    (tmp_path / "notapipe" / "readme.txt").write_text("hello")
    _one_line_error(run_cli("ldm-export", "--model", str(tmp_path / "notapipe"), "-o", str(tmp_path / "o")),
                    "not a diffusers pipeline directory")
    assert not (tmp_path / "o").exists()


def test_hub_id_offline_says_to_pass_a_local_directory(tmp_path):
    proc = run_cli("ldm-export", "--model", "sd15", "-o", str(tmp_path / "o"),
                   env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    _one_line_error(proc, "stable-diffusion-v1-5/stable-diffusion-v1-5", "local diffusers pipeline directory")


def test_existing_output_is_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    _one_line_error(run_cli("ldm-export", "--model", "tiny-random", "-o", str(out)), "already exists", "--overwrite")
    assert (out / "keep.txt").read_text() == "user data"


def test_sigkill_midway_leaves_no_artifact_and_rerun_succeeds(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "ldm_deploy.export.cli", "--model", "tiny-random", "-o", str(out),
           "--components", "text_encoder,vae_decoder"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    assert proc.stderr is not None
    for line in proc.stderr:  # wait until the export is under way
        if "exporting" in line or time.time() > deadline:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "a killed export must not leave OUT behind"
    assert list(tmp_path.glob(".ldm-tmp-out-*")), "expected the killed run's temporary directory"
    rerun = run_cli("ldm-export", "--model", "tiny-random", "-o", str(out), "--components", "text_encoder", "-q")
    assert rerun.returncode == 0, rerun.stderr
    assert (out / "manifest.json").is_file()
    assert not list(tmp_path.glob(".ldm-tmp-out-*")), "stale temporary directory not cleaned"


def test_local_pipeline_directory_round_trip(tmp_path, tiny_random_torch):
    """A saved diffusers pipeline directory loads through from_pretrained and exports."""
    pipe_dir = tmp_path / "pipe"
    tiny_random_torch.save_pretrained(pipe_dir)
    out = tmp_path / "art"
    proc = run_cli("ldm-export", "--model", str(pipe_dir), "-o", str(out), "--components", "text_encoder,vae_decoder", "-q")
    assert proc.returncode == 0, proc.stderr
    assert "validation: text_encoder passed, vae_decoder passed" in proc.stdout
