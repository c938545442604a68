"""ldm-prune: both methods on tiny-random give a smaller diffusers pipeline that plain diffusers
loads, ldm-export exports (parity check) and the torch-free runtime runs; GroupNorm groups and
heads stay whole; distillation lowers the student-teacher loss; bad input is one clear line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torch_pruning")

from conftest import ROOT  # noqa: E402

from ldm_deploy.prune import PruneOptions, prune_model  # noqa: E402

QUIET = {"progress": False, "threads": 1}


@pytest.fixture(scope="module")
def channels_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prune") / "channels"
    prune_model("tiny-random", out, PruneOptions(ratio=0.3, **QUIET), log=lambda s: None)
    return out


@pytest.fixture(scope="module")
def blocks_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prune") / "blocks"
    prune_model("tiny-random", out, PruneOptions(method="blocks", **QUIET), log=lambda s: None)
    return out


@pytest.fixture(scope="module")
def tiny_channels():
    """The trained tiny U-Net pruned at 0.3 (its non-trivial norms and weights identify channels)."""
    from ldm_deploy.models import load_model
    from ldm_deploy.prune.channels import plan_widths, prune_channels
    from ldm_deploy.prune.importance import make_scorer

    teacher = load_model("tiny").unet
    student, report = prune_channels(teacher, plan_widths(teacher.config, 0.3), make_scorer("l2"))
    return teacher, student, report


def _forward(unet, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lat = unet.config.sample_size
    x = torch.randn(batch, unet.config.in_channels, lat, lat, generator=g)
    e = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([999, 10][:batch]), e).sample


@pytest.mark.parametrize("which", ["channels", "blocks"])
def test_pruned_pipeline_loads_with_plain_diffusers(which, channels_dir, blocks_dir, tiny_random_torch):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    out = channels_dir if which == "channels" else blocks_dir
    pipe = StableDiffusionPipeline.from_pretrained(str(out))
    assert type(pipe.unet) is UNet2DConditionModel
    teacher = tiny_random_torch.unet
    n_student = sum(p.numel() for p in pipe.unet.parameters())
    assert n_student < sum(p.numel() for p in teacher.parameters())
    assert _forward(pipe.unet).shape == _forward(teacher).shape
    m = json.loads((out / "manifest.json").read_text())
    p = m["prune"]
    assert m["stage"] == "prune" and p["method"] == which
    assert p["after"]["params"] == n_student
    assert p["after"]["params"] < p["before"]["params"] and p["after"]["macs"] < p["before"]["macs"]
    assert "params" in (out / "README.md").read_text()
    if which == "channels":
        assert p["ratio"] == 0.3 and p["channels"]["ratio_effective"] == 0.25
        assert pipe.unet.config.block_out_channels == [24, 24, 48, 48]
        assert pipe.unet.config.norm_num_groups == 6
    else:
        assert p["blocks"]["removed"] == ["mid"] and pipe.unet.mid_block is None


def test_groupnorm_groups_stay_whole(tiny_channels):
    """Identify every kept channel of each GroupNorm by its (weight, bias) and check that each new
    group is exactly one old group (except the GroupNorms over skip concatenations)."""
    from torch import nn

    teacher, student, report = tiny_channels
    checked = 0
    for name, new in student.named_modules():
        if not isinstance(new, nn.GroupNorm) or ("up_blocks" in name and name.endswith("norm1")):
            continue
        old = teacher.get_submodule(name)
        assert new.num_groups == 12 and old.num_groups == 16
        old_wb = torch.stack([old.weight, old.bias], 1)
        src = [int(torch.nonzero((old_wb == row).all(1))[0]) for row in torch.stack([new.weight, new.bias], 1)]
        gs_old, gs_new = old.num_channels // old.num_groups, new.num_channels // new.num_groups
        assert gs_old == gs_new
        for k in range(new.num_groups):
            members = src[k * gs_new:(k + 1) * gs_new]
            assert members == list(range(members[0], members[0] + gs_old)) and members[0] % gs_old == 0, name
        assert report.groupnorm_whole[name]
        checked += 1
    assert checked >= 20
    assert all(not v for k, v in report.groupnorm_whole.items() if "up_blocks" in k and k.endswith("norm1"))


def test_attention_heads_stay_whole(tiny_channels):
    """Cross-attention keys read the (unpruned) text, so their rows identify the kept channels."""
    teacher, student, report = tiny_channels
    attns = [n for n, _ in student.named_modules() if n.endswith("attn2")]
    assert attns
    for name in attns:
        old, new = teacher.get_submodule(name), student.get_submodule(name)
        assert (old.heads, new.heads) == (8, 6)
        head = old.to_k.out_features // old.heads
        assert new.to_k.out_features // new.heads == head
        src = [int(torch.nonzero((old.to_k.weight == row).all(1))[0]) for row in new.to_k.weight]
        for k in range(new.heads):
            members = src[k * head:(k + 1) * head]
            assert members == list(range(members[0], members[0] + head)) and members[0] % head == 0, name
        removed = report.removed[f"{name}.to_q"]
        assert len(removed) == 2 * head and {i // head for i in removed} == {i // head for i in set(range(8 * head)) - set(src)}


def test_time_embedding_is_kept_and_refitted(tiny_channels):
    teacher, student, report = tiny_channels
    assert report.time_embedding_refit_rel_err is not None and report.time_embedding_refit_rel_err < 1e-4
    t = torch.arange(0, 1000, 37)
    with torch.no_grad():
        a = teacher.time_embedding(teacher.time_proj(t))
        b = student.time_embedding(student.time_proj(t))
    assert a.shape == b.shape
    assert float((a - b).abs().max() / a.abs().max()) < 1e-3


@pytest.mark.parametrize("which", ["channels", "blocks"])
def test_pruned_pipeline_exports_and_runs(which, channels_dir, blocks_dir, tmp_path):
    from ldm_deploy.export.exporter import ExportOptions, export_model
    from ldm_deploy.runtime import Pipeline

    art = tmp_path / "onnx"
    m = export_model(str(channels_dir if which == "channels" else blocks_dir), art, ExportOptions(), log=lambda s: None)
    assert {k: v["status"] for k, v in m["validation"].items()} == {
        "unet": "passed", "text_encoder": "passed", "vae_encoder": "passed", "vae_decoder": "passed"}
    # the runtime over the pruned export gives the pixels diffusers gives for the pruned pipeline
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from ldm_deploy.numerics import psnr

    sd = StableDiffusionPipeline.from_pretrained(str(channels_dir if which == "channels" else blocks_dir))
    sd.scheduler = DDIMScheduler.from_config(sd.scheduler.config)
    sd.set_progress_bar_config(disable=True)
    prompt = "a small red circle on a blue background, center"
    latents = np.random.default_rng(4).standard_normal((1, 4, 8, 8)).astype(np.float32)
    with torch.no_grad():
        ref = sd(prompt, num_inference_steps=3, latents=torch.from_numpy(latents), output_type="np",
                 height=64, width=64).images
    img = Pipeline.load(art)(prompt, num_inference_steps=3, latents=latents, output_type="np").images
    assert img.shape == ref.shape == (1, 64, 64, 3)
    assert psnr(img, ref, 1.0) >= 40.0, psnr(img, ref, 1.0)


def test_distillation_lowers_the_student_teacher_loss():
    from ldm_deploy.models import build_random
    from ldm_deploy.prune.channels import plan_widths, prune_channels
    from ldm_deploy.prune.data import generate_latents, read_prompts
    from ldm_deploy.prune.distill import DistillConfig, distill
    from ldm_deploy.prune.importance import make_scorer

    torch.manual_seed(0)
    model = build_random("tiny-random")
    teacher = model.unet
    student, report = prune_channels(teacher, plan_widths(teacher.config, 0.5), make_scorer("l1"))
    data = generate_latents(model, teacher, read_prompts("generator", 16), (8, 8), 3, 5.0, 0, "cpu", progress=False)
    r = distill(teacher, student, data, DistillConfig(steps=15, batch_size=8, lr=1e-3, eval_size=16), report.removed,
                progress=False)
    assert r["feature_points"] == [f"down_blocks.{i}" for i in range(4)] + ["mid_block"] + [f"up_blocks.{i}" for i in range(4)]
    assert r["kd_out_loss_after"] < 0.8 * r["kd_out_loss_before"], r


def test_taylor_importance_over_trajectory_timesteps(tmp_path):
    out = tmp_path / "taylor"
    m = prune_model("tiny-random", out, PruneOptions(ratio=0.5, importance="taylor", data_size=4, sample_steps=2,
                                                     batch_size=4, **QUIET), log=lambda s: None)
    ts = m["prune"]["taylor"]["timesteps"]
    assert len(ts) == 8 and ts == sorted(ts, reverse=True) and ts[0] > 800 and ts[-1] < 200
    assert m["prune"]["channels"]["ratio_effective"] == 0.5
    assert m["prune"]["unet_config_changes"]["block_out_channels"] == [[32, 32, 64, 64], [16, 16, 32, 32]]


def test_blocks_bk_sdm_pairs_keep_weights_and_skips():
    """layers_per_block 2 -> 1: down blocks keep pair 0, up blocks keep pair 0 and the skip pair."""
    from diffusers import UNet2DConditionModel

    from ldm_deploy.prune.blocks import bk_sdm_recipe, build_student

    cfg = json.loads((ROOT / "ldm_deploy/models/configs/tiny-random/unet.json").read_text()) | {"layers_per_block": 2}
    torch.manual_seed(0)
    teacher = UNet2DConditionModel(**cfg).eval()
    removals = bk_sdm_recipe(teacher.config, {})
    assert [r.name for r in removals] == ["pair:0", "pair:1", "pair:2", "pair:3", "mid"]
    student = build_student(teacher, removals)
    assert student.config.layers_per_block == 1 and student.mid_block is None
    for j in range(4):
        assert len(student.up_blocks[j].resnets) == 2
        assert torch.equal(student.up_blocks[j].resnets[0].conv1.weight, teacher.up_blocks[j].resnets[0].conv1.weight)
        assert torch.equal(student.up_blocks[j].resnets[1].conv1.weight, teacher.up_blocks[j].resnets[2].conv1.weight)
    assert torch.equal(student.down_blocks[1].resnets[0].conv1.weight, teacher.down_blocks[1].resnets[0].conv1.weight)
    assert _forward(student).shape == _forward(teacher).shape


def test_blocks_ratio_removes_ranked_blocks_until_target(tmp_path):
    m = prune_model("tiny-random", tmp_path / "b", PruneOptions(method="blocks", ratio=0.2, keep=("mid_block",),
                                                                 data_size=4, sample_steps=2, **QUIET), log=lambda s: None)
    b = m["prune"]["blocks"]
    assert m["prune"]["reduction"]["macs"] >= 0.2
    assert "mid" not in b["removed"] and all(r["removal"] != "mid" for r in b["sensitivity"])
    assert b["removed"] == [r["removal"] for r in b["sensitivity"][:len(b["removed"])]]


# --------------------------------------------------------------------------- command line


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ldm_deploy.prune.cli", *args], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=False)


@pytest.mark.parametrize("args, needles", [
    (["--model", "tiny-random", "--ratio", "1.5"], ["--ratio 1.5 is outside (0, 1)"]),
    (["--model", "tiny-random", "--ratio", "0"], ["--ratio 0.0 is outside (0, 1)"]),
    (["--model", "tiny-random", "--keep", "down_blocks.9*"], ["--keep pattern 'down_blocks.9*' matches no module"]),
    (["--model", "tiny-random", "--keep", "conv_in"], ["--keep 'conv_in' covers conv_in", "--method blocks"]),
    (["--model", "tiny-random", "--method", "blocks", "--importance", "taylor"], ["--importance applies to"]),
    (["--model", "tiny-random", "--data", "no-such-prompts.txt", "--distill-steps", "2"], ["neither 'generator'"]),
])
def test_bad_input_is_one_line_error(tmp_path, args, needles):
    out = tmp_path / "out"
    proc = _cli(*args, "-o", str(out), "-q")
    assert proc.returncode == 1, proc.stderr
    err = proc.stderr.strip().splitlines()
    assert err and err[-1].startswith("ldm-prune: error:") and "Traceback" not in proc.stderr, proc.stderr
    for n in needles:
        assert n in err[-1], err[-1]
    assert not out.exists() and not list(tmp_path.glob(".ldm-tmp-*"))


def test_model_without_unet_is_an_error(tmp_path):
    pipe = tmp_path / "vae-only"
    (pipe / "vae").mkdir(parents=True)
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "X", "vae": ["diffusers", "AutoencoderKL"]}))
    proc = _cli("--model", str(pipe), "-o", str(tmp_path / "o"))
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith(f"ldm-prune: error: {pipe} has no U-Net"), proc.stderr
    assert not (tmp_path / "o").exists()
