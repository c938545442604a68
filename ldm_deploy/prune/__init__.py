"""Structured pruning of SD-class U-Nets (``ldm-prune``; needs the ``export`` and ``prune`` extras).

* :mod:`.channels` - Torch-Pruning DepGraph channel pruning in whole GroupNorm groups / heads,
  stored as a plain diffusers config;
* :mod:`.blocks` - BK-SDM-style removal of resnet+attention pairs, the mid block, attentions;
* :mod:`.importance` - l1 / l2 / taylor (over timesteps) channel importance;
* :mod:`.distill` - recovery by output + feature distillation from the unpruned teacher;
* :mod:`.counting` - parameter and MAC counts;
* :mod:`.data` - prompts and teacher-generated latents;
* :mod:`.saving` - the output pipeline directory, manifest and model card;
* :mod:`.run` - :func:`~.run.prune_model`, the whole command.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PruneOptions", "prune_model"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import run

        return getattr(run, name)
    raise AttributeError(name)
