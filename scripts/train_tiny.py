#!/usr/bin/env python
"""Train the tiny SD1.5-family text-to-image model shipped in ``ldm_deploy/assets/tiny``.

The model uses the same classes as Stable Diffusion 1.5 (``AutoencoderKL`` with a
downsampling factor of 8 and 4 latent channels, ``UNet2DConditionModel`` with
cross-attention, ``CLIPTextModel`` with the real CLIP tokenizer, ``DDIMScheduler``
with SD1.5's settings), only much smaller, trained on the procedural coloured-shape
data of :mod:`ldm_deploy.data.shapes` (train split: the held-out (shape, colour)
combinations are never seen).

Stages:
  1. VAE: L1 + MSE reconstruction + a small KL term.
  2. Measure the latent std and set ``vae.config.scaling_factor = 1 / std``.
  3. U-Net + text encoder jointly, epsilon prediction on the DDPM schedule that matches
     SD1.5's DDIM config, 10% caption dropout (empty prompt) for classifier-free
     guidance, min-SNR loss weighting, EMA of the weights (the EMA weights are saved).
     A text-attribute loss (``--text-aux-weight``) asks a linear head on the text encoder's
     pooled output to predict the caption's five attributes. SD1.5 gets a text encoder that
     already tells words apart from CLIP pre-training; trained only through the U-Net from
     scratch, this one let the position words fade (the U-Net then ignored them and placed
     shapes at random). With the loss, position is followed like the other attributes.

Runs on CPU with 2 threads on an otherwise idle 2-core machine (on a shared machine use
``--threads 1``: two threads were several times slower there). The defaults took 53 minutes
(the U-Net stage stops at the ``--max-minutes`` cap, 7486 of 7500 steps), plus 3 for the decoder
fine-tune (second command). ``--quick`` runs a few dozen steps for smoke testing.

    python scripts/train_tiny.py                 # full run -> ldm_deploy/assets/tiny
    python scripts/train_tiny.py --decoder-only ldm_deploy/assets/tiny --n-train 8000 --max-minutes 7
    python scripts/train_tiny.py --quick         # smoke test -> /tmp/tiny_quick
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ldm_deploy.data import shapes  # noqa: E402

TOKENIZER_DIR = ROOT / "ldm_deploy" / "assets" / "clip_tokenizer"
DEFAULT_OUT = ROOT / "ldm_deploy" / "assets" / "tiny"
DEFAULT_LOG = ROOT / "benchmarks" / "results" / "train_tiny.md"

SD15_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    clip_sample=False,
    set_alpha_to_one=False,
    prediction_type="epsilon",
)

MODEL_CONFIG = dict(
    image_size=64,
    vae=dict(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        # narrow at full resolution (16 channels at 64x64): 4x cheaper per step than 32 there,
        # so many more steps fit in the time budget; flat-colour shapes need little width.
        block_out_channels=[16, 32, 64, 64],
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=64,
    ),
    unet=dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        block_out_channels=[48, 96, 128],
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=16,
    ),
    text_encoder=dict(
        vocab_size=49408,
        hidden_size=32,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=1,
    ),
)


def log(msg: str) -> None:
    print(msg, flush=True)


def nparams(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, p))))


def build_models():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vae = AutoencoderKL(**MODEL_CONFIG["vae"])
    unet = UNet2DConditionModel(**MODEL_CONFIG["unet"])
    text_encoder = CLIPTextModel(CLIPTextConfig(**MODEL_CONFIG["text_encoder"]))
    tokenizer = CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))
    return vae, unet, text_encoder, tokenizer


def to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def foreground_masks(images: np.ndarray, attrs) -> np.ndarray:
    """``[N, H, W]`` float masks of the pixels that differ from each image's background colour."""
    bg = np.array([shapes.COLORS[a.background] for a in attrs], dtype=np.int16)
    return (np.abs(images.astype(np.int16) - bg[:, None, None, :]).max(-1) > 8).astype(np.float32)


