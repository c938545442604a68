"""The shipped `tiny` LoRA (``ldm_deploy/assets/lora/tiny-noir.safetensors``, trigger ``noir`` ->
black background), fused by ``ldm-export --lora``, measured with the quality harness, and the U-Net
step time of the fused vs the base artifact.

    python benchmarks/lora_quality.py [--n-plain 200] [--n-trigger 100] [--steps 25] [--guidance 5] \
        [--threads 1] [-o benchmarks/results/lora_quality]

Exports ``tiny`` twice (base, and with the adapter at ``--scale``) into a temporary directory and
generates with the torch-free runtime (ONNX Runtime CPU), every variant with the same initial latents
per prompt:

* plain prompts (``eval_prompts(n_plain)``, as ``tiny_quality.py``): adherence of base vs fused;
* trigger prompts (``"<caption>, noir"`` for ``n_trigger`` evaluation captions whose shape is not
  black): share of images whose background the classifier reads as black, and full adherence to
  the caption with its background replaced by black (shape, colour, size and position kept); the
  base model on the same trigger prompts is the control.

Timing: seconds per CFG U-Net call (batch 2, 64x64) of both artifacts in one process, alternating
rounds, and the two graphs' node and initializer counts. Writes ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_quality import pipeline_images  # noqa: E402  (one copy of the image loop)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

ADAPTER = ROOT / "ldm_deploy" / "assets" / "lora" / "tiny-noir.safetensors"


def latents_for(n: int, seed0: int = 0) -> np.ndarray:
    return np.stack([np.random.default_rng(seed0 + i).standard_normal((4, 8, 8)).astype(np.float32) for i in range(n)])


def graph_stats(path: Path) -> dict:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return {"nodes": len(m.graph.node), "initializers": len(m.graph.initializer),
            "parameters": int(sum(np.prod(t.dims) for t in m.graph.initializer)),
            "bytes": path.stat().st_size}


def step_times(artifacts: dict[str, Path], threads: int, rounds: int, iters: int) -> dict:
    from ldm_deploy.artifact import Artifact
    from ldm_deploy.bench.measure import session_step_times
    from ldm_deploy.runtime.sessions import make_session

    sessions = {k: make_session(Artifact.open(p).model_file("unet"), "cpu", threads) for k, p in artifacts.items()}
    rng = np.random.default_rng(0)
    feeds = {"sample": rng.standard_normal((2, 4, 8, 8)).astype(np.float32),
             "timestep": np.array([501.0], np.float32),
             "encoder_hidden_states": rng.standard_normal((2, 77, 32)).astype(np.float32)}
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(rounds):
        for k, s in sessions.items():
            times[k] += session_step_times(s, feeds, iters, warmup=3)
    return {k: {"median_ms": 1e3 * statistics.median(v), "mean_ms": 1e3 * statistics.fmean(v),
                "p10_ms": 1e3 * float(np.percentile(v, 10)), "p90_ms": 1e3 * float(np.percentile(v, 90)),
                "calls": len(v)} for k, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-plain", type=int, default=200)
    p.add_argument("--n-trigger", type=int, default=100)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--adapter", type=Path, default=ADAPTER)
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--iters", type=int, default=40)
    p.add_argument("-o", "--out", type=Path, default=ROOT / "benchmarks" / "results" / "lora_quality")
    args = p.parse_args()

    import onnxruntime as ort
    import torch

    torch.set_num_threads(args.threads)

    from ldm_deploy.data.shapes import caption, eval_prompts
    from ldm_deploy.export.exporter import ExportOptions, export_model
    from ldm_deploy.export.lora import LoraSpec
    from ldm_deploy.quality import evaluate
    from ldm_deploy.runtime import Pipeline
    from train_lora_tiny import EFFECT_BACKGROUND, effect, with_trigger

    plain = eval_prompts(args.n_plain)
    trig = [a for a in eval_prompts(2 * args.n_trigger, seed=4321) if a.color != EFFECT_BACKGROUND][:args.n_trigger]
    lat_plain, lat_trig = latents_for(len(plain)), latents_for(len(trig), seed0=10_000)
    rows: dict[str, dict] = {}
    comps = ("text_encoder", "unet", "vae_decoder")
    with tempfile.TemporaryDirectory() as tmp:
        arts = {"base": Path(tmp) / "base", "fused": Path(tmp) / "fused"}
        export_s = {}
        for label, loras in (("base", ()), ("fused", (LoraSpec(args.adapter, args.scale),))):
            t0 = time.perf_counter()
            m = export_model("tiny", arts[label], ExportOptions(loras=loras, components=comps), log=lambda s: None)
            export_s[label] = round(time.perf_counter() - t0, 1)
            rows[f"{label} export"] = {"validation": {k: {f: v.get(f) for f in ("status", "max_abs", "cosine")}
                                                      for k, v in m["validation"].items()},
                                       "loras": m["loras"], "seconds": export_s[label]}
        for label, art in arts.items():
            pipe = Pipeline.load(art, threads=args.threads, components=comps)
            for kind, attrs, lat, prompts, target in (
                ("plain", plain, lat_plain, [caption(a) for a in plain], plain),
                ("trigger", trig, lat_trig, [with_trigger(caption(a)) for a in trig], [effect(a) for a in trig]),
            ):
                t0 = time.perf_counter()
                imgs = pipeline_images(pipe, prompts, lat, args.steps, args.guidance)
                r = evaluate(imgs, target, inception=False, return_predictions=True)
                row = {"n": r["n"], "adherence": r["adherence"], "per_attribute": r["per_attribute"],
                       "domain_fid": r["domain_fid"], "seconds": round(time.perf_counter() - t0, 1)}
                if kind == "trigger":
                    preds = r["predictions"]
                    row["black_background"] = float(np.mean([q["background"] == EFFECT_BACKGROUND for q in preds]))
                    keep = ("shape", "color", "size", "position")
                    row["kept_attributes"] = float(np.mean([all(q[k] == getattr(a, k) for k in keep)
                                                            for q, a in zip(preds, trig)]))
                rows[f"{label} {kind}"] = row
            del pipe
        timing = step_times(arts, args.threads, args.rounds, args.iters)
        graphs = {k: graph_stats(a / "unet" / "model.onnx") for k, a in arts.items()}

    result = {"settings": vars(args) | {"out": str(args.out), "adapter": str(args.adapter)},
              "machine": {"python": platform.python_version(), "onnxruntime": ort.__version__,
                          "processor": platform.processor() or platform.machine()},
              "variants": rows, "unet_step": timing, "unet_graph": graphs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    bp, fp, bt, ft = rows["base plain"], rows["fused plain"], rows["base trigger"], rows["fused trigger"]
    md = [
        f"# `tiny` + LoRA `{args.adapter.name}` (scale {args.scale:g}), fused by `ldm-export --lora`",
        "",
        f"ONNX Runtime CPU ({args.threads} thread(s)), {args.steps} DDIM steps, guidance {args.guidance}, 64x64; "
        "the same initial latents per prompt in both variants. Scored by the shipped attribute classifier.",
        "",
        f"## Plain prompts ({bp['n']}, `eval_prompts({args.n_plain})`: no trigger)",
        "",
        "| variant | adherence | shape | colour | background | size | position | domain FID |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in (("base", bp), ("fused", fp)):
        pa = r["per_attribute"]
        md.append(f"| {name} | {r['adherence']:.3f} | {pa['shape']:.2f} | {pa['color']:.2f} | {pa['background']:.2f} "
                  f"| {pa['size']:.2f} | {pa['position']:.2f} | {r['domain_fid']:.1f} |")
    md += [
        "",
        f"Adherence change with the adapter: {100 * (fp['adherence'] - bp['adherence']):+.1f} points.",
        "",
        f"## Trigger prompts ({ft['n']}, `\"<caption>, noir\"`, shapes that are not black)",
        "",
        "| variant | background black | shape+colour+size+position kept | adherence to caption with black background |",
        "|---|---|---|---|",
        f"| base (control) | {bt['black_background']:.3f} | {bt['kept_attributes']:.3f} | {bt['adherence']:.3f} |",
        f"| fused | {ft['black_background']:.3f} | {ft['kept_attributes']:.3f} | {ft['adherence']:.3f} |",
        "",
        f"## U-Net step time (CFG batch 2, 64x64; {args.rounds} alternating rounds x {args.iters} calls each)",
        "",
        "| artifact | median ms | mean ms | p10 / p90 ms | graph nodes | initializers | parameters |",
        "|---|---|---|---|---|---|---|",
    ]
    for k in ("base", "fused"):
        t, g = timing[k], graphs[k]
        md.append(f"| {k} | {t['median_ms']:.3f} | {t['mean_ms']:.3f} | {t['p10_ms']:.3f} / {t['p90_ms']:.3f} "
                  f"| {g['nodes']} | {g['initializers']} | {g['parameters']} |")
    md += ["", f"Export parity (fused): " + ", ".join(f"{k} {v['status']} (max abs {v['max_abs']:.2g})"
                                                   for k, v in rows["fused export"]["validation"].items()),
           "", "Reproduce: `python benchmarks/lora_quality.py " + " ".join(sys.argv[1:]) + "`"]
    args.out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
