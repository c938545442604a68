#!/usr/bin/env bash
# Wall time and peak RSS of `ldm-export` (with its parity validation) vs `optimum-cli export onnx`
# (no parity check) on the same saved sd15-random pipeline, one after the other on this machine.
#
#   bash benchmarks/export_vs_optimum.sh [WORKDIR]
#
# Optimum lives in its own venv (it pins transformers 4.57 / an old huggingface-hub that conflict
# with current diffusers): OPTIMUM_VENV (default $WORKDIR/optimum-venv) is created if missing.
# Writes benchmarks/results/export_sd15.md and .json.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
work=${1:-/tmp/ldm-export-bench}
py=${PYTHON:-python}
venv=${OPTIMUM_VENV:-$work/optimum-venv}
mkdir -p "$work" "$here/results"

if [ ! -x "$venv/bin/optimum-cli" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q torch==2.13.0
  "$venv/bin/pip" install -q "optimum-onnx[onnxruntime]" diffusers
fi
[ -d "$work/sd15-random-pipeline" ] || $py -m ldm_deploy.models save sd15-random "$work/sd15-random-pipeline"

measure() {  # name, command...
  local name=$1; shift
  rm -rf "$work/out-$name"
  /usr/bin/time -f "%e %M" -o "$work/time-$name" "$@" > "$work/log-$name" 2>&1
  read -r secs kb < "$work/time-$name"
  echo "$name $secs $kb"
}

ours=$(measure ldm-export ldm-export --model "$work/sd15-random-pipeline" -o "$work/out-ldm-export")
theirs=$(measure optimum "$venv/bin/optimum-cli" export onnx --model "$work/sd15-random-pipeline" \
         --task text-to-image "$work/out-optimum")

$py - "$ours" "$theirs" "$here/results/export_sd15" "$work" <<'PY'
import json, os, platform, sys
rows = [s.split() for s in sys.argv[1:3]]
out, work = sys.argv[3], sys.argv[4]
man = json.load(open(os.path.join(work, "out-ldm-export", "manifest.json")))
val = {k: v.get("cosine") for k, v in man["validation"].items()}
res = {"machine": {"cores": os.cpu_count(), "cpu": platform.processor()},
       "rows": [{"tool": r[0], "wall_s": float(r[1]), "peak_rss_gib": int(r[2]) / 2**20} for r in rows],
       "ldm_export_validation_cosine": val, "versions": man["versions"]}
json.dump(res, open(out + ".json", "w"), indent=2)
lines = ["# Export of the SD1.5 architecture (sd15-random, fp32) on this CPU", "",
         f"{os.cpu_count()} cores; both tools export the same saved pipeline, one after the other.", "",
         "| tool | wall time (s) | peak RSS (GiB) | parity check |", "|---|---|---|---|"]
for r in res["rows"]:
    check = "4 components vs PyTorch at 512x512, CFG batch (cosine " + \
            ", ".join(f"{k} {v:.7f}" for k, v in val.items()) + ")" if r["tool"] == "ldm-export" else "none"
    lines.append(f"| {r['tool']} | {r['wall_s']:.0f} | {r['peak_rss_gib']:.2f} | {check} |")
lines += ["", "Reproduce: `bash benchmarks/export_vs_optimum.sh`"]
open(out + ".md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
