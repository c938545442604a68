"""Export one component to ONNX with ``torch.onnx.export`` (the dynamo exporter), naming the
dynamic axes exactly as its spec does."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from ..specs import ComponentSpec, ShapeRanges, TensorSpec

EXTERNAL_DATA_THRESHOLD = 1 << 30  # weights above 1 GiB go to model.onnx.data (protobuf caps at 2 GiB)
DEFAULT_OPSET = 18


def _torch_dims(spec: ComponentSpec, ranges: ShapeRanges, size_multiple_latent: int) -> dict[str, object]:
    """torch.export ``Dim`` objects for the spec's axes, within ``ranges``.

    Latent sizes are declared as ``unet_factor * k`` so that the traced graph holds for every
    allowed size (the U-Net's skip connections need sizes divisible by its downsampling)."""
    Dim = torch.export.Dim
    axes = ranges.axes()
    dims: dict[str, object] = {}
    for axis in ("batch", "unet_batch"):
        lo, _, hi = axes[axis]
        # torch.export specialises size-1 dims; start ranges at 1 but let the exporter see >= 2
        dims[axis] = Dim(axis, min=1, max=max(hi, 2))
    for axis, pix in (("height", "image_height"), ("width", "image_width")):
        lo, _, hi = axes[axis]
        q = Dim(f"{axis}_q", min=max(1, lo // size_multiple_latent), max=max(hi // size_multiple_latent, 2))
        dims[axis] = size_multiple_latent * q
        dims[pix] = (size_multiple_latent * ranges.vae_scale) * q
    return dims


def trace_sizes(ranges: ShapeRanges, unet_factor: int) -> dict[str, int]:
    """Axis sizes to trace at: the opt point, moved off the values torch.export specialises
    (batch 1, one downsampling cell) so that every axis stays symbolic."""
    sizes = ranges.sizes("opt")
    sizes["batch"] = max(sizes["batch"], 2)
    sizes["unet_batch"] = max(sizes["unet_batch"], 2)
    for axis, pix in (("height", "image_height"), ("width", "image_width")):
        sizes[axis] = max(sizes[axis], 2 * unet_factor)
        sizes[pix] = sizes[axis] * ranges.vae_scale
    return sizes


def _dynamic_shapes(spec: ComponentSpec, dims: dict[str, object]) -> dict[str, dict[int, object] | None]:
    return {
        t.name: ({i: dims[a] for i, a in t.dynamic_axes().items()} or None) for t in spec.inputs
    }


def _rename_dims(values, tensors: tuple[TensorSpec, ...]) -> None:  # type: ignore[no-untyped-def]
    import onnx_ir as ir

    for value, t in zip(values, tensors):
        value.name = t.name
        value.shape = ir.Shape([d for d in t.shape])


def export_component(
    module: torch.nn.Module,
    spec: ComponentSpec,
    example: dict[str, np.ndarray],
    ranges: ShapeRanges,
    unet_factor: int,
    path: Path,
    opset: int = DEFAULT_OPSET,
) -> Path:
    """Export ``module`` (a wrapper from :mod:`.wrappers`) to ``path``.

    ``example`` are inputs at :func:`trace_sizes` (so that no axis is specialised). Weights over 1 GiB are written to ``<path>.data`` beside the graph."""
    args = tuple(torch.from_numpy(np.ascontiguousarray(example[n])) for n in spec.input_names)
    param = next(module.parameters())
    args = tuple(a.to(param.device, param.dtype) if a.is_floating_point() else a.to(param.device) for a in args)
    dims = _torch_dims(spec, ranges, unet_factor)
    weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            args,
            None,
            input_names=spec.input_names,
            output_names=spec.output_names,
            dynamic_shapes=_dynamic_shapes(spec, dims),
            opset_version=opset,
            dynamo=True,
            optimize=True,
            verbose=False,
        )
    _rename_dims(program.model.graph.inputs, spec.inputs)
    _rename_dims(program.model.graph.outputs, spec.outputs)
    program.save(str(path), external_data=weight_bytes > EXTERNAL_DATA_THRESHOLD)
    return path
