"""Does fusing a LoRA cost anything per step? Base vs LoRA-fused U-Net of one model, exported by
ldm-export, timed side by side in interleaved rounds through ONNX Runtime CPU (CFG batch 2).

    python benchmarks/lora_speed.py --model sd15-random --size 512 --rank 8 --rounds 2 --iters 2 \
        [-o benchmarks/results/lora_speed_sd15_cpu]

Makes a rank-``--rank`` adapter on the attention projections (PEFT, random non-zero weights, saved
in diffusers' format), exports the U-Net without and with ``--lora`` (parity checked as usual),
then times both graphs. Writes ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def make_adapter(model: str, rank: int, out: Path) -> Path:
    import torch
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from ldm_deploy.models import load_model

    unet = load_model(model).unet
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero (a no-op adapter): make it change the model
                p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
    StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=get_peft_model_state_dict(unet),
                                              safe_serialization=True)
    return out / "pytorch_lora_weights.safetensors"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="sd15-random")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("-o", "--out", type=Path, default=Path("benchmarks/results/lora_speed_sd15_cpu"))
    args = p.parse_args()

    from ldm_deploy.artifact import Artifact
    from ldm_deploy.bench.measure import session_step_times
    from ldm_deploy.export.exporter import ExportOptions, export_model
    from ldm_deploy.export.lora import parse_lora_arg
    from ldm_deploy.runtime.sessions import make_session

    with tempfile.TemporaryDirectory(dir=".") as tmp:
        tmp = Path(tmp)
        adapter = make_adapter(args.model, args.rank, tmp / "adapter")
        arts, export_s = {"base": tmp / "base", "fused": tmp / "fused"}, {}
        for label, out in arts.items():
            loras = (parse_lora_arg(str(adapter)),) if label == "fused" else ()
            t0 = time.perf_counter()
            m = export_model(args.model, out, ExportOptions(components=("unet",), height=args.size, width=args.size,
                                                            loras=loras), log=lambda s: None)
            export_s[label] = {"seconds": time.perf_counter() - t0, "validation": m["validation"]["unet"]["status"],
                               "cosine": m["validation"]["unet"].get("cosine")}
            print(f"{label}: exported in {export_s[label]['seconds']:.0f} s ({export_s[label]['validation']})", flush=True)
        sessions = {k: make_session(Artifact.open(v).model_file("unet"), "cpu", args.threads) for k, v in arts.items()}
        spec = Artifact.open(arts["base"]).spec("unet")
        lat, rng = args.size // 8, np.random.default_rng(0)
        feeds = {"sample": rng.standard_normal((2, 4, lat, lat)).astype(np.float32),
                 "timestep": np.array([501.0], np.float32),
                 "encoder_hidden_states": rng.standard_normal((2,) + tuple(spec.inputs[2].shape[1:])).astype(np.float32)}
        out = {k: s.run(None, feeds)[0] for k, s in sessions.items()}
        times: dict[str, list[float]] = {k: [] for k in sessions}
        for r in range(args.rounds):
            for k, s in sessions.items():
                times[k] += session_step_times(s, feeds, args.iters, warmup=1 if r == 0 else 0)
        rel_change = float(np.abs(out["fused"] - out["base"]).max() / np.abs(out["base"]).max())
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"settings": vars(args) | {"out": str(args.out)}, "export": export_s, "step_s": times,
              "median_s": med, "fused_over_base": med["fused"] / med["base"],
              "output_max_rel_change": rel_change}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    md = [f"# LoRA fused vs base U-Net: {args.model}, {args.size}x{args.size}, CFG batch 2, ORT CPU", "",
          f"Rank-{args.rank} adapter on to_q/to_k/to_v/to_out (random, non-zero); the fused U-Net's output differs "
          f"from the base's by {rel_change:.3g} (max relative), so the weights did change.", "",
          "| U-Net | export (s) | parity | s per CFG step (median) | all calls |", "|---|---|---|---|---|"]
    for k in ("base", "fused"):
        md.append(f"| {k} | {export_s[k]['seconds']:.0f} | {export_s[k]['validation']} (cosine "
                  f"{export_s[k]['cosine']:.7f}) | {med[k]:.2f} | {', '.join(f'{t:.2f}' for t in times[k])} |")
    md += ["", f"fused / base: **{result['fused_over_base']:.3f}** ({args.rounds} interleaved rounds x {args.iters} calls).",
           "", f"Reproduce: `python benchmarks/lora_speed.py --model {args.model} --size {args.size} --rank {args.rank} "
           f"--rounds {args.rounds} --iters {args.iters}`"]
    args.out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
