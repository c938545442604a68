"""Procedural coloured-shape images with captions (numpy + Pillow only).

Each image shows one filled shape of a given colour and size at one of five
positions, on a flat background of another colour. Captions have the fixed form::

    "a {size} {color} {shape} on a {background} background, {position}"

e.g. ``"a small red circle on a blue background, top left"``.

A fixed set of (shape, colour) combinations, :data:`HELDOUT`, is never produced by
the ``"train"`` split, so a model trained on it can be evaluated on compositions it
has not seen (each held-out shape and each held-out colour still appears in
training, only not together).

Everything is deterministic given a seed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "SHAPES",
    "COLORS",
    "SIZES",
    "POSITIONS",
    "HELDOUT",
    "Attributes",
    "caption",
    "parse_caption",
    "render",
    "sample_attributes",
    "make_dataset",
    "eval_prompts",
]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (245, 220, 40),
    "purple": (140, 40, 170),
    "orange": (250, 130, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}

SIZES: tuple[str, ...] = ("small", "large")

POSITIONS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right", "center")

#: (shape, colour) combinations never used for training: 4 of the 32 combos (12.5%),
#: one per shape and each with a different colour.
HELDOUT: frozenset[tuple[str, str]] = frozenset(
    {
        ("circle", "green"),
        ("square", "purple"),
        ("triangle", "orange"),
        ("diamond", "yellow"),
    }
)

# Geometry, as fractions of the image side.
_CENTERS: dict[str, tuple[float, float]] = {  # (x, y)
    "top left": (0.25, 0.25),
    "top right": (0.75, 0.25),
    "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75),
    "center": (0.5, 0.5),
}
_RADII: dict[str, float] = {"small": 0.125, "large": 0.21}  # half-extent of the shape
_POS_JITTER = 0.035  # max centre offset, fraction of side
_SIZE_JITTER = 0.12  # max relative radius change
_SUPERSAMPLE = 4

_CAPTION_RE = re.compile(
    r"^a (?P<size>\w+) (?P<color>\w+) (?P<shape>\w+) on an? (?P<background>\w+) background, "
    r"(?P<position>[a-z ]+)$"
)


@dataclass(frozen=True)
class Attributes:
    """What one image shows."""

    shape: str
    color: str
    background: str
    size: str
    position: str

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}")
        if self.color not in COLORS:
            raise ValueError(f"unknown color {self.color!r}")
        if self.background not in COLORS:
            raise ValueError(f"unknown background {self.background!r}")
        if self.background == self.color:
            raise ValueError("background must differ from the shape colour")
        if self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}")
        if self.position not in POSITIONS:
            raise ValueError(f"unknown position {self.position!r}")

    @property
    def combo(self) -> tuple[str, str]:
        return (self.shape, self.color)

    @property
    def heldout(self) -> bool:
        return self.combo in HELDOUT


def caption(a: Attributes) -> str:
    """The caption of ``a``, e.g. ``"a small red circle on a blue background, top left"``."""
    return f"a {a.size} {a.color} {a.shape} on a {a.background} background, {a.position}"


def parse_caption(text: str) -> Attributes:
    """Inverse of :func:`caption`; raises ``ValueError`` if ``text`` does not parse."""
    m = _CAPTION_RE.match(" ".join(text.strip().lower().split()))
    if m is None:
        raise ValueError(f"not a shapes caption: {text!r}")
    return Attributes(
        shape=m["shape"],
        color=m["color"],
        background=m["background"],
        size=m["size"],
        position=m["position"],
    )


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    if shape == "square":
        s = r * 0.9  # visually match the circle's area a bit better
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":  # upright, centroid near centre
        return [(cx, cy - r * 1.1), (cx + r * 1.1, cy + r * 0.9), (cx - r * 1.1, cy + r * 0.9)]
    if shape == "diamond":
        return [(cx, cy - r * 1.15), (cx + r * 1.15, cy), (cx, cy + r * 1.15), (cx - r * 1.15, cy)]
    return None


def render(a: Attributes, size: int = 64, rng: np.random.Generator | None = None) -> np.ndarray:
    """Draw ``a`` as a ``size`` x ``size`` RGB image (uint8 HxWx3).

    ``rng`` drives a small jitter of position and size; without it the shape is
    drawn exactly at its nominal place and size.
    """
    if size < 8:
        raise ValueError("size must be >= 8")
    fx, fy = _CENTERS[a.position]
    radius = _RADII[a.size]
    if rng is not None:
        dx, dy = rng.uniform(-_POS_JITTER, _POS_JITTER, size=2)
        fx, fy = fx + dx, fy + dy
        radius *= 1.0 + rng.uniform(-_SIZE_JITTER, _SIZE_JITTER)
    big = size * _SUPERSAMPLE
    cx, cy, r = fx * big, fy * big, radius * big
    img = Image.new("RGB", (big, big), COLORS[a.background])
    draw = ImageDraw.Draw(img)
    fill = COLORS[a.color]
    poly = _polygon(a.shape, cx, cy, r)
    if poly is None:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(poly, fill=fill)
    img = img.resize((size, size), Image.BOX)
    return np.asarray(img, dtype=np.uint8).copy()


def _combos(split: str) -> list[tuple[str, str]]:
    every = [(s, c) for s in SHAPES for c in COLORS]
    if split == "train":
        return [sc for sc in every if sc not in HELDOUT]
    if split == "heldout":
        return sorted(HELDOUT, key=every.index)
    if split == "all":
        return every
    raise ValueError(f"split must be 'train', 'heldout' or 'all', not {split!r}")


def _draw(rng: np.random.Generator, combos: list[tuple[str, str]]) -> Attributes:
    shape, color = combos[int(rng.integers(len(combos)))]
    backgrounds = [c for c in COLORS if c != color]
    return Attributes(
        shape=shape,
        color=color,
        background=backgrounds[int(rng.integers(len(backgrounds)))],
        size=SIZES[int(rng.integers(len(SIZES)))],
        position=POSITIONS[int(rng.integers(len(POSITIONS)))],
    )


def sample_attributes(n: int, seed: int, split: str = "train") -> list[Attributes]:
    """``n`` random attribute sets: ``split`` is ``"train"`` (no :data:`HELDOUT` combos),
    ``"heldout"`` (only :data:`HELDOUT` combos) or ``"all"``."""
    combos = _combos(split)
    rng = np.random.default_rng([int(seed), 0])
    return [_draw(rng, combos) for _ in range(int(n))]


def make_dataset(
    n: int, seed: int, split: str = "train", size: int = 64
) -> tuple[np.ndarray, list[str], list[Attributes]]:
    """``n`` images (uint8 ``[n, size, size, 3]``), their captions and attributes."""
    attrs = sample_attributes(n, seed, split)
    rng = np.random.default_rng([int(seed), 1])
    images = np.empty((len(attrs), size, size, 3), dtype=np.uint8)
    for i, a in enumerate(attrs):
        images[i] = render(a, size=size, rng=rng)
    return images, [caption(a) for a in attrs], attrs


def eval_prompts(n: int = 200, seed: int = 1234, heldout_fraction: float = 0.25) -> list[Attributes]:
    """A fixed evaluation set: ``round(n * heldout_fraction)`` held-out-combo prompts
    mixed with seen-combo (train split) prompts, in a seeded shuffled order."""
    if not 0.0 <= heldout_fraction <= 1.0:
        raise ValueError("heldout_fraction must be in [0, 1]")
    n_held = int(round(n * heldout_fraction))
    rng = np.random.default_rng([int(seed), 2])
    held = [_draw(rng, _combos("heldout")) for _ in range(n_held)]
    seen = [_draw(rng, _combos("train")) for _ in range(n - n_held)]
    out = held + seen
    order = rng.permutation(len(out))
    return [out[i] for i in order]
