"""Hugging Face Optimum's ONNX layout, both ways.

* :func:`to_optimum`: an ldm-deploy artifact -> a directory that Optimum's
  ``ORTStableDiffusionPipeline.from_pretrained`` loads (``model_index.json``, ``config.json`` and
  ``model.onnx`` per component folder, Optimum's I/O names). For Optimum only: it has no
  ``manifest.json`` (import it back with :func:`from_optimum` to run it here).
* :func:`from_optimum`: a directory written by ``optimum-cli export onnx`` (or by
  :func:`to_optimum`) -> a new ldm-deploy artifact (our I/O names, a manifest with hashes, specs
  and shape ranges read from the graphs and configs).

Graph I/O is renamed on the ONNX graph (no weight is touched; external data files are copied);
neither function ever writes to its source directory. Needs ``onnx`` (the export extra).

``python -m ldm_deploy.interop.optimum to-optimum ARTIFACT OUT`` /
``python -m ldm_deploy.interop.optimum from-optimum OPTIMUM_DIR OUT``.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any, Callable

from ..artifact import (
    MANIFEST, Artifact, ArtifactWriter, check_output_path, library_versions, optimum_layout, rename_noreplace,
    read_json_object, write_json,
)
from ..errors import LdmDeployError, cli_entry, first_line
from ..specs import MAX_BATCH, MAX_IMAGE_SIDE, MAX_PROMPT_CHUNKS, ComponentSpec, ModelDims, ShapeRanges, component_specs
from . import graph_io

#: Our spec names -> Optimum's, per component (read from optimum-onnx 0.1's model configs and
#: ``modeling_diffusion.py``). The text encoder also gets Optimum's ``pooler_output``.
NAMES: dict[str, dict[str, str]] = {
    "text_encoder": {"input_ids": "input_ids", "text_embeddings": "last_hidden_state"},
    "unet": {"sample": "sample", "timestep": "timestep", "encoder_hidden_states": "encoder_hidden_states",
             "noise_pred": "out_sample"},
    "vae_encoder": {"image": "sample", "latent_parameters": "latent_parameters"},
    "vae_decoder": {"latent": "latent_sample", "image": "sample"},
}
REQUIRED = ("text_encoder", "unet", "vae_decoder")
ONNX_NAME = "model.onnx"


# --- ldm-deploy -> Optimum ------------------------------------------------------------------------
def to_optimum(artifact: Path | str, out: Path | str, overwrite: bool = False,
               log: Callable[[str], None] = lambda s: None) -> Path:
    """Write ``artifact`` in Optimum's layout at ``out``; returns ``out``. The artifact's files are
    verified against its manifest first."""
    art = Artifact.open(artifact)
    art.require("components", "model_dims", "shape_ranges")
    missing = [c for c in REQUIRED if c not in art.components]
    if missing:
        raise LdmDeployError(f"{art.path} lacks {', '.join(missing)}: Optimum's pipeline needs text_encoder, unet "
                             "and vae_decoder")
    components = [c for c in NAMES if c in art.components]
    art.verify([f for c in components for f in art.component_files(c)])
    dims, ranges = art.model_dims, art.shape_ranges
    configs = _optimum_configs(art, dims, ranges)
    with _AtomicDir(out, overwrite) as tmp:
        for name in components:
            log(f"{name}: renaming graph I/O to Optimum's names")
            _write_graph(art.model_file(name), tmp / name, lambda g, n=name: _to_optimum_graph(g, art.spec(n)))
            write_json(tmp / name / "config.json", configs["vae" if name.startswith("vae") else name])
        shutil.copytree(art.subdir("tokenizer"), tmp / "tokenizer")
        shutil.copytree(art.subdir("scheduler"), tmp / "scheduler")
        sched = json.loads((tmp / "scheduler" / "scheduler_config.json").read_text())
        write_json(tmp / "model_index.json", {
            "_class_name": "StableDiffusionPipeline",
            "_diffusers_version": configs["unet"].get("_diffusers_version", "0.30.0"),
            "_ldm_deploy": {"source_artifact": str(art.path), "precision": art.manifest.get("precision"),
                            "note": "written by ldm_deploy.interop.optimum.to_optimum"},
            "feature_extractor": [None, None],
            "requires_safety_checker": False,
            "safety_checker": [None, None],
            "scheduler": ["diffusers", sched.get("_class_name", "DDIMScheduler")],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        })
    return Path(out)


def _to_optimum_graph(graph: Any, spec: ComponentSpec) -> None:
    names = NAMES[spec.name]
    graph_io.drop_outputs(graph, [spec.outputs[0].name])  # e.g. a --deepcache U-Net's cache_feature
    graph_io.rename_values(graph, {k: v for k, v in names.items() if k != v})
    if spec.name == "unet":  # Optimum's U-Net takes a scalar timestep (a [1] one draws a warning per load)
        graph_io.adapt_input(graph, "timestep", graph_io.io_dtype(_value(graph.input, "timestep")), ())
    if spec.name == "text_encoder":
        graph_io.add_pooled_output(graph, "input_ids", "last_hidden_state", "pooler_output")


def _optimum_configs(art: Artifact, dims: ModelDims, ranges: ShapeRanges) -> dict[str, dict[str, Any]]:
    """The component configs Optimum reads: the source model's, when the export recorded them,
    else the fields its pipeline uses, derived from the manifest."""
    recorded = art.manifest.get("model_configs") or {}
    vae_blocks = int(round(math.log2(dims.vae_scale))) + 1
    unet_blocks = int(round(math.log2(dims.unet_factor))) + 1
    unet = dict(recorded.get("unet") or {
        "_class_name": "UNet2DConditionModel", "in_channels": dims.latent_channels,
        "out_channels": dims.latent_channels, "cross_attention_dim": dims.text_hidden,
        "block_out_channels": [320 * min(2 ** i, 4) for i in range(unet_blocks)]})
    unet.setdefault("sample_size", ranges.image_height[1] // dims.vae_scale)
    unet.setdefault("time_cond_proj_dim", None)
    vae = dict(recorded.get("vae") or {
        "_class_name": "AutoencoderKL", "in_channels": dims.image_channels, "out_channels": dims.image_channels,
        "latent_channels": dims.latent_channels, "block_out_channels": [128 * min(2 ** i, 4) for i in range(vae_blocks)]})
    vae["scaling_factor"] = dims.vae_scaling_factor
    text = dict(recorded.get("text_encoder") or {
        "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "hidden_size": dims.text_hidden,
        "max_position_embeddings": dims.seq_len, "num_hidden_layers": 12})
    return {"unet": unet, "vae": vae, "text_encoder": text}


# --- Optimum -> ldm-deploy ------------------------------------------------------------------------
def from_optimum(src: Path | str, out: Path | str, overwrite: bool = False, max_batch: int = 4,
                 log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Import an Optimum ONNX diffusion export at ``src`` as a new ldm-deploy artifact at ``out``;
    returns its manifest. ``max_batch``: prompts per call the artifact is declared for (the graphs'
    batch axes are dynamic)."""
    src = Path(src)
    if not src.is_dir():
        raise LdmDeployError(f"{src} is not a directory")
    if (src / MANIFEST).is_file():
        raise LdmDeployError(f"{src} is already an ldm-deploy artifact (it has a {MANIFEST})")
    if not optimum_layout(src):
        raise LdmDeployError(f"{src} is not an Optimum ONNX export (needs model_index.json and unet/{ONNX_NAME})")
    index = read_json_object(src / "model_index.json")
    if index.get("text_encoder_2") not in (None, [None, None]) or index.get("transformer") not in (None, [None, None]):
        raise LdmDeployError(f"{src} is a {index.get('_class_name', 'pipeline')} export; only Stable Diffusion 1.x/2.x-"
                             "class pipelines (one CLIP text encoder and a U-Net) can be imported")
    missing = [c for c in REQUIRED if not (src / c / ONNX_NAME).is_file()]
    if missing:
        raise LdmDeployError(f"{src} lacks {', '.join(f'{c}/{ONNX_NAME}' for c in missing)}")
    components = [c for c in NAMES if (src / c / ONNX_NAME).is_file()]
    if not (src / "tokenizer").is_dir() or not (src / "scheduler" / "scheduler_config.json").is_file():
        raise LdmDeployError(f"{src} lacks tokenizer/ or scheduler/scheduler_config.json")
    unet_cfg = read_json_object(src / "unet" / "config.json")
    vae_cfg = read_json_object(src / "vae_decoder" / "config.json")
    text_cfg = read_json_object(src / "text_encoder" / "config.json")
    graphs = {c: _load_graph(src / c / ONNX_NAME) for c in components}
    dims = _model_dims(unet_cfg, vae_cfg, text_cfg, graphs["unet"].graph)
    long_prompts = isinstance(graph_io.io_dims(_value(graphs["unet"].graph.input, "encoder_hidden_states"))[1], str)
    ranges = _ranges(unet_cfg, dims, graphs, max_batch, long_prompts)
    specs = component_specs(dims, long_prompts=long_prompts)
    io_dtype = graph_io.io_dtype(_value(graphs["unet"].graph.input, "sample"))
    with ArtifactWriter(out, overwrite=overwrite) as writer:
        entries = {}
        for name in components:
            log(f"{name}: renaming graph I/O to ldm-deploy's names")
            spec = _imported_spec(specs[name], graphs[name].graph)
            _write_graph(src / name / ONNX_NAME, writer.path / name, lambda g, s=spec: _from_optimum_graph(g, s),
                         model=graphs[name])
            entries[name] = {"file": f"{name}/{ONNX_NAME}", "spec": spec.to_dict()}
        _write_tokenizer(src / "tokenizer", writer.path / "tokenizer")
        (writer.path / "scheduler").mkdir()
        shutil.copyfile(src / "scheduler" / "scheduler_config.json", writer.path / "scheduler" / "scheduler_config.json")
        opset = next((o.version for o in graphs["unet"].opset_import if o.domain in ("", "ai.onnx")), None)
        writer.manifest.update({
            "stage": "import-optimum",
            "source": {"kind": "optimum", "path": str(src.absolute()), "model_index": index},
            "precision": "fp16" if _has_fp16_weights(graphs["unet"]) else "fp32",
            "io_dtype": io_dtype,
            "opset": opset,
            "model_dims": dims.__dict__,
            "long_prompts": long_prompts,
            "model_configs": {"unet": unet_cfg, "vae": vae_cfg, "text_encoder": text_cfg},
            "shape_ranges": ranges.to_dict(),
            "components": entries,
            "validation": {c: {"component": c, "status": "not-validated", "how": "imported from an Optimum export "
                               "(no PyTorch model to compare with)"} for c in components},
            "versions": library_versions(),
        })
        manifest = writer.manifest
    return manifest


