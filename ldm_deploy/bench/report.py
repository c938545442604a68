"""Render ``results.json`` as ``results.csv``, ``results.md``, ``latency.png`` and ``pareto.png``
(``ldm-bench report RESULTS_DIR`` re-renders them from the JSON alone)."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from .plots import latency_plot, pareto_plot
from .results import OPS, PARETO_METRICS, QUALITY_KEYS, pareto_metric


def render_all(results: dict[str, Any], out: Path) -> list[Path]:
    """Write every rendering of ``results`` into ``out``; returns the paths written."""
    paths = [write_csv(results, out / "results.csv"), write_markdown(results, out / "results.md")]
    paths.append(latency_plot(results, out / "latency.png"))
    paths.append(pareto_plot(results, out / "pareto.png"))
    return paths


# --------------------------------------------------------------------------- CSV


def _flat(v: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {"variant": v["name"], "kind": v["kind"], "status": v["status"],
                           "reason": v.get("reason", "")}
    lat = v.get("latency", {})
    for op, _ in OPS:
        for stat in ("median", "p90", "min", "max"):
            row[f"{op}_{stat}_s"] = lat.get(op, {}).get(stat)
    mem, size, q = v.get("memory", {}), v.get("size", {}), v.get("quality", {})
    row.update(images_per_s=v.get("throughput_images_per_s"), load_s=v.get("load_s"),
               peak_rss_bytes=mem.get("peak_rss_bytes"), peak_device_bytes=mem.get("peak_device_bytes"),
               artifact_bytes=size.get("bytes"))
    row.update({k: q.get(k) for k in QUALITY_KEYS})
    return row


def write_csv(results: dict[str, Any], path: Path) -> Path:
    rows = [_flat(v) for v in results["variants"]]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


# --------------------------------------------------------------------------- markdown


def fmt_seconds(x: float | None) -> str:
    if x is None:
        return "–"
    return f"{x * 1000:.3g} ms" if x < 1 else f"{x:.3g} s"


def _fmt(x: Any, spec: str) -> str:
    if x is None:
        return "–"
    if isinstance(x, float) and math.isinf(x):
        return "∞"
    return format(x, spec)


def _gib(b: int | None) -> str:
    return "–" if b is None else f"{b / 2**30:.2f}"


def _mib(b: int | None) -> str:
    return "–" if b is None else f"{b / 2**20:.1f}"


def _settings_line(s: dict[str, Any]) -> str:
    return (f"{s['height']}x{s['width']}, batch {s['batch']}, {s['steps']} steps, guidance {s['guidance']}, "
            f"{s['warmup']} warm-up + {s['repeats']} timed rounds, threads {s.get('threads_used', s['threads'])}")


def _load_note(m: dict[str, Any]) -> list[str]:
    start, end, cpus = m.get("loadavg_1min_start"), m.get("loadavg_1min_end"), m.get("logical_cpus") or 1
    if start is None:
        return []
    busy = " Other processes were competing for the CPUs: the timings are indicative." if start > 0.5 * cpus else ""
    return [f"System load average (1 min) at start / end of the run: {start} / {end} on {cpus} logical CPUs.{busy}"]


def markdown(results: dict[str, Any]) -> str:
    suite, s = results["suite"], results["suite"]["settings"]
    ok = [v for v in results["variants"] if v["status"] == "ok"]
    m = results["machine"]
    lines = [f"# ldm-bench: {suite['name']}", ""]
    if suite.get("description"):
        lines += [suite["description"], ""]
    lines += [
        (f"Suite `{results.get('suite_file', suite['path'])}`, run {results['started']} "
         f"({results['wall_s']:.0f} s wall incl. builds). Machine: {m.get('cpu', '?')}, "
         f"{m.get('logical_cpus')} logical CPUs, {_gib(m.get('memory_bytes'))} GiB RAM, "
         f"GPU: {m.get('gpu') or 'none'}."),
        "Versions: " + ", ".join(f"{k} {v}" for k, v in results["versions"].items()) + ".",
        *_load_note(m),
        "",
        (f"Latency settings: {_settings_line(s)}. Each cell: median (p90) over the timed rounds; "
         "U-Net step = one CFG call; peak RSS sampled with psutil in the variant's own process."),
        "",
        ("| variant | text encoder | U-Net step | VAE decode | end to end | min–max e2e | images/s | "
         "peak RSS GiB | peak device MiB | size MiB |"),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for v in ok:
        lat = v["latency"]
        cells = [f"{fmt_seconds(lat[op]['median'])} ({fmt_seconds(lat[op]['p90'])})" for op, _ in OPS]
        e2e = lat["end_to_end"]
        mem, size = v["memory"], v.get("size", {})
        size_cell = _mib(size.get("bytes")) if size.get("bytes") is not None else \
            f"({_mib(size.get('weights_bytes'))} in memory)"
        lines.append(f"| {v['name']} | " + " | ".join(cells) + f" | {fmt_seconds(e2e['min'])}–{fmt_seconds(e2e['max'])}"
                     f" | {_fmt(v.get('throughput_images_per_s'), '.3g')} | {_gib(mem['peak_rss_bytes'])} | "
                     f"{_mib(mem.get('peak_device_bytes'))} | {size_cell} |")
    lines += _quality_section(results, ok)
    lines += _variant_notes(results)
    metric = pareto_metric(ok)
    shown = f"{metric[1]}, the first of " if metric else "peak RSS: no quality metric among "
    lines += ["", "![latency per component](latency.png)", "", "![quality vs latency](pareto.png)", "",
              f"Pareto chart: {shown}" + ", ".join(m[1] for m in PARETO_METRICS) + " that differs between variants.",
              "",
              f"Reproduce: `{results.get('command', 'ldm-bench run SUITE -o DIR')}`"]
    return "\n".join(lines) + "\n"


def _quality_section(results: dict[str, Any], ok: list[dict[str, Any]]) -> list[str]:
    q = results["suite"].get("quality")
    if not q:
        return ["", "No quality run in this suite (latency and memory only)."]
    scored = [v for v in ok if v.get("quality")]
    first = scored[0]["quality"] if scored else {}
    src = "procedural shapes prompts" if q["prompts"] == "shapes" else f"prompts from `{Path(q['prompts']).name}`"
    held = f" ({first.get('n_seen')} seen, {first.get('n_heldout')} held-out shape/colour combos)" \
        if "n_seen" in first else ""
    ray = results.get("ray")
    lines = ["", f"## Quality: {q['n']} {src}{held}", "",
             f"{q['steps']} steps, guidance {q['guidance']}, batch {q['batch']}, prompt i from the latents of seed "
             f"{q['seed']} + i in every variant; PSNR/SSIM vs `{q['reference'] or '–'}`"
             + (f"; images generated on Ray ({ray})" if ray else "") + ".", "",
             "| variant | adherence | seen | held-out | domain FID | PSNR dB | SSIM | Inception FID | CLIP score |",
             "|---|---|---|---|---|---|---|---|---|"]
    for v in scored:
        r = v["quality"]
        lines.append(f"| {v['name']} | {_fmt(r.get('adherence'), '.3f')} | {_fmt(r.get('adherence_seen'), '.3f')} | "
                     f"{_fmt(r.get('adherence_heldout'), '.3f')} | {_fmt(r.get('domain_fid'), '.2f')} | "
                     f"{_fmt(r.get('psnr'), '.2f')} | {_fmt(r.get('ssim'), '.4f')} | "
                     f"{_fmt(r.get('inception_fid'), '.2f')} | {_fmt(r.get('clip_score'), '.2f')} |")
    notes = {f"{label}: {v['quality'].get(key)}" for v in scored for key, label in
             (("inception_fid_note", "Inception FID"), ("clip_score_note", "CLIP score"))
             if v["quality"].get(key) and v["quality"].get(key.replace("_note", "")) is None}
    lines += [""] + [f"- {n}" for n in sorted(notes)]
    if any(v["quality"].get("psnr") == math.inf for v in scored):
        lines.append("- PSNR ∞: the 8-bit images are identical to the reference's.")
    if q["prompts"] == "shapes":
        lines.append("- adherence: share of images whose five attributes (shape, colour, background, size, position) "
                     "all match the prompt, read by the shipped attribute classifier; domain FID on its features "
                     "vs real renders of the same prompts.")
    return lines


def _variant_notes(results: dict[str, Any]) -> list[str]:
    lines = ["", "## Variants", ""]
    for v in results["variants"]:
        spec = v["spec"]
        what = spec.get("description") or ", ".join(f"{k} {x}" for k, x in spec["options"].items() if x)
        status = "" if v["status"] == "ok" else f" **{v['status']}**: {v.get('reason', '')}"
        build = v.get("build")
        built = ""
        if build:
            built = f" Built by `{build['recipe']['kind']}`" + (" (reused)" if build.get("reused") else
                                                                 f" in {build.get('seconds', 0):.0f} s") + "."
        lines.append(f"- `{v['name']}` ({v['kind']}): {what}.{built}{status}")
    dev = {v["memory"].get("device_note") for v in results["variants"] if v.get("memory")}
    lines += ["", "Device memory: " + "; ".join(sorted(d for d in dev if d)) + "."] if dev else []
    return lines


def write_markdown(results: dict[str, Any], path: Path) -> Path:
    path.write_text(markdown(results))
    return path
