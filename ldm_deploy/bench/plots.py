"""PNG charts of a results dict (matplotlib, Agg): latency per component, quality vs latency."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .results import OPS, pareto_metric, quality_value


def require_matplotlib() -> Any:
    try:
        import matplotlib
    except ImportError:
        from ..errors import LdmDeployError

        raise LdmDeployError("ldm-bench plots need matplotlib: pip install 'ldm-deploy[bench]'") from None
    return matplotlib


def _pyplot() -> Any:
    matplotlib = require_matplotlib()
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _seconds(x: float) -> str:
    return f"{x * 1000:g} ms" if x < 1 else f"{x:g} s"


def _minor_seconds(x: float, _: Any = None) -> str:
    """Label the 2x and 5x minor ticks of a log axis only."""
    if x <= 0:
        return ""
    mantissa = x / 10 ** math.floor(math.log10(x) + 1e-9)
    return _seconds(x) if any(abs(mantissa - m) < 1e-6 for m in (2, 5)) else ""


def _log_seconds_axis(ax: Any) -> None:
    from matplotlib.ticker import FuncFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: _seconds(x)))
    ax.xaxis.set_minor_formatter(FuncFormatter(_minor_seconds))
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.grid(axis="x", which="major", alpha=0.3)


def _bars(ax: Any, ys: list[float], stats: list[dict[str, Any]], low: str, high: str, floor: float, **kw: Any) -> None:
    """Bars from ``floor`` to the median, whiskers from ``stats[low]`` to ``stats[high]`` (log axis)."""
    med = [st["median"] for st in stats]
    err = [[m - st[low] for m, st in zip(med, stats)], [st[high] - m for m, st in zip(med, stats)]]
    ax.barh(ys, [m - floor for m in med], left=floor, xerr=err, capsize=2, **kw)


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def latency_plot(results: dict[str, Any], path: Path) -> Path:
    """Write :func:`latency_figure` as a PNG."""
    return _save(latency_figure(results), path)


def pareto_plot(results: dict[str, Any], path: Path) -> Path:
    """Write :func:`pareto_figure` as a PNG."""
    return _save(pareto_figure(results), path)


def latency_figure(results: dict[str, Any]) -> Any:
    """Left: median per component (whiskers: min to p90); right: end to end (whiskers: min to max).
    Log time axes: components differ by orders of magnitude and a loaded machine adds outliers."""
    plt = _pyplot()
    ok = [v for v in results["variants"] if v["status"] == "ok"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 0.9 + 0.9 * max(2, len(ok))),
                                   gridspec_kw={"width_ratios": [3, 2]})
    names = [v["name"] for v in ok]
    comps = OPS[:3]
    if ok:
        floor = min(v["latency"][op]["min"] for v in ok for op, _ in comps) / 2
        h = 0.8 / len(comps)
        for k, (op, label) in enumerate(comps):
            ys = [i + (k - (len(comps) - 1) / 2) * h for i in range(len(ok))]
            _bars(ax1, ys, [v["latency"][op] for v in ok], "min", "p90", floor, height=h, label=label)
        e2e = [v["latency"]["end_to_end"] for v in ok]
        _bars(ax2, list(range(len(ok))), e2e, "min", "max", min(e["min"] for e in e2e) / 2, color="tab:gray")
        ax1.legend(loc="best", fontsize=8)
        for ax in (ax1, ax2):
            _log_seconds_axis(ax)
    for ax in (ax1, ax2):
        ax.set_yticks(range(len(ok)), names)
        ax.invert_yaxis()
    s = results["suite"]["settings"]
    ax1.set_xlabel("median latency (whiskers: min to p90)")
    ax1.set_title("per component (one call; U-Net: one CFG step)")
    ax2.set_xlabel("median latency (whiskers: min to max)")
    ax2.set_title(f"end to end ({s['steps']} steps, batch {s['batch']})")
    fig.suptitle(f"{results['suite']['name']}: latency, {s['height']}x{s['width']}")
    fig.tight_layout()
    return fig


def _front(points: list[tuple[float, float, str]], higher: bool) -> list[tuple[float, float, str]]:
    """Points not beaten by a faster one (lower latency) on quality."""
    out: list[tuple[float, float, str]] = []
    for p in sorted(points):
        if not out or (p[1] > out[-1][1] if higher else p[1] < out[-1][1]):
            out.append(p)
    return out


def pareto_figure(results: dict[str, Any]) -> Any:
    """Quality (or, without a quality run, peak RSS) vs end-to-end median latency, with the front."""
    plt = _pyplot()
    ok = [v for v in results["variants"] if v["status"] == "ok"]
    metric = pareto_metric(ok)
    if metric is not None:
        key, label, higher = metric
        pts = [(v["latency"]["end_to_end"]["median"], quality_value(v["quality"], key), v["name"]) for v in ok
               if quality_value(v.get("quality") or {}, key) is not None]
        title = f"{label} vs latency ({'higher' if higher else 'lower'} is better)"
    else:
        label, higher = "peak RSS (GiB)", False
        pts = [(v["latency"]["end_to_end"]["median"], v["memory"]["peak_rss_bytes"] / 2**30, v["name"]) for v in ok]
        title = "peak memory vs latency (lower-left is better)"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if pts:
        markers = "osD^vP*Xh<>"
        for k, (x, y, name) in enumerate(pts):
            ax.scatter([x], [y], s=55, zorder=3, marker=markers[k % len(markers)], label=name)
        front = _front(pts, higher)
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="tab:red", alpha=0.5,
                label="Pareto front")
        xs = [p[0] for p in pts]
        if min(xs) > 0 and max(xs) / min(xs) > 8:
            _log_seconds_axis(ax)
        ax.legend(loc="best", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no variant with a quality metric", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("end-to-end median latency" + ("" if ax.get_xscale() == "log" else " (s)"))
    ax.set_ylabel(label)
    ax.set_title(f"{results['suite']['name']}: {title}", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
