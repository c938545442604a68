"""TensorRT optimization profiles from the component specs (pure: no tensorrt, no numpy).

One profile per engine (min/opt/max of every input). The ranges come from the artifact's
``shape_ranges`` (what the ONNX graphs were exported and validated for); ``--batch`` and
``--size`` narrow them and must stay inside them; ``--static`` collapses every input to its opt
shape (min = opt = max), which is also what enables CUDA graphs at run time.

With classifier-free guidance the U-Net batch axis is 2B (``ShapeRanges`` doubles it; its min
stays B so that guidance_scale <= 1 still runs). A static profile pins the U-Net to 2B.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Iterable

from ..errors import LdmDeployError
from ..specs import ComponentSpec, ShapeRanges, TrtProfile, trt_profile

Range = tuple[int, int, int]
Shape = tuple[int, ...]

_RANGE_RE = re.compile(r"^\s*(\d+)\s*(?::\s*(\d+)\s*:\s*(\d+)\s*)?$")


def parse_range(text: str, what: str = "range") -> Range:
    """``"N"`` -> (N, N, N); ``"MIN:OPT:MAX"`` -> (MIN, OPT, MAX), with 1 <= MIN <= OPT <= MAX."""
    m = _RANGE_RE.match(str(text))
    if not m:
        raise LdmDeployError(f"--{what} {text!r}: expected N or MIN:OPT:MAX (positive integers, e.g. 1:1:4)")
    lo, opt, hi = (int(m.group(1)),) * 3 if m.group(2) is None else (int(m.group(1)), int(m.group(2)), int(m.group(3)))
    if not 1 <= lo <= opt <= hi:
        raise LdmDeployError(f"--{what} {text!r}: MIN:OPT:MAX must satisfy 1 <= MIN <= OPT <= MAX")
    return (lo, opt, hi)


def _inside(what: str, requested: Range, exported: Range, unit: str = "") -> None:
    lo, hi = exported[0], exported[2]
    if requested[0] < lo or requested[2] > hi:
        raise LdmDeployError(
            f"--{what} {requested[0]}:{requested[1]}:{requested[2]} is outside the range the ONNX graphs were "
            f"exported for ({lo}:{exported[1]}:{hi}{unit}); re-export with ldm-export --max-batch/--min-size/"
            "--max-size to widen it"
        )


def build_ranges(
    exported: ShapeRanges,
    batch: Range | str | None = None,
    size: Range | str | None = None,
    height: Range | str | None = None,
    width: Range | str | None = None,
    static: bool = False,
) -> ShapeRanges:
    """The ranges to build for: the artifact's ``exported`` ranges, narrowed by ``batch`` (prompts
    per call) and ``size`` (image side in pixels, both height and width; ``height``/``width``
    override one side). Overrides must lie inside the exported ranges and image sizes must be
    multiples of the model's size multiple. ``static`` pins every axis to its opt value."""
    b = parse_range(batch, "batch") if isinstance(batch, str) else batch
    s = parse_range(size, "size") if isinstance(size, str) else size
    h = parse_range(height, "height") if isinstance(height, str) else height
    w = parse_range(width, "width") if isinstance(width, str) else width
    h, w = h or s, w or s
    if b is not None:
        _inside("batch", b, exported.batch)
    for what, r, ex in (("size" if height is None else "height", h, exported.image_height),
                        ("size" if width is None else "width", w, exported.image_width)):
        if r is None:
            continue
        bad = [v for v in r if v % exported.size_multiple]
        if bad:
            raise LdmDeployError(f"--{what} {bad[0]} is not a multiple of {exported.size_multiple} (required by this model)")
        _inside(what, r, ex, " px")
    out = replace(exported, batch=b or exported.batch, image_height=h or exported.image_height,
                  image_width=w or exported.image_width)
    if static:
        out = replace(out, batch=(out.batch[1],) * 3, image_height=(out.image_height[1],) * 3,
                      image_width=(out.image_width[1],) * 3, sequence=(out.sequence[1],) * 3)
    return out


def component_profile(spec: ComponentSpec, ranges: ShapeRanges, static: bool = False) -> TrtProfile:
    """The optimization profile of one component. ``static``: min = opt = max = the opt shape of
    every input (for the U-Net with CFG that is batch 2B, not B)."""
    prof = trt_profile(spec, ranges)
    if static:
        prof = TrtProfile({name: (opt, opt, opt) for name, (_, opt, _) in prof.shapes.items()})
    return prof


def is_static(profile: TrtProfile) -> bool:
    return all(lo == opt == hi for lo, opt, hi in profile.shapes.values())


def profile_to_json(profile: TrtProfile) -> dict[str, list[list[int]]]:
    """A canonical JSON form (lists; input order kept) for cache keys and sidecars."""
    return {name: [list(p) for p in pts] for name, pts in profile.shapes.items()}


def profile_from_json(d: dict[str, list[list[int]]]) -> TrtProfile:
    return TrtProfile({name: tuple(tuple(int(v) for v in p) for p in pts) for name, pts in d.items()})  # type: ignore[misc]


def check_shape(component: str, name: str, shape: Iterable[int], lo: Shape, hi: Shape) -> None:
    """Raise a clear error when a runtime input shape falls outside an engine's profile."""
    shape = tuple(int(v) for v in shape)
    if len(shape) != len(lo) or any(not a <= v <= b for v, a, b in zip(shape, lo, hi)):
        raise LdmDeployError(
            f"{component} input {name} has shape {shape}, outside the engine's profile (min {tuple(lo)}, max "
            f"{tuple(hi)}); rebuild with ldm-build --batch/--size covering it"
        )


def describe(ranges: ShapeRanges) -> str:
    fmt = lambda r: f"{r[0]}:{r[1]}:{r[2]}"  # noqa: E731
    return (f"batch {fmt(ranges.batch)} (U-Net {fmt(ranges.axes()['unet_batch'])}), "
            f"height {fmt(ranges.image_height)}, width {fmt(ranges.image_width)}")
