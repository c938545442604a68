"""The request and response bodies of ``POST /v1/generate``."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class GenerateRequest(BaseModel):
    """The :class:`~ldm_deploy.runtime.Pipeline` call's arguments (text-to-image). ``seed``: None
    draws a random one, returned in the response."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    negative_prompt: str | None = None
    steps: int = Field(25, description="denoising steps (num_inference_steps)")
    guidance_scale: float = 7.5
    height: int | None = None
    width: int | None = None
    seed: int | None = None
    eta: float = Field(0.0, description="DDIM eta; > 0 is stochastic and never shares a batch")
    scheduler: str = Field("ddim", description="sampler: ddim, dpm++2m, dpm++2m-karras, euler, euler-a "
                           "(euler-a is stochastic and never shares a batch)")
    cache_interval: int = Field(1, description="DeepCache: the full U-Net every N-th step (artifacts exported "
                                "with --deepcache)")
    num_images: int = Field(1, description="images for the prompt (num_images_per_prompt)")


class GenerateResponse(BaseModel):
    """JSON answer: base64 PNGs and how the call went."""

    images: list[str] = Field(description="base64-encoded PNGs")
    seed: int
    steps: int
    batch_size: int = Field(description="images in the pipeline call that served this request")
    timings: dict[str, float] = Field(description="seconds per phase of the (shared) call, plus queue_wait")


def validation_message(errors: list[dict]) -> str:
    """Pydantic's validation errors as one line: ``field: message; field: message``."""
    parts = []
    for e in errors:
        where = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
        parts.append(f"{where}: {e.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"