def train_vae(vae, images: np.ndarray, steps: int, batch: int, lr: float, kl_weight: float,
              gen: torch.Generator, log_every: int, masks: np.ndarray | None = None, fg_weight: float = 0.0,
              deadline: float = 0.0) -> dict:
    """L1 + MSE reconstruction (pixels of the shape weighted ``1 + fg_weight``: the shape covers a
    few % of the image, and an unweighted loss is met by drawing the background first) + KL."""
    vae.train()
    # Start with a small posterior std (logvar bias -6): with the default logvar ~0 the
    # sampled latents are drowned in unit noise and reconstruction learns very slowly.
    with torch.no_grad():
        c = vae.config.latent_channels
        vae.quant_conv.bias[c:] = -6.0
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    n = len(images)
    t0 = time.time()
    hist = []
    done = steps
    for step in range(steps):
        if deadline and time.time() > deadline:
            log(f"[vae] time budget reached: stopping after {step} of {steps} steps")
            done = step
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup=min(100, steps // 10 + 1))
        idx = torch.randint(0, n, (batch,), generator=gen).numpy()
        x = to_tensor(images[idx])
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        err = rec - x
        l1 = err.abs().mean()
        mse = err.pow(2).mean()
        kl = 0.5 * (post.mean.pow(2) + post.var - 1.0 - post.logvar).mean()
        if masks is not None and fg_weight > 0:
            w = 1.0 + fg_weight * torch.from_numpy(masks[idx])[:, None]
            loss = ((err.abs() + err.pow(2)) * w).mean() / w.mean() + kl_weight * kl
        else:
            loss = l1 + mse + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 5.0)
        opt.step()
        hist.append((l1.item(), mse.item(), kl.item()))
        if (step + 1) % log_every == 0 or step + 1 == steps:
            h = np.mean(hist[-log_every:], axis=0)
            el = time.time() - t0
            log(f"[vae] step {step + 1}/{steps}  l1 {h[0]:.4f}  mse {h[1]:.5f}  kl {h[2]:.2f}  "
                f"{el:.0f}s elapsed, eta {el / (step + 1) * (steps - step - 1):.0f}s")
    h = np.mean(hist[-min(50, len(hist)):], axis=0)
    return dict(l1=float(h[0]), mse=float(h[1]), kl=float(h[2]), seconds=time.time() - t0, steps_done=done)


def finetune_decoder(vae, images: np.ndarray, lat_mean, lat_std, steps: int, batch: int, lr: float,
                     gen: torch.Generator, log_every: int, deadline: float = 0.0,
                     masks: np.ndarray | None = None, fg_weight: float = 0.0) -> dict:
    """Fine-tune only the VAE decoder (post_quant_conv + decoder) on the frozen encoder's
    latents: the latent space the U-Net was trained on does not change."""
    vae.requires_grad_(False)
    dec_params = list(vae.post_quant_conv.parameters()) + list(vae.decoder.parameters())
    for q in dec_params:
        q.requires_grad_(True)
    vae.decoder.train()
    opt = torch.optim.AdamW(dec_params, lr=lr, weight_decay=0.0)
    n = len(images)
    t0 = time.time()
    hist = []
    done = steps
    for step in range(steps):
        if deadline and time.time() > deadline:
            log(f"[decoder] wall-time cap reached: stopping after {step} of {steps} steps")
            done = step
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup=min(50, steps // 10 + 1))
        idx = torch.randint(0, n, (batch,), generator=gen)
        x = to_tensor(images[idx.numpy()])
        z = lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=gen)
        rec = vae.decode(z).sample
        err = rec - x
        l1 = err.abs().mean()
        mse = err.pow(2).mean()
        if masks is not None and fg_weight > 0:
            w = 1.0 + fg_weight * torch.from_numpy(masks[idx.numpy()])[:, None]
            loss = ((err.abs() + err.pow(2)) * w).mean() / w.mean()
        else:
            loss = l1 + mse
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dec_params, 5.0)
        opt.step()
        hist.append((l1.item(), mse.item()))
        if (step + 1) % log_every == 0 or step + 1 == steps:
            h = np.mean(hist[-log_every:], axis=0)
            el = time.time() - t0
            log(f"[decoder] step {step + 1}/{steps}  l1 {h[0]:.4f}  mse {h[1]:.5f}  {el:.0f}s elapsed, "
                f"eta {el / (step + 1) * (steps - step - 1):.0f}s")
    vae.eval().requires_grad_(False)
    h = np.mean(hist[-min(50, len(hist)):], axis=0) if hist else (float("nan"), float("nan"))
    return dict(l1=float(h[0]), mse=float(h[1]), seconds=time.time() - t0, steps_done=done)


