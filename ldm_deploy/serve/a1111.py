"""AUTOMATIC1111-compatible text to image: ``POST /sdapi/v1/txt2img`` mapped onto the micro-batcher.

A1111 clients send the whole ``StableDiffusionProcessingTxt2Img`` field set. Here:

* used: ``prompt``, ``negative_prompt``, ``steps``, ``cfg_scale``, ``sampler_name`` (or the older
  ``sampler_index``) with ``scheduler`` (A1111 >= 1.9: ``"Automatic"`` or ``"Karras"``), ``width``,
  ``height`` (default: the artifact's size), ``seed`` (-1: random), ``batch_size``, ``n_iter``,
  ``eta`` (DDIM), ``send_images``. Image ``i`` of the request gets seed ``seed + i`` (batch after
  batch, as A1111 numbers them) and is exactly what ``/v1/generate`` gives for that seed.
* refused with 422, because they would change the image and are not implemented:
  :data:`REFUSED` with a non-default value (``enable_hr: true``, ``restore_faces: true``, a
  ``styles`` list, a script, ``override_settings``, variation seeds, ...).
* ignored (listed under ``ignored`` in ``info``): every other field, e.g. ``do_not_save_samples``,
  ``save_images``, ``hr_*`` while ``enable_hr`` is false, ``denoising_strength``, ``comments``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, Field

from ..errors import LdmDeployError
from ..runtime.pipeline import Pipeline
from ..specs import MAX_BATCH
from .batcher import Job, text_windows

#: A1111 sampler names -> ours.
SAMPLERS = {"DDIM": "ddim", "DPM++ 2M": "dpm++2m", "DPM++ 2M Karras": "dpm++2m-karras", "Euler": "euler",
            "Euler a": "euler-a"}
#: A1111 >= 1.9 splits the noise schedule off the sampler: (sampler, scheduler) -> ours.
SCHEDULED = {("DPM++ 2M", "Karras"): "dpm++2m-karras"}
AUTOMATIC = ("", "automatic")
DEFAULT_SAMPLER = "Euler"  # what A1111's API uses when a request names none

#: Fields that change the image, with the values that leave it alone (anything else: 422).
REFUSED: dict[str, Callable[[Any], bool]] = {
    "enable_hr": lambda v: not v,
    "restore_faces": lambda v: not v,
    "tiling": lambda v: not v,
    "styles": lambda v: not v,
    "script_name": lambda v: not v,
    "alwayson_scripts": lambda v: not v,
    "override_settings": lambda v: not v,
    "refiner_checkpoint": lambda v: not v,
    "subseed_strength": lambda v: not v,
    "seed_resize_from_h": lambda v: v in (None, -1, 0),
    "seed_resize_from_w": lambda v: v in (None, -1, 0),
    "s_churn": lambda v: not v,
    "s_tmin": lambda v: not v,
    "s_tmax": lambda v: v in (None, 0) or (isinstance(v, (int, float)) and math.isinf(v)),
    "s_noise": lambda v: v in (None, 1, 1.0),
    "s_min_uncond": lambda v: not v,
}


class Txt2ImgRequest(BaseModel):
    """The A1111 fields this route uses; every other field is kept (``extra``) and checked
    against :data:`REFUSED` or ignored."""

    model_config = ConfigDict(extra="allow")

    prompt: str = ""
    negative_prompt: str = ""
    steps: int = 50
    cfg_scale: float = 7.0
    sampler_name: str | None = None
    sampler_index: str | None = None
    scheduler: str | None = None
    width: int | None = Field(None, description="default: the artifact's export size")
    height: int | None = None
    seed: int = -1
    batch_size: int = 1
    n_iter: int = 1
    eta: float | None = None
    send_images: bool = True


@dataclass
class Plan:
    """One A1111 request resolved into batcher jobs (one image each)."""

    body: Txt2ImgRequest
    sampler_label: str
    scheduler: str
    jobs: list[Job]
    ignored: list[str]


def sampler_of(body: Txt2ImgRequest) -> tuple[str, str]:
    """(A1111 label, our scheduler name) of the request; 422 for an unsupported one."""
    name = body.sampler_name or body.sampler_index or DEFAULT_SAMPLER
    sched = (body.scheduler or "").strip()
    supported = ", ".join(f"'{s}'" for s in SAMPLERS)
    if name not in SAMPLERS:
        raise LdmDeployError(f"sampler_name {name!r} is not supported; supported: {supported} "
                             "(scheduler: 'Automatic', or 'Karras' with 'DPM++ 2M')")
    if sched.lower() in AUTOMATIC:
        return name, SAMPLERS[name]
    if (name, sched) in SCHEDULED:
        return f"{name} {sched}", SCHEDULED[(name, sched)]
    raise LdmDeployError(f"scheduler {sched!r} with sampler {name!r} is not supported; supported: 'Automatic' with "
                         f"{supported}, or 'Karras' with 'DPM++ 2M'")


def plan(body: Txt2ImgRequest, pipe: Pipeline, random_seed: int) -> Plan:
    """Check the request (one-line :class:`LdmDeployError` for what it cannot do) and make its jobs."""
    extra = body.model_extra or {}
    refused = [k for k, ok in REFUSED.items() if k in extra and not ok(extra[k])]
    if refused:
        raise LdmDeployError(f"not supported by ldm-serve (it would change the image): "
                             f"{', '.join(f'{k}={extra[k]!r}' for k in refused)}")
    label, scheduler = sampler_of(body)
    for name, v in (("batch_size", body.batch_size), ("n_iter", body.n_iter)):
        if v < 1:
            raise LdmDeployError(f"{name} must be >= 1, got {v}")
    total = body.batch_size * body.n_iter
    if total > MAX_BATCH:
        raise LdmDeployError(f"batch_size x n_iter = {total} images exceed {MAX_BATCH} per request")
    if body.seed < -1:
        raise LdmDeployError(f"seed must be -1 (random) or >= 0, got {body.seed}")
    eta = 0.0
    if body.eta is not None:
        if scheduler == "ddim":
            eta = float(body.eta)
        elif scheduler == "euler-a" and body.eta != 1.0:
            raise LdmDeployError(f"eta {body.eta} with 'Euler a' (ancestral noise scale) is not supported: leave it "
                                 "unset or 1")
    seed = random_seed if body.seed == -1 else body.seed
    negative = body.negative_prompt or None
    height, width, stochastic = pipe.check_call(body.prompt, negative, body.steps, body.cfg_scale, body.height,
                                                body.width, 1, seed, eta, scheduler)
    windows = text_windows(pipe, body.prompt, negative)
    jobs = [Job(body.prompt, negative, body.steps, body.cfg_scale, height, width, seed + i, eta, 1, scheduler, 1,
                stochastic, windows=windows) for i in range(total)]
    ignored = sorted(k for k in extra if k not in REFUSED)
    return Plan(body, label, scheduler, jobs, ignored)


def response(p: Plan, images_b64: list[str], model_name: str) -> dict[str, Any]:
    """A1111's answer: ``images`` (base64 PNG), ``parameters`` (the request) and ``info`` (a JSON
    string with the resolved seeds and settings, as A1111's ``Processed.js()``)."""
    b = p.body
    first = p.jobs[0]
    seeds = [j.seed for j in p.jobs]
    n = len(p.jobs)
    neg = b.negative_prompt
    infotext = (f"{b.prompt}\nNegative prompt: {neg}\n" if neg else f"{b.prompt}\n") + (
        f"Steps: {b.steps}, Sampler: {p.sampler_label}, CFG scale: {b.cfg_scale:g}, Seed: {{seed}}, "
        f"Size: {first.width}x{first.height}, Model: {model_name}")
    info = {
        "prompt": b.prompt, "all_prompts": [b.prompt] * n,
        "negative_prompt": neg, "all_negative_prompts": [neg] * n,
        "seed": seeds[0], "all_seeds": seeds, "subseed": -1, "all_subseeds": [-1] * n, "subseed_strength": 0,
        "width": first.width, "height": first.height, "sampler_name": p.sampler_label,
        "scheduler": p.scheduler, "cfg_scale": b.cfg_scale, "steps": b.steps, "batch_size": b.batch_size,
        "n_iter": b.n_iter, "restore_faces": False, "sd_model_name": model_name, "sd_model_hash": None,
        "seed_resize_from_w": -1, "seed_resize_from_h": -1, "denoising_strength": None,
        "extra_generation_params": {}, "index_of_first_image": 0,
        "infotexts": [infotext.replace("{seed}", str(s)) for s in seeds],
        "styles": [], "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "clip_skip": 1,
        "is_using_inpainting_conditioning": False, "version": "ldm-deploy", "ignored": p.ignored,
    }
    return {"images": images_b64 if b.send_images else [], "parameters": b.model_dump(), "info": json.dumps(info)}
