"""The ``ldm-prune`` pipeline: load, (generate data,) prune, count, (distil,) save."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import LdmDeployError

METHODS = ("channels", "blocks")  # one pruner each: PRUNERS
DEFAULT_RATIO = 0.3
DEFAULT_IMPORTANCE = "l1"


@dataclass
class PruneOptions:
    method: str = "channels"
    ratio: float | None = None  # channels: share of channels (default 0.3); blocks: share of MACs (default: BK-SDM)
    importance: str | None = None  # channels only: l1 (default), l2, taylor
    keep: tuple[str, ...] = ()
    distill_steps: int = 0
    data: str = "generator"
    data_size: int = 64
    sample_steps: int = 20
    guidance: float = 7.5
    batch_size: int = 16
    lr: float = 1e-4
    seed: int = 0
    taylor_timesteps: int = 8
    count_size: int | None = None  # image side the MACs are counted at (default: the model's native size)
    device: str = "auto"
    threads: int = 0  # torch intra-op threads (0: torch's default)
    progress: bool = True


def check_options(opts: PruneOptions) -> None:
    """Reject bad options before anything is loaded."""
    from .importance import IMPORTANCES

    if opts.method not in METHODS:
        raise LdmDeployError(f"unknown method {opts.method!r}: choose {' or '.join(METHODS)}")
    if opts.ratio is not None and not 0.0 < opts.ratio < 1.0:
        raise LdmDeployError(f"--ratio {opts.ratio} is outside (0, 1)")
    if opts.importance is not None:
        if opts.method != "channels":
            raise LdmDeployError("--importance applies to --method channels (blocks are ranked by output sensitivity)")
        if opts.importance not in IMPORTANCES:
            raise LdmDeployError(f"unknown importance {opts.importance!r}: choose {', '.join(IMPORTANCES)}")
    for label, v, lo in (("--distill-steps", opts.distill_steps, 0), ("--data-size", opts.data_size, 1),
                         ("--sample-steps", opts.sample_steps, 1), ("--batch-size", opts.batch_size, 1),
                         ("--taylor-timesteps", opts.taylor_timesteps, 1), ("--threads", opts.threads, 0)):
        if v < lo:
            raise LdmDeployError(f"{label} must be >= {lo}, got {v}")
    if opts.data != "generator" and not Path(opts.data).is_file():
        raise LdmDeployError(f"--data {opts.data!r} is neither 'generator' nor an existing prompt file")
    if opts.count_size is not None and (opts.count_size <= 0 or opts.count_size % 8):
        raise LdmDeployError(f"--count-size {opts.count_size} is not a positive multiple of 8")
    if opts.device not in ("auto", "cpu", "cuda"):
        raise LdmDeployError(f"--device {opts.device!r}: choose auto, cpu or cuda")


def require_unet(model_name: str) -> None:
    """Fail clearly when a local pipeline has no ``UNet2DConditionModel``."""
    from ..models import ALIASES, EMBEDDED, random_model_names

    if model_name in ALIASES or model_name in EMBEDDED or model_name in random_model_names():
        return
    path = Path(model_name).expanduser()
    index = path / "model_index.json"
    if not index.is_file():
        return  # load_model explains (missing directory, not a pipeline, hub id offline)
    try:
        parts = json.loads(index.read_text())
    except json.JSONDecodeError as e:
        raise LdmDeployError(f"{index} is not valid JSON: {e}") from None
    entry = parts.get("unet")
    if not entry or not isinstance(entry, list) or entry[-1] is None or not (path / "unet").is_dir():
        others = ", ".join(k for k in parts if not k.startswith("_")) or "nothing"
        raise LdmDeployError(f"{model_name} has no U-Net (its model_index.json lists {others}); "
                             "ldm-prune prunes the UNet2DConditionModel of SD-class pipelines")
    cls = entry[-1]
    if cls != "UNet2DConditionModel":
        raise LdmDeployError(f"the U-Net of {model_name} is a {cls}, not a UNet2DConditionModel")


def _device(choice: str) -> str:
    import torch

    if choice == "cuda" and not torch.cuda.is_available():
        raise LdmDeployError("--device cuda: no CUDA device is available")
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return choice


def prune_model(model_name: str, out: Path | str, opts: PruneOptions, overwrite: bool = False,
                log: Callable[[str], None] = print) -> dict[str, Any]:
    """Prune the U-Net of ``model_name`` and write the pipeline to ``out``; returns the manifest."""
    check_options(opts)
    require_unet(model_name)
    from ..artifact import ArtifactWriter

    ArtifactWriter(out, overwrite=overwrite)  # refuses an existing output before any work
    import torch

    from ..artifact import library_versions, peak_rss_bytes
    from ..models import load_model
    from .counting import unet_counts
    from .keep import match_keep

    start = time.perf_counter()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    torch.manual_seed(opts.seed)
    device = _device(opts.device)
    ratio = opts.ratio if opts.ratio is not None or opts.method == "blocks" else DEFAULT_RATIO
    importance = opts.importance or (DEFAULT_IMPORTANCE if opts.method == "channels" else None)
    log(f"loading {model_name}")
    model = load_model(model_name)
    teacher = model.unet
    old_cfg = _clean(dict(teacher.config))
    keep = match_keep([n for n, _ in teacher.named_modules()], opts.keep)
    vae_scale = model.dims().vae_scale
    native = int(teacher.config.sample_size)
    count_lat = (opts.count_size // vae_scale) if opts.count_size else native
    if count_lat % 2 ** (len(teacher.config.block_out_channels) - 1):
        raise LdmDeployError(f"--count-size {opts.count_size} does not fit this U-Net's downsampling")
    count_hw = (count_lat, count_lat)
    before = unet_counts(teacher, count_hw)
    log(f"U-Net: {before['params'] / 1e6:.2f} M params, {before['macs'] / 1e9:.3f} GMACs per eval at "
        f"{count_lat * vae_scale}x{count_lat * vae_scale}")
    teacher.to(device)
    data = None
    need_data = opts.distill_steps > 0 or importance == "taylor" or (opts.method == "blocks" and ratio is not None)
    if need_data:
        from .data import generate_latents, read_prompts

        prompts = read_prompts(opts.data, opts.data_size, opts.seed)
        log(f"generating {len(prompts)} teacher latents ({opts.sample_steps} DDIM steps, guidance {opts.guidance}, "
            f"data: {opts.data})")
        data = generate_latents(model, teacher, prompts, (native, native), opts.sample_steps, opts.guidance,
                                opts.seed, device, batch=max(opts.batch_size, 16), progress=opts.progress)
    job = _Job(model, teacher, opts, ratio, importance, keep, data, count_hw, log)
    student, removed, details = PRUNERS[opts.method](job)
    if opts.distill_steps == 0:
        teacher = None  # not needed for distillation: channel pruning has pruned it in place
    after = unet_counts(student, count_hw)
    log(f"pruned U-Net: {after['params'] / 1e6:.2f} M params (-{1 - after['params'] / before['params']:.1%}), "
        f"{after['macs'] / 1e9:.3f} GMACs (-{1 - after['macs'] / before['macs']:.1%})")
    distillation = None
    if opts.distill_steps:
        from .distill import DistillConfig, distill

        cfg = DistillConfig(steps=opts.distill_steps, batch_size=opts.batch_size, lr=opts.lr, seed=opts.seed)
        distillation = distill(teacher, student.to(device), data, cfg, removed, opts.progress, log)
    else:
        log("no distillation (--distill-steps 0): the pruned model needs it to recover quality")
    manifest = {
        "stage": "prune",
        "kind": "diffusers-pipeline",
        "source": model.source,
        "prune": {
            "method": opts.method,
            "ratio": ratio,
            "importance": importance,
            "keep": list(opts.keep),
            "before": before,
            "after": after,
            "reduction": {"params": 1 - after["params"] / before["params"], "macs": 1 - after["macs"] / before["macs"]},
            "count_size": count_lat * vae_scale,
            **details,
            "unet_config_changes": _config_changes(old_cfg, _clean(dict(student.config))),
            "data": None if data is None else {"source": opts.data, "size": opts.data_size,
                                               "sample_steps": opts.sample_steps, "guidance": opts.guidance},
            "distillation": distillation,
            "options": asdict(opts),
        },
        "versions": {**library_versions(), **library_versions(("torch-pruning",))},
    }
    teacher = None
    manifest["stats"] = {"prune_seconds": round(time.perf_counter() - start, 1), "peak_rss_bytes": peak_rss_bytes()}
    return _save(out, model, student, manifest, overwrite)


@dataclass
class _Job:
    """What a prune method needs: the loaded model, the options resolved, the data (if any)."""

    model: Any
    teacher: Any
    opts: PruneOptions
    ratio: float | None
    importance: str | None
    keep: Any
    data: Any
    count_hw: tuple[int, int]
    log: Callable[[str], None]

    @property
    def keep_teacher(self) -> bool:
        """Distillation needs the unpruned teacher, so the student is pruned from a copy."""
        return self.opts.distill_steps > 0


def _prune_channels(job: _Job) -> tuple[Any, dict[str, list[int]], dict[str, Any]]:
    """Torch-Pruning channel pruning: (student, removed channel indices, manifest details)."""
    import copy

    from .channels import plan_widths, prune_channels
    from .data import spread_timesteps
    from .importance import accumulate_taylor_grads, make_scorer

    ratio = float(job.ratio)  # type: ignore[arg-type]  # channels always have a ratio
    plan = plan_widths(job.teacher.config, ratio)
    if abs(plan.effective - ratio) > 1e-9:
        job.log(f"ratio {ratio} rounded to {plan.effective:.4g}: whole heads and GroupNorm groups "
                f"(keeping {plan.groups_kept} of {plan.groups} groups per layer)")
    work = copy.deepcopy(job.teacher) if job.keep_teacher else job.teacher
    details: dict[str, Any] = {}
    if job.importance == "taylor":
        steps = spread_timesteps(job.model.scheduler_config, job.opts.taylor_timesteps)
        loss = accumulate_taylor_grads(work, job.data, steps, job.opts.batch_size, job.opts.seed)
        details["taylor"] = {"timesteps": steps, "eps_mse": loss}
    job.log(f"pruning channels with Torch-Pruning DepGraph ({job.importance} importance)")
    train_steps = int(job.model.scheduler_config.get("num_train_timesteps", 1000))
    student, report = prune_channels(work, plan, make_scorer(job.importance), job.keep, train_steps, inplace=True)
    details["channels"] = report.summary()
    return student, report.removed, details


def _prune_blocks(job: _Job) -> tuple[Any, dict[str, list[int]], dict[str, Any]]:
    """BK-SDM-style block removal (its recipe, or ranked by output sensitivity to a MACs ratio)."""
    from . import blocks
    from .counting import unet_macs

    teacher, cfg = job.teacher, job.teacher.config
    if job.ratio is None:
        removals = blocks.bk_sdm_recipe(cfg, job.keep)
        info: dict[str, Any] = {"recipe": "bk-sdm-small"}
    else:
        cands = [r for r in blocks.candidates(cfg) if blocks.blocked_by_keep(r, cfg, job.keep) is None]
        job.log(f"ranking {len(cands)} removable blocks by output sensitivity")
        def macs(c: Any) -> float:
            return unet_macs(c, job.count_hw)

        error = _error_fn(teacher, job.data, job.model.scheduler_config, job.opts.batch_size)
        ranked = blocks.rank_by_sensitivity(teacher, cands, error, macs)
        removals = blocks.choose_by_ratio(teacher, ranked, job.ratio, macs)
        info = {"recipe": "sensitivity", "sensitivity": ranked}
    student = blocks.build_student(teacher, removals, share=not job.keep_teacher)
    info["removed"] = [r.name for r in removals]
    info["removed_modules"] = [m for r in removals for m in r.modules(cfg)]
    return student, {}, {"blocks": info}


PRUNERS: dict[str, Callable[[_Job], tuple[Any, dict[str, list[int]], dict[str, Any]]]] = {
    "channels": _prune_channels,
    "blocks": _prune_blocks,
}


def _save(out: Path | str, model: Any, student: Any, manifest: dict[str, Any], overwrite: bool) -> dict[str, Any]:
    from .saving import write_pruned

    return write_pruned(Path(out), model, student, manifest, overwrite=overwrite)


def _clean(cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items() if not k.startswith("_")}


def _config_changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, list[Any]]:
    return {k: [old.get(k), new.get(k)] for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}


def _error_fn(teacher: Any, data: Any, scheduler_config: dict[str, Any], batch: int) -> Callable[[Any], float]:
    """Relative squared error of a student's output vs the teacher's on noised teacher latents
    at 4 timesteps spread along the trajectory (teacher outputs cached)."""
    import torch

    from .data import spread_timesteps

    gen = torch.Generator().manual_seed(1234)
    n = min(len(data.x0), batch)
    batches = [data.batch(n, gen, cfg_drop=0.1, t=t) for t in spread_timesteps(scheduler_config, 4)]
    with torch.no_grad():
        refs = [teacher(x, t, c, return_dict=False)[0] for x, t, c, _ in batches]

    def error(student: Any) -> float:
        with torch.no_grad():
            errs = [float((student(x, t, c, return_dict=False)[0] - r).pow(2).sum() / r.pow(2).sum())
                    for (x, t, c, _), r in zip(batches, refs)]
        return sum(errs) / len(errs)

    return error