@torch.no_grad()
def heldout_recon_l1(vae, seed: int) -> float:
    him, _, _ = shapes.make_dataset(64, seed=seed + 99, split="heldout", size=MODEL_CONFIG["image_size"])
    xh = to_tensor(him)
    rec = vae.decode(vae.encode(xh).latent_dist.mean).sample.clamp(-1, 1)
    return float((rec - xh).abs().mean())


@torch.no_grad()
def reconstruction_adherence(vae, n: int = 200) -> dict:
    """Prompt adherence (quality harness) of the VAE's reconstructions of renders of the evaluation
    prompts: the ceiling any U-Net trained in this latent space can reach. A diagnostic only."""
    from ldm_deploy.quality import evaluate

    attrs = shapes.eval_prompts(n)
    rng = np.random.default_rng(5)
    real = np.stack([shapes.render(a, MODEL_CONFIG["image_size"], rng) for a in attrs])
    rec = vae.decode(vae.encode(to_tensor(real)).latent_dist.mean).sample.clamp(-1, 1)
    rec = ((rec + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    r = evaluate(rec, attrs, inception=False)
    return {"adherence": r["adherence"], "per_attribute": r["per_attribute"]}


def decoder_only(args, src: Path, out: Path, log_md: Path | None) -> int:
    """Second training command: fine-tune the decoder of an already trained pipeline."""
    from diffusers import StableDiffusionPipeline

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed + 2)
    t_start = time.time()
    deadline = t_start + 60 * args.max_minutes if args.max_minutes else 0.0
    pipe = StableDiffusionPipeline.from_pretrained(str(src), torch_dtype=torch.float32)
    vae = pipe.vae
    images, _, attrs = shapes.make_dataset(args.n_train, seed=args.seed, split="train",
                                           size=MODEL_CONFIG["image_size"])
    lat_mean, lat_std = encode_all(vae, images)
    before = heldout_recon_l1(vae, args.seed)
    adh_before = reconstruction_adherence(vae)["adherence"]
    log(f"[decoder] fine-tuning the decoder of {src}; held-out-combo recon L1 before {before:.4f}, "
        f"adherence of reconstructions {adh_before:.3f}")
    st = finetune_decoder(vae, images, lat_mean, lat_std, args.decoder_steps, args.vae_batch, args.decoder_lr,
                          gen, args.log_every, deadline, foreground_masks(images, attrs), args.fg_weight)
    after = heldout_recon_l1(vae, args.seed)
    adh_after = reconstruction_adherence(vae)
    log(f"[decoder] after: held-out-combo recon L1 {after:.4f}, adherence of reconstructions "
        f"{adh_after['adherence']:.3f} {adh_after['per_attribute']}")
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(str(out), safe_serialization=True)
    compact_saved(out)
    total = time.time() - t_start
    text = (
        "\n## Decoder fine-tune (second command)\n\n"
        f"Command: `python scripts/train_tiny.py {' '.join(sys.argv[1:])}`\n\n"
        "Only `post_quant_conv` + decoder are trained, on latents of the frozen encoder (the U-Net's latent "
        "space and `scaling_factor` are unchanged).\n\n"
        "| steps | batch | wall time | final L1 / MSE (train) | held-out-combo recon L1 before -> after "
        "| adherence of reconstructions before -> after |\n"
        "|---|---|---|---|---|---|\n"
        f"| {st['steps_done']} (of {args.decoder_steps}) | {args.vae_batch} | {st['seconds']:.0f} s "
        f"(command total {total:.0f} s) | {st['l1']:.4f} / {st['mse']:.5f} | {before:.4f} -> {after:.4f} "
        f"| {adh_before:.3f} -> {adh_after['adherence']:.3f} |\n"
    )
    print(text, flush=True)
    if log_md is not None and log_md.exists():
        log_md.write_text(log_md.read_text() + text)
        log(f"appended to {log_md}")
    log(f"[save] {out}  {dir_size(out) / 1e6:.2f} MB")
    return 0


def continue_unet(args, src: Path, out: Path, log_md: Path | None) -> int:
    """Third training command: more U-Net + text-encoder steps on an already trained pipeline
    (the VAE and its scaling factor stay as they are), with a fresh warm-up + cosine schedule."""
    from diffusers import StableDiffusionPipeline

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed + 3)
    gen = torch.Generator().manual_seed(args.seed + 3)
    t_start = time.time()
    args.deadline = t_start + 60 * args.max_minutes if args.max_minutes else 0.0
    pipe = StableDiffusionPipeline.from_pretrained(str(src), torch_dtype=torch.float32)
    vae, unet, text_encoder, tokenizer = pipe.vae, pipe.unet, pipe.text_encoder, pipe.tokenizer
    vae.eval().requires_grad_(False)
    images, captions, _ = shapes.make_dataset(args.n_train, seed=args.seed, split="train",
                                              size=MODEL_CONFIG["image_size"])
    lat_mean, lat_std = encode_all(vae, images)
    scaling = float(vae.config.scaling_factor)
    log(f"[continue] {src}: {args.unet_steps} more U-Net steps at lr {args.lr}")
    den = train_denoiser(unet, text_encoder, tokenizer, lat_mean, lat_std, captions, scaling, args, gen,
                         checkpoint_saver(out, vae, tokenizer))
    save_pipeline(out, vae, den["ema_te"], tokenizer, den["ema_unet"])
    total = time.time() - t_start
    text = (
        "\n## Continued U-Net training (third command)\n\n"
        f"Command: `python scripts/train_tiny.py {' '.join(sys.argv[1:])}`\n\n"
        "| steps | batch | wall time | final losses (mean of last steps) |\n|---|---|---|---|\n"
        f"| {den['steps_done']} (of {args.unet_steps}) | {args.batch} | {den['seconds']:.0f} s (command total "
        f"{total:.0f} s) | eps MSE {den['mse']:.4f}, min-SNR loss {den['loss_minsnr']:.4f} |\n"
    )
    print(text, flush=True)
    if log_md is not None and log_md.exists():
        log_md.write_text(log_md.read_text() + text)
    log(f"[save] {out}  {dir_size(out) / 1e6:.2f} MB")
    return 0


