"""Training data for importance, block sensitivity and distillation: prompts, and latents the
unpruned teacher generates for them.

``--data generator`` takes captions from the procedural shapes generator
(:mod:`ldm_deploy.data.shapes`, train split); ``--data FILE`` reads one prompt per line. The
teacher then samples one clean latent per prompt (DDIM with classifier-free guidance), so no
images are needed: the student learns to match the teacher on the teacher's own distribution.
Noised versions of these latents at any timestep are what the U-Net sees along a trajectory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import LdmDeployError
from ..prompts import read_prompt_file

GENERATOR = "generator"


def read_prompts(source: str, n: int, seed: int = 0) -> list[str]:
    """``n`` prompts from ``source`` (``generator`` or a text file, cycled to length ``n``)."""
    if n < 1:
        raise LdmDeployError(f"--data-size must be >= 1, got {n}")
    if source == GENERATOR:
        from ..data.shapes import caption, sample_attributes

        return [caption(a) for a in sample_attributes(n, seed=seed + 7, split="train")]
    if not Path(source).is_file():
        raise LdmDeployError(f"--data {source!r} is neither 'generator' nor an existing prompt file")
    prompts = read_prompt_file(source)
    return [prompts[i % len(prompts)] for i in range(n)]


@dataclass
class LatentSet:
    """Clean teacher latents with their prompt embeddings (all on one device)."""

    x0: Any  # [N, C, h, w]
    cond: Any  # [N, L, D]
    uncond: Any  # [1, L, D]
    alphas_cumprod: Any  # [T]
    prompts: list[str]

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def noised(self, idx: Any, t: Any, noise: Any) -> Any:
        """``x_t`` for rows ``idx`` at timesteps ``t`` with ``noise``."""
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        return a.sqrt() * self.x0[idx] + (1 - a).sqrt() * noise

    def batch(self, size: int, gen: Any, cfg_drop: float = 0.1, t: Any = None) -> tuple[Any, Any, Any, Any]:
        """A random ``(x_t, t, cond, noise)`` batch; ``cfg_drop`` of the prompts replaced by ``""``."""
        import torch

        dev = self.x0.device
        idx = torch.randint(0, len(self.x0), (size,), generator=gen).to(dev)
        if t is None:
            t = torch.randint(0, self.num_train_timesteps, (size,), generator=gen)
        t = torch.as_tensor(t).expand(size).to(dev)
        noise = torch.randn((size, *self.x0.shape[1:]), generator=gen).to(dev)
        cond = self.cond[idx].clone()
        drop = (torch.rand(size, generator=gen) < cfg_drop).to(dev)
        cond[drop] = self.uncond[0]
        return self.noised(idx, t, noise), t, cond, noise


def encode_prompts(model: Any, prompts: list[str], device: str, batch: int = 32) -> Any:
    """Text-encoder hidden states ``[N, 77, D]`` of ``prompts``."""
    import torch

    tok = model.tokenizer()
    te = model.text_encoder.to(device)
    out = []
    with torch.no_grad():
        for s in range(0, len(prompts), batch):
            ids = tok(prompts[s:s + batch], padding="max_length", max_length=tok.model_max_length,
                      truncation=True, return_tensors="pt").input_ids.to(device)
            out.append(te(ids)[0])
    return torch.cat(out)


def generate_latents(model: Any, unet: Any, prompts: list[str], latent_hw: tuple[int, int], steps: int,
                     guidance: float, seed: int, device: str, batch: int = 16, progress: bool = True) -> LatentSet:
    """Sample one clean latent per prompt with ``unet`` (DDIM, classifier-free guidance)."""
    import torch
    from diffusers import DDIMScheduler
    from tqdm.auto import tqdm

    if steps < 1:
        raise LdmDeployError(f"--sample-steps must be >= 1, got {steps}")
    sched = DDIMScheduler.from_config(model.scheduler_config)
    cond = encode_prompts(model, prompts, device)
    uncond = encode_prompts(model, [""], device)
    gen = torch.Generator().manual_seed(seed)
    channels = int(unet.config.in_channels)
    x0 = []
    bar = tqdm(total=len(prompts) * steps, desc="teacher latents", unit="step", disable=not progress, leave=False)
    with torch.no_grad():
        for s in range(0, len(prompts), batch):
            c = cond[s:s + batch]
            n = len(c)
            lat = torch.randn((n, channels, *latent_hw), generator=gen).to(device) * sched.init_noise_sigma
            sched.set_timesteps(steps)
            ctx = torch.cat([uncond.expand(n, -1, -1), c])
            for t in sched.timesteps:
                inp = sched.scale_model_input(torch.cat([lat, lat]), t)
                eps_u, eps_c = unet(inp, t.to(device), ctx, return_dict=False)[0].chunk(2)
                lat = sched.step(eps_u + guidance * (eps_c - eps_u), t, lat, return_dict=False)[0]
                bar.update(n)
            x0.append(lat)
    bar.close()
    alphas = sched.alphas_cumprod.to(device=device, dtype=torch.float32)
    return LatentSet(torch.cat(x0), cond, uncond, alphas, prompts)


def spread_timesteps(scheduler_config: dict[str, Any], k: int) -> list[int]:
    """``k`` timesteps spread along a DDIM sampling trajectory (noisiest first)."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(scheduler_config)
    sched.set_timesteps(k)
    return [int(t) for t in sched.timesteps]
