"""Conversions between PIL / numpy images and the model's NCHW [-1, 1] tensors."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from PIL import Image

from ..errors import LdmDeployError


def to_pil(images: np.ndarray) -> list[Image.Image]:
    """float [N, H, W, 3] in [0, 1] -> PIL images (rounded like diffusers' ``numpy_to_pil``)."""
    return [Image.fromarray(im) for im in (images * 255).round().astype(np.uint8)]


def check_image(image: Any) -> tuple[int, int]:
    """(height, width) of an init image: a PIL image or an HxWx3 / HxWx4 array (uint8, or float
    in [0, 1]). Anything else (a path, a 2-D array, NaN/Inf pixels) is one :class:`LdmDeployError`."""
    what = "the init image must be a PIL image or an HxWx3 array"
    if isinstance(image, Image.Image):
        if image.mode == "F" and not np.isfinite(np.asarray(image, dtype=np.float64)).all():
            raise LdmDeployError("the init image has NaN or infinite pixels")
        return image.height, image.width
    if isinstance(image, (str, bytes, os.PathLike)):
        raise LdmDeployError(f"{what}, not the path {os.fsdecode(image)!r} (open it with PIL.Image.open)")
    try:
        arr = np.asarray(image)
    except (TypeError, ValueError) as e:
        raise LdmDeployError(f"{what}, got {type(image).__name__} ({e})") from None
    if arr.dtype.kind not in "uif" or arr.ndim != 3 or arr.shape[-1] not in (3, 4) or 0 in arr.shape:
        raise LdmDeployError(f"{what}, got {type(image).__name__} of shape {arr.shape} and dtype {arr.dtype}")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise LdmDeployError("the init image has NaN or infinite pixels")
    return arr.shape[0], arr.shape[1]


def to_model_image(image: Any, height: int, width: int) -> np.ndarray:
    """A PIL image, or an HxWx3 uint8 / float [0, 1] array, or a list of them -> float32
    [N, 3, height, width] in [-1, 1] (resized with Lanczos when the size differs)."""
    items = image if isinstance(image, (list, tuple)) else [image]
    out = []
    for im in items:
        check_image(im)
        if not isinstance(im, Image.Image):
            arr = np.asarray(im)
            if arr.dtype != np.uint8:
                arr = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
            im = Image.fromarray(arr)
        im = im.convert("RGB")
        if im.size != (width, height):
            im = im.resize((width, height), Image.LANCZOS)
        out.append(np.asarray(im, dtype=np.float32) / 127.5 - 1.0)
    return np.stack(out).transpose(0, 3, 1, 2).copy()