@torch.no_grad()
def encode_all(vae, images: np.ndarray, batch: int = 256):
    vae.eval()
    means, stds = [], []
    for i in range(0, len(images), batch):
        post = vae.encode(to_tensor(images[i:i + batch])).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    ep = [p for p in ema.parameters()]
    mp = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(ep, mp, 1.0 - decay)


def tokenize(tokenizer, texts: list[str]) -> torch.Tensor:
    return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def save_pipeline(out: Path, vae, text_encoder, tokenizer, unet) -> None:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=DDIMScheduler(**SD15_SCHEDULER), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(str(out), safe_serialization=True)
    compact_saved(out)


def checkpoint_saver(out: Path, vae, tokenizer):
    """Callback for ``train_denoiser``: save the EMA U-Net + text encoder with ``vae`` to ``OUT_ckpt``."""
    def save(ema_unet, ema_te, step: int) -> None:
        p = Path(str(out) + "_ckpt")
        save_pipeline(p, vae, ema_te, tokenizer, ema_unet)
        log(f"[ckpt] step {step} -> {p}")
    return save


def compact_saved(out: Path) -> None:
    """Shrink a saved pipeline to fit the package's 30 MB budget, losslessly for its use.

    * tokenizer: keep the BPE files (vocab.json + merges.txt, 2.2 MB, exactly the project's
      ``clip_tokenizer`` asset) instead of the 3.6 MB ``tokenizer.json``;
    * text encoder: store only the 49408 x hidden token-embedding table as fp16 (all other
      tensors stay fp32); the model config says float32, so ``from_pretrained`` builds an fp32
      model and upcasts it. Only ~40 rows of that table are ever used by the shapes prompts.
    """
    import shutil

    from safetensors.torch import load_file, save_file

    tok = out / "tokenizer"
    if (tok / "tokenizer.json").exists():
        for name in ("vocab.json", "merges.txt"):
            shutil.copyfile(TOKENIZER_DIR / name, tok / name)
        (tok / "tokenizer.json").unlink()
    te = out / "text_encoder" / "model.safetensors"
    sd = load_file(str(te))
    key = next(k for k in sd if k.endswith("token_embedding.weight"))
    if sd[key].dtype == torch.float32:
        sd[key] = sd[key].half()
        save_file({k: v.contiguous() for k, v in sd.items()}, str(te), metadata={"format": "pt"})


