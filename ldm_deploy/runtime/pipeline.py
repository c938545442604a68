"""Text-to-image and image-to-image with a numpy scheduler (DDIM, DPM-Solver++, Euler) + classifier-free
guidance over exported graphs.

Torch-free: numpy, ONNX Runtime, tokenizers and Pillow. One ``Pipeline`` may be shared by
threads: every call keeps its own scheduler, random generator, buffers and observer; nothing in
a call modifies the pipeline.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..artifact import Artifact, read_json_object
from ..errors import LdmDeployError
from ..specs import ShapeRanges
from .backends import LoadOptions, check_artifact_backend, get_backend
from .components import Component
from .image import check_image, to_model_image, to_pil
from .memory import limit_heap_retention, release_free_heap
from .feature_cache import CachedUNet, check_cache_interval
from .scheduler import make_scheduler
from .tokenizer import ClipTokenizer


@dataclass
class GenerationOutput:
    """``images``: PIL images, or float32 [N, H, W, 3] in [0, 1] for ``output_type="np"``.
    ``timings``: seconds per phase; ``steps``: denoising steps run."""

    images: Any
    timings: dict[str, float] = field(default_factory=dict)
    steps: int = 0


@dataclass(frozen=True)
class StepInfo:
    """What one denoising step saw and produced (read-only: observers must not modify it)."""

    index: int  # 0-based step number
    total: int  # steps in this call
    timestep: float
    unet_inputs: Mapping[str, np.ndarray]  # exactly what the U-Net graph was given
    noise_pred: np.ndarray  # after classifier-free guidance
    latents: np.ndarray  # after the scheduler step
    graph: str = "unet"  # the U-Net graph that ran: "unet" or (feature caching) "unet_shallow"
    cache_feature: np.ndarray | None = None  # the feature a full step of a --deepcache artifact produced


class PipelineObserver:
    """Hooks into one ``Pipeline`` call (diffusers' ``callback_on_step_end`` idea). Subclass and
    override what you need; the defaults do nothing. Observers belong to one call, so a shared
    ``Pipeline`` stays safe for concurrent calls."""

    def on_component(self, name: str, inputs: Mapping[str, np.ndarray]) -> None:
        """Called before every component call with its inputs (the U-Net: every step)."""

    def on_step_end(self, info: StepInfo) -> None:
        """Called after every denoising step."""


_NO_OBSERVER = PipelineObserver()
_OPTIONAL = ("vae_encoder", "unet_shallow")  # loaded only where the artifact has them


class Pipeline:
    """The SD sampling loop over one artifact's graphs, on any backend of :mod:`.backends`.

    A call runs four phases, each a method usable on its own: :meth:`encode` (prompts -> text
    context), :meth:`prepare_latents` (noise or an encoded init image), :meth:`denoise` (the
    scheduler loop with classifier-free guidance) and :meth:`decode` (latents -> pixels).
    """

    def __init__(self, artifact: Artifact, components: dict[str, Component], tokenizer: ClipTokenizer,
                 long_prompts: bool = False):
        self.artifact = artifact
        self.components = components
        self.tokenizer = tokenizer
        m = artifact.manifest
        self.scheduler_config: dict[str, Any] = read_json_object(artifact.path / "scheduler" / "scheduler_config.json")
        self.ranges: ShapeRanges = artifact.shape_ranges
        dims = m["model_dims"]
        self.vae_scale = int(dims["vae_scale"])
        self.latent_channels = int(dims["latent_channels"])
        self.scaling_factor = float(dims["vae_scaling_factor"])
        self.default_size = (self.ranges.image_height[1], self.ranges.image_width[1])
        self.long_prompts = long_prompts
        if long_prompts:
            context = components["unet"].spec.inputs[2] if "unet" in components else None
            if context is None or not isinstance(context.shape[1], str):
                raise LdmDeployError(f"long_prompts needs a U-Net with a dynamic text sequence; {artifact.path} takes "
                                     "77 tokens: re-export it with ldm-export --long-prompts")
        #: 77-token windows a long prompt may take (the U-Net's sequence range / 77)
        self.max_chunks = max(1, self.ranges.sequence[2] // tokenizer.max_length)

    @classmethod
    def load(
        cls,
        path: str | Path,
        backend: str = "ort-cpu",
        threads: int = 0,
        verify: bool = True,
        components: Sequence[str] = ("text_encoder", "unet", "unet_shallow", "vae_decoder", "vae_encoder"),
        low_memory: bool = False,
        precision_hint: str = "default",
        static_shape: tuple[int, int, int] | None = None,
        compile_cache: bool = True,
        long_prompts: bool = False,
    ) -> "Pipeline":
        """Open an artifact and load its components on ``backend`` (see :data:`.backends.BACKENDS`:
        ``ort-cpu``, ``ort-cuda``, ``ort-trt``, ``tensorrt``, ``openvino``).

        ``verify`` checks every file of the loaded components against the manifest's sha256.
        ``vae_encoder`` (img2img) and ``unet_shallow`` (feature caching) are loaded only if the
        artifact has them.
        ``threads``: ONNX Runtime intra-op threads (0: all cores).
        ``low_memory``: ONNX Runtime sessions without the CPU memory arena, and freed activation
        memory returned to the OS promptly (:mod:`ldm_deploy.runtime.memory`, a process-wide glibc
        setting): a lower resident peak when one process serves many image sizes, at the cost of
        slower steps (see :func:`~ldm_deploy.runtime.sessions.session_options`).
        OpenVINO only: ``precision_hint`` (``default``: OpenVINO's choice, ``f32``, ``bf16``),
        ``static_shape`` (batch, image height, image width: compiled for that size alone, the
        U-Net for the CFG batch 2 x batch), ``compile_cache`` (compiled models cached under
        ``ARTIFACT/openvino-cache/``).
        ``long_prompts``: prompts over 77 tokens are encoded in 77-token windows whose embeddings
        are concatenated (artifacts exported with ``--long-prompts``) instead of truncated."""
        chosen = get_backend(backend)
        options = LoadOptions(threads=threads, low_memory=low_memory, precision_hint=precision_hint,
                              static_shape=tuple(static_shape) if isinstance(static_shape, list) else static_shape,
                              compile_cache=compile_cache)
        chosen.check_options(options)
        if low_memory:
            limit_heap_retention()
        art = Artifact.open(path)
        check_artifact_backend(art, backend)
        wanted = [c for c in components if c in art.components or c not in _OPTIONAL]
        art.check_runtime(wanted)
        if verify:
            art.verify([f for c in wanted for f in art.component_files(c)] + _tokenizer_files(art))
        loaded = chosen.load(art, wanted, options)
        return cls(art, loaded, ClipTokenizer.from_dir(art.subdir("tokenizer")), long_prompts=long_prompts)

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
        observer: PipelineObserver | None = None,
        scheduler: str = "ddim",
        cache_interval: int = 1,
    ) -> GenerationOutput:
        """Text-to-image, or image-to-image when ``image`` is given. ``scheduler``: a name of
        :data:`.scheduler.SCHEDULERS` (``eta`` is DDIM's alone). ``cache_interval`` N > 1: feature
        caching (DeepCache, artifacts exported with ``--deepcache``): the full U-Net every N-th
        step, the shallow graph on its cached feature in between. ``observer`` sees every
        component's inputs and every step (:class:`PipelineObserver`)."""
        prompts = _prompt_list(prompt, "prompt")
        image_h, image_w = image_size(image) if image is not None else self.default_size
        height, width = image_h if height is None else height, image_w if width is None else width
        sampler = make_scheduler(scheduler, self.scheduler_config)  # an unknown name: one clear line
        self._check_args(prompts, num_inference_steps, guidance_scale, height, width, num_images_per_prompt,
                         strength, image, output_type, eta, seed, negative_prompt, scheduler)
        check_cache_interval(cache_interval, self.components, "unet_shallow" in self.artifact.components)
        obs = observer or _NO_OBSERVER
        rng = np.random.default_rng(seed)
        cfg = guidance_scale > 1.0
        timings: dict[str, float] = {}

        t0 = time.perf_counter()
        context = self.encode(prompts, negative_prompt, num_images_per_prompt, cfg, obs)
        timings["text_encoder"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        latents, timesteps = self.prepare_latents(
            sampler, len(prompts) * num_images_per_prompt, height, width, num_inference_steps, rng, latents,
            image, strength, obs)
        if image is not None:
            timings["vae_encoder"] = time.perf_counter() - t0

        latents, timings["unet"], timings["scheduler_and_guidance"] = self.denoise(
            latents, context, sampler, timesteps, guidance_scale, eta, rng, obs, progress, cache_interval)

        t0 = time.perf_counter()
        release_free_heap()
        decoded = self.decode(latents, obs)
        timings["vae_decoder"] = time.perf_counter() - t0
        images = np.clip(decoded / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)
        return GenerationOutput(to_pil(images) if output_type == "pil" else images, timings, len(timesteps))

    # --- the phases, usable on their own ------------------------------------------------------
    def encode_prompt(self, prompts: list[str], num_images_per_prompt: int = 1,
                      observer: PipelineObserver = _NO_OBSERVER, chunks: int | None = None) -> np.ndarray:
        """Text embeddings [len(prompts) x num_images_per_prompt, 77, D]; with ``chunks``, each
        prompt encoded in that many 77-token windows, concatenated: [.., chunks x 77, D]."""
        if chunks is None:
            emb = self._run("text_encoder", observer, input_ids=self.tokenizer(prompts))
        else:
            ids = self.tokenizer.chunked(prompts, chunks)
            emb = np.concatenate([self._run("text_encoder", observer, input_ids=ids[:, c]) for c in range(chunks)],
                                 axis=1)
        return np.repeat(emb, num_images_per_prompt, axis=0)

    def encode(self, prompts: list[str], negative_prompt: str | list[str] | None, num_images_per_prompt: int,
               cfg: bool, observer: PipelineObserver = _NO_OBSERVER) -> np.ndarray:
        """The U-Net's text context: [unconditional; conditional] with guidance, conditional without.
        With ``long_prompts`` the prompts and negative prompts are all encoded in as many 77-token
        windows as the longest needs (at most :attr:`max_chunks`)."""
        negatives = _broadcast(negative_prompt, len(prompts), "negative_prompt") if cfg else []
        chunks = None
        if self.long_prompts:
            chunks = min(self.max_chunks, self.tokenizer.chunks_needed(prompts + negatives))
        cond = self.encode_prompt(prompts, num_images_per_prompt, observer, chunks)
        if not cfg:
            return cond
        return np.concatenate([self.encode_prompt(negatives, num_images_per_prompt, observer, chunks), cond])

    def prepare_latents(self, scheduler: Any, batch: int, height: int, width: int, steps: int,
                        rng: np.random.Generator, latents: np.ndarray | None = None, image: Any = None,
                        strength: float = 0.8, observer: PipelineObserver = _NO_OBSERVER,
                        ) -> tuple[np.ndarray, np.ndarray]:
        """Initial latents and the timesteps to run: scaled noise (or the given ``latents``), or
        for img2img the encoded ``image`` noised to the first of the strength-shortened schedule."""
        shape = (batch, self.latent_channels, height // self.vae_scale, width // self.vae_scale)
        if image is not None:
            timesteps = scheduler.img2img_timesteps(steps, strength)
            init = self.encode_image(image, height, width, rng, batch, observer)
            noise = rng.standard_normal(shape).astype(np.float32)
            return scheduler.add_noise(init, noise, timesteps[:1]).astype(np.float32), timesteps
        scheduler.set_timesteps(steps)
        if latents is None:
            latents = rng.standard_normal(shape).astype(np.float32)
        else:
            latents = np.asarray(latents, dtype=np.float32)
            if latents.shape != shape:
                raise LdmDeployError(f"latents have shape {latents.shape}, expected {shape}")
        return latents * np.float32(scheduler.init_noise_sigma), scheduler.timesteps

    def denoise(self, latents: np.ndarray, context: np.ndarray, scheduler: Any, timesteps: np.ndarray,
                guidance_scale: float, eta: float = 0.0, rng: np.random.Generator | None = None,
                observer: PipelineObserver = _NO_OBSERVER, progress: bool | Callable[[int, int], None] = False,
                cache_interval: int = 1) -> tuple[np.ndarray, float, float]:
        """The sampling loop: (final latents, seconds in the U-Net, seconds in guidance + scheduler)."""
        cfg = guidance_scale > 1.0
        noisy = eta > 0 or scheduler.stochastic  # only these steps draw from ``rng``
        step_kwargs = {"eta": eta} if eta > 0 else {}
        unet = CachedUNet(self.components, context, cache_interval)
        unet_s = other_s = 0.0
        bar = _progress_bar(progress, len(timesteps))
        for i, t in enumerate(timesteps):
            t0 = time.perf_counter()
            sample = scheduler.scale_model_input(latents, t)
            graph = unet.graph(i)
            inputs = unet.inputs(graph, {"sample": np.concatenate([sample, sample]) if cfg else sample,
                                         "timestep": np.array([t], dtype=np.float32)})
            observer.on_component(graph, {**inputs, "encoder_hidden_states": context})
            noise_pred = unet.run(graph, inputs)
            t1 = time.perf_counter()
            if not np.isfinite(noise_pred).all():
                raise LdmDeployError(f"the U-Net produced NaN/Inf at step {i + 1} (timestep {float(t):g})")
            if cfg:
                uncond_pred, cond_pred = np.split(noise_pred, 2)
                noise_pred = uncond_pred + np.float32(guidance_scale) * (cond_pred - uncond_pred)
            latents = scheduler.step(noise_pred, t, latents, generator=rng if noisy else None, **step_kwargs)
            t2 = time.perf_counter()
            unet_s += t1 - t0
            other_s += t2 - t1
            observer.on_step_end(StepInfo(i, len(timesteps), float(t), {**inputs, "encoder_hidden_states": context},
                                          noise_pred, latents, graph, unet.feature if graph == "unet" else None))
            bar(i + 1)
        return latents, unet_s, other_s

    def decode(self, latents: np.ndarray, observer: PipelineObserver = _NO_OBSERVER) -> np.ndarray:
        """Latents -> images [N, 3, H, W] in [-1, 1]."""
        image = self._run("vae_decoder", observer, latent=latents / np.float32(self.scaling_factor))
        if not np.isfinite(image).all():
            raise LdmDeployError("the VAE decoder produced NaN/Inf")
        return image

    def encode_image(self, image: Any, height: int, width: int, rng: np.random.Generator, batch: int,
                     observer: PipelineObserver = _NO_OBSERVER) -> np.ndarray:
        """An init image -> scaled latents sampled from the VAE's posterior, repeated to ``batch``."""
        if "vae_encoder" not in self.components:
            raise LdmDeployError("this artifact has no vae_encoder: img2img is not available")
        pixels = to_model_image(image, height, width)
        params = self._run("vae_encoder", observer, image=pixels)
        mean, logvar = np.split(params, 2, axis=1)
        std = np.exp(0.5 * np.clip(logvar, -30.0, 20.0))
        sample = mean + std * rng.standard_normal(mean.shape).astype(np.float32)
        sample = sample * np.float32(self.scaling_factor)
        if sample.shape[0] != batch:
            sample = np.repeat(sample, batch // sample.shape[0], axis=0)
        return sample.astype(np.float32)

    def check_call(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None,
                   num_inference_steps: int = 25, guidance_scale: float = 7.5, height: int | None = None,
                   width: int | None = None, num_images_per_prompt: int = 1, seed: int | None = None,
                   eta: float = 0.0, scheduler: str = "ddim", cache_interval: int = 1) -> tuple[int, int, bool]:
        """Check a text-to-image call's arguments without running it, as the call itself would
        (one-line :class:`LdmDeployError`); returns the resolved (height, width) and whether the
        call draws random numbers while sampling (``eta`` > 0 or a stochastic scheduler). For
        callers that must refuse bad input before queueing it (a server)."""
        prompts = _prompt_list(prompt, "prompt")
        height = self.default_size[0] if height is None else height
        width = self.default_size[1] if width is None else width
        sampler = make_scheduler(scheduler, self.scheduler_config)
        self._check_args(prompts, num_inference_steps, guidance_scale, height, width, num_images_per_prompt,
                         0.8, None, "pil", eta, seed, negative_prompt, scheduler)
        check_cache_interval(cache_interval, self.components, "unet_shallow" in self.artifact.components)
        return height, width, bool(eta > 0 or sampler.stochastic)

    def _run(self, name: str, observer: PipelineObserver, **inputs: np.ndarray) -> np.ndarray:
        observer.on_component(name, inputs)
        return self.components[name](**inputs)

    def _check_args(self, prompts, steps, guidance, height, width, num_images, strength, image, output_type, eta,  # type: ignore[no-untyped-def]
                    seed=None, negative_prompt=None, scheduler="ddim"):
        if not prompts:
            raise LdmDeployError("prompt list is empty")
        _broadcast(negative_prompt, len(prompts), "negative_prompt")
        max_steps = int(self.scheduler_config.get("num_train_timesteps", 1000))
        if not (_is_int(steps) or isinstance(steps, float) and steps.is_integer()) or not 1 <= steps <= max_steps:
            raise LdmDeployError(f"num_inference_steps must be an integer in [1, {max_steps}], got {steps!r}")
        if not _is_real(guidance) or guidance < 0:
            raise LdmDeployError(f"guidance_scale must be >= 0, got {guidance}")
        if not _is_real(eta) or not 0.0 <= eta <= 1.0:
            raise LdmDeployError(f"eta must be in [0, 1] (0: deterministic DDIM, 1: DDPM-like), got {eta}")
        if eta > 0 and scheduler != "ddim":
            raise LdmDeployError(f"eta applies to the ddim scheduler only, not to {scheduler!r}: leave eta at 0")
        if not _is_int(num_images) or num_images < 1:
            raise LdmDeployError(f"num_images_per_prompt must be an integer >= 1, got {num_images!r}")
        if seed is not None and (not _is_int(seed) or seed < 0):
            raise LdmDeployError(f"seed must be a non-negative integer (or None for a random one), got {seed!r}")
        if image is not None and not (_is_real(strength) and 0.0 < strength <= 1.0):
            raise LdmDeployError(f"strength must be in (0, 1], got {strength}")
        if output_type not in ("pil", "np"):
            raise LdmDeployError(f"output_type must be 'pil' or 'np', got {output_type!r}")
        self.ranges.check_image(height, width)
        self.ranges.check_batch(len(prompts) * num_images)


def image_size(image: Any) -> tuple[int, int]:
    """(height, width) of a PIL image or HxWxC array, rounded down to a multiple of 8."""
    h, w = check_image(image)
    return (h // 8 * 8, w // 8 * 8)


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and bool(np.isfinite(v))


def _prompt_list(value: Any, label: str) -> list[str]:
    """A prompt or a list of prompts as a list of strings that encode as UTF-8 (argv bytes that are
    not UTF-8 arrive as lone surrogates); one clear line otherwise."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(p, str) for p in items):
        got = type(value).__name__ if not isinstance(items, (list, tuple)) else "a list with non-strings"
        raise LdmDeployError(f"{label} must be a string or a list of strings, got {got}")
    for i, p in enumerate(items):
        try:
            p.encode("utf-8")
        except UnicodeEncodeError as e:
            where = f" {i}" if len(items) > 1 else ""
            raise LdmDeployError(f"{label}{where} is not valid UTF-8 text (an undecodable byte or lone surrogate at "
                                 f"character {e.start})") from None
    return list(items)


def _broadcast(value: str | list[str] | None, n: int, label: str) -> list[str]:
    if value is None:
        return [""] * n
    values = _prompt_list(value, label)
    if isinstance(value, str):
        return values * n
    if len(values) != n:
        raise LdmDeployError(f"{label} has {len(values)} entries for {n} prompts")
    return values


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
