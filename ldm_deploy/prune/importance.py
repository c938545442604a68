"""Channel importance for ``--method channels``: Torch-Pruning group scorers.

* ``l1`` / ``l2``: magnitude of every weight slice a coupled channel owns, over all layers of
  its dependency group (``GroupMagnitudeImportance``), data-free;
* ``taylor``: first-order Taylor ``|w * dL/dw|`` over the group (``GroupTaylorImportance``),
  with ``L`` the denoising loss accumulated at timesteps spread along a DDIM trajectory on
  teacher-generated latents (:func:`accumulate_taylor_grads`).
"""

from __future__ import annotations

from typing import Any

IMPORTANCES = ("l1", "l2", "taylor")


def make_scorer(kind: str) -> Any:
    """The Torch-Pruning importance object for ``kind`` (no per-group normalisation: each group
    is pruned on its own ranking)."""
    import torch_pruning as tp

    if kind == "l1":
        return tp.importance.GroupMagnitudeImportance(p=1, normalizer=None)
    if kind == "l2":
        return tp.importance.GroupMagnitudeImportance(p=2, normalizer=None)
    if kind == "taylor":
        return tp.importance.GroupTaylorImportance(normalizer=None)
    raise ValueError(kind)


def accumulate_taylor_grads(unet: Any, data: Any, timesteps: list[int], batch: int, seed: int = 0) -> float:
    """Accumulate ``d(eps-MSE)/dw`` into ``unet``'s ``.grad`` over every latent of ``data`` at each
    of ``timesteps``; returns the mean loss. Parameters without a gradient get zeros so that every
    layer has one for the scorer."""
    import torch
    import torch.nn.functional as F

    unet.requires_grad_(True)
    unet.zero_grad(set_to_none=True)
    gen = torch.Generator().manual_seed(seed)
    n = len(data.x0)
    losses = []
    with torch.enable_grad():
        for t in timesteps:
            for s in range(0, n, batch):
                idx = torch.arange(s, min(s + batch, n), device=data.x0.device)
                noise = torch.randn((len(idx), *data.x0.shape[1:]), generator=gen).to(data.x0.device)
                tt = torch.full((len(idx),), t, device=data.x0.device)
                pred = unet(data.noised(idx, tt, noise), tt, data.cond[idx], return_dict=False)[0]
                loss = F.mse_loss(pred, noise) * len(idx) / n
                loss.backward()
                losses.append(loss.item() * n / len(idx))
    for p in unet.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    return sum(losses) / max(1, len(losses))
