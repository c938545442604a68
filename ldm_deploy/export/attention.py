"""Attention processors for export: per-head self-attention, or ONNX Runtime's fused
``com.microsoft::MultiHeadAttention``.

**sliced** (:class:`HeadSlicedAttnProcessor`) computes self-attention one head at a time.

The default processor exports attention as one batched ``MatMul -> Softmax -> MatMul`` whose
scores tensor is ``batch x heads x S x S``: at 512x512 (S = 4096) with the CFG batch that is
1 GiB for each of the scores and the softmax output, and ONNX Runtime on CPU materialises both.
Unrolled over heads (a static count), each slice needs ``batch x S x S`` and the runtime frees it
before the next, so peak activation memory drops ~8x for the same arithmetic.

**mha** (:class:`FusedMHAAttnProcessor`) exports each attention as one ONNX Runtime contrib
``MultiHeadAttention`` node on the projected ``[batch, seq, heads*head_dim]`` Q/K/V. ORT's CPU kernel
tiles the softmax (flash-style), so the ``S x S`` scores never exist in full: faster and leaner
than either pattern on CPU. It is an ONNX Runtime operator: TensorRT's parser does not know it.

Fused-attention targets (ONNX Runtime CUDA fusions, TensorRT) want the plain pattern instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _tokens_in(attn, hidden_states, temb):  # type: ignore[no-untyped-def]
    """Spatial norm, ``[B, C, H, W] -> [B, HW, C]`` and group norm, as diffusers' processors do;
    returns the tokens, the residual and the 4-D shape (or None)."""
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    shape = tuple(hidden_states.shape) if hidden_states.ndim == 4 else None
    if shape is not None:
        b, c, h, w = shape
        hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    return hidden_states, residual, shape


def _qkv(attn, hidden_states, encoder_hidden_states):  # type: ignore[no-untyped-def]
    query = attn.to_q(hidden_states)
    if encoder_hidden_states is None:
        encoder_hidden_states = hidden_states
    elif attn.norm_cross:
        encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
    return query, attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)


def _tokens_out(attn, hidden_states, residual, shape):  # type: ignore[no-untyped-def]
    """Output projection, back to 4-D, residual and rescale."""
    hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
    if shape is not None:
        hidden_states = hidden_states.transpose(-1, -2).reshape(shape)
    if attn.residual_connection:
        hidden_states = hidden_states + residual
    return hidden_states / attn.rescale_output_factor


class HeadSlicedAttnProcessor:
    """Same maths as diffusers' scaled-dot-product processor, self-attention split per head."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):  # type: ignore[no-untyped-def]
        hidden_states, residual, shape = _tokens_in(attn, hidden_states, temb)
        batch = hidden_states.shape[0]
        if attention_mask is not None:
            kv_len = (hidden_states if encoder_hidden_states is None else encoder_hidden_states).shape[1]
            attention_mask = attn.prepare_attention_mask(attention_mask, kv_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        self_attention = encoder_hidden_states is None
        query, key, value = _qkv(attn, hidden_states, encoder_hidden_states)

        head_dim = key.shape[-1] // attn.heads
        split = lambda t: t.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # noqa: E731
        query, key, value = split(query), split(key), split(value)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if self_attention and attn.heads > 1:
            outs = []
            for i in range(attn.heads):
                mask = attention_mask[:, i : i + 1] if attention_mask is not None else None
                outs.append(F.scaled_dot_product_attention(
                    query[:, i : i + 1], key[:, i : i + 1], value[:, i : i + 1], attn_mask=mask, scale=attn.scale))
            hidden_states = torch.cat(outs, dim=1)
        else:
            hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=attn.scale)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        return _tokens_out(attn, hidden_states, residual, shape)


class _OrtMultiHeadAttention(torch.autograd.Function):
    """Scaled-dot-product attention on ``[B, S, H*d]`` tensors; exported as one
    ``com.microsoft::MultiHeadAttention`` node by the TorchScript exporter."""

    @staticmethod
    def forward(ctx, query, key, value, heads: int, scale: float):  # type: ignore[no-untyped-def, override]
        b, d = query.shape[0], query.shape[-1]
        split = lambda t: t.view(b, -1, heads, t.shape[-1] // heads).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(split(query), split(key), split(value), scale=scale)
        return out.transpose(1, 2).reshape(b, -1, d)

    @staticmethod
    def symbolic(g, query, key, value, heads: int, scale: float):  # type: ignore[no-untyped-def]
        out = g.op("com.microsoft::MultiHeadAttention", query, key, value, num_heads_i=heads, scale_f=scale)
        out.setType(query.type())
        return out


class FusedMHAAttnProcessor:
    """Diffusers attention with the core as ORT's fused ``MultiHeadAttention`` (no mask, no
    per-head q/k norms: those fall back to :class:`HeadSlicedAttnProcessor`)."""

    def __init__(self) -> None:
        self._fallback = HeadSlicedAttnProcessor()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):  # type: ignore[no-untyped-def]
        if attention_mask is not None or attn.norm_q is not None or attn.norm_k is not None:
            return self._fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        hidden_states, residual, shape = _tokens_in(attn, hidden_states, temb)
        query, key, value = _qkv(attn, hidden_states, encoder_hidden_states)
        hidden_states = _OrtMultiHeadAttention.apply(query, key, value, int(attn.heads), float(attn.scale))
        return _tokens_out(attn, hidden_states, residual, shape)


PROCESSORS = {"sliced": HeadSlicedAttnProcessor, "mha": FusedMHAAttnProcessor}


def set_export_attention(module: torch.nn.Module, kind: str) -> int:
    """Install the ``kind`` (``sliced`` or ``mha``) processor on every diffusers ``Attention`` in
    ``module``; returns how many were replaced."""
    from diffusers.models.attention_processor import Attention

    n = 0
    for m in module.modules():
        if isinstance(m, Attention):
            m.set_processor(PROCESSORS[kind]())
            n += 1
    return n

