"""Quality runs: the prompt set, the per-prompt initial latents, image generation in fixed chunks
(the same chunks locally and on Ray, so sharding cannot change an image), and scoring through
:mod:`ldm_deploy.quality` (adherence, domain FID, PSNR/SSIM vs the reference variant, Inception FID
and CLIP score when their weights are on disk)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

#: Environment variable that may point at a local CLIP model directory (transformers format).
CLIP_MODEL_ENV = "LDM_DEPLOY_CLIP_MODEL"


def quality_prompts(q: dict[str, Any]) -> list[str]:
    """The ``n`` prompts of a ``[quality]`` table: the procedural shapes set or the file's first n."""
    if q["prompts"] == "shapes":
        from ..data.shapes import caption, eval_prompts

        return [caption(a) for a in eval_prompts(q["n"], seed=q["prompt_seed"])]
    from .suite import read_prompts

    return read_prompts(Path(q["prompts"]))[: q["n"]]


def initial_latents(seeds: Sequence[int], channels: int, height: int, width: int) -> np.ndarray:
    """One standard-normal latent per seed, ``[len(seeds), channels, height, width]`` float32."""
    return np.stack([np.random.default_rng(int(s)).standard_normal((channels, height, width)).astype(np.float32)
                     for s in seeds])


def chunks(n: int, batch: int, seed: int) -> list[tuple[int, int, list[int]]]:
    """``(start, stop, seeds)`` of each generation call: prompt i always gets seed ``seed + i`` and
    always lands in the same chunk, whoever generates it."""
    return [(s, min(s + batch, n), list(range(seed + s, seed + min(s + batch, n)))) for s in range(0, n, batch)]


def generate_chunks(runner: Any, prompts: list[str], parts: list[tuple[int, int, list[int]]], steps: int,
                    guidance: float, height: int, width: int, on_chunk: Callable[[], None] | None = None) -> np.ndarray:
    """uint8 images ``[sum of chunk sizes, H, W, 3]`` for the given chunks, in order."""
    out = []
    for start, stop, seeds in parts:
        lat = initial_latents(seeds, runner.latent_channels, height // runner.vae_scale, width // runner.vae_scale)
        out.append(runner.generate(prompts[start:stop], lat, steps, guidance))
        if on_chunk:
            on_chunk()
    return np.concatenate(out) if out else np.empty((0, height, width, 3), np.uint8)


# --------------------------------------------------------------------------- scoring


def _load_image_dir(path: Path, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
    if len(files) < 2:
        raise ValueError(f"{path} holds fewer than 2 images")
    imgs = [np.asarray(Image.open(f).convert("RGB").resize((size[1], size[0]), Image.BICUBIC)) for f in files]
    return np.stack(imgs).astype(np.uint8)


def clip_score(images: np.ndarray, prompts: list[str], model_dir: str | None) -> tuple[float | None, str]:
    """Mean CLIP score (100 x cosine, floored at 0) of images vs their prompts with a local CLIP
    model (``model_dir``, else ``$LDM_DEPLOY_CLIP_MODEL``); ``(None, reason)`` without one."""
    path = model_dir or os.environ.get(CLIP_MODEL_ENV, "")
    if not path:
        return None, f"no local CLIP model (set quality.clip_model or ${CLIP_MODEL_ENV})"
    if not (Path(path) / "config.json").is_file():
        return None, f"{path} is not a transformers CLIP model directory (no config.json)"
    import torch
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(path).eval()
    proc = CLIPProcessor.from_pretrained(path)
    scores = []
    with torch.no_grad():
        for s in range(0, len(images), 16):
            inp = proc(text=prompts[s:s + 16], images=list(images[s:s + 16]), return_tensors="pt", padding=True,
                       truncation=True)
            out = model(input_ids=inp["input_ids"], attention_mask=inp["attention_mask"],
                        pixel_values=inp["pixel_values"])
            cos = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds)
            scores.append(100 * cos.clamp(min=0))
    return float(torch.cat(scores).mean()), f"CLIP model {path}"


def score(images: np.ndarray, prompts: list[str], q: dict[str, Any], reference: np.ndarray | None,
          classifier: Any = None) -> dict[str, Any]:
    """Metrics of one variant's images. Shapes prompts: the harness's adherence, domain FID,
    PSNR/SSIM and Inception FID (vs real renders). Prompt files: PSNR/SSIM vs the reference
    variant and Inception FID vs ``reference_images`` (else vs the reference variant)."""
    from ..quality import psnr, ssim

    if q["prompts"] == "shapes":
        from ..quality.harness import evaluate

        res = evaluate(images, prompts, reference_images=reference, classifier=classifier, inception=q["inception"])
        res["inception_fid_vs"] = "real renders of the same prompts"
    else:
        res = {"n": len(images)}
        if reference is not None:
            res["psnr"], res["ssim"] = psnr(images, reference), ssim(images, reference)
        res.update(_file_prompt_fid(images, q, reference))
    res["clip_score"], res["clip_score_note"] = clip_score(images, prompts, q["clip_model"] or None)
    for k in ("predictions", "correct"):
        res.pop(k, None)
    return res


def _file_prompt_fid(images: np.ndarray, q: dict[str, Any], reference: np.ndarray | None) -> dict[str, Any]:
    from ..quality.harness import inception_fid

    if not q["inception"]:
        return {"inception_fid": None, "inception_fid_note": "not requested"}
    if q["reference_images"]:
        real, vs = _load_image_dir(Path(q["reference_images"]), images.shape[1:3]), q["reference_images"]
    elif reference is not None:
        real, vs = reference, f"the reference variant {q['reference']!r}"
    elif q["reference"]:
        return {"inception_fid": None, "inception_fid_note": "the reference variant itself"}
    else:
        return {"inception_fid": None, "inception_fid_note": "no reference_images and no reference variant"}
    try:
        return {"inception_fid": inception_fid(images, real), "inception_fid_note": "Inception-v3 pool3",
                "inception_fid_vs": vs}
    except (RuntimeError, ValueError) as e:
        return {"inception_fid": None, "inception_fid_note": str(e)}
