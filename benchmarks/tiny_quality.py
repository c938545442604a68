"""Quality of the embedded `tiny` model: PyTorch (diffusers) vs the ONNX runtime artifact, and
`tiny-random` under the same protocol.

    python benchmarks/tiny_quality.py [--n 200] [--steps 25] [--guidance 5] \
        [-o benchmarks/results/tiny_quality]

Each prompt i gets the same initial latents (numpy seed i) in every variant. Exports the ONNX
artifacts it needs into a temporary directory. Writes ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def latents_for(n: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.stack([np.random.default_rng(i).standard_normal(shape).astype(np.float32) for i in range(n)])


def torch_images(model_name: str, prompts: list[str], latents: np.ndarray, steps: int, guidance: float,
                 batch: int = 50) -> np.ndarray:
    import torch

    from ldm_deploy.models import load_model

    pipe = load_model(model_name).diffusers_pipeline()
    pipe.set_progress_bar_config(disable=True)
    out = []
    with torch.no_grad():
        for s in range(0, len(prompts), batch):
            imgs = pipe(prompts[s:s + batch], num_inference_steps=steps, guidance_scale=guidance,
                        latents=torch.from_numpy(latents[s:s + batch]), output_type="np",
                        height=64, width=64).images
            out.append((imgs * 255).round().astype(np.uint8))
    return np.concatenate(out)


def runtime_images(artifact: Path, prompts: list[str], latents: np.ndarray, steps: int, guidance: float) -> np.ndarray:
    from ldm_deploy.runtime import Pipeline

    pipe = Pipeline.load(artifact, components=("text_encoder", "unet", "vae_decoder"))
    return pipeline_images(pipe, prompts, latents, steps, guidance)


def pipeline_images(pipe, prompts: list[str], latents: np.ndarray, steps: int, guidance: float) -> np.ndarray:  # type: ignore[no-untyped-def]
    """uint8 images of a loaded runtime Pipeline, as many prompts per call as the artifact allows."""
    batch = pipe.ranges.batch[2]
    out = []
    for s in range(0, len(prompts), batch):
        imgs = pipe(prompts[s:s + batch], num_inference_steps=steps, guidance_scale=guidance,
                    latents=latents[s:s + batch], output_type="np").images
        out.append((imgs * 255).round().astype(np.uint8))
    return np.concatenate(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--model", default="tiny", help="the trained model to score (name or pipeline directory)")
    p.add_argument("-o", "--out", type=Path, default=Path("benchmarks/results/tiny_quality"))
    args = p.parse_args()

    from ldm_deploy.data.shapes import caption, eval_prompts
    from ldm_deploy.export.exporter import ExportOptions, export_model
    from ldm_deploy.quality import evaluate

    attrs = eval_prompts(args.n)
    prompts = [caption(a) for a in attrs]
    latents = latents_for(args.n, (4, 8, 8))
    rows: dict[str, dict] = {}
    images: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, model in (("tiny", args.model), ("tiny-random", "tiny-random")):
            t0 = time.perf_counter()
            images[f"{label} torch"] = torch_images(model, prompts, latents, args.steps, args.guidance)
            rows[f"{label} torch"] = {"seconds": time.perf_counter() - t0}
            art = Path(tmp) / label
            export_model(model, art, ExportOptions(), log=lambda s: None)
            t0 = time.perf_counter()
            images[f"{label} onnx"] = runtime_images(art, prompts, latents, args.steps, args.guidance)
            rows[f"{label} onnx"] = {"seconds": time.perf_counter() - t0}
    for name, imgs in images.items():
        ref = images[name.split()[0] + " torch"] if name.endswith("onnx") else None
        r = evaluate(imgs, attrs, reference_images=ref)
        rows[name].update({k: r.get(k) for k in ("adherence", "adherence_seen", "adherence_heldout", "domain_fid",
                                                 "psnr", "ssim", "per_attribute", "n_seen", "n_heldout",
                                                 "inception_fid", "inception_fid_note")})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {"settings": vars(args) | {"out": str(args.out)}, "variants": rows}
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    first = next(iter(rows.values()))
    md = [
        f"# Embedded `tiny` model quality ({args.n} prompts: {first['n_seen']} seen, {first['n_heldout']} held-out "
        f"shape/colour combos; {args.steps} DDIM steps, guidance {args.guidance}, 64x64)",
        "",
        "| variant | adherence | seen | held-out | domain FID | PSNR vs torch (dB) | SSIM vs torch | time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    fmt = lambda v, f: "–" if v is None else format(v, f)  # noqa: E731
    for name, r in rows.items():
        md.append(f"| {name} | {fmt(r['adherence'], '.3f')} | {fmt(r['adherence_seen'], '.3f')} | "
                  f"{fmt(r['adherence_heldout'], '.3f')} | {fmt(r['domain_fid'], '.1f')} | {fmt(r['psnr'], '.1f')} | "
                  f"{fmt(r['ssim'], '.4f')} | {r['seconds']:.0f} |")
    md += ["", f"Inception FID: {first.get('inception_fid_note') or first.get('inception_fid')}",
           "", f"Reproduce: `python benchmarks/tiny_quality.py --n {args.n} --steps {args.steps} --guidance {args.guidance}`"]
    args.out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
