"""``--method channels``: dependency-aware channel pruning of a ``UNet2DConditionModel`` with
Torch-Pruning's DepGraph, stored as a plain diffusers config.

DepGraph traces the U-Net and groups every set of coupled channels: a stage's residual stream
(residual adds, the skip concatenations into the up blocks, the GroupNorms on it), a resnet's
inner channels, a transformer's inner stream, the channels of one attention (q, k, v and the
output projection, tied by the attention product), a feed-forward's hidden units (GEGLU halves
tied). Each group is pruned as a whole, in units that keep the architecture's structure:

* groups with a GroupNorm on them lose whole GroupNorm groups (the surviving channels keep
  exactly their old normalisation statistics);
* attention groups lose whole heads (head size unchanged);
* other groups lose single channels.

**Storage.** Every group keeps the same fraction ``G'/G`` of its units, where ``G`` is
``norm_num_groups``: then every width in the U-Net is again ``block_out_channels[s] * G'/G`` (or
4x that for feed-forwards), heads become ``heads * G'/G``, and the result is an ordinary
``UNet2DConditionModel`` config (``block_out_channels``, ``norm_num_groups``, heads) that plain
``diffusers`` loads. The price: the pruning is uniform (each layer loses the same share, chosen
per layer by importance), the ratio is rounded to a whole number of heads (steps of 1/8 for
SD1.5's 8 heads; see :func:`plan_widths`), and a module cannot be kept at full width on its own
(``--keep`` with this method can only name the time embedding, which is always kept).

The GroupNorms in the up blocks that normalise ``concat(hidden, skip)`` see both streams at once;
their groups straddle the two streams, so they are re-partitioned (``G'`` groups over the kept
channels) rather than kept whole — distillation recovers that.

``conv_in``'s input and ``conv_out``'s output (the latent channels) and the time-embedding MLP
are never pruned. diffusers sizes the sinusoidal timestep projection by
``block_out_channels[0]``, so when stage 0 narrows, ``time_embedding.linear_1`` is refitted by
least squares on the new projection over all training timesteps (its error is reported).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import LdmDeployError

#: Modules whose output channels are never pruned (latent output, time-embedding MLP).
FIXED_OUTPUTS = ("conv_out", "time_embedding.linear_1", "time_embedding.linear_2")


@dataclass
class WidthPlan:
    """Keep ``groups_kept`` of ``groups`` GroupNorm groups (and the same share of everything)."""

    groups: int
    groups_kept: int
    requested: float
    step: int

    @property
    def effective(self) -> float:
        return 1.0 - self.groups_kept / self.groups

    def scale(self, n: int) -> int:
        if (n * self.groups_kept) % self.groups:
            raise LdmDeployError(f"internal: width {n} does not scale by {self.groups_kept}/{self.groups}")
        return n * self.groups_kept // self.groups


def stage_heads(config: Mapping[str, Any]) -> dict[int, int]:
    """Attention heads of every stage that has attention (down, up or, for the last, mid)."""
    n = len(config["block_out_channels"])
    heads = config.get("num_attention_heads") or config.get("attention_head_dim")
    heads = [heads] * n if isinstance(heads, int) else list(heads)
    out: dict[int, int] = {}
    for s in range(n):
        has = "CrossAttn" in config["down_block_types"][s] or "CrossAttn" in config["up_block_types"][n - 1 - s]
        if s == n - 1 and "CrossAttn" in str(config.get("mid_block_type", "UNetMidBlock2DCrossAttn")):
            has = True
        if has:
            out[s] = int(heads[s])
    return out


def plan_widths(config: Mapping[str, Any], ratio: float) -> WidthPlan:
    """Round ``ratio`` to the nearest share of GroupNorm groups that also removes whole heads in
    every attention stage (ties keep more channels)."""
    groups = int(config.get("norm_num_groups") or 32)
    widths = list(config["block_out_channels"])
    bad = [c for c in widths if c % groups]
    if bad:
        raise LdmDeployError(f"block_out_channels {widths} are not multiples of norm_num_groups {groups}")
    step = 1
    for s, h in stage_heads(config).items():
        if widths[s] % h:
            raise LdmDeployError(f"stage {s}: {widths[s]} channels do not split into {h} heads")
        need = groups // math.gcd(groups, h)  # G' must make G'*h/G whole heads
        step = step * need // math.gcd(step, need)
    options = list(range(step, groups, step))
    if not options:
        raise LdmDeployError(
            f"this U-Net cannot lose whole heads and whole GroupNorm groups together "
            f"(norm_num_groups {groups}, heads {sorted(set(stage_heads(config).values()))}); use --method blocks")
    target = groups * (1.0 - ratio)
    kept = min(options, key=lambda k: (abs(k - target), -k))
    return WidthPlan(groups, kept, ratio, step)


@dataclass
class ChannelReport:
    """What :func:`prune_channels` removed, for the manifest, the tests and feature distillation."""

    plan: WidthPlan
    removed: dict[str, list[int]] = field(default_factory=dict)  # module -> removed output channels
    removed_in: dict[str, list[int]] = field(default_factory=dict)  # module -> removed input channels
    groups: dict[str, int] = field(default_factory=dict)  # kind of group -> count
    groupnorm_whole: dict[str, bool] = field(default_factory=dict)  # GroupNorm -> kept whole groups
    heads: dict[str, list[int]] = field(default_factory=dict)  # attention -> [heads before, after]
    time_embedding_refit_rel_err: float | None = None

    def summary(self) -> dict[str, Any]:
        return {
            "norm_num_groups": [self.plan.groups, self.plan.groups_kept],
            "ratio_requested": self.plan.requested,
            "ratio_effective": round(self.plan.effective, 6),
            "ratio_step": self.plan.step / self.plan.groups,
            "dependency_groups": self.groups,
            "groupnorms_whole_groups": sum(self.groupnorm_whole.values()),
            "groupnorms_repartitioned": sorted(k for k, v in self.groupnorm_whole.items() if not v),
            "attention_heads": {k: v for k, v in sorted(self.heads.items())},
            "time_embedding_refit_rel_err": self.time_embedding_refit_rel_err,
        }


def pruned_config(config: Mapping[str, Any], plan: WidthPlan) -> dict[str, Any]:
    """The diffusers config of the pruned U-Net."""
    cfg = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    old0 = cfg["block_out_channels"][0]
    cfg["block_out_channels"] = [plan.scale(c) for c in cfg["block_out_channels"]]
    cfg["norm_num_groups"] = plan.groups_kept
    key = "num_attention_heads" if cfg.get("num_attention_heads") else "attention_head_dim"
    heads = cfg[key]
    cfg[key] = plan.scale(heads) if isinstance(heads, int) else [plan.scale(h) for h in heads]
    if cfg.get("time_embedding_type", "positional") == "positional":
        cfg["time_embedding_dim"] = cfg.get("time_embedding_dim") or old0 * 4
        # keep the highest frequencies of the old sinusoidal projection exactly (see module doc)
        cfg["freq_shift"] = int(cfg.get("freq_shift", 0)) + cfg["block_out_channels"][0] // 2 - old0 // 2
    return cfg


def prune_channels(unet: Any, plan: WidthPlan, scorer: Any, keep: Mapping[str, str] | None = None,
                   num_train_timesteps: int = 1000, inplace: bool = False) -> tuple[Any, ChannelReport]:
    """Prune ``unet`` by ``plan`` ranking units with ``scorer`` (a Torch-Pruning importance; for
    Taylor the gradients must already be on ``unet``). Returns a fresh ``UNet2DConditionModel``
    built from :func:`pruned_config` holding the pruned weights, and a report."""
    import torch
    import torch_pruning as tp
    from diffusers import UNet2DConditionModel
    from torch import nn

    keep = dict(keep or {})
    cfg = dict(unet.config)
    if cfg.get("time_embedding_type", "positional") != "positional" or cfg.get("class_embed_type") \
            or cfg.get("addition_embed_type") or cfg.get("encoder_hid_dim_type"):
        raise LdmDeployError("--method channels supports SD1.x/2.x-style U-Nets (positional time embedding, "
                             "no class/addition embeddings)")
    model = unet if inplace else copy.deepcopy(unet)
    grads = {n: p.grad for n, p in unet.named_parameters()}
    if not inplace:  # deepcopy does not carry .grad
        for n, p in model.named_parameters():
            p.grad = None if grads[n] is None else grads[n].clone()
    model.requires_grad_(True).eval()
    names = {m: n for n, m in model.named_modules()}
    latent = 2 ** (len(cfg["block_out_channels"]) - 1)
    cross = cfg["cross_attention_dim"]
    cross = cross[0] if isinstance(cross, (list, tuple)) else cross
    dev = next(model.parameters()).device
    example = (torch.randn(1, cfg["in_channels"], latent, latent, device=dev), torch.tensor([500], device=dev),
               torch.randn(1, 77, int(cross), device=dev))
    with torch.enable_grad():
        dg = tp.DependencyGraph().build_dependency(
            model, example_inputs=example, forward_fn=lambda m, x: m(*x, return_dict=False)[0], verbose=False)
    fixed = [model.get_submodule(n) for n in FIXED_OUTPUTS]
    report = ChannelReport(plan)
    decisions = []
    for group in dg.get_all_groups(ignored_layers=fixed, root_module_types=(nn.Conv2d, nn.Linear)):
        members = [(item.dep.target.module, item) for item in group if item.dep.target.module in names]
        for mod, _ in members:
            if names[mod] in keep:
                raise LdmDeployError(
                    f"--keep {keep[names[mod]]!r} covers {names[mod]}, whose channels are tied to a stage width: "
                    "--method channels writes a plain diffusers config (one width per stage, one norm_num_groups), "
                    "so only the time embedding (kept by default) can stay intact; use --method blocks to keep blocks")
        linear = [(m, it) for m, it in members if isinstance(m, (nn.Conv2d, nn.Linear))]
        width = min(len(it.idxs) for _, it in linear)
        # the root: a layer whose whole output (or else input) dimension is exactly these channels
        root, root_item = next((m, it) for m, it in sorted(
            linear, key=lambda x: not dg.is_out_channel_pruning_fn(x[1].dep.handler))
            if len(it.idxs) == width == _dim(m, dg.is_out_channel_pruning_fn(it.dep.handler)))
        full = dg.get_pruning_group(root, root_item.dep.handler, list(range(width)))
        kind, unit = _classify(full, names, width)
        keep_n = plan.scale(width)
        if width % unit or keep_n % unit:
            raise LdmDeployError(f"internal: group at {names[root]} ({width} channels) is not divisible into {kind} "
                                 f"units of {unit}")
        imp = scorer(full)
        if imp is None:
            imp = torch.zeros(width)
        units = imp.detach().float().cpu().view(width // unit, unit).sum(1)
        kept_units = set(torch.topk(units, keep_n // unit).indices.tolist())
        idxs = [u * unit + j for u in range(width // unit) if u not in kept_units for j in range(unit)]
        decisions.append((root, root_item.dep.handler, idxs))
        report.groups[kind] = report.groups.get(kind, 0) + 1
        if kind == "heads":
            attn = names[root].rsplit(".", 1)[0]
            heads = width // unit
            report.heads[attn] = [heads, keep_n // unit]
    gn_before = {names[m]: (m.num_channels, m.num_groups) for m in model.modules() if isinstance(m, nn.GroupNorm)}
    touched: dict[str, int] = {}
    for root, handler, idxs in decisions:
        group = dg.get_pruning_group(root, handler, idxs)
        for item in group:
            mod = item.dep.target.module
            if mod not in names:
                continue
            target = report.removed if dg.is_out_channel_pruning_fn(item.dep.handler) else report.removed_in
            target.setdefault(names[mod], []).extend(int(i) for i in item.idxs)
            touched[names[mod]] = touched.get(names[mod], 0) + 1
        group.prune()
    for name, (channels, groups) in gn_before.items():
        removed = set(report.removed.get(name, []))
        size = channels // groups
        # a GroupNorm over a skip concatenation is touched by two groups: re-partitioned, not whole
        report.groupnorm_whole[name] = touched.get(name, 0) == 1 and all(
            len(removed & set(range(g * size, (g + 1) * size))) in (0, size) for g in range(groups))
    new_cfg = pruned_config(cfg, plan)
    report.time_embedding_refit_rel_err = _refit_time_embedding(model, cfg, new_cfg, num_train_timesteps)
    with torch.device("meta"):
        fresh = UNet2DConditionModel.from_config(new_cfg)
    try:
        fresh.load_state_dict(model.state_dict(), strict=True, assign=True)
    except RuntimeError as e:
        raise LdmDeployError(f"internal: the pruned weights do not fit the rewritten config: {str(e)[:300]}") from None
    leftovers = [n for n, t in list(fresh.named_parameters()) + list(fresh.named_buffers()) if t.is_meta]
    if leftovers:
        raise LdmDeployError(f"internal: tensors left unset after pruning: {leftovers[:5]}")
    fresh.to(dev).eval().requires_grad_(False)
    for p in fresh.parameters():
        p.grad = None
    if not inplace:
        del model
    return fresh, report


def _dim(mod: Any, out: bool) -> int:
    """Output (``out``) or input channels of a Conv2d/Linear."""
    if hasattr(mod, "out_channels"):
        return int(mod.out_channels if out else mod.in_channels)
    return int(mod.out_features if out else mod.in_features)


def _classify(group: Any, names: Mapping[Any, str], width: int) -> tuple[str, int]:
    """Kind of a dependency group and its pruning unit: whole GroupNorm groups for groups with a
    GroupNorm over exactly these channels, whole heads for attention q/k/v, else single channels."""
    from diffusers.models.attention_processor import Attention
    from torch import nn

    unit, kind = 1, "channels"
    for item in group:
        mod = item.dep.target.module
        if isinstance(mod, nn.GroupNorm) and mod.num_channels == width and list(item.idxs) == list(item.root_idxs):
            gsize = mod.num_channels // mod.num_groups
            unit, kind = unit * gsize // math.gcd(unit, gsize), "groupnorm"
    for item in group:
        mod = item.dep.target.module
        name = names.get(mod, "")
        if (name.endswith((".to_q", ".to_k", ".to_v")) and isinstance(mod, nn.Linear)
                and group._DG.is_out_channel_pruning_fn(item.dep.handler)):
            parent = group._DG.model.get_submodule(name.rsplit(".", 1)[0])
            if isinstance(parent, Attention):
                head = mod.out_features // parent.heads
                return "heads", unit * head // math.gcd(unit, head)
    return kind, unit


def _refit_time_embedding(model: Any, old_cfg: Mapping[str, Any], new_cfg: Mapping[str, Any], steps: int) -> float | None:
    """Refit ``time_embedding.linear_1`` for the narrower sinusoidal projection; returns the
    relative RMS error of its output over all ``steps`` training timesteps (None if unchanged)."""
    import torch
    from diffusers.models.embeddings import get_timestep_embedding

    old, new = int(old_cfg["block_out_channels"][0]), int(new_cfg["block_out_channels"][0])
    if old == new:
        return None
    lin = model.time_embedding.linear_1
    t = torch.arange(steps, dtype=torch.float64)
    flip = bool(old_cfg.get("flip_sin_to_cos", True))
    e_old = get_timestep_embedding(t, old, flip, float(old_cfg.get("freq_shift", 0))).double()
    e_new = get_timestep_embedding(t, new, flip, float(new_cfg.get("freq_shift", 0))).double()
    w, b = lin.weight.detach().double().cpu(), lin.bias.detach().double().cpu()
    target = e_old @ w.T + b
    a = torch.cat([e_new, torch.ones(steps, 1, dtype=torch.float64)], dim=1)
    sol = torch.linalg.lstsq(a, target).solution
    err = float((a @ sol - target).norm() / target.norm())
    dev, dt = lin.weight.device, lin.weight.dtype
    lin.weight = torch.nn.Parameter(sol[:-1].T.contiguous().to(dev, dt))
    lin.bias = torch.nn.Parameter(sol[-1].contiguous().to(dev, dt))
    lin.in_features = new
    return err