def _imported_spec(spec: ComponentSpec, graph: Any) -> ComponentSpec:
    """Our spec with the integer dtypes the graph really has (Optimum exports int64 token ids)."""
    renamed = {v: k for k, v in NAMES[spec.name].items()}
    dtypes = {renamed.get(v.name, v.name): graph_io.io_dtype(v) for v in graph.input}
    return ComponentSpec.from_dict({**spec.to_dict(), "inputs": [
        {"name": t.name, "dtype": dtypes[t.name] if dtypes.get(t.name, "").startswith("int") else t.dtype,
         "shape": list(t.shape)} for t in spec.inputs]})


def _from_optimum_graph(graph: Any, spec: ComponentSpec) -> None:
    names = NAMES[spec.name]
    missing = [n for n in list(names.values())[: len(spec.inputs)] if n not in {v.name for v in graph.input}]
    if missing:
        raise LdmDeployError(f"{spec.name} graph lacks Optimum's input(s) {missing}")
    graph_io.drop_outputs(graph, [names[spec.outputs[0].name]])  # pooler_output, hidden_states.N
    graph_io.rename_values(graph, {v: k for k, v in names.items() if k != v})
    for t in spec.inputs:
        if t.name == "timestep":  # Optimum: a scalar; ours: float32 [1]
            graph_io.adapt_input(graph, "timestep", "float32", tuple(t.shape))
        else:
            graph_io.set_dims(_value(graph.input, t.name), t.shape)
    graph_io.specs_io(graph, spec.outputs, outputs=True)


