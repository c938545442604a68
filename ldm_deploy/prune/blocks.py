"""``--method blocks``: BK-SDM-style removal of whole U-Net blocks, with the diffusers config
rewritten so that plain ``UNet2DConditionModel.from_pretrained`` loads the result.

Removable units (each maps to a config change; the surviving weights are copied unchanged):

* ``pair:S`` - the last resnet+attention pair of down stage ``S`` and the matching middle pair of
  its up stage (``layers_per_block[S]`` - 1; needs >= 2 layers). Down blocks keep their first
  pairs (the first one changes width); up blocks keep their first pairs and the last one, which
  takes the skip from the previous stage - so every kept layer keeps its weight shapes;
* ``mid`` - the whole mid block (``mid_block_type: null``);
* ``down-attn:S`` / ``up-attn:J`` - the attentions of one down / up block (its type becomes
  ``DownBlock2D`` / ``UpBlock2D``).

The default recipe is BK-SDM's (Kim et al. 2023, "BK-SDM-Small"): every ``pair`` plus ``mid``.
With ``--ratio R`` the units are instead ranked by the teacher-output error each causes on its
own per MAC it saves, and the cheapest are removed until at least ``R`` of the MACs are gone.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import LdmDeployError


@dataclass(frozen=True)
class Removal:
    """One removable unit."""

    kind: str  # "pair" | "mid" | "down-attn" | "up-attn"
    index: int = -1  # down stage (pair, down-attn) or up block (up-attn)

    @property
    def name(self) -> str:
        return "mid" if self.kind == "mid" else f"{self.kind}:{self.index}"

    def modules(self, config: Mapping[str, Any]) -> list[str]:
        """Module names this unit removes from the teacher."""
        n = len(config["block_out_channels"])
        if self.kind == "mid":
            return ["mid_block"]
        if self.kind == "down-attn":
            return [f"down_blocks.{self.index}.attentions"]
        if self.kind == "up-attn":
            return [f"up_blocks.{self.index}.attentions"]
        last = _layers(config)[self.index] - 1
        up = n - 1 - self.index
        out = [f"down_blocks.{self.index}.resnets.{last}", f"up_blocks.{up}.resnets.{last}"]
        if "CrossAttn" in config["down_block_types"][self.index]:
            out.append(f"down_blocks.{self.index}.attentions.{last}")
        if "CrossAttn" in config["up_block_types"][up]:
            out.append(f"up_blocks.{up}.attentions.{last}")
        return out


def _layers(config: Mapping[str, Any]) -> list[int]:
    lpb = config["layers_per_block"]
    return [lpb] * len(config["down_block_types"]) if isinstance(lpb, int) else list(lpb)


def parse_removal(name: str) -> Removal:
    """Inverse of :attr:`Removal.name`."""
    if name == "mid":
        return Removal("mid")
    kind, _, idx = name.partition(":")
    return Removal(kind, int(idx))


def candidates(config: Mapping[str, Any]) -> list[Removal]:
    """Every unit of ``config`` that can be removed on its own."""
    out = [Removal("pair", s) for s, n in enumerate(_layers(config)) if n >= 2]
    if config.get("mid_block_type", "UNetMidBlock2DCrossAttn") is not None:
        out.append(Removal("mid"))
    out += [Removal("down-attn", s) for s, t in enumerate(config["down_block_types"]) if "CrossAttn" in t]
    out += [Removal("up-attn", j) for j, t in enumerate(config["up_block_types"]) if "CrossAttn" in t]
    return out


def blocked_by_keep(removal: Removal, config: Mapping[str, Any], keep: Mapping[str, str]) -> str | None:
    """The ``--keep`` pattern that protects a module ``removal`` would delete, if any."""
    for prefix in removal.modules(config):
        for name, pattern in keep.items():
            if name == prefix or name.startswith(prefix + ".") or prefix.startswith(name + "."):
                return pattern
    return None


def bk_sdm_recipe(config: Mapping[str, Any], keep: Mapping[str, str]) -> list[Removal]:
    """BK-SDM-Small: one pair per stage with >= 2 layers, and the mid block; minus kept units."""
    picked = [r for r in candidates(config) if r.kind in ("pair", "mid") and blocked_by_keep(r, config, keep) is None]
    if not picked:
        raise LdmDeployError(
            "no BK-SDM block to remove (every stage has one layer and the mid block is absent or kept); "
            "pass --ratio R to remove attention blocks ranked by sensitivity")
    return picked


def apply_removals(config: Mapping[str, Any], state_dict: Mapping[str, Any],
                   removals: Iterable[Removal]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The rewritten config and the teacher weights renamed/filtered for it."""
    cfg = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    removals = set(removals)
    n = len(cfg["block_out_channels"])
    layers = _layers(cfg)
    pairs = {r.index for r in removals if r.kind == "pair"}
    down_attn = {r.index for r in removals if r.kind == "down-attn"}
    up_attn = {r.index for r in removals if r.kind == "up-attn"}
    cfg["layers_per_block"] = [n_ - (s in pairs) for s, n_ in enumerate(layers)]
    if len(set(cfg["layers_per_block"])) == 1:
        cfg["layers_per_block"] = cfg["layers_per_block"][0]
    cfg["down_block_types"] = [t.replace("CrossAttnDownBlock2D", "DownBlock2D") if s in down_attn else t
                               for s, t in enumerate(cfg["down_block_types"])]
    cfg["up_block_types"] = [t.replace("CrossAttnUpBlock2D", "UpBlock2D") if j in up_attn else t
                             for j, t in enumerate(cfg["up_block_types"])]
    if Removal("mid") in removals:
        cfg["mid_block_type"] = None
    out: dict[str, Any] = {}
    pat = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)$")
    for key, value in state_dict.items():
        if key.startswith("mid_block.") and Removal("mid") in removals:
            continue
        m = pat.match(key)
        if m is None:
            out[key] = value
            continue
        side, b, part, i, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
        stage = b if side == "down_blocks" else n - 1 - b
        if part == "attentions" and (b in down_attn if side == "down_blocks" else b in up_attn):
            continue
        if stage in pairs:
            last = layers[stage] - 1
            if i == last:
                continue  # the removed pair (down: the last one, up: the one before the skip pair)
            if side == "up_blocks" and i == last + 1:
                i = last  # the up pair that takes the previous stage's skip moves up by one
        out[f"{side}.{b}.{part}.{i}.{rest}"] = value
    return cfg, out


