"""What a variant can do for the benchmark, one class per kind.

Every runner exposes the same four timed operations on numpy inputs: ``encode`` (text encoding,
with the unconditional half under CFG), ``unet_step`` (one CFG U-Net call), ``decode`` (VAE
decoder) and ``generate`` (a whole text-to-image call from given initial latents, uint8 images).

* ``runtime``: an ldm-deploy artifact on ONNX Runtime (any provider) or TensorRT - torch-free;
* ``diffusers``: the diffusers ``StableDiffusionPipeline`` on torch, eager or ``torch.compile``;
* ``optimum``: Optimum's ``ORTStableDiffusionPipeline`` (exported by Optimum itself).

:func:`unavailable_reason` says why a variant cannot run in this environment (or None).
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ..numerics import to_uint8
from .measure import dir_bytes

#: Mid-trajectory timestep for the single timed U-Net call (the cost does not depend on it).
TIMESTEP = 500


def unavailable_reason(kind: str, options: dict[str, Any]) -> str | None:
    """Why this variant cannot run in the current interpreter, or None."""
    if kind == "runtime":
        from ..runtime.backends import get_backend

        return get_backend(options["backend"]).unavailable()
    missing = [m for m in ("torch", "diffusers") if importlib.util.find_spec(m) is None]
    if kind == "optimum" and importlib.util.find_spec("optimum") is not None:
        if importlib.util.find_spec("optimum.onnxruntime") is None:
            missing.append("optimum.onnxruntime")
    elif kind == "optimum":
        missing.append("optimum.onnxruntime")
    if missing:
        hint = " (pip install 'optimum-onnx[onnxruntime]', or set python = an interpreter that has it)" \
            if "optimum.onnxruntime" in missing else ""
        return f"{', '.join(missing)} not importable in {sys.executable}{hint}"
    device = options.get("device", "cuda" if options.get("provider") in ("cuda", "tensorrt") else "cpu")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            return "needs a CUDA GPU; torch.cuda.is_available() is False here"
    if kind == "optimum":
        from ..runtime.sessions import provider_unavailable

        return provider_unavailable(options["provider"])
    return None


def make_runner(kind: str, options: dict[str, Any], settings: dict[str, Any], threads: int) -> Any:
    cls = {"runtime": RuntimeRunner, "diffusers": DiffusersRunner, "optimum": OptimumRunner}[kind]
    return cls(options, settings, threads)


class RuntimeRunner:
    """An artifact through :class:`ldm_deploy.runtime.Pipeline`."""

    def __init__(self, options: dict[str, Any], settings: dict[str, Any], threads: int):
        from ..runtime import Pipeline

        self.scheduler, self.steps = options.get("scheduler", "ddim"), options.get("steps")
        self.cache_interval = options.get("cache_interval", 1)
        graphs = ("text_encoder", "unet", "vae_decoder") + (("unet_shallow",) if self.cache_interval > 1 else ())
        extra = {}
        if options["backend"] == "openvino":
            static = (settings["batch"], settings["height"], settings["width"]) if options.get("static") else None
            extra = dict(precision_hint=options.get("precision_hint", "default"), static_shape=static)
        self.pipe = Pipeline.load(options["artifact"], backend=options["backend"], threads=threads, components=graphs,
                                  **extra)
        self.unet = self.pipe.components["unet"]
        self.latent_channels, self.vae_scale = self.pipe.latent_channels, self.pipe.vae_scale
        self.height, self.width = settings["height"], settings["width"]
        files = [info["bytes"] for rel, info in self.pipe.artifact.manifest.get("files", {}).items()
                 if rel.split("/")[0] in ("text_encoder", "unet", "vae_decoder", "tokenizer", "scheduler")]
        self.size = {"bytes": int(sum(files)), "note": "artifact files used for text-to-image"}

    def sync(self) -> None:
        """Outputs come back to host memory synchronously."""

    def encode(self, prompts: list[str], cfg: bool) -> np.ndarray:
        cond = self.pipe.encode_prompt(prompts)
        return np.concatenate([self.pipe.encode_prompt([""] * len(prompts)), cond]) if cfg else cond

    def unet_step(self, latents: np.ndarray, context: np.ndarray, cfg: bool) -> None:
        sample = np.concatenate([latents, latents]) if cfg else latents
        self.unet(sample=sample, timestep=np.array([TIMESTEP], dtype=np.float32), encoder_hidden_states=context)

    def decode(self, latents: np.ndarray) -> None:
        self.pipe.decode(latents)

    def generate(self, prompts: list[str], latents: np.ndarray, steps: int, guidance: float) -> np.ndarray:
        """Images with the variant's scheduler, steps (when set) and cache interval."""
        out = self.pipe(prompts, num_inference_steps=self.steps or steps, guidance_scale=guidance, height=self.height,
                        width=self.width, latents=latents, output_type="np", scheduler=self.scheduler,
                        cache_interval=self.cache_interval)
        return to_uint8(out.images)


