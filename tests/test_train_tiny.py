"""The tiny model's training script: its text-attribute loss and a smoke run of ``--quick``."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

from conftest import ROOT
from ldm_deploy.data import shapes
from ldm_deploy.quality.classifier import ATTRIBUTE_NAMES, ATTRIBUTE_VALUES


@pytest.fixture(scope="module")
def train_tiny():
    spec = importlib.util.spec_from_file_location("train_tiny", ROOT / "scripts" / "train_tiny.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_caption_labels_index_the_caption_attributes(train_tiny):
    attrs = shapes.sample_attributes(50, seed=4, split="all")
    labels = train_tiny.caption_labels([shapes.caption(a) for a in attrs])
    assert labels.shape == (50, 5)
    for a, row in zip(attrs, labels.tolist()):
        decoded = [ATTRIBUTE_VALUES[name][i] for name, i in zip(ATTRIBUTE_NAMES, row)]
        assert decoded == [a.shape, a.color, a.background, a.size, a.position]


def test_attribute_loss_is_the_mean_cross_entropy(train_tiny):
    widths = train_tiny.attribute_widths()
    labels = torch.zeros(3, 5, dtype=torch.long)
    uniform = torch.zeros(3, sum(widths))
    expected = sum(math.log(w) for w in widths) / len(widths)
    assert float(train_tiny.attribute_loss(uniform, labels)) == pytest.approx(expected, rel=1e-6)
    # confident and right in every column: near zero; the columns do not leak into each other
    confident = torch.full((3, sum(widths)), -20.0)
    start = 0
    for w in widths:
        confident[:, start] = 20.0
        start += w
    assert float(train_tiny.attribute_loss(confident, labels)) < 1e-6
    labels[:, 4] = 1  # the position column now wrong
    assert float(train_tiny.attribute_loss(confident, labels)) == pytest.approx(40.0 / 5, rel=1e-3)


def test_quick_run_saves_a_loadable_pipeline(train_tiny, tmp_path):
    from diffusers import StableDiffusionPipeline

    out, log_md = tmp_path / "tiny", tmp_path / "train.md"
    assert train_tiny.main(["--quick", "--out", str(out), "--log-md", str(log_md), "--n-train", "64",
                            "--vae-steps", "4", "--unet-steps", "6", "--threads", "1"]) == 0
    pipe = StableDiffusionPipeline.from_pretrained(str(out))
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert json.loads((out / "vae" / "config.json").read_text())["scaling_factor"] > 0
    text = log_md.read_text()
    assert "text-attribute loss" in text and '"text_aux_weight": 1.0' in text
