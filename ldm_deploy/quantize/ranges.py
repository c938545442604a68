"""Streaming activation-range collection for static INT8 quantization.

``onnxruntime.quantization.quantize_static`` exposes every tensor to calibrate as a graph output,
runs the whole calibration set and keeps all of those tensors of all samples in memory before
reducing them (24 GB for a single SD1.5 U-Net sample). Here memory is bounded instead:

* **pass 1 (every method): in-graph reductions.** A copy of the graph gets a ``ReduceMin`` and a
  ``ReduceMax`` (no axes, ``keepdims=0``) on every tensor to calibrate; only those scalars are graph
  outputs. One session, one run per calibration batch, running min/max updated after each run:
  the extra memory is two floats per tensor. This is the whole job for ``minmax``.
* **pass 2 (``percentile`` / ``mse``): fixed-bin histograms.** With the pass-1 range of each
  tensor as its fixed histogram domain (``bins`` equal bins over ``[min, max]``), the tensors
  are exposed as graph outputs, one calibration batch per run, ``np.histogram`` accumulated and
  the arrays dropped at once. When the exposed tensors of one run would exceed
  ``max_calib_memory`` bytes (sizes from ONNX shape inference at the calibration shapes) the
  tensor set is split into chunks and the model is run once per chunk over the calibration set.
  Ranges are then the percentile bounds or the MSE-optimal clipping of each histogram.

``strategy="expose"`` computes min/max from exposed tensors too (the brute-force path, chunked
in the same way): the tests check that all paths agree.

The source model is never written to: augmented copies go to a temporary directory, next to
hard links to the source's external-data files.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..runtime.sessions import make_session, run_session

DEFAULT_OP_TYPES = ("Conv", "MatMul", "Gemm")
_FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16)
_SUFFIX_MIN = "__ldmq_min"
_SUFFIX_MAX = "__ldmq_max"


# --------------------------------------------------------------------------- graph helpers


def load_structure(model_path: Path | str) -> onnx.ModelProto:
    """The graph without loading external weight data (small even for a 3.4 GB U-Net)."""
    return onnx.load(str(model_path), load_external_data=False)


def calibration_targets(model: onnx.ModelProto, op_types: Sequence[str] = DEFAULT_OP_TYPES,
                        outputs: bool | Sequence[str] = True) -> list[str]:
    """Activation tensors a QDQ quantizer of ``op_types`` needs ranges for: the non-constant
    float inputs of those nodes and the outputs of those in ``outputs`` (True: all, False: none),
    in graph order, deduplicated."""
    out_ops = set(op_types) if outputs is True else set(outputs or ())
    g = model.graph
    inits = {i.name for i in g.initializer}
    constants = {o for n in g.node if n.op_type == "Constant" for o in n.output}
    seen: dict[str, None] = {}
    for n in g.node:
        if n.op_type not in op_types:
            continue
        ins = list(n.input[:2]) if n.op_type in ("MatMul", "Gemm") else list(n.input[:1])
        for t in ins + (list(n.output[:1]) if n.op_type in out_ops else []):
            if t and t not in inits and t not in constants:
                seen.setdefault(t, None)
    return list(seen)


def _with_concrete_inputs(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for inp in m.graph.input:
        if inp.name in shapes:
            dims = inp.type.tensor_type.shape.dim
            for d, v in zip(dims, shapes[inp.name]):
                d.Clear()
                d.dim_value = int(v)
    return m


def estimate_tensor_bytes(model: onnx.ModelProto, names: Sequence[str],
                          input_shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """Bytes of each tensor at the given input shapes (ONNX shape inference on the graph
    structure). A tensor whose shape stays unknown is assumed as large as the largest known one."""
    m = _with_concrete_inputs(model, input_shapes)
    del m.graph.value_info[:]
    try:
        inferred = onnx.shape_inference.infer_shapes(m, data_prop=True)
    except Exception:  # pragma: no cover - fall back to "unknown" for everything
        inferred = m
    infos = {v.name: v for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    out: dict[str, int | None] = {}
    for n in names:
        vi = infos.get(n)
        size = None
        if vi is not None and vi.type.HasField("tensor_type"):
            dims = vi.type.tensor_type.shape.dim
            if dims and all(d.HasField("dim_value") for d in dims):
                itemsize = 2 if vi.type.tensor_type.elem_type == TensorProto.FLOAT16 else 4
                size = itemsize * math.prod(d.dim_value for d in dims)
        out[n] = size
    known = [v for v in out.values() if v is not None]
    fallback = max(known) if known else 1 << 30
    return {k: (v if v is not None else fallback) for k, v in out.items()}


def plan_chunks(names: Sequence[str], sizes: dict[str, int], budget: int | None) -> list[list[str]]:
    """Greedy split (graph order) so that the tensors exposed by one run stay within ``budget``
    bytes; a single tensor larger than the budget gets a chunk of its own."""
    if not budget or budget <= 0:
        return [list(names)] if names else []
    chunks: list[list[str]] = []
    cur: list[str] = []
    total = 0
    for n in names:
        s = sizes.get(n, 0)
        if cur and total + s > budget:
            chunks.append(cur)
            cur, total = [], 0
        cur.append(n)
        total += s
    if cur:
        chunks.append(cur)
    return chunks


class Workspace:
    """A temporary directory holding augmented copies of a model next to *hard links* of its
    external-data files, so that relative ``location`` entries still resolve. (ONNX Runtime
    refuses external data that resolves outside the model's directory, which rules out
    symlinks.) The directory is made beside the source artifact so the links stay on one file
    system; where linking fails the files are copied."""

    def __init__(self, model_path: Path | str):
        self.src = Path(model_path).absolute()
        parent = self.src.parent.parent.parent  # <parent>/<artifact>/<component>/model.onnx
        try:
            self.tmp = tempfile.TemporaryDirectory(prefix=".ldm-quant-", dir=parent)
        except OSError:  # read-only location: the system temp dir (data files then get copied)
            self.tmp = tempfile.TemporaryDirectory(prefix="ldm-quant-")
        self.dir = Path(self.tmp.name)
        for p in self.src.parent.iterdir():
            if p.is_file() and p != self.src and not p.name.endswith(".onnx"):
                try:
                    os.link(p, self.dir / p.name)
                except OSError:
                    shutil.copyfile(p, self.dir / p.name)

    def save(self, model: onnx.ModelProto, name: str) -> Path:
        path = self.dir / name
        onnx.save(model, str(path))
        return path

    def close(self) -> None:
        self.tmp.cleanup()


def augment_with_reductions(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """Copy of ``model`` whose only outputs are a scalar min and max of each tensor in ``names``."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    del g.output[:]
    types = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
        types = {v.name: v.type.tensor_type.elem_type for v in
                 list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    except Exception:  # pragma: no cover
        pass
    for i, n in enumerate(names):
        et = types.get(n) or TensorProto.FLOAT
        for op, suffix in (("ReduceMin", _SUFFIX_MIN), ("ReduceMax", _SUFFIX_MAX)):
            out = f"{n}{suffix}"
            g.node.append(helper.make_node(op, [n], [out], name=f"ldmq_{op}_{i}", keepdims=0))
            g.output.append(helper.make_tensor_value_info(out, et, []))
    return m


def augment_with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """Copy of ``model`` whose outputs are exactly the tensors ``names``."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    existing = {o.name: o for o in g.output}
    del g.output[:]
    for n in names:
        if n in existing:
            g.output.append(existing[n])
        else:
            vi = onnx.ValueInfoProto()
            vi.name = n
            g.output.append(vi)
    return m


def _session(path: Path, threads: int = 0):  # type: ignore[no-untyped-def]
    # basic optimisations only (the fused kernels of the full level may drop or rename the tensors
    # read here), and no arena: each pass exposes different tensors
    return make_session(path, "cpu", threads, low_memory=True, optimization="basic")


# --------------------------------------------------------------------------- statistics


@dataclass
class TensorStats:
    """Running statistics of one tensor over the calibration set."""

    lo: float = math.inf
    hi: float = -math.inf
    hist: np.ndarray | None = None  # int64 counts over ``edges``
    edges: np.ndarray | None = None

    def update_minmax(self, lo: float, hi: float) -> None:
        self.lo = min(self.lo, float(lo))
        self.hi = max(self.hi, float(hi))


@dataclass
class RangeCollection:
    """Per-tensor statistics plus how they were gathered."""

    stats: dict[str, TensorStats]
    method: str
    bins: int
    passes: dict[str, int] = field(default_factory=dict)  # runs per pass, chunks
    chunks: list[int] = field(default_factory=list)  # tensors per chunk of pass 2
    estimated_bytes: int = 0

    def minmax(self) -> dict[str, tuple[float, float]]:
        return {k: (s.lo, s.hi) for k, s in self.stats.items()}

    def ranges(self, method: str | None = None, symmetric: bool = False,
               percentile: float = 99.999) -> dict[str, tuple[float, float]]:
        """(lo, hi) per tensor for ``method`` (default: the collected one). ``symmetric``
        optimises a zero-centred range (int8 activations with zero point 0)."""
        method = method or self.method
        out: dict[str, tuple[float, float]] = {}
        for k, s in self.stats.items():
            if method == "minmax" or s.hist is None or s.hi <= s.lo:
                out[k] = (s.lo, s.hi)
            elif method == "percentile":
                out[k] = percentile_range(s.hist, s.edges, percentile, symmetric)
            elif method == "mse":
                out[k] = mse_range(s.hist, s.edges, symmetric)
            else:
                raise ValueError(f"unknown calibration method {method!r}")
            if symmetric:
                a = max(abs(out[k][0]), abs(out[k][1]))
                out[k] = (-a, a)
        return out


def percentile_range(hist: np.ndarray, edges: np.ndarray, percentile: float, symmetric: bool) -> tuple[float, float]:
    """Range covering ``percentile`` % of the values: two equal tails for an asymmetric range,
    the ``percentile`` of |x| for a symmetric one (cdf linear inside a bin)."""
    total = float(hist.sum())
    if total <= 0:
        return float(edges[0]), float(edges[-1])
    tail = (1.0 - percentile / 100.0) * total
    cum = np.concatenate([[0.0], np.cumsum(hist, dtype=np.float64)])
    if symmetric:
        amax = max(abs(float(edges[0])), abs(float(edges[-1])))
        grid = np.linspace(0.0, amax, 4097)[1:]
        outside = np.interp(-grid, edges, cum) + total - np.interp(grid, edges, cum)
        ok = np.nonzero(outside <= tail)[0]
        t = float(grid[ok[0]]) if len(ok) else amax
        return -t, t
    half = tail / 2
    lo = float(np.interp(half, cum, edges))
    hi = float(np.interp(total - half, cum, edges))
    return min(lo, 0.0), max(hi, 0.0)


def mse_range(hist: np.ndarray, edges: np.ndarray, symmetric: bool, levels: int = 256,
              candidates: int = 100) -> tuple[float, float]:
    """Clipping range that minimises the expected INT8 quantization MSE of the histogram:
    clipping error of the values outside (exact per bin centre) + uniform rounding noise
    ``step^2 / 12`` for the values inside. Candidates shrink the observed range towards zero."""
    centers = (edges[:-1] + edges[1:]) / 2
    w = hist.astype(np.float64)
    lo0, hi0 = min(float(edges[0]), 0.0), max(float(edges[-1]), 0.0)
    if symmetric:
        a = max(-lo0, hi0)
        lo0, hi0 = -a, a
    best, best_err = (lo0, hi0), math.inf
    for s in np.linspace(1.0, 0.05, candidates):
        lo, hi = lo0 * s, hi0 * s
        step = (hi - lo) / (levels - 1)
        if step <= 0:
            continue
        clipped = np.clip(centers, lo, hi)
        inside = (centers >= lo) & (centers <= hi)
        err = float(np.sum(w * (centers - clipped) ** 2) + np.sum(w[inside]) * step * step / 12.0)
        if err < best_err:
            best, best_err = (lo, hi), err
    return best


# --------------------------------------------------------------------------- collection


def fixed_histogram(values: np.ndarray, lo: float, hi: float, bins: int, block: int = 1 << 22) -> np.ndarray:
    """Counts of ``values`` in ``bins`` equal bins over [lo, hi] (values outside are clamped into
    the end bins), computed in float64 blocks: np.histogram bins in the data's float32 and fails
    on very narrow ranges."""
    flat = values.reshape(-1)
    out = np.zeros(bins, dtype=np.int64)
    scale = bins / (hi - lo) if hi > lo else 0.0
    for i in range(0, flat.size, block):
        x = flat[i: i + block].astype(np.float64)
        idx = np.clip(((x - lo) * scale).astype(np.int64), 0, bins - 1)
        out += np.bincount(idx, minlength=bins)
    return out


def collect_ranges(
    model_path: Path | str,
    batches: Sequence[dict[str, np.ndarray]],
    targets: Sequence[str] | None = None,
    method: str = "minmax",
    strategy: str = "auto",
    max_calib_memory: int | None = 2 << 30,
    bins: int = 2048,
    threads: int = 0,
    log: Callable[[str], None] = lambda s: None,
) -> RangeCollection:
    """Statistics of ``targets`` (default: :func:`calibration_targets`) over ``batches`` (dicts
    of graph inputs), streaming one batch per run. See the module docstring."""
    if method not in ("minmax", "percentile", "mse"):
        raise ValueError(f"unknown calibration method {method!r}")
    if strategy not in ("auto", "reduce", "expose"):
        raise ValueError(f"unknown strategy {strategy!r}")
    if not batches:
        raise ValueError("no calibration batches")
    structure = load_structure(model_path)
    names = list(targets) if targets is not None else calibration_targets(structure)
    stats = {n: TensorStats() for n in names}
    coll = RangeCollection(stats, method, bins)
    ws = Workspace(model_path)
    try:
        if strategy in ("auto", "reduce"):
            path = ws.save(augment_with_reductions(structure, names), "reduce.onnx")
            sess = _session(path, threads)
            outs = [o.name for o in sess.get_outputs()]
            for bi, batch in enumerate(batches):
                vals = run_session(sess, batch, outs)
                for n, lo, hi in zip(names, vals[0::2], vals[1::2]):
                    stats[n].update_minmax(float(lo), float(hi))
            del sess
            coll.passes["reduce_runs"] = len(batches)
            log(f"ranges: min/max of {len(names)} tensors in-graph over {len(batches)} batches")
            if method == "minmax":
                return coll
        hist_pass = method != "minmax"
        shapes = {k: tuple(v.shape) for k, v in batches[0].items()}
        sizes = estimate_tensor_bytes(structure, names, shapes)
        coll.estimated_bytes = int(sum(sizes.values()))
        chunks = plan_chunks(names, sizes, max_calib_memory)
        coll.chunks = [len(c) for c in chunks]
        log(f"ranges: exposing {len(names)} tensors (~{coll.estimated_bytes / 2**20:.1f} MiB per batch) in "
            f"{len(chunks)} chunk(s) under a {((max_calib_memory or 0) / 2**20):.0f} MiB budget")
        if hist_pass:
            for n in names:
                s = stats[n]
                if strategy == "expose":
                    raise ValueError("histogram methods need the min/max pass (strategy auto/reduce)")
                lo, hi = (s.lo, s.hi) if s.hi > s.lo else (s.lo - 1e-6, s.lo + 1e-6)
                s.edges = np.linspace(lo, hi, bins + 1)
                s.hist = np.zeros(bins, dtype=np.int64)
        runs = 0
        for ci, chunk in enumerate(chunks):
            path = ws.save(augment_with_outputs(structure, chunk), f"expose_{ci}.onnx")
            sess = _session(path, threads)
            for batch in batches:
                vals = run_session(sess, batch, chunk)
                runs += 1
                for n, v in zip(chunk, vals):
                    s = stats[n]
                    if hist_pass:
                        s.hist += fixed_histogram(v, float(s.edges[0]), float(s.edges[-1]), bins)
                    else:
                        s.update_minmax(float(v.min()), float(v.max()))
                del vals
            del sess
            os.unlink(path)
        coll.passes["expose_runs"] = runs
        return coll
    finally:
        ws.close()


def brute_force_minmax(model_path: Path | str, batches: Iterable[dict[str, np.ndarray]],
                       targets: Sequence[str]) -> dict[str, tuple[float, float]]:
    """Reference: every tensor of every batch kept, then reduced (what quantize_static does)."""
    structure = load_structure(model_path)
    ws = Workspace(model_path)
    try:
        sess = _session(ws.save(augment_with_outputs(structure, targets), "all.onnx"))
        kept = [run_session(sess, b, list(targets)) for b in batches]
    finally:
        ws.close()
    return {n: (float(min(k[i].min() for k in kept)), float(max(k[i].max() for k in kept)))
            for i, n in enumerate(targets)}
