"""Thin torch modules that give each SD component exactly the inputs/outputs of its spec."""

from __future__ import annotations

import torch
from torch import nn


class TextEncoder(nn.Module):
    """``input_ids`` (int32) -> ``text_embeddings`` (the last hidden state SD conditions on)."""

    def __init__(self, text_encoder: nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids.to(torch.int64), return_dict=False)[0]


class UNet(nn.Module):
    """(``sample``, ``timestep`` [1], ``encoder_hidden_states``) -> ``noise_pred``."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class VaeEncoder(nn.Module):
    """``image`` in [-1, 1] -> ``latent_parameters`` (mean and log-variance, unscaled)."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        h = self.vae.encoder(image)
        if getattr(self.vae, "quant_conv", None) is not None:
            h = self.vae.quant_conv(h)
        return h


class VaeDecoder(nn.Module):
    """``latent`` (already divided by the VAE scaling factor) -> ``image`` in about [-1, 1]."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent, return_dict=False)[0]


def component_module(name: str, model, deepcache_depth: int | None = None) -> nn.Module:  # type: ignore[no-untyped-def]
    """The wrapper of component ``name`` over a ``LoadedModel``; with ``deepcache_depth`` the U-Net
    is the full graph of feature caching and ``unet_shallow`` its shallow graph."""
    from .deepcache import DeepCacheFull, DeepCacheShallow

    if name == "text_encoder":
        return TextEncoder(model.text_encoder).eval()
    if name == "unet" and deepcache_depth:
        return DeepCacheFull(model.unet, deepcache_depth).eval()
    if name == "unet_shallow" and deepcache_depth:
        return DeepCacheShallow(model.unet, deepcache_depth).eval()
    if name == "unet":
        return UNet(model.unet).eval()
    if name == "vae_encoder":
        return VaeEncoder(model.vae).eval()
    if name == "vae_decoder":
        return VaeDecoder(model.vae).eval()
    raise KeyError(name)
