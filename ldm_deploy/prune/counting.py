"""Parameter and MAC counts of a ``UNet2DConditionModel``.

MACs come from :class:`torch.utils.flop_counter.FlopCounterMode` (FLOPs / 2) on a copy of the
architecture built on the ``meta`` device from the config, so counting an SD1.5-size U-Net at
512x512 costs no memory and well under a second. Attention runs through diffusers' classic
``AttnProcessor`` while counting: its ``baddbmm``/``bmm`` are counted, whereas the fused
scaled-dot-product kernels on CPU have no flop formula in torch and would be missed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def count_params(module: Any) -> int:
    """Number of parameters of a torch module."""
    return int(sum(p.numel() for p in module.parameters()))


def unet_macs(config: Mapping[str, Any], latent_hw: tuple[int, int], batch: int = 1, text_len: int = 77) -> int:
    """Multiply-accumulates of one U-Net forward for ``batch`` samples of ``latent_hw`` latents."""
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor
    from torch.utils.flop_counter import FlopCounterMode

    cfg = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(cfg)
    unet.set_attn_processor(AttnProcessor())
    cross = unet.config.cross_attention_dim
    cross = cross[0] if isinstance(cross, (list, tuple)) else cross
    sample = torch.empty(batch, unet.config.in_channels, *latent_hw, device="meta")
    timestep = torch.empty(batch, dtype=torch.long, device="meta")
    text = torch.empty(batch, text_len, int(cross), device="meta")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(sample, timestep, text)
    return int(counter.get_total_flops()) // 2


def unet_counts(unet: Any, latent_hw: tuple[int, int]) -> dict[str, Any]:
    """``params`` and ``macs`` (one sample; a CFG step runs two) of ``unet`` at ``latent_hw``."""
    return {"params": count_params(unet), "macs": unet_macs(unet.config, latent_hw), "latent_hw": list(latent_hw)}
