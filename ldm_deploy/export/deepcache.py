"""Feature caching (DeepCache, arXiv:2312.00858): the U-Net as a full and a shallow graph.

Deep U-Net features change slowly between adjacent denoising steps. The *full* graph is the
U-Net that also returns the hidden state entering the last ``depth + 1`` layers of the last up
block; the *shallow* graph runs only the time embedding, ``conv_in``, the first ``depth`` layers
of the first down block (for their skip connections) and those last up layers, starting from a
cached feature. Given the feature of the same step, the shallow graph's output equals the full
U-Net's; the runtime reuses the feature of an earlier step instead (``cache_interval``).

Both modules walk the blocks of a diffusers ``UNet2DConditionModel`` in the order of its own
``forward`` (time embedding, down blocks with their skips, mid block, up blocks, output conv), so
the full graph computes exactly what ``unet(...)`` does.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import LdmDeployError
from ..specs import DeepCacheDims


def deepcache_dims(unet: nn.Module, depth: int) -> DeepCacheDims:
    """Check that ``unet`` can be split at ``depth`` and return the split's sizes."""
    cfg = unet.config
    layers = int(cfg.layers_per_block if isinstance(cfg.layers_per_block, int) else cfg.layers_per_block[0])
    if isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth <= layers:
        raise LdmDeployError(f"--deepcache depth must be an integer in [1, {layers}] (the layers of this U-Net's "
                             f"first down block), got {depth!r}")
    last = unet.up_blocks[-1]
    if len(last.resnets) != layers + 1 or unet.up_blocks[-1].upsamplers is not None:
        raise LdmDeployError("this U-Net's last up block does not mirror its first down block; DeepCache needs the "
                             "standard SD U-Net layout")
    first = _first_up_layer(last, depth)
    channels = last.resnets[first].in_channels - _skip_channels(unet, depth)
    return DeepCacheDims(depth=depth, channels=int(channels))


def _first_up_layer(last_up: nn.Module, depth: int) -> int:
    """Index of the first layer of the last up block that the shallow graph runs."""
    return len(last_up.resnets) - (depth + 1)


def _skip_channels(unet: nn.Module, depth: int) -> int:
    """Channels of the skip that the first shallow up layer concatenates (first down block, layer ``depth - 1``)."""
    return int(unet.down_blocks[0].resnets[depth - 1].out_channels)


class _UNetWalk(nn.Module):
    """The pieces of ``UNet2DConditionModel.forward`` both graphs share."""

    def __init__(self, unet: nn.Module, depth: int):
        super().__init__()
        self.unet = unet
        self.depth = depth
        self.first_up = _first_up_layer(unet.up_blocks[-1], depth)

    def embed(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor):  # type: ignore[no-untyped-def]
        u = self.unet
        emb = u.time_embedding(u.get_time_embed(sample=sample, timestep=timestep), None)
        if u.time_embed_act is not None:
            emb = u.time_embed_act(emb)
        ehs = u.process_encoder_hidden_states(encoder_hidden_states=encoder_hidden_states, added_cond_kwargs={})
        return emb, ehs

    @staticmethod
    def layer(block: nn.Module, i: int, h: torch.Tensor, emb: torch.Tensor, ehs: torch.Tensor) -> torch.Tensor:
        """Layer ``i`` of a down or up block: resnet, then its transformer if the block has one."""
        h = block.resnets[i](h, emb)
        attentions = getattr(block, "attentions", None)
        if attentions is not None:
            h = attentions[i](h, encoder_hidden_states=ehs, return_dict=False)[0]
        return h

    def finish(self, h: torch.Tensor, skips: tuple[torch.Tensor, ...], emb: torch.Tensor, ehs: torch.Tensor,
               ) -> torch.Tensor:
        """The shallow up layers of the last up block from ``h`` (consuming ``skips`` from the end),
        then the output convolution."""
        u, last = self.unet, self.unet.up_blocks[-1]
        for i in range(self.first_up, len(last.resnets)):
            h = self.layer(last, i, torch.cat([h, skips[-1]], dim=1), emb, ehs)
            skips = skips[:-1]
        if u.conv_norm_out is not None:
            h = u.conv_act(u.conv_norm_out(h))
        return u.conv_out(h)


class DeepCacheFull(_UNetWalk):
    """(``sample``, ``timestep``, ``encoder_hidden_states``) -> (``noise_pred``, ``cache_feature``)."""

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                ) -> tuple[torch.Tensor, torch.Tensor]:
        u = self.unet
        emb, ehs = self.embed(sample, timestep, encoder_hidden_states)
        h = u.conv_in(sample)
        skips: tuple[torch.Tensor, ...] = (h,)
        for block in u.down_blocks:
            if getattr(block, "has_cross_attention", False):
                h, res = block(hidden_states=h, temb=emb, encoder_hidden_states=ehs)
            else:
                h, res = block(hidden_states=h, temb=emb)
            skips += res
        if u.mid_block is not None:
            if getattr(u.mid_block, "has_cross_attention", False):
                h = u.mid_block(h, emb, encoder_hidden_states=ehs)
            else:
                h = u.mid_block(h, emb)
        for block in u.up_blocks[:-1]:
            n = len(block.resnets)
            res, skips = skips[-n:], skips[:-n]
            if getattr(block, "has_cross_attention", False):
                h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=res, encoder_hidden_states=ehs)
            else:
                h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=res)
        last = u.up_blocks[-1]
        for i in range(self.first_up):  # the deep layers of the last up block
            h = self.layer(last, i, torch.cat([h, skips[-1]], dim=1), emb, ehs)
            skips = skips[:-1]
        return self.finish(h, skips, emb, ehs), h


class DeepCacheShallow(_UNetWalk):
    """(``sample``, ``timestep``, ``encoder_hidden_states``, ``cache_feature``) -> ``noise_pred``."""

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                cache_feature: torch.Tensor) -> torch.Tensor:
        u = self.unet
        emb, ehs = self.embed(sample, timestep, encoder_hidden_states)
        h = u.conv_in(sample)
        skips: tuple[torch.Tensor, ...] = (h,)
        for i in range(self.depth):
            h = self.layer(u.down_blocks[0], i, h, emb, ehs)
            skips += (h,)
        return self.finish(cache_feature, skips, emb, ehs)
