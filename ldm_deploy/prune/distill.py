"""Recovery by knowledge distillation from the unpruned teacher (BK-SDM's objective).

Each step draws teacher-generated latents, noises them at uniform random timesteps (10% of the
prompts replaced by the empty prompt, so the unconditional branch of CFG is trained too) and
minimises::

    w_task * |s(x_t) - eps|^2 + w_out * |s(x_t) - t(x_t)|^2 + w_feat * sum_b |s_b(x_t) - t_b(x_t)|^2

with ``s_b``/``t_b`` the outputs of every down, mid and up block present in both. For channel
pruning the teacher's block outputs are compared on the channels the student kept. AdamW,
linear warm-up then cosine decay, gradient clipping at 1.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

FEATURE_BLOCKS = ("down_blocks", "mid_block", "up_blocks")


@dataclass
class DistillConfig:
    steps: int = 0
    batch_size: int = 16
    lr: float = 1e-4
    weight_task: float = 1.0
    weight_out: float = 1.0
    weight_feat: float = 1.0
    cfg_drop: float = 0.1
    eval_size: int = 64
    seed: int = 0


def feature_points(teacher: Any, student: Any) -> list[str]:
    """Names of the blocks whose outputs both U-Nets have (``down_blocks.0``, ``mid_block``...)."""
    def points(unet: Any) -> list[str]:
        out = [f"down_blocks.{i}" for i in range(len(unet.down_blocks))]
        out += ["mid_block"] if unet.mid_block is not None else []
        return out + [f"up_blocks.{i}" for i in range(len(unet.up_blocks))]

    have = set(points(student))
    return [p for p in points(teacher) if p in have]


def channel_index(teacher: Any, point: str, removed: Mapping[str, list[int]]) -> list[int] | None:
    """The teacher channels a channel-pruned student kept at block output ``point`` (None: all).

    A block's output channels are those of its last layer: the down/up sampler's conv, else
    the last resnet's ``conv2`` (same dependency group as the attention after it)."""
    block = teacher.get_submodule(point)
    if getattr(block, "downsamplers", None):
        layer = f"{point}.downsamplers.0.conv"
    elif getattr(block, "upsamplers", None):
        layer = f"{point}.upsamplers.0.conv"
    else:
        layer = f"{point}.resnets.{len(block.resnets) - 1}.conv2"
    gone = set(removed.get(layer, []))
    if not gone:
        return None
    width = teacher.get_submodule(layer).out_channels
    return [i for i in range(width) if i not in gone]


class _Capture:
    """Forward hooks that keep the first output of some submodules."""

    def __init__(self, unet: Any, points: list[str]):
        self.out: dict[str, Any] = {}
        self.handles = [unet.get_submodule(p).register_forward_hook(self._hook(p)) for p in points]

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: Any, args: Any, output: Any) -> None:
            self.out[name] = output[0] if isinstance(output, tuple) else output
        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def distill(teacher: Any, student: Any, data: Any, cfg: DistillConfig, removed: Mapping[str, list[int]] | None = None,
            progress: bool = True, log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Train ``student`` towards ``teacher`` on ``data`` (:class:`~.data.LatentSet`) in place.

    Returns the output-KD loss ``|s - t|^2`` on a fixed held-out set of noised latents before and
    after, the loss curve and the time taken."""
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    points = feature_points(teacher, student)
    index = {p: channel_index(teacher, p, removed or {}) for p in points}
    dev = data.x0.device
    index_t = {p: (None if ix is None else torch.tensor(ix, device=dev)) for p, ix in index.items()}
    gen = torch.Generator().manual_seed(cfg.seed)
    eval_batches = [data.batch(min(cfg.batch_size, cfg.eval_size), torch.Generator().manual_seed(10_000 + i), cfg.cfg_drop)
                    for i in range(max(1, math.ceil(cfg.eval_size / cfg.batch_size)))]
    teacher.eval().requires_grad_(False)
    t_cap, s_cap = _Capture(teacher, points), _Capture(student, points)

    def eval_loss() -> float:
        student.eval()
        with torch.no_grad():
            losses = [F.mse_loss(student(x, t, c, return_dict=False)[0], teacher(x, t, c, return_dict=False)[0]).item()
                      for x, t, c, _ in eval_batches]
        return sum(losses) / len(losses)

    before = eval_loss()
    params = [p for p in student.parameters()]
    student.requires_grad_(True).train()
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    warm = min(100, max(1, cfg.steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / warm) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, i / max(1, cfg.steps)))))
    curve: list[dict[str, float]] = []
    t0 = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc="distill", unit="step", disable=not progress)
    running = None
    for step in bar:
        x, t, c, noise = data.batch(cfg.batch_size, gen, cfg.cfg_drop)
        with torch.no_grad():
            t_out = teacher(x, t, c, return_dict=False)[0]
        s_out = student(x, t, c, return_dict=False)[0]
        l_task = F.mse_loss(s_out, noise)
        l_out = F.mse_loss(s_out, t_out)
        l_feat = sum((F.mse_loss(s_cap.out[p], t_cap.out[p] if index_t[p] is None else t_cap.out[p][:, index_t[p]])
                      for p in points), torch.zeros((), device=dev))
        loss = cfg.weight_task * l_task + cfg.weight_out * l_out + cfg.weight_feat * l_feat
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        vals = {"loss": loss.item(), "task": l_task.item(), "out": l_out.item(), "feat": l_feat.item()}
        running = vals if running is None else {k: 0.98 * running[k] + 0.02 * v for k, v in vals.items()}
        bar.set_postfix(loss=f"{running['loss']:.4f}", out=f"{running['out']:.4f}")
        if (step + 1) % max(1, cfg.steps // 20) == 0 or step + 1 == cfg.steps:
            curve.append({"step": step + 1, **{k: round(v, 6) for k, v in running.items()}})
    bar.close()
    seconds = time.perf_counter() - t0
    student.eval().requires_grad_(False)
    after = eval_loss()
    t_cap.close()
    s_cap.close()
    log(f"distillation: {cfg.steps} steps in {seconds:.0f} s; held-out output KD loss {before:.5f} -> {after:.5f}")
    return {
        "steps": cfg.steps, "batch_size": cfg.batch_size, "lr": cfg.lr, "cfg_drop": cfg.cfg_drop,
        "weights": {"task": cfg.weight_task, "out": cfg.weight_out, "feat": cfg.weight_feat},
        "feature_points": points, "kd_out_loss_before": before, "kd_out_loss_after": after,
        "curve": curve, "seconds": round(seconds, 1),
    }
