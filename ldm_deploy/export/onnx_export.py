"""Export one component to ONNX with ``torch.onnx.export``, naming the dynamic axes exactly as
its spec does.

Two exporters: ``torchscript`` (the tracing exporter; default: it exports the SD1.5 U-Net in
under a minute on 2 cores) and ``dynamo`` (``torch.export``-based; proves the dynamic ranges
symbolically but took over four minutes for the SD1.5 U-Net here). Both write one external
data file, ``model.onnx.data``, for weights over 1 GiB."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

from ..specs import ComponentSpec, ShapeRanges, TensorSpec

EXTERNAL_DATA_THRESHOLD = 1 << 30  # weights above 1 GiB go to model.onnx.data (protobuf caps at 2 GiB)
DEFAULT_OPSET = 18
EXPORTERS = ("torchscript", "dynamo")


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
    if axes["sequence"][2] > axes["sequence"][0]:
        dims["sequence"] = Dim("sequence", min=axes["sequence"][0], max=axes["sequence"][2])
    for axis, pix in (("height", "image_height"), ("width", "image_width")):
        lo, _, hi = axes[axis]
        q = Dim(f"{axis}_q", min=max(1, lo // size_multiple_latent), max=max(hi // size_multiple_latent, 2))
        dims[axis] = size_multiple_latent * q
        dims[pix] = (size_multiple_latent * ranges.vae_scale) * q
    return dims


def trace_sizes(ranges: ShapeRanges, unet_factor: int) -> dict[str, int]:
    """Axis sizes to trace at: batch 2 and two U-Net downsampling cells per side -- small (fast
    to trace) yet off the values the exporters specialise (size 1) -- so every axis stays
    symbolic."""
    lo, _, hi = ranges.sequence  # a dynamic text sequence is traced at its longest (off the static 77)
    sizes = {"batch": 2, "unet_batch": 2, "sequence": hi if hi > lo else lo}
    for axis, pix in (("height", "image_height"), ("width", "image_width")):
        sizes[axis] = 2 * unet_factor
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
    exporter: str = "torchscript",
) -> Path:
    """Export ``module`` (a wrapper from :mod:`.wrappers`) to ``path``.

    ``example`` are inputs at :func:`trace_sizes` (so that no axis is specialised)."""
    args = tuple(torch.from_numpy(np.ascontiguousarray(example[n])) for n in spec.input_names)
    param = next(module.parameters())
    args = tuple(a.to(param.device, param.dtype) if a.is_floating_point() else a.to(param.device) for a in args)
    external = sum(p.numel() * p.element_size() for p in module.parameters()) > EXTERNAL_DATA_THRESHOLD
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            _export_dynamo(module, spec, args, ranges, unet_factor, path, opset, external)
        elif exporter == "torchscript":
            _export_torchscript(module, spec, args, path, opset, external)
        else:
            raise ValueError(f"unknown exporter {exporter!r}; choose from {EXPORTERS}")
    return path


def _export_torchscript(module, spec, args, path: Path, opset: int, external: bool) -> None:  # type: ignore[no-untyped-def]
    dynamic_axes = {t.name: t.dynamic_axes() for t in spec.inputs + spec.outputs if t.dynamic_axes()}
    target = path if not external else path.parent / "_tensors" / path.name
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        module, args, str(target), input_names=spec.input_names, output_names=spec.output_names,
        dynamic_axes=dynamic_axes, opset_version=opset, dynamo=False, do_constant_folding=True,
        external_data=external,
    )
    if external:  # the tracing exporter writes one file per tensor: gather them into one
        gather_external_data(target, path)
        shutil.rmtree(target.parent)
    set_io_dims(path, spec)


def set_io_dims(path: Path, spec: ComponentSpec) -> None:
    """Make the graph's input/output dims exactly the spec's (static sizes and axis names)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for value, t in zip(list(model.graph.input) + list(model.graph.output), spec.inputs + spec.outputs):
        dims = value.type.tensor_type.shape.dim
        for d, want in zip(dims, t.shape):
            if isinstance(want, int):
                d.ClearField("dim_param")
                d.dim_value = want
            else:
                d.ClearField("dim_value")
                d.dim_param = want
    onnx.save_model(model, str(path))


def _export_dynamo(module, spec, args, ranges, unet_factor, path: Path, opset: int, external: bool) -> None:  # type: ignore[no-untyped-def]
    dims = _torch_dims(spec, ranges, unet_factor)
    program = torch.onnx.export(
        module, args, None, input_names=spec.input_names, output_names=spec.output_names,
        dynamic_shapes=_dynamic_shapes(spec, dims), opset_version=opset, dynamo=True, optimize=True, verbose=False,
    )
    _rename_dims(program.model.graph.inputs, spec.inputs)
    _rename_dims(program.model.graph.outputs, spec.outputs)
    program.save(str(path), external_data=external)


def gather_external_data(src: Path, dst: Path) -> None:
    """Rewrite the graph at ``src`` (external data in many files beside it) as ``dst`` with all
    tensors in ``dst.name + ".data"``, streaming one tensor at a time."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo

    model = onnx.load(str(src), load_external_data=False)
    data_name = dst.name + ".data"
    offset = 0
    with open(dst.parent / data_name, "wb") as out:
        for tensor in _all_tensors(model.graph):
            if tensor.data_location != onnx.TensorProto.EXTERNAL:
                continue
            info = ExternalDataInfo(tensor)
            with open(src.parent / info.location, "rb") as f:
                f.seek(info.offset or 0)
                blob = f.read(info.length) if info.length else f.read()
            pad = (-offset) % 4096  # page-aligned, so ONNX Runtime can memory-map tensors
            out.write(b"\0" * pad)
            offset += pad
            out.write(blob)
            del tensor.external_data[:]
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(len(blob)))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            offset += len(blob)
    onnx.save_model(model, str(dst))


def _all_tensors(graph):  # type: ignore[no-untyped-def]
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            for g in list(attr.graphs) + ([attr.g] if attr.HasField("g") else []):
                yield from _all_tensors(g)