class DiffusersRunner:
    """diffusers + torch (eager, or the U-Net through ``torch.compile``)."""

    def __init__(self, options: dict[str, Any], settings: dict[str, Any], threads: int):
        import torch

        torch.set_num_threads(threads)
        self.torch = torch
        self.device = torch.device(options.get("device", "cpu"))
        self.dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[options.get("dtype", "fp32")]
        self.height, self.width = settings["height"], settings["width"]
        self.pipe = self._load(options, threads)
        self.pipe.set_progress_bar_config(disable=True)
        self.latent_channels = int(self.pipe.unet.config.in_channels)
        self.vae_scale = 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)
        self.scaling = float(getattr(self.pipe.vae.config, "scaling_factor", 0.18215))

    def _load(self, options: dict[str, Any], threads: int) -> Any:
        from ..models import load_model

        model = load_model(options["model"], dtype=self.dtype, device=str(self.device))
        pipe = model.diffusers_pipeline()
        path = model.source.get("path")
        if path and model.source.get("kind") != "random":
            self.size = {"bytes": dir_bytes(path, ("text_encoder", "unet", "vae", "tokenizer", "scheduler")),
                         "note": "diffusers pipeline directory"}
        else:
            params = sum(p.numel() * p.element_size() for m in (pipe.unet, pipe.vae, pipe.text_encoder)
                         for p in m.parameters())
            self.size = {"bytes": None, "weights_bytes": int(params),
                         "note": "random weights built in memory (nothing on disk)"}
        if options.get("compile"):
            mode = None if options["compile_mode"] == "default" else options["compile_mode"]
            pipe.unet = self.torch.compile(pipe.unet, mode=mode)
        return pipe

    def sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def _tensor(self, a: np.ndarray) -> Any:
        return self.torch.from_numpy(np.ascontiguousarray(a)).to(self.device, self.dtype)

    def encode(self, prompts: list[str], cfg: bool) -> Any:
        with self.torch.no_grad():
            cond, uncond = self.pipe.encode_prompt(prompts, self.device, 1, cfg)
        return self.torch.cat([uncond, cond]) if cfg else cond

    def unet_step(self, latents: np.ndarray, context: Any, cfg: bool) -> None:
        x = self._tensor(np.concatenate([latents, latents]) if cfg else latents)
        t = self.torch.tensor(TIMESTEP, device=self.device)
        with self.torch.no_grad():
            self.pipe.unet(x, t, encoder_hidden_states=context)

    def decode(self, latents: np.ndarray) -> None:
        with self.torch.no_grad():
            self.pipe.vae.decode(self._tensor(latents / np.float32(self.scaling)))

    def generate(self, prompts: list[str], latents: np.ndarray, steps: int, guidance: float) -> np.ndarray:
        with self.torch.no_grad():
            images = self.pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, height=self.height,
                               width=self.width, latents=self._tensor(latents), output_type="np").images
        return to_uint8(images)


class OptimumRunner(DiffusersRunner):
    """Optimum's ONNX Runtime Stable Diffusion pipeline, exported by Optimum from the same weights,
    with the DDIM scheduler the other variants use."""

    def _load(self, options: dict[str, Any], threads: int) -> Any:
        import onnxruntime as ort
        from diffusers import DDIMScheduler
        from optimum.onnxruntime import ORTStableDiffusionPipeline

        from ..models import EMBEDDED, known_names, load_model
        from ..runtime.sessions import PROVIDERS

        self._tmp = tempfile.TemporaryDirectory(prefix="ldm-bench-optimum-")
        model = options["model"]
        if model in EMBEDDED:
            src = EMBEDDED[model]
        elif model in known_names():
            src = Path(self._tmp.name) / "pipeline"
            load_model(model).save_pretrained(src)
        else:
            src = Path(model)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        provider = PROVIDERS.get(options["provider"], options["provider"])
        pipe = ORTStableDiffusionPipeline.from_pretrained(str(src), export=True, provider=provider,
                                                          session_options=so)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        out = Path(self._tmp.name) / "onnx"
        pipe.save_pretrained(str(out))
        self.size = {"bytes": dir_bytes(out, ("text_encoder", "unet", "vae_decoder", "tokenizer", "scheduler")),
                     "note": "Optimum ONNX export"}
        self.device = self.torch.device("cuda" if provider != "CPUExecutionProvider" else "cpu")
        return pipe

    def unet_step(self, latents: np.ndarray, context: Any, cfg: bool) -> None:
        x = self._tensor(np.concatenate([latents, latents]) if cfg else latents)
        self.pipe.unet(sample=x, timestep=self.torch.tensor(TIMESTEP), encoder_hidden_states=context)

    def decode(self, latents: np.ndarray) -> None:
        self.pipe.vae_decoder(latent_sample=self._tensor(latents / np.float32(self.scaling)))
