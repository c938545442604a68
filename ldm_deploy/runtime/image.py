"""Conversions between PIL / numpy images and the model's NCHW [-1, 1] tensors."""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image


def to_pil(images: np.ndarray) -> list[Image.Image]:
    """float [N, H, W, 3] in [0, 1] -> PIL images (rounded like diffusers' ``numpy_to_pil``)."""
    return [Image.fromarray(im) for im in (images * 255).round().astype(np.uint8)]


def to_model_image(image: Any, height: int, width: int) -> np.ndarray:
    """A PIL image, or an HxWx3 uint8 / float [0, 1] array, or a list of them -> float32
    [N, 3, height, width] in [-1, 1] (resized with Lanczos when the size differs)."""
    items = image if isinstance(image, (list, tuple)) else [image]
    out = []
    for im in items:
        if not isinstance(im, Image.Image):
            arr = np.asarray(im)
            if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
                raise ValueError(f"expected an HxWx3 image array, got shape {arr.shape}")
            if arr.dtype != np.uint8:
                arr = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
            im = Image.fromarray(arr)
        im = im.convert("RGB")
        if im.size != (width, height):
            im = im.resize((width, height), Image.LANCZOS)
        out.append(np.asarray(im, dtype=np.float32) / 127.5 - 1.0)
    return np.stack(out).transpose(0, 3, 1, 2).copy()
