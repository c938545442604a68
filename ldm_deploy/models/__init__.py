"""Resolve ``--model`` names and load SD-class components with diffusers/transformers.

Accepted names:
  * aliases: ``sd15``, ``sd14`` (Hugging Face hub ids);
  * any hub id (``owner/name``), fetched with ``huggingface_hub.snapshot_download``;
  * a local diffusers pipeline directory (``model_index.json`` + component folders);
  * ``tiny-random`` / ``sd15-random``: architectures built from configs shipped here, with
    seeded random weights (for tests, and for speed/memory at real SD1.5 scale);
  * ``tiny``: the small trained model embedded in the package (when present).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import LdmDeployError, first_line
from ..specs import ModelDims

if TYPE_CHECKING:  # pragma: no cover
    import torch

ALIASES = {
    "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd14": "CompVis/stable-diffusion-v1-4",
}
CONFIG_DIR = Path(__file__).parent / "configs"
ASSETS = Path(__file__).resolve().parents[1] / "assets"
CLIP_TOKENIZER_DIR = ASSETS / "clip_tokenizer"
EMBEDDED = {"tiny": ASSETS / "tiny"}
RANDOM_SEED = 0
_PIPELINE_PARTS = ("unet", "vae", "text_encoder", "tokenizer")


def random_model_names() -> list[str]:
    return sorted(p.name for p in CONFIG_DIR.iterdir() if p.is_dir())


def known_names() -> list[str]:
    return sorted(ALIASES) + random_model_names() + sorted(EMBEDDED)


@dataclass
class LoadedModel:
    """The torch components of one SD-class pipeline plus what an artifact needs besides them."""

    source: dict[str, Any]
    text_encoder: Any
    unet: Any
    vae: Any
    tokenizer_dir: Path
    scheduler_config: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)

    def dims(self) -> ModelDims:
        return model_dims(self.unet.config, self.vae.config, self.text_encoder.config)

    def tokenizer(self):  # type: ignore[no-untyped-def]
        from transformers import CLIPTokenizer

        return CLIPTokenizer.from_pretrained(str(self.tokenizer_dir))

    def diffusers_pipeline(self):  # type: ignore[no-untyped-def]
        """A diffusers ``StableDiffusionPipeline`` with a DDIM scheduler over these components."""
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        return StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer(),
            unet=self.unet,
            scheduler=DDIMScheduler.from_config(self.scheduler_config),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    def save_pretrained(self, path: Path | str) -> None:
        """Write a diffusers pipeline directory (safetensors) that ``from_pretrained`` loads.

        ``vocab.json``/``merges.txt`` are written beside ``tokenizer.json`` so that tools on older
        transformers releases (slow ``CLIPTokenizer``) load it too."""
        import shutil

        self.diffusers_pipeline().save_pretrained(str(path), safe_serialization=True)
        for name in ("vocab.json", "merges.txt"):
            src, dst = self.tokenizer_dir / name, Path(path) / "tokenizer" / name
            if src.is_file() and not dst.exists():
                shutil.copyfile(src, dst)
        _prefix_text_model(Path(path) / "text_encoder" / "model.safetensors")


def _prefix_text_model(file: Path) -> None:
    """Name the text encoder's weights ``text_model.*`` as every SD checkpoint does: transformers 5
    saves ``CLIPTextModel`` without that level (and loads both), transformers 4 (what Optimum runs
    on) finds nothing under the new names and silently initialises a random text encoder."""
    from safetensors.numpy import load_file, save_file
    from safetensors import safe_open

    if not file.is_file():
        return
    with safe_open(str(file), framework="numpy") as f:
        metadata = f.metadata()
    tensors = load_file(str(file))
    if all(k.startswith("text_model.") for k in tensors):
        return
    save_file({k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in tensors.items()}, str(file),
              metadata=metadata)


def model_dims(unet_config: Any, vae_config: Any, text_config: Any) -> ModelDims:
    return ModelDims(
        text_hidden=int(text_config.hidden_size),
        seq_len=int(text_config.max_position_embeddings),
        latent_channels=int(vae_config.latent_channels),
        image_channels=int(vae_config.in_channels),
        vae_scale=2 ** (len(vae_config.block_out_channels) - 1),
        unet_factor=2 ** (len(unet_config.block_out_channels) - 1),
        vae_scaling_factor=float(getattr(vae_config, "scaling_factor", 0.18215)),
    )


def load_model(name: str, dtype: "torch.dtype | None" = None, device: str = "cpu") -> LoadedModel:
    """Resolve ``name`` (see module doc) and load its text encoder, U-Net and VAE."""
    import torch

    dtype = dtype or torch.float32
    if name in random_model_names():
        model = build_random(name)
        if dtype != torch.float32 or device != "cpu":
            for m in (model.text_encoder, model.unet, model.vae):
                m.to(device=device, dtype=dtype)
        return model
    if name in EMBEDDED:
        path = EMBEDDED[name]
        if not (path / "model_index.json").is_file():
            raise LdmDeployError(f"the embedded model '{name}' is not present in this installation ({path})")
        return _load_pipeline_dir(path, {"model": name, "kind": "embedded", "path": str(path)}, dtype, device)
    local = Path(name).expanduser()
    if local.exists() or name.startswith((".", "/", "~")):
        return _load_pipeline_dir(local, {"model": name, "kind": "local", "path": str(local.resolve())}, dtype, device)
    repo_id = ALIASES.get(name, name)
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise LdmDeployError(
            f"unknown model '{name}': not an alias ({', '.join(known_names())}), "
            "a hub id (owner/name) or an existing directory"
        )
    path = _download(repo_id)
    source = {"model": name, "kind": "hub", "repo_id": repo_id, "path": str(path)}
    return _load_pipeline_dir(path, source, dtype, device)


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["model_index.json", "scheduler/*", "tokenizer/*"] + [
        f"{part}/{f}" for part in ("unet", "vae", "text_encoder") for f in ("config.json", "*.safetensors")
    ]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # offline, unknown repo, gated repo, ...
        raise LdmDeployError(
            f"could not fetch '{repo_id}' from the Hugging Face Hub ({first_line(e)}); "
            "pass a local diffusers pipeline directory instead (--model /path/to/pipeline)"
        ) from None


def check_pipeline_dir(path: Path) -> None:
    if not path.is_dir():
        raise LdmDeployError(f"model directory {path} does not exist")
    if not (path / "model_index.json").is_file():
        raise LdmDeployError(f"{path} is not a diffusers pipeline directory (no model_index.json)")
    missing = [p for p in _PIPELINE_PARTS if not (path / p).is_dir()]
    if missing:
        raise LdmDeployError(f"{path} is not a complete SD pipeline directory (missing {', '.join(missing)}/)")


def _load_pipeline_dir(path: Path, source: dict[str, Any], dtype: "torch.dtype", device: str) -> LoadedModel:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    check_pipeline_dir(path)
    unet, vae, text_encoder = (_load_part(cls, path, sub, dtype) for cls, sub in (
        (UNet2DConditionModel, "unet"), (AutoencoderKL, "vae"), (CLIPTextModel, "text_encoder")))
    sched_file = path / "scheduler" / "scheduler_config.json"
    scheduler_config = json.loads(sched_file.read_text()) if sched_file.is_file() else _default_scheduler()
    for m in (unet, vae, text_encoder):
        m.to(device).eval().requires_grad_(False)
    return LoadedModel(source, text_encoder, unet, vae, path / "tokenizer", scheduler_config)


def _load_part(cls: Any, path: Path, subfolder: str, dtype: "torch.dtype") -> Any:
    """``cls.from_pretrained`` of one pipeline folder; a file it cannot load is one line."""
    import pickle

    try:
        return cls.from_pretrained(str(path), subfolder=subfolder, torch_dtype=dtype)
    except pickle.UnpicklingError:
        raise LdmDeployError(
            f"could not load the pipeline in {path}: {subfolder}/ holds pickle weights with more than tensors, which "
            "torch.load(weights_only=True) refuses since they could run code; convert them to safetensors"
        ) from None
    except (OSError, ValueError, RuntimeError, EOFError) as e:  # missing/corrupt weights, bad config
        raise LdmDeployError(f"could not load the pipeline in {path} ({subfolder}/): {first_line(e, 1000)}") from None


def _default_scheduler() -> dict[str, Any]:
    return json.loads((CONFIG_DIR / "sd15-random" / "scheduler.json").read_text())


def build_random(name: str, seed: int = RANDOM_SEED) -> LoadedModel:
    """Build one of the shipped architectures with seeded random weights."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg_dir = CONFIG_DIR / name
    read = lambda f: json.loads((cfg_dir / f).read_text())  # noqa: E731
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**read("unet.json"))
    vae = AutoencoderKL(**read("vae.json"))
    text_cfg = {k: v for k, v in read("text_encoder.json").items() if k not in ("architectures", "model_type")}
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_cfg))
    for m in (unet, vae, text_encoder):
        m.eval().requires_grad_(False)
    source = {"model": name, "kind": "random", "seed": seed, "configs": f"ldm_deploy/models/configs/{name}"}
    return LoadedModel(source, text_encoder, unet, vae, CLIP_TOKENIZER_DIR, read("scheduler.json"))