def _model_dims(unet: dict, vae: dict, text: dict, unet_graph: Any) -> ModelDims:
    try:
        ehs = graph_io.io_dims(_value(unet_graph.input, "encoder_hidden_states"))
        return ModelDims(
            text_hidden=int(ehs[2]) if isinstance(ehs[2], int) else int(unet["cross_attention_dim"]),
            seq_len=int(text.get("max_position_embeddings", 77)),
            latent_channels=int(unet["in_channels"]),
            image_channels=int(vae.get("out_channels", 3)),
            vae_scale=2 ** (len(vae["block_out_channels"]) - 1),
            unet_factor=2 ** (len(unet["block_out_channels"]) - 1),
            vae_scaling_factor=float(vae.get("scaling_factor", 0.18215)),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise LdmDeployError(f"cannot read the model's sizes from its config.json files: {first_line(e)}") from None


def _ranges(unet: dict, dims: ModelDims, graphs: dict[str, Any], max_batch: int, long_prompts: bool) -> ShapeRanges:
    """Shape ranges from the graphs' dims: a dynamic axis gets ldm-export's defaults (batch 1..
    ``max_batch``, sides from half to twice the native size), a static one its value."""
    multiple = dims.size_multiple
    sample = graph_io.io_dims(_value(graphs["unet"].graph.input, "sample"))
    native = int(unet.get("sample_size", 64)) * dims.vae_scale
    sides = []
    for d in sample[2:]:
        if isinstance(d, int):
            sides.append((d * dims.vae_scale,) * 3)
        else:
            lo = max(multiple, native // 2 // multiple * multiple)
            hi = max(min(2 * native, MAX_IMAGE_SIDE // multiple * multiple), native)
            sides.append((lo, native, hi))
    ids = graph_io.io_dims(_value(graphs["text_encoder"].graph.input, "input_ids"))
    batch = (ids[0],) * 3 if isinstance(ids[0], int) else (1, 1, max(1, min(max_batch, MAX_BATCH)))
    seq = (dims.seq_len, dims.seq_len, dims.seq_len * (MAX_PROMPT_CHUNKS if long_prompts else 1))
    try:
        return ShapeRanges(batch=batch, image_height=sides[0], image_width=sides[1], vae_scale=dims.vae_scale,
                           size_multiple=multiple, sequence=seq)
    except ValueError as e:
        raise LdmDeployError(f"cannot derive shape ranges from the graphs: {e}") from None


def _write_tokenizer(src: Path, dst: Path) -> None:
    """Copy the tokenizer folder; build ``tokenizer.json`` (what the runtime reads) when transformers
    saved only the slow tokenizer's files."""
    if (src / "tokenizer.json").is_file():
        shutil.copytree(src, dst)
        return
    from tokenizers import Tokenizer
    from transformers import CLIPTokenizerFast

    shutil.copytree(src, dst)
    fast = CLIPTokenizerFast.from_pretrained(str(src))
    backend = fast.backend_tokenizer
    backend.no_padding()
    backend.no_truncation()
    backend.save(str(dst / "tokenizer.json"))
    probe = "A photograph of an astronaut riding a horse, 2024!!"
    if Tokenizer.from_file(str(dst / "tokenizer.json")).encode(probe, add_special_tokens=False).ids != \
            fast(probe, add_special_tokens=False)["input_ids"]:
        raise LdmDeployError(f"{src}: the tokenizer.json built from it does not reproduce transformers' token ids")


def _has_fp16_weights(model: Any) -> bool:
    return any(t.data_type == 10 for t in model.graph.initializer)


# --- shared helpers -------------------------------------------------------------------------------
def _value(values: Any, name: str) -> Any:
    for v in values:
        if v.name == name:
            return v
    raise LdmDeployError(f"the graph has no input/output named {name!r} (has {[v.name for v in values]})")


def _load_graph(path: Path) -> Any:
    import onnx

    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf raises its own DecodeError
        raise LdmDeployError(f"{path} is not a readable ONNX model: {first_line(e)}") from None


def _write_graph(src: Path, dst_dir: Path, edit: Callable[[Any], None], model: Any = None) -> None:
    """Load the graph at ``src`` without its weights, ``edit`` its graph, save it as
    ``dst_dir/model.onnx`` and copy the external data files it names (same relative names)."""
    import onnx

    model = model if model is not None else _load_graph(src)
    edit(model.graph)
    dst_dir.mkdir(parents=True, exist_ok=True)
    locations = set()
    for tensor in _external_tensors(model.graph):
        loc = next((e.value for e in tensor.external_data if e.key == "location"), None)
        if loc is None or Path(loc).is_absolute() or ".." in Path(loc).parts:
            raise LdmDeployError(f"{src}: external data location {loc!r} is not a file beside the graph")
        locations.add(loc)
    for loc in sorted(locations):
        if not (src.parent / loc).is_file():
            raise LdmDeployError(f"{src}: its external data file {loc} is missing")
        (dst_dir / loc).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src.parent / loc, dst_dir / loc)
    onnx.save_model(model, str(dst_dir / ONNX_NAME))


def _external_tensors(graph: Any) -> Any:
    import onnx

    for t in graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            yield t
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t") and attr.t.data_location == onnx.TensorProto.EXTERNAL:
                yield attr.t
            for g in list(attr.graphs) + ([attr.g] if attr.HasField("g") else []):
                yield from _external_tensors(g)


class _AtomicDir:
    """A directory built in a hidden sibling and renamed to ``out`` at the end (nothing at ``out``
    on failure; an existing ``out`` is replaced only with ``overwrite``)."""

    def __init__(self, out: Path | str, overwrite: bool):
        self.out = Path(out).absolute()
        check_output_path(self.out)
        if self.out.exists() and not overwrite:
            raise LdmDeployError(f"output {out} already exists (pass --overwrite to replace it)")
        self.overwrite = overwrite
        self.tmp = self.out.parent / f".ldm-optimum-{self.out.name}-{id(self):x}"

    def __enter__(self) -> Path:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:  # type: ignore[no-untyped-def]
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        try:
            if self.overwrite and self.out.exists():
                shutil.rmtree(self.out)
            rename_noreplace(self.tmp, self.out)
        except FileExistsError:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise LdmDeployError(f"output {self.out} appeared while converting and was left untouched") from None
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise


# --- command line ---------------------------------------------------------------------------------
@cli_entry("python -m ldm_deploy.interop.optimum")
def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m ldm_deploy.interop.optimum",
                                description="Convert between ldm-deploy artifacts and Optimum's ONNX layout.")
    sub = p.add_subparsers(dest="cmd", required=True)
    to = sub.add_parser("to-optimum", help="an ldm-deploy artifact -> a directory ORTStableDiffusionPipeline loads")
    to.add_argument("artifact", type=Path)
    to.add_argument("out", type=Path)
    frm = sub.add_parser("from-optimum", help="an optimum-cli export onnx directory -> a new ldm-deploy artifact")
    frm.add_argument("optimum_dir", type=Path)
    frm.add_argument("out", type=Path)
    frm.add_argument("--max-batch", type=int, default=4, help="prompts per call to declare (default 4)")
    for q in (to, frm):
        q.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    args = p.parse_args(argv)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    if args.cmd == "to-optimum":
        to_optimum(args.artifact, args.out, overwrite=args.overwrite, log=log)
        print(f"wrote {args.out} (Optimum layout: ORTStableDiffusionPipeline.from_pretrained({str(args.out)!r}))")
    else:
        from_optimum(args.optimum_dir, args.out, overwrite=args.overwrite, max_batch=args.max_batch, log=log)
        print(f"wrote {args.out} (ldm-deploy artifact imported from {args.optimum_dir})")
    return 0


if __name__ == "__main__":
    main()
