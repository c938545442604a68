"""Quality evaluation of generated shapes images, for any backend.

:func:`evaluate` takes the images a pipeline produced for a list of prompts (uint8
``HxWx3`` arrays, a ``[N, H, W, 3]`` batch or PIL images) and reports

* **prompt adherence** - the share of images whose five attributes (as read by the
  shipped :class:`~ldm_deploy.quality.classifier.AttributeClassifier`) all match the
  prompt, overall and split into seen vs held-out (:data:`~ldm_deploy.data.shapes.HELDOUT`)
  shape/colour combinations, plus per-attribute accuracy;
* **domain FID** - Fréchet distance between classifier features of the generated
  images and of real generator renders of the same prompts (fixed seed
  :data:`REFERENCE_SEED`);
* **PSNR / SSIM** against ``reference_images`` (another variant's images for the
  same prompts and seeds), when given;
* **Inception FID** through torchmetrics / torch-fidelity, only when the Inception
  weights are already on disk (never downloaded); otherwise ``None`` with the reason.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ldm_deploy.data.shapes import Attributes, parse_caption, render
from ldm_deploy.quality.classifier import AttributeClassifier, load_default_classifier, to_uint8_batch
from ldm_deploy.quality.metrics import frechet_distance, prompt_adherence, psnr, ssim

__all__ = [
    "REFERENCE_SEED",
    "INCEPTION_WEIGHTS_ENV",
    "evaluate",
    "render_references",
    "to_attributes",
    "find_inception_weights",
    "inception_fid",
]

#: Seed of the jitter of the real renders that the domain FID compares against.
REFERENCE_SEED = 424_242
#: Environment variable that may point at torch-fidelity's Inception weights file.
INCEPTION_WEIGHTS_ENV = "LDM_DEPLOY_INCEPTION_WEIGHTS"
#: File name under which torch-fidelity (and torchmetrics, through it) caches the
#: FID Inception weights in ``torch.hub.get_dir()/checkpoints``.
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"


def to_attributes(a: Any) -> Attributes:
    """An :class:`Attributes` from an ``Attributes``, a caption string or a mapping."""
    if isinstance(a, Attributes):
        return a
    if isinstance(a, str):
        return parse_caption(a)
    if isinstance(a, Mapping):
        return Attributes(**{k: a[k] for k in ("shape", "color", "background", "size", "position")})
    raise TypeError(f"cannot read attributes from {type(a).__name__}")


def render_references(attributes: Sequence[Any], seed: int = REFERENCE_SEED, size: int = 64) -> np.ndarray:
    """Real generator images for ``attributes`` (uint8 ``[N, size, size, 3]``), jitter seeded by ``seed``."""
    rng = np.random.default_rng([int(seed), 7])
    attrs = [to_attributes(a) for a in attributes]
    out = np.empty((len(attrs), size, size, 3), dtype=np.uint8)
    for i, a in enumerate(attrs):
        out[i] = render(a, size=size, rng=rng)
    return out


def _native_batch(images: Any) -> np.ndarray:
    """uint8 ``[N, H, W, 3]`` at the images' own resolution (that of the first image)."""
    from PIL import Image

    if isinstance(images, np.ndarray):
        side = images.shape[1] if images.ndim == 4 else images.shape[0]
    elif isinstance(images, Image.Image):
        side = images.size[1]
    else:
        images = list(images)
        if not images:
            return np.empty((0, 64, 64, 3), np.uint8)
        first = images[0]
        side = first.size[1] if isinstance(first, Image.Image) else np.asarray(first).shape[0]
    return to_uint8_batch(images, size=int(side))


# --------------------------------------------------------------------------- Inception FID


def find_inception_weights() -> tuple[Path | None, str]:
    """Where the FID Inception weights are on disk, if anywhere: ``(path, "")`` or ``(None, reason)``.

    Looks at ``$LDM_DEPLOY_INCEPTION_WEIGHTS`` and at torch-fidelity's download cache
    ``torch.hub.get_dir()/checkpoints/weights-inception-2015-12-05-6726825d.pth``
    (which ``$TORCH_HOME`` moves); nothing is ever downloaded.
    """
    looked: list[str] = []
    env = os.environ.get(INCEPTION_WEIGHTS_ENV)
    if env:
        if Path(env).is_file():
            return Path(env), ""
        looked.append(f"${INCEPTION_WEIGHTS_ENV}={env} (no such file)")
    try:
        import torch.hub

        cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE
        if cached.is_file():
            return cached, ""
        looked.append(str(cached))
    except Exception as exc:  # torch missing or broken
        looked.append(f"torch hub cache unavailable ({exc})")
    return None, "looked in " + ", ".join(looked) + f"; set ${INCEPTION_WEIGHTS_ENV} to a local copy"