def build_student(teacher: Any, removals: Iterable[Removal], share: bool = False) -> Any:
    """A ``UNet2DConditionModel`` without ``removals`` holding copies of the teacher's weights
    (``share``: the teacher's own tensors, no copy - for read-only use or a discarded teacher)."""
    import torch
    from diffusers import UNet2DConditionModel

    cfg, state = apply_removals(teacher.config, teacher.state_dict(), removals)
    with torch.device("meta"):
        student = UNet2DConditionModel.from_config(cfg)
    try:
        student.load_state_dict(state if share else {k: v.clone() for k, v in state.items()}, strict=True, assign=True)
    except RuntimeError as e:
        raise LdmDeployError(f"internal: weights do not fit the rewritten config: {str(e)[:300]}") from None
    left = [n for n, t in list(student.named_parameters()) + list(student.named_buffers()) if t.is_meta]
    if left:
        raise LdmDeployError(f"internal: tensors left unset in the student: {left[:5]}")
    return student.eval().requires_grad_(False)


def rank_by_sensitivity(teacher: Any, cands: list[Removal], error_fn: Callable[[Any], float],
                        macs_fn: Callable[[Mapping[str, Any]], int]) -> list[dict[str, Any]]:
    """Per candidate: the teacher-output error with only it removed, the MACs it saves, and
    their ratio (lower = cheaper to remove); sorted cheapest first."""
    base = macs_fn(teacher.config)
    rows = []
    for r in cands:
        student = build_student(teacher, [r], share=True)
        saved = base - macs_fn(student.config)
        err = error_fn(student)
        rows.append({"removal": r.name, "error": err, "macs_saved": saved, "score": err / max(saved, 1) * base})
        del student
    return sorted(rows, key=lambda x: x["score"])


def choose_by_ratio(teacher: Any, ranked: list[dict[str, Any]], ratio: float,
                    macs_fn: Callable[[Mapping[str, Any]], int]) -> list[Removal]:
    """Remove ranked units, cheapest first, until at least ``ratio`` of the MACs are gone."""
    base = macs_fn(teacher.config)
    picked: list[Removal] = []
    for row in ranked:
        picked.append(parse_removal(row["removal"]))
        cfg, _ = apply_removals(teacher.config, {}, picked)
        if 1 - macs_fn(cfg) / base >= ratio - 1e-9:
            return picked
    cfg, _ = apply_removals(teacher.config, {}, picked)
    most = 1 - macs_fn(cfg) / base if picked else 0.0
    raise LdmDeployError(f"--method blocks can remove at most {most:.1%} of this U-Net's MACs "
                         f"({len(picked)} removable units, --keep respected); lower --ratio or use --method channels")
