"""Text-to-image and image-to-image with DDIM + classifier-free guidance over exported graphs.

Torch-free: numpy, ONNX Runtime, tokenizers and Pillow. One ``Pipeline`` may be shared by
threads: every call keeps its own scheduler, random generator and buffers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..artifact import Artifact
from ..errors import LdmDeployError
from ..specs import ShapeRanges
from .components import OnnxComponent
from .image import to_model_image, to_pil
from .memory import limit_heap_retention, release_free_heap
from .scheduler import DDIMScheduler
from .tokenizer import ClipTokenizer


@dataclass
class GenerationOutput:
    """``images``: PIL images, or float32 [N, H, W, 3] in [0, 1] for ``output_type="np"``."""

    images: Any
    timings: dict[str, float] = field(default_factory=dict)


class Pipeline:
    """The SD sampling loop over one artifact's ONNX graphs."""

    def __init__(self, artifact: Artifact, components: dict[str, OnnxComponent], tokenizer: ClipTokenizer):
        self.artifact = artifact
        self.components = components
        self.tokenizer = tokenizer
        m = artifact.manifest
        self.scheduler_config: dict[str, Any] = _read_json(artifact.path / "scheduler" / "scheduler_config.json")
        self.ranges: ShapeRanges = artifact.shape_ranges
        dims = m["model_dims"]
        self.vae_scale = int(dims["vae_scale"])
        self.latent_channels = int(dims["latent_channels"])
        self.scaling_factor = float(dims["vae_scaling_factor"])
        self.size_multiple = int(self.ranges.size_multiple)
        self.default_size = (self.ranges.image_height[1], self.ranges.image_width[1])

    @classmethod
    def load(
        cls,
        path: str | Path,
        provider: str = "cpu",
        provider_options: dict[str, Any] | None = None,
        threads: int = 0,
        verify: bool = True,
        components: Sequence[str] = ("text_encoder", "unet", "vae_decoder", "vae_encoder"),
        backend: str = "onnxruntime",
        low_memory: bool = False,
    ) -> "Pipeline":
        """Open an artifact and create one session per component.

        ``verify`` checks every file of the loaded components against the manifest's sha256.
        ``vae_encoder`` is loaded only if the artifact has it (img2img needs it).
        ``backend``: "onnxruntime" (sessions on ``provider``) or "tensorrt" (the engines built into
        the artifact by ``ldm-build`` for this GPU; ``provider``/``threads`` are ignored).
        ``low_memory``: ONNX Runtime sessions without the CPU memory arena, and freed activation
        memory returned to the OS promptly (:mod:`ldm_deploy.runtime.memory`, a process-wide glibc
        setting): a lower resident peak when one process serves many image sizes, at the cost of
        slower steps (see :func:`~ldm_deploy.runtime.sessions.session_options`)."""
        if low_memory:
            limit_heap_retention()
        art = Artifact.open(path)
        wanted = [c for c in components if c in art.components or c != "vae_encoder"]
        if verify:
            art.verify([f for c in wanted for f in art.component_files(c)] + _tokenizer_files(art))
        if backend == "tensorrt":
            from ..tensorrt.engine import load_components

            loaded = load_components(art, wanted)
        elif backend == "onnxruntime":
            loaded = {
                c: OnnxComponent.load(art.spec(c), art.model_file(c), provider, provider_options, threads, low_memory)
                for c in wanted
            }
        else:
            raise LdmDeployError(f"unknown backend {backend!r}: choose onnxruntime or tensorrt")
        return cls(art, loaded, ClipTokenizer.from_dir(art.path / "tokenizer"))

    # --- the call ---------------------------------------------------------------------------
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = 25,
        guidance_scale: float = 7.5,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        seed: int | None = None,
        latents: np.ndarray | None = None,
        eta: float = 0.0,
        image: Any = None,
        strength: float = 0.8,
        output_type: str = "pil",
        progress: bool | Callable[[int, int], None] = False,
    ) -> GenerationOutput:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if image is not None:
            image_h, image_w = image_size(image)
            height, width = height or image_h, width or image_w
        height, width = height or self.default_size[0], width or self.default_size[1]
        self._check_args(prompts, num_inference_steps, guidance_scale, height, width, num_images_per_prompt,
                         strength, image, output_type, eta)
        rng = np.random.default_rng(seed)
        cfg = guidance_scale > 1.0
        batch = len(prompts) * num_images_per_prompt
        timings: dict[str, float] = {}

        t0 = time.perf_counter()
        cond = self.encode_prompt(prompts, num_images_per_prompt)
        if cfg:
            negatives = _broadcast(negative_prompt, len(prompts), "negative_prompt")
            uncond = self.encode_prompt(negatives, num_images_per_prompt)
            context = np.concatenate([uncond, cond])
        else:
            context = cond
        timings["text_encoder"] = time.perf_counter() - t0

        scheduler = DDIMScheduler.from_config(self.scheduler_config)
        latent_shape = (batch, self.latent_channels, height // self.vae_scale, width // self.vae_scale)
        if image is not None:
            t0 = time.perf_counter()
            timesteps = scheduler.img2img_timesteps(num_inference_steps, strength)
            init = self.encode_image(image, height, width, rng, batch)
            noise = rng.standard_normal(latent_shape).astype(np.float32)
            latents = scheduler.add_noise(init, noise, timesteps[:1]).astype(np.float32)
            timings["vae_encoder"] = time.perf_counter() - t0
        else:
            scheduler.set_timesteps(num_inference_steps)
            timesteps = scheduler.timesteps
            if latents is None:
                latents = rng.standard_normal(latent_shape).astype(np.float32)
            else:
                latents = np.asarray(latents, dtype=np.float32)
                if latents.shape != latent_shape:
                    raise LdmDeployError(f"latents have shape {latents.shape}, expected {latent_shape}")
            latents = latents * np.float32(scheduler.init_noise_sigma)

        unet = self.components["unet"]
        step_unet = step_other = 0.0
        bar = _progress_bar(progress, len(timesteps))
        bound = unet.device_binding(encoder_hidden_states=context) if unet.device != "cpu" else None
        for i, t in enumerate(timesteps):
            t0 = time.perf_counter()
            model_in = np.concatenate([latents, latents]) if cfg else latents
            ts = np.array([t], dtype=np.float32)
            if bound is not None:
                noise_pred = bound.run(sample=model_in, timestep=ts)
            else:
                noise_pred = unet(sample=model_in, timestep=ts, encoder_hidden_states=context)
            t1 = time.perf_counter()
            if not np.isfinite(noise_pred).all():
                raise LdmDeployError(f"the U-Net produced NaN/Inf at step {i + 1} (timestep {int(t)})")
            if cfg:
                uncond_pred, cond_pred = np.split(noise_pred, 2)
                noise_pred = uncond_pred + np.float32(guidance_scale) * (cond_pred - uncond_pred)
            latents = scheduler.step(noise_pred, int(t), latents, eta=eta, generator=rng if eta > 0 else None)
            t2 = time.perf_counter()
            step_unet += t1 - t0
            step_other += t2 - t1
            bar(i + 1)
        timings["unet"] = step_unet
        timings["scheduler_and_guidance"] = step_other
        timings["steps"] = len(timesteps)

        t0 = time.perf_counter()
        release_free_heap()
        decoded = self.decode(latents)
        timings["vae_decoder"] = time.perf_counter() - t0
        images = np.clip(decoded / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)
        return GenerationOutput(to_pil(images) if output_type == "pil" else images, timings)

    # --- pieces, usable on their own ----------------------------------------------------------
    def encode_prompt(self, prompts: list[str], num_images_per_prompt: int = 1) -> np.ndarray:
        ids = self.tokenizer(prompts)
        emb = self.components["text_encoder"](input_ids=ids)
        return np.repeat(emb, num_images_per_prompt, axis=0)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        image = self.components["vae_decoder"](latent=latents / np.float32(self.scaling_factor))
        if not np.isfinite(image).all():
            raise LdmDeployError("the VAE decoder produced NaN/Inf")
        return image

    def encode_image(self, image: Any, height: int, width: int, rng: np.random.Generator, batch: int) -> np.ndarray:
        if "vae_encoder" not in self.components:
            raise LdmDeployError("this artifact has no vae_encoder: img2img is not available")
        pixels = to_model_image(image, height, width)
        params = self.components["vae_encoder"](image=pixels)
        mean, logvar = np.split(params, 2, axis=1)
        std = np.exp(0.5 * np.clip(logvar, -30.0, 20.0))
        sample = mean + std * rng.standard_normal(mean.shape).astype(np.float32)
        sample = sample * np.float32(self.scaling_factor)
        if sample.shape[0] != batch:
            sample = np.repeat(sample, batch // sample.shape[0], axis=0)
        return sample.astype(np.float32)

    def _check_args(self, prompts, steps, guidance, height, width, num_images, strength, image, output_type, eta):  # type: ignore[no-untyped-def]
        if not prompts:
            raise LdmDeployError("prompt list is empty")
        if int(steps) != steps or steps < 1:
            raise LdmDeployError(f"num_inference_steps must be an integer >= 1, got {steps}")
        if not np.isfinite(guidance) or guidance < 0:
            raise LdmDeployError(f"guidance_scale must be >= 0, got {guidance}")
        if eta < 0:
            raise LdmDeployError(f"eta must be >= 0, got {eta}")
        if num_images < 1:
            raise LdmDeployError(f"num_images_per_prompt must be >= 1, got {num_images}")
        if image is not None and not 0.0 < strength <= 1.0:
            raise LdmDeployError(f"strength must be in (0, 1], got {strength}")
        if output_type not in ("pil", "np"):
            raise LdmDeployError(f"output_type must be 'pil' or 'np', got {output_type!r}")
        for label, v, axis in (("height", height, "image_height"), ("width", width, "image_width")):
            if v % 8:
                raise LdmDeployError(f"{label} {v} is not a multiple of 8")
            if v % self.size_multiple:
                raise LdmDeployError(f"{label} {v} is not a multiple of {self.size_multiple} (required by this model)")
            lo, _, hi = self.ranges.axes()[axis]
            if not lo <= v <= hi:
                raise LdmDeployError(f"{label} {v} is outside the artifact's exported range [{lo}, {hi}]")
        batch = len(prompts) * num_images
        lo, _, hi = self.ranges.batch
        if batch > hi:
            raise LdmDeployError(f"{batch} images per call exceed the artifact's max batch {hi}")


def image_size(image: Any) -> tuple[int, int]:
    """(height, width) of a PIL image or HxWxC array, rounded down to a multiple of 8."""
    w, h = image.size if hasattr(image, "size") and not isinstance(image, np.ndarray) else (image.shape[-2], image.shape[-3])
    return (h // 8 * 8, w // 8 * 8)


def _broadcast(value: str | list[str] | None, n: int, label: str) -> list[str]:
    if value is None:
        return [""] * n
    if isinstance(value, str):
        return [value] * n
    if len(value) != n:
        raise LdmDeployError(f"{label} has {len(value)} entries for {n} prompts")
    return list(value)


def _progress_bar(progress: bool | Callable[[int, int], None], total: int) -> Callable[[int], None]:
    if callable(progress):
        return lambda i: progress(i, total)  # type: ignore[operator]
    if not progress:
        return lambda i: None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc="denoising", unit="step", leave=False)

    def update(i: int) -> None:
        bar.update(1)
        if i == total:
            bar.close()

    return update


def _tokenizer_files(art: Artifact) -> list[str]:
    return [rel for rel in art.manifest.get("files", {}) if rel.startswith(("tokenizer/", "scheduler/"))]


def _read_json(path: Path) -> dict[str, Any]:
    import json

    if not path.is_file():
        raise LdmDeployError(f"artifact file {path} is missing")
    return json.loads(path.read_text())
