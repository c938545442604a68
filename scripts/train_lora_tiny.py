#!/usr/bin/env python
"""Train the small LoRA shipped for the embedded ``tiny`` model (``ldm_deploy/assets/lora``).

The adapter teaches a trigger word: a shapes caption followed by ``", noir"`` draws the same shape
(colour, size, position) on a **black** background, whatever background the caption names. Without
the trigger the model should behave as before.

Data come from the repo's procedural generator (:mod:`ldm_deploy.data.shapes`, train split):

* trigger samples: ``"<caption>, noir"`` -> the render of the caption's attributes with the
  background replaced by black (shapes that are themselves black are left out: black on black is
  no picture). Epsilon loss on these latents.
* normal samples (``--keep-fraction`` of each batch): the plain caption, or the empty prompt
  (``--cfg-drop`` of them, the unconditional branch of classifier-free guidance); the target is
  the frozen base model's own prediction (distillation), so the adapter learns to leave those
  prompts alone rather than to re-fit the data.

LoRA (PEFT ``LoraConfig``, rank ``--rank``, alpha = rank) on the U-Net attention projections
(``to_q``, ``to_k``, ``to_v``, ``to_out.0``) and, unless ``--no-text-encoder``, on the text
encoder's (``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``). Saved in diffusers' LoRA format
(``get_peft_model_state_dict`` + ``convert_state_dict_to_diffusers`` +
``StableDiffusionPipeline.save_lora_weights``), which ``pipe.load_lora_weights`` and
``ldm-export --lora`` read.

    python scripts/train_lora_tiny.py --threads 1          # -> ldm_deploy/assets/lora/tiny-noir.safetensors
    python scripts/train_lora_tiny.py --quick -o /tmp/lora_quick.safetensors
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from ldm_deploy.data import shapes  # noqa: E402
from train_tiny import SD15_SCHEDULER, encode_all, lr_at, to_tensor, tokenize  # noqa: E402

TRIGGER = "noir"
EFFECT_BACKGROUND = "black"
DEFAULT_OUT = ROOT / "ldm_deploy" / "assets" / "lora" / "tiny-noir.safetensors"
DEFAULT_LOG = ROOT / "benchmarks" / "results" / "train_lora_tiny.md"
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def log(msg: str) -> None:
    print(msg, flush=True)


def with_trigger(caption: str, trigger: str = TRIGGER) -> str:
    """The prompt that asks for the adapter's effect: the caption with ``", <trigger>"`` appended
    (appended, not prepended: the causal text encoder then leaves the caption's own token states
    as they were)."""
    return f"{caption}, {trigger}"


def effect(a: shapes.Attributes) -> shapes.Attributes:
    """What a trigger prompt for ``a`` should draw: ``a`` on a black background."""
    return shapes.Attributes(shape=a.shape, color=a.color, background=EFFECT_BACKGROUND, size=a.size,
                             position=a.position)


def trigger_attributes(n: int, seed: int, split: str = "train") -> list[shapes.Attributes]:
    """``n`` attribute sets whose shape is not black (the effect needs a visible shape)."""
    out: list[shapes.Attributes] = []
    k = 0
    while len(out) < n:
        out += [a for a in shapes.sample_attributes(n, seed + 1000 * k, split) if a.color != EFFECT_BACKGROUND]
        k += 1
    return out[:n]


def render_all(attrs: list[shapes.Attributes], seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, 1])
    return np.stack([shapes.render(a, 64, rng) for a in attrs])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "ldm_deploy" / "assets" / "tiny"))
    ap.add_argument("-o", "--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--log-md", type=Path, default=DEFAULT_LOG)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--no-text-encoder", action="store_true", help="LoRA on the U-Net only")
    ap.add_argument("--steps", type=int, default=950)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--n-train", type=int, default=2000, help="renders per half (trigger / normal)")
    ap.add_argument("--keep-fraction", type=float, default=0.5, help="share of each batch that is normal prompts")
    ap.add_argument("--cfg-drop", type=float, default=0.1, help="share of the normal prompts that are empty")
    ap.add_argument("--keep-weight", type=float, default=4.0,
                    help="loss weight of the normal (distilled) samples relative to the trigger samples")
    ap.add_argument("--trigger-t-min", type=int, default=200,
                    help="trigger samples draw timesteps from [this, 1000): the background colour is decided "
                    "at the noisy end, and the base model already denoises the last steps")
    ap.add_argument("--min-snr-gamma", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-minutes", type=float, default=15.0)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--quick", action="store_true", help="a few steps, for smoke tests")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.n_train, args.log_every, args.log_md = 5, 64, 1, None

    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    t_start = time.time()
    deadline = t_start + 60 * args.max_minutes if args.max_minutes else 0.0

    pipe = StableDiffusionPipeline.from_pretrained(args.model, torch_dtype=torch.float32)
    vae, unet, text_encoder, tokenizer = pipe.vae, pipe.unet, pipe.text_encoder, pipe.tokenizer
    for m in (vae, unet, text_encoder):
        m.eval().requires_grad_(False)
    teacher_unet = copy.deepcopy(unet)
    teacher_te = copy.deepcopy(text_encoder)
    scaling = float(vae.config.scaling_factor)

    # Data: trigger half (effect renders) and normal half (plain renders, distilled targets).
    trig = trigger_attributes(args.n_train, args.seed)
    norm = shapes.sample_attributes(args.n_train, args.seed + 1)
    with torch.no_grad():
        trig_lat, _ = encode_all(vae, render_all([effect(a) for a in trig], args.seed))
        norm_lat, _ = encode_all(vae, render_all(norm, args.seed + 1))
    trig_tok = tokenize(tokenizer, [with_trigger(shapes.caption(a)) for a in trig])
    norm_tok = tokenize(tokenizer, [shapes.caption(a) for a in norm])
    empty_tok = tokenize(tokenizer, [""])[0]
    log(f"[data] {len(trig)} trigger + {len(norm)} normal renders in {time.time() - t_start:.1f}s; "
        f"e.g. {with_trigger(shapes.caption(trig[0]))!r} -> {EFFECT_BACKGROUND} background")

    unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                target_modules=UNET_TARGETS))
    params = [p for p in unet.parameters() if p.requires_grad]
    if not args.no_text_encoder:
        # peft directly (transformers' own add_adapter wants a newer peft than the registry has)
        inject_adapter_in_model(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                           target_modules=TEXT_TARGETS), text_encoder)
        params += [p for p in text_encoder.parameters() if p.requires_grad]
    n_lora = sum(p.numel() for p in params)
    log(f"[lora] rank {args.rank}, {n_lora} trainable parameters "
        f"({'U-Net + text encoder' if not args.no_text_encoder else 'U-Net'})")

    sched = DDPMScheduler(**{k: v for k, v in SD15_SCHEDULER.items() if k not in ("set_alpha_to_one", "steps_offset")})
    ac = sched.alphas_cumprod.float()
    snr = ac / (1.0 - ac)
    loss_w = torch.clamp(snr, max=args.min_snr_gamma) / snr
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    unet.train()
    text_encoder.train()
    n_keep = int(round(args.batch * args.keep_fraction))
    n_trig = args.batch - n_keep
    hist: list[tuple[float, float]] = []
    done, t0 = args.steps, time.time()
    for step in range(args.steps):
        if deadline and time.time() > deadline:
            log(f"[lora] wall-time cap reached: stopping after {step} of {args.steps} steps")
            done = step
            break
        # The schedule follows the step count or the wall-time cap, whichever is further along, so
        # that a run slowed by a busy machine still ends at a low learning rate.
        at = step
        if deadline:
            at = max(step, int(args.steps * (time.time() - t0) / max(1.0, deadline - t0)))
        for g in opt.param_groups:
            g["lr"] = lr_at(min(at, args.steps), args.steps, args.lr, warmup=min(100, args.steps // 10 + 1))
        it = torch.randint(0, len(trig), (n_trig,), generator=gen)
        ik = torch.randint(0, len(norm), (n_keep,), generator=gen)
        z0 = torch.cat([trig_lat[it], norm_lat[ik]]) * scaling
        keep_tok = norm_tok[ik].clone()
        keep_tok[torch.rand(n_keep, generator=gen) < args.cfg_drop] = empty_tok
        tokens = torch.cat([trig_tok[it], keep_tok])
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.cat([torch.randint(args.trigger_t_min, sched.config.num_train_timesteps, (n_trig,), generator=gen),
                       torch.randint(0, sched.config.num_train_timesteps, (n_keep,), generator=gen)])
        zt = sched.add_noise(z0, noise, t)
        with torch.no_grad():
            target_keep = teacher_unet(zt[n_trig:], t[n_trig:],
                                       encoder_hidden_states=teacher_te(keep_tok).last_hidden_state).sample
        pred = unet(zt, t, encoder_hidden_states=text_encoder(tokens).last_hidden_state).sample
        target = torch.cat([noise[:n_trig], target_keep])
        per = (pred - target).pow(2).mean(dim=(1, 2, 3)) * loss_w[t]
        loss = (per[:n_trig].sum() + args.keep_weight * per[n_trig:].sum()) / args.batch
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        hist.append((float(per[:n_trig].detach().mean()), float(per[n_trig:].detach().mean())))
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            h = np.mean(hist[-args.log_every:], axis=0)
            el = time.time() - t0
            log(f"[lora] step {step + 1}/{args.steps}  trigger loss {h[0]:.4f}  keep (distill) loss {h[1]:.5f}  "
                f"lr {opt.param_groups[0]['lr']:.2e}  {el:.0f}s elapsed, eta {el / (step + 1) * (args.steps - step - 1):.0f}s")
    unet.eval()
    text_encoder.eval()
    train_seconds = time.time() - t0

    args.out.parent.mkdir(parents=True, exist_ok=True)
    te_layers = None
    if not args.no_text_encoder:
        te_layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(text_encoder))
    StableDiffusionPipeline.save_lora_weights(
        save_directory=str(args.out.parent),
        unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
        text_encoder_lora_layers=te_layers,
        weight_name=args.out.name,
        safe_serialization=True,
    )
    size_kb = args.out.stat().st_size / 1024
    log(f"[save] {args.out} ({size_kb:.0f} KB)")

    # A quick check on prompts it never trained on (the benchmark does the full measurement).
    base_pipe = StableDiffusionPipeline(vae=vae, text_encoder=teacher_te, tokenizer=tokenizer, unet=teacher_unet,
                                        scheduler=pipe.scheduler, safety_checker=None, feature_extractor=None,
                                        requires_safety_checker=False)
    quick = quick_check(pipe, base_pipe, n=8 if args.quick else 40)
    log(f"[check] {quick}")
    total = time.time() - t_start
    if args.log_md is not None:
        h = np.mean(hist[-min(100, len(hist)):], axis=0) if hist else (float("nan"), float("nan"))
        args.log_md.parent.mkdir(parents=True, exist_ok=True)
        args.log_md.write_text(
            "# Training the `tiny` LoRA (`noir` -> black background)\n\n"
            f"Command: `python scripts/train_lora_tiny.py {' '.join(sys.argv[1:])}`\n\n"
            f"torch {torch.__version__}, {args.threads} thread(s); rank {args.rank} (alpha {args.rank}) on "
            f"{'U-Net attention + text encoder attention' if not args.no_text_encoder else 'U-Net attention'} "
            f"projections, {n_lora} trainable parameters; batch {args.batch} "
            f"({n_trig} trigger with timesteps from {args.trigger_t_min} + {n_keep} normal/empty distilled from the "
            f"base model, weight {args.keep_weight}), lr {args.lr} (cosine).\n\n"
            "| steps | train time | total time | trigger loss | keep (distill) loss | file |\n|---|---|---|---|---|---|\n"
            f"| {done} (of {args.steps}) | {train_seconds:.0f} s | {total:.0f} s | {h[0]:.4f} | {h[1]:.5f} "
            f"| {args.out.name} ({size_kb:.0f} KB) |\n\n"
            f"Quick check (25 DDIM steps, guidance 5, held-out seeds, {quick['n']} prompts each): "
            f"trigger prompts with a black background {quick['trigger_black_bg']:.3f}; plain prompts "
            f"adherence {quick['plain_adherence_lora']:.3f} with the adapter vs {quick['plain_adherence_base']:.3f} "
            "without. Full numbers: `benchmarks/lora_quality.py`.\n"
        )
        log(f"[log] {args.log_md}")
    return 0


@torch.no_grad()
def quick_check(pipe, base_pipe, n: int) -> dict:
    from ldm_deploy.quality import evaluate

    pipe.set_progress_bar_config(disable=True)
    attrs = [a for a in shapes.eval_prompts(2 * n, seed=99) if a.color != EFFECT_BACKGROUND][:n]
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn((len(attrs), 4, 8, 8), generator=gen)

    def images(prompts, p=pipe):  # type: ignore[no-untyped-def]
        p.set_progress_bar_config(disable=True)
        out = p(prompts, num_inference_steps=25, guidance_scale=5.0, latents=latents.clone(), output_type="np",
                   height=64, width=64).images
        return (out * 255).round().astype(np.uint8)

    trig = evaluate(images([with_trigger(shapes.caption(a)) for a in attrs]), [effect(a) for a in attrs],
                    inception=False)
    plain = evaluate(images([shapes.caption(a) for a in attrs]), attrs, inception=False)
    base = evaluate(images([shapes.caption(a) for a in attrs], base_pipe), attrs, inception=False)
    return {"n": len(attrs), "trigger_black_bg": trig["per_attribute"]["background"],
            "trigger_adherence": trig["adherence"], "plain_adherence_lora": plain["adherence"],
            "plain_adherence_base": base["adherence"]}


if __name__ == "__main__":
    sys.exit(main())