def dir_size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def caption_labels(captions: list[str]) -> torch.Tensor:
    """``[N, 5]`` class indices of shapes captions, columns in ``ATTRIBUTE_NAMES`` order (the
    quality classifier's labels)."""
    from ldm_deploy.quality.classifier import ATTRIBUTE_NAMES, attribute_labels

    labels = attribute_labels([shapes.parse_caption(c) for c in captions])
    return torch.stack([labels[name] for name in ATTRIBUTE_NAMES], dim=1)


def attribute_widths() -> list[int]:
    """Number of classes of each attribute, in ``ATTRIBUTE_NAMES`` order."""
    from ldm_deploy.quality.classifier import ATTRIBUTE_NAMES, ATTRIBUTE_VALUES

    return [len(ATTRIBUTE_VALUES[name]) for name in ATTRIBUTE_NAMES]


def attribute_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the five attribute classifiers packed side by side in ``logits``."""
    parts = torch.split(logits, attribute_widths(), dim=1)
    return torch.stack([torch.nn.functional.cross_entropy(p, labels[:, j]) for j, p in enumerate(parts)]).mean()


def train_denoiser(unet, text_encoder, tokenizer, lat_mean, lat_std, captions, scaling: float,
                   args, gen: torch.Generator, ckpt_cb=None) -> dict:
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(**{k: v for k, v in SD15_SCHEDULER.items()
                             if k not in ("set_alpha_to_one", "steps_offset")})
    alphas_cumprod = sched.alphas_cumprod.float()
    snr = alphas_cumprod / (1.0 - alphas_cumprod)
    loss_w = torch.clamp(snr, max=args.min_snr_gamma) / snr  # min-SNR-gamma, epsilon target

    uniq = sorted(set(captions))
    cap_index = {c: i for i, c in enumerate(uniq)}
    cap_ids = torch.tensor([cap_index[c] for c in captions])
    uniq_tokens = tokenize(tokenizer, uniq)
    empty_tokens = tokenize(tokenizer, [""])[0]

    ema_unet = copy.deepcopy(unet).eval().requires_grad_(False)
    ema_te = copy.deepcopy(text_encoder).eval().requires_grad_(False)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    aux_head, aux_labels = None, None
    if args.text_aux_weight > 0:
        aux_labels = caption_labels(uniq)
        aux_head = torch.nn.Linear(text_encoder.config.hidden_size, sum(attribute_widths()))
        params += list(aux_head.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    unet.train()
    text_encoder.train()
    n = len(captions)
    steps, batch = args.unet_steps, args.batch
    t0 = time.time()
    hist: list = []
    aux_hist: list[float] = []
    done = steps
    for step in range(steps):
        if args.deadline and time.time() > args.deadline:
            log(f"[unet] wall-time cap reached: stopping after {step} of {steps} steps")
            done = step
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, args.lr, warmup=min(300, steps // 10 + 1))
        idx = torch.randint(0, n, (batch,), generator=gen)
        z0 = (lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=gen)) * scaling
        tokens = uniq_tokens[cap_ids[idx]].clone()
        drop = torch.rand(batch, generator=gen) < args.cfg_drop
        tokens[drop] = empty_tokens
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=gen)
        zt = sched.add_noise(z0, noise, t)
        enc = text_encoder(tokens)
        cond = enc.last_hidden_state
        pred = unet(zt, t, encoder_hidden_states=cond).sample
        per = (pred - noise).pow(2).mean(dim=(1, 2, 3))
        denoise_loss = (per * loss_w[t]).mean()
        loss = denoise_loss
        if aux_head is not None and bool((~drop).any()):
            aux = attribute_loss(aux_head(enc.pooler_output[~drop]), aux_labels[cap_ids[idx][~drop]])
            loss = loss + args.text_aux_weight * aux
            aux_hist.append(float(aux.detach()))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema_decay, (1.0 + step) / (10.0 + step))
        ema_update(ema_unet, unet, decay)
        ema_update(ema_te, text_encoder, decay)
        hist.append((denoise_loss.item(), per.mean().item()))
        if (step + 1) % args.log_every == 0 or step + 1 == steps:
            h = np.mean(hist[-args.log_every:], axis=0)
            el = time.time() - t0
            log(f"[unet] step {step + 1}/{steps}  loss(minsnr) {h[0]:.4f}  mse {h[1]:.4f}  "
                f"{f'text-aux {np.mean(aux_hist[-args.log_every:]):.3f}  ' if aux_hist else ''}"
                f"lr {opt.param_groups[0]['lr']:.2e}  {el:.0f}s elapsed, "
                f"eta {el / (step + 1) * (steps - step - 1):.0f}s")
        if ckpt_cb is not None and args.ckpt_every and (step + 1) % args.ckpt_every == 0 and step + 1 < steps:
            ckpt_cb(ema_unet, ema_te, step + 1)
    k = min(200, len(hist))
    h = np.mean(hist[-k:], axis=0)
    return dict(loss_minsnr=float(h[0]), mse=float(h[1]), seconds=time.time() - t0,
                text_aux=float(np.mean(aux_hist[-k:])) if aux_hist else None,
                ema_unet=ema_unet, ema_te=ema_te, n_unique_captions=len(uniq), steps_done=done)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help=f"output dir (default {DEFAULT_OUT}; /tmp/tiny_quick with --quick)")
    ap.add_argument("--log-md", type=Path, default=None, help=f"summary markdown (default {DEFAULT_LOG}; none with --quick)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="a few dozen steps, for smoke tests")
    ap.add_argument("--n-train", type=int, default=20000, help="number of pre-rendered training images")
    ap.add_argument("--vae-steps", type=int, default=3000)
    ap.add_argument("--vae-batch", type=int, default=16)
    ap.add_argument("--vae-lr", type=float, default=2e-3)
    ap.add_argument("--kl-weight", type=float, default=1e-5)
    ap.add_argument("--fg-weight", type=float, default=5.0, help="extra reconstruction weight on shape pixels")
    ap.add_argument("--vae-minutes", type=float, default=13.0, help="time budget of the VAE stage (0: none)")
    ap.add_argument("--unet-steps", type=int, default=7500)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--cfg-drop", type=float, default=0.1, help="caption dropout probability")
    ap.add_argument("--min-snr-gamma", type=float, default=5.0)
    ap.add_argument("--text-aux-weight", type=float, default=1.0,
                    help="weight of an auxiliary loss that makes the text encoder's pooled output predict the "
                         "caption's attributes (a linear head used only in training)")
    ap.add_argument("--ema-decay", type=float, default=0.999)
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--ckpt-every", type=int, default=0, help="save an EMA checkpoint every N U-Net steps to OUT_ckpt")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-minutes", type=float, default=53.0,
                    help="safety cap on total wall time: U-Net training stops early (and says so) past it; 0 = none")
    ap.add_argument("--decoder-only", type=Path, default=None, metavar="DIR",
                    help="instead of training from scratch, fine-tune the VAE decoder of the pipeline in DIR "
                         "(encoder, U-Net, text encoder unchanged) and save to --out")
    ap.add_argument("--decoder-steps", type=int, default=1500)
    ap.add_argument("--continue-unet", type=Path, default=None, metavar="DIR",
                    help="train the U-Net + text encoder of the pipeline in DIR for --unet-steps more steps "
                         "(VAE unchanged) and save to --out")
    ap.add_argument("--decoder-lr", type=float, default=5e-4)
    args = ap.parse_args(argv)
    if args.decoder_only is not None:
        if args.quick:
            args.n_train, args.decoder_steps, args.log_every = min(args.n_train, 512), min(args.decoder_steps, 20), 10
        return decoder_only(args, args.decoder_only, args.out or args.decoder_only,
                            args.log_md or (None if args.quick else DEFAULT_LOG))
    if args.continue_unet is not None:
        if args.quick:
            args.n_train, args.unet_steps, args.log_every = min(args.n_train, 512), min(args.unet_steps, 20), 10
        return continue_unet(args, args.continue_unet, args.out or args.continue_unet,
                             args.log_md or (None if args.quick else DEFAULT_LOG))
    if args.quick:
        args.n_train = min(args.n_train, 512)
        args.vae_steps = min(args.vae_steps, 30)
        args.unet_steps = min(args.unet_steps, 40)
        args.log_every = 10
    out = args.out or (Path("/tmp/tiny_quick") if args.quick else DEFAULT_OUT)
    log_md = args.log_md or (None if args.quick else DEFAULT_LOG)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    t_start = time.time()
    args.deadline = t_start + 60 * args.max_minutes if args.max_minutes else 0.0

    vae, unet, text_encoder, tokenizer = build_models()
    counts = dict(vae=nparams(vae), unet=nparams(unet), text_encoder=nparams(text_encoder))
    log(f"params: {counts}  total {sum(counts.values()) / 1e6:.2f}M")

    t = time.time()
    images, captions, attrs = shapes.make_dataset(args.n_train, seed=args.seed, split="train",
                                                  size=MODEL_CONFIG["image_size"])
    masks = foreground_masks(images, attrs)
    t_data = time.time() - t
    log(f"[data] {len(images)} train images rendered in {t_data:.1f}s; e.g. {captions[0]!r}")

    log("[vae] training")
    vae_deadline = t_start + 60 * args.vae_minutes if args.vae_minutes else 0.0
    vae_stats = train_vae(vae, images, args.vae_steps, args.vae_batch, args.vae_lr, args.kl_weight,
                          gen, args.log_every, masks, args.fg_weight, vae_deadline)
    vae.eval().requires_grad_(False)

    t = time.time()
    lat_mean, lat_std = encode_all(vae, images)
    g2 = torch.Generator().manual_seed(args.seed + 1)
    sample = lat_mean + lat_std * torch.randn(lat_mean.shape, generator=g2)
    std = float(sample.std())
    scaling = 1.0 / std
    vae.register_to_config(scaling_factor=scaling)
    t_enc = time.time() - t
    log(f"[latents] {tuple(lat_mean.shape)} encoded in {t_enc:.1f}s; latent mean {float(sample.mean()):.3f} "
        f"std {std:.4f} -> scaling_factor {scaling:.5f}; mean posterior std {float(lat_std.mean()):.4f}")
    # reconstruction error on held-out-combo images (never seen by the VAE)
    with torch.no_grad():
        him, _, _ = shapes.make_dataset(64, seed=args.seed + 99, split="heldout", size=MODEL_CONFIG["image_size"])
        xh = to_tensor(him)
        rec = vae.decode(vae.encode(xh).latent_dist.mean).sample.clamp(-1, 1)
        vae_heldout_l1 = float((rec - xh).abs().mean())
    log(f"[vae] heldout-combo reconstruction L1 {vae_heldout_l1:.4f} (in [-1,1] units)")
    vae_adherence = reconstruction_adherence(vae)
    log(f"[vae] reconstructions of the 200 evaluation prompts' renders: attribute adherence "
        f"{vae_adherence['adherence']:.3f} {vae_adherence['per_attribute']}")

    log("[unet] training U-Net + text encoder")
    den = train_denoiser(unet, text_encoder, tokenizer, lat_mean, lat_std, captions, scaling, args, gen,
                         checkpoint_saver(out, vae, tokenizer))

    save_pipeline(out, vae, den["ema_te"], tokenizer, den["ema_unet"])
    total = time.time() - t_start
    size = dir_size(out)
    log(f"[save] {out}  {size / 1e6:.2f} MB")

    cfg_public = {k: vars(args)[k] for k in ("seed", "n_train", "vae_steps", "vae_batch", "vae_lr", "kl_weight", "fg_weight", "vae_minutes",
                                             "unet_steps", "batch", "lr", "cfg_drop", "min_snr_gamma", "text_aux_weight", "ema_decay",
                                             "max_minutes")}
    aux_note = "" if den["text_aux"] is None else f", text-attribute loss {den['text_aux']:.4f}"
    lines = [
        "# train_tiny: tiny SD1.5-family model on procedural shapes",
        "",
        f"Command: `python scripts/train_tiny.py {' '.join(argv if argv is not None else sys.argv[1:])}`".rstrip(),
        "",
        f"Machine: {platform.machine()} {platform.processor() or ''} {os.cpu_count()} CPU cores, "
        f"torch {torch.__version__} ({args.threads} threads), python {platform.python_version()}",
        "",
        f"Output: `{out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}` ({size / 1e6:.2f} MB, fp32 safetensors)",
        "",
        "## Parameters",
        "",
        "| component | params |",
        "|---|---|",
        *[f"| {k} | {v / 1e6:.3f} M |" for k, v in counts.items()],
        f"| total | {sum(counts.values()) / 1e6:.3f} M |",
        "",
        "## Training config",
        "",
        "```json",
        json.dumps(dict(train=cfg_public, model=MODEL_CONFIG, scheduler=SD15_SCHEDULER), indent=1),
        "```",
        "",
        "## Results",
        "",
        "| stage | steps | wall time | final losses (mean of last steps) |",
        "|---|---|---|---|",
        f"| data | {args.n_train} images | {t_data:.0f} s | |",
        f"| VAE | {vae_stats['steps_done']} (of {args.vae_steps}) x {args.vae_batch} | {vae_stats['seconds']:.0f} s | "
        f"L1 {vae_stats['l1']:.4f}, MSE {vae_stats['mse']:.5f}, KL {vae_stats['kl']:.2f}; "
        f"held-out-combo recon L1 {vae_heldout_l1:.4f}; adherence of reconstructions "
        f"{vae_adherence['adherence']:.3f} |",
        f"| latents | scaling_factor {scaling:.5f} (latent std {std:.4f}) | {t_enc:.0f} s | |",
        f"| U-Net + text encoder | {den['steps_done']} (of {args.unet_steps}) x {args.batch} | {den['seconds']:.0f} s | "
        f"eps MSE {den['mse']:.4f}, min-SNR loss {den['loss_minsnr']:.4f}{aux_note} |",
        f"| total | | {total:.0f} s ({total / 60:.1f} min) | |",
        "",
        f"{den['n_unique_captions']} distinct training captions; held-out (shape, colour) combos: "
        f"{sorted(shapes.HELDOUT)}.",
    ]
    text = "\n".join(lines) + "\n"
    print(text, flush=True)
    if log_md is not None:
        log_md.parent.mkdir(parents=True, exist_ok=True)
        log_md.write_text(text)
        log(f"summary written to {log_md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
