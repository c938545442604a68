"""Write a pruned pipeline: a plain diffusers directory (``model_index.json``, ``unet/``,
``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``) plus ``manifest.json`` and a model
card ``README.md``, built in a temporary sibling and renamed into place (:class:`ArtifactWriter`).

The pruned U-Net's ``config.json`` is an ordinary ``UNet2DConditionModel`` config, so
``StableDiffusionPipeline.from_pretrained(OUT)``, ``UNet2DConditionModel.from_pretrained(OUT,
subfolder="unet")``, ``ldm_deploy.models.load_model(OUT)`` and ``ldm-export --model OUT`` all load
it without any ldm-deploy code.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..artifact import ArtifactWriter


def write_pruned(out: Path, model: Any, unet: Any, manifest: dict[str, Any], overwrite: bool = False,
                 before_save: Callable[[], None] | None = None) -> dict[str, Any]:
    """Save ``model`` (a :class:`~ldm_deploy.models.LoadedModel`) with ``unet`` in place of its
    U-Net into ``out``; ``manifest`` is merged into ``manifest.json``. Returns the manifest."""
    from ..models import LoadedModel

    with ArtifactWriter(out, overwrite=overwrite) as w:
        if before_save is not None:
            before_save()
        pruned = LoadedModel(model.source, model.text_encoder.cpu(), unet.cpu(), model.vae.cpu(), model.tokenizer_dir,
                             model.scheduler_config)
        pruned.save_pretrained(w.path)
        (w.path / "README.md").write_text(model_card(manifest))
        w.manifest.update(manifest)
        result = w.manifest
    return result


def _num(v: Any, scale: float, fmt: str) -> str:
    return "–" if v is None else format(v / scale, fmt)


def model_card(m: dict[str, Any]) -> str:
    """A short markdown model card from the manifest fields."""
    p = m["prune"]
    before, after = p["before"], p["after"]
    hw = before["latent_hw"]
    lines = [
        f"# Pruned U-Net: {m['source'].get('model')} ({p['method']})",
        "",
        ("Written by `ldm-prune` (ldm-deploy). A plain diffusers Stable Diffusion pipeline: "
         "`StableDiffusionPipeline.from_pretrained(this_dir)` loads it; `ldm-export --model this_dir` exports it."),
        "",
        "| | U-Net params | GMACs per U-Net eval at latent " + f"{hw[0]}x{hw[1]} (one sample; a CFG step is 2x) |",
        "|---|---|---|",
        f"| before | {_num(before['params'], 1e6, '.4g')} M | {_num(before['macs'], 1e9, '.4g')} |",
        f"| after | {_num(after['params'], 1e6, '.4g')} M | {_num(after['macs'], 1e9, '.4g')} |",
        "",
    ]
    if p["method"] == "channels":
        c = p["channels"]
        lines.append(f"Channel ratio requested {p['ratio']}, effective {c['ratio_effective']} (whole GroupNorm groups "
                     f"{c['norm_num_groups'][0]} -> {c['norm_num_groups'][1]}, whole heads), importance "
                     f"`{p['importance']}`.")
    else:
        lines.append(f"Removed blocks: {', '.join(p['blocks']['removed'])}"
                     + (f" (target {p['ratio']:.0%} of the MACs)" if p.get("ratio") else " (BK-SDM-Small recipe)") + ".")
    d = p.get("distillation")
    if d and d.get("steps"):
        lines.append(f"Distilled from the unpruned teacher for {d['steps']} steps (batch {d['batch_size']}): held-out "
                     f"output KD loss {d['kd_out_loss_before']:.5f} -> {d['kd_out_loss_after']:.5f}.")
    else:
        lines.append("Not distilled: expect a large quality drop until it is (see `ldm-prune --distill-steps`).")
    if p.get("keep"):
        lines.append(f"Kept intact: {', '.join(p['keep'])}.")
    return "\n".join(lines) + "\n"