def inception_fid(images_a: Any, images_b: Any, weights_path: str | Path | None = None, batch_size: int = 50) -> float:
    """Standard (Inception-v3 pool3, 2048-d) FID between two image sets.

    Uses torchmetrics' ``FrechetInceptionDistance`` or else torch-fidelity's feature
    extractor, and only with weights already on disk (``weights_path``,
    ``$LDM_DEPLOY_INCEPTION_WEIGHTS`` or the torch hub cache). Raises
    ``RuntimeError("Inception weights not available locally: ...")`` otherwise.
    """
    if weights_path is not None:
        path: Path | None = Path(weights_path)
        reason = "" if path.is_file() else f"{path} does not exist"
        if not path.is_file():
            path = None
    else:
        path, reason = find_inception_weights()
    if path is None:
        raise RuntimeError(f"Inception weights not available locally: {reason}")

    import torch

    a = torch.from_numpy(_native_batch(images_a)).permute(0, 3, 1, 2).contiguous()
    b = torch.from_numpy(_native_batch(images_b)).permute(0, 3, 1, 2).contiguous()
    if len(a) < 2 or len(b) < 2:
        raise ValueError("Inception FID needs at least 2 images per set")
    errors: list[str] = []

    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except Exception as exc:  # not installed
        errors.append(f"torchmetrics: {exc}")
    else:
        try:
            try:
                metric = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(path))
            except TypeError:  # older torchmetrics: only the hub cache, where no download is triggered
                import torch.hub

                if path != Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE:
                    raise RuntimeError("this torchmetrics only reads the torch hub cache") from None
                metric = FrechetInceptionDistance(feature=2048)
            with torch.no_grad():
                for i in range(0, len(b), batch_size):
                    metric.update(b[i : i + batch_size], real=True)
                for i in range(0, len(a), batch_size):
                    metric.update(a[i : i + batch_size], real=False)
                return float(metric.compute())
        except Exception as exc:
            errors.append(f"torchmetrics: {type(exc).__name__}: {exc}")

    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except Exception as exc:
        errors.append(f"torch-fidelity: {exc}")
    else:
        try:
            extractor = FeatureExtractorInceptionV3(
                "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path)
            ).eval()

            def feats(x: "torch.Tensor") -> np.ndarray:
                with torch.no_grad():
                    return np.concatenate(
                        [extractor(x[i : i + batch_size])[0].double().numpy() for i in range(0, len(x), batch_size)]
                    )

            return frechet_distance(feats(a), feats(b))
        except Exception as exc:
            errors.append(f"torch-fidelity: {type(exc).__name__}: {exc}")
    raise RuntimeError(f"Inception FID unavailable with weights at {path}: " + "; ".join(errors))


# --------------------------------------------------------------------------- evaluate


def _share(flags: list[bool]) -> float | None:
    return float(np.mean(flags)) if flags else None


def evaluate(
    images: Any,
    attributes: Sequence[Any],
    reference_images: Any | None = None,
    classifier: AttributeClassifier | None = None,
    *,
    reference_seed: int = REFERENCE_SEED,
    inception: bool = True,
    return_predictions: bool = False,
) -> dict[str, Any]:
    """Score generated ``images`` against the prompts ``attributes`` (same order).

    ``attributes``: :class:`Attributes`, captions or dicts. ``reference_images``:
    another variant's images for the same prompts and seeds (enables ``psnr`` /
    ``ssim``). ``classifier`` defaults to :func:`load_default_classifier`.

    Returns a JSON-friendly dict::

        {"n", "n_seen", "n_heldout",
         "adherence", "adherence_seen", "adherence_heldout",   # None when a group is empty
         "per_attribute": {"shape": acc, ...},
         "domain_fid",                      # None (with "domain_fid_note") for < 2 images
         "psnr", "ssim",                    # only with reference_images (psnr may be inf)
         "inception_fid", "inception_fid_note"}   # None + reason without local weights
    """
    attrs = [to_attributes(a) for a in attributes]
    native = _native_batch(images)
    if len(native) != len(attrs):
        raise ValueError(f"{len(native)} images for {len(attrs)} prompts")
    clf = classifier if classifier is not None else load_default_classifier()
    small = to_uint8_batch(native)  # the classifier's 64x64 input

    preds = clf.predict(small)
    adh = prompt_adherence(preds, attrs)
    held = [a.heldout for a in attrs]
    correct = adh["correct"]
    result: dict[str, Any] = {
        "n": len(attrs),
        "n_seen": int(sum(not h for h in held)),
        "n_heldout": int(sum(held)),
        "adherence": adh["adherence"] if attrs else None,
        "adherence_seen": _share([c for c, h in zip(correct, held) if not h]),
        "adherence_heldout": _share([c for c, h in zip(correct, held) if h]),
        "per_attribute": adh["per_attribute"],
    }

    if len(attrs) >= 2:
        real = render_references(attrs, seed=reference_seed, size=small.shape[1])
        result["domain_fid"] = frechet_distance(clf.features(small), clf.features(real))
    else:
        result["domain_fid"] = None
        result["domain_fid_note"] = "needs at least 2 images"

    if reference_images is not None:
        ref = _native_batch(reference_images)
        if ref.shape != native.shape:
            if len(ref) == len(native):
                ref = to_uint8_batch(ref, size=native.shape[1])
            else:
                raise ValueError(f"reference_images {ref.shape} do not match images {native.shape}")
        result["psnr"] = psnr(native, ref)
        result["ssim"] = ssim(native, ref)

    result["inception_fid"] = None
    if not inception:
        result["inception_fid_note"] = "not requested"
    else:
        try:
            real_native = render_references(attrs, seed=reference_seed, size=native.shape[1])
            result["inception_fid"] = inception_fid(native, real_native)
            result["inception_fid_note"] = "torchmetrics/torch-fidelity Inception-v3 vs real renders"
        except (RuntimeError, ValueError) as exc:
            result["inception_fid_note"] = str(exc)

    if return_predictions:
        result["predictions"] = preds
        result["correct"] = correct
    return result
