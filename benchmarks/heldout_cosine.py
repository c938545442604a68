"""U-Net output cosine of INT8 artifacts vs their fp32 source on held-out *trajectory* inputs: the held-out
batches ``ldm-quantize`` records for its quality report (same prompts, seed, steps, guidance, size), rebuilt
from the calibration metadata of the first INT8 artifact and fed to every artifact given.

    python benchmarks/heldout_cosine.py --fp32 sd15-onnx --int8 ort=sd15-int8 nncf=sd15-ov-int8:openvino \
        [--holdout 4] [--cache heldout.npz] [-o benchmarks/results/heldout_cosine_sd15]

``NAME=PATH[:BACKEND]``: ``ort-cpu`` (default) or ``openvino``. Writes ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def _outputs(path: str, backend: str, batches: list[dict], threads: int) -> list[np.ndarray]:
    from ldm_deploy.artifact import Artifact

    art = Artifact.open(path)
    if backend == "openvino":  # the same runner ldm-quantize --target openvino reports with
        import openvino as ov

        from ldm_deploy.quantize.nncf_target import _ov_outputs

        return _ov_outputs(ov.Core(), art.model_file("unet"), batches, threads)
    from ldm_deploy.quantize.assess import onnx_outputs

    return onnx_outputs(art.model_file("unet"), batches, threads)


def heldout_batches(fp32: str, int8: str, n: int, threads: int = 0, cache: str | None = None) -> list[dict]:
    """The ``n`` held-out U-Net batches ``ldm-quantize`` reported on for the INT8 artifact ``int8``, rebuilt by
    sampling the fp32 artifact with its calibration settings; ``cache``: an npz to reuse (written if missing)."""
    if cache and Path(cache).exists():
        with np.load(cache) as z:
            return [{k.split("/", 1)[1]: z[k] for k in z.files if k.startswith(f"{i}/")} for i in range(n)]
    from ldm_deploy.quantize.calibration import collect_heldout
    from ldm_deploy.runtime import Pipeline

    meta = json.loads((Path(int8) / "manifest.json").read_text())["quantization"]["calibration"]
    pipe = Pipeline.load(fp32, threads=threads, verify=False, components=("text_encoder", "unet", "vae_decoder"))
    held = collect_heldout(pipe, meta["prompts"], n, meta["steps"], meta["seed"], meta["guidance_scale"],
                           meta["height"], meta["width"])
    if cache:
        held.save(cache)
    return held.batches


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fp32", required=True)
    ap.add_argument("--int8", nargs="+", required=True, metavar="NAME=PATH[:BACKEND]")
    ap.add_argument("--holdout", type=int, default=4)
    ap.add_argument("--cache", help="npz of the held-out batches (written if missing)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("-o", "--output", default="benchmarks/results/heldout_cosine")
    a = ap.parse_args()

    from ldm_deploy.numerics import compare, mean_errors

    variants = []
    for spec in a.int8:
        name, rest = spec.split("=", 1)
        path, _, backend = rest.partition(":")
        variants.append((name, path, backend or "ort-cpu"))
    batches = heldout_batches(a.fp32, variants[0][1], a.holdout, a.threads, a.cache)
    meta = json.loads((Path(variants[0][1]) / "manifest.json").read_text())["quantization"]["calibration"]
    ref = _outputs(a.fp32, "ort-cpu", batches, a.threads)
    rows = []
    for name, path, backend in variants:
        err = mean_errors([compare(r, g) for r, g in zip(ref, _outputs(path, backend, batches, a.threads))])
        rows.append({"variant": name, "artifact": path, "backend": backend, **err})
        print(f"{name}: cosine {err['cosine']:.5f}", flush=True)
    out = Path(a.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"fp32": a.fp32, "batches": len(batches), "calibration": meta,
                                                    "rows": rows}, indent=2, default=float) + "\n")
    lines = [f"# U-Net INT8 vs fp32 on {len(batches)} held-out trajectory batches ({meta['height']}x{meta['width']}, "
             f"{meta['steps']}-step CFG runs, guidance {meta['guidance_scale']})", "",
             "| variant | backend | cosine (mean) | cosine (min) | rel L2 |", "|---|---|---:|---:|---:|"]
    lines += [f"| {r['variant']} | {r['backend']} | {r['cosine']:.5f} | {r['cosine_min']:.5f} | {r['rel_l2']:.4f} |"
              for r in rows]
    lines += ["", "Reproduce: `python benchmarks/heldout_cosine.py --fp32 FP32 --int8 " + " ".join(a.int8) + "`"]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
