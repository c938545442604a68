"""ldm-bench: suite validation (with line numbers), a real tiny run with every output, report
re-rendering, atomic results, memory sampling, and Ray sharding giving the same metrics."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT

from ldm_deploy.bench import SuiteError, load_suite
from ldm_deploy.bench.measure import MemorySampler, summarize

OUTPUTS = ("results.json", "results.csv", "results.md", "latency.png", "pareto.png")


def write_suite(tmp_path: Path, body: str, name: str = "suite.toml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(body).lstrip())
    return p


def marked_line(path: Path) -> int:
    """1-based number of the line carrying the `# <-` marker."""
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if "# <-" in line)


GOOD_HEAD = """
    name = "t"
    [settings]
    height = 64
    width = 64
    steps = 2
    """

BAD_SUITES = {
    "unknown kind": GOOD_HEAD + """
        [[variant]]
        name = "a"
        kind = "diffusers"
        model = "tiny-random"

        [[variant]]
        name = "b"
        kind = "tensorflow"  # <-
        """,
    "missing artifact": GOOD_HEAD + """
        [[variant]]
        name = "a"
        kind = "runtime"
        artifact = "no/such/dir"  # <-
        """,
    "negative steps": """
        [settings]
        height = 64
        steps = -3  # <-
        [[variant]]
        name = "a"
        kind = "diffusers"
        model = "tiny-random"
        """,
    "size not multiple of 8": """
        [settings]
        width = 60  # <-
        [[variant]]
        name = "a"
        kind = "diffusers"
        model = "tiny-random"
        """,
    "zero repeats": """
        [settings]
        repeats = 0  # <-
        [[variant]]
        name = "a"
        kind = "diffusers"
        model = "tiny-random"
        """,
    "bool for a number": """
        [settings]
        batch = true  # <-
        [[variant]]
        name = "a"
        kind = "diffusers"
        model = "tiny-random"
        """,
    "unknown variant key": GOOD_HEAD + """
        [[variant]]
        name = "a"
        kind = "diffusers"
        model = "tiny-random"
        providr = "cpu"  # <-
        """,
    "unknown build key (inline)": GOOD_HEAD + """
        [[variant]]
        name = "a"
        kind = "runtime"
        build = { export = "tiny-random", fp16 = false }

        [[variant]]
        name = "b"
        kind = "runtime"
        build = { quantize = "a", calib_sise = 4 }  # <-
        """,
    "bad build number (sub-table)": GOOD_HEAD + """
        [[variant]]
        name = "a"
        kind = "runtime"
        [variant.build]
        export = "tiny-random"
        max_batch = 0  # <-
        """,
    "unknown quantize source": GOOD_HEAD + """
        [[variant]]
        name = "a"
        kind = "runtime"
        build = { quantize = "fp32" }  # <-
        """,
    "unknown model": GOOD_HEAD + """
        [[variant]]
        name = "a"
        kind = "diffusers"
        model = "no-such-model"  # <-
        """,
    "reference not a variant": GOOD_HEAD + """
        [quality]
        n = 4
        reference = "torch"  # <-
        [[variant]]
        name = "a"
        kind = "diffusers"
        model = "tiny-random"
        """,
    "unset environment variable": GOOD_HEAD + """
        [[variant]]
        name = "a"
        kind = "diffusers"
        model = "${LDM_BENCH_TEST_SURELY_UNSET}"  # <-
        """,
    "duplicate name": GOOD_HEAD + """
        [[variant]]
        name = "a"
        kind = "diffusers"
        model = "tiny-random"
        [[variant]]
        name = "a"  # <-
        kind = "diffusers"
        model = "tiny-random"
        """,
    "unknown table": GOOD_HEAD + """
        [variants]  # <-
        name = "a"
        """,
    "invalid TOML": GOOD_HEAD + """
        [[variant]]
        name = "a  # <-
        kind = "diffusers"
        """,
}


@pytest.mark.parametrize("case", sorted(BAD_SUITES))
def test_bad_suites_fail_naming_the_line(tmp_path, case):
    path = write_suite(tmp_path, BAD_SUITES[case])
    with pytest.raises(SuiteError) as err:
        load_suite(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}:{marked_line(path)}:"), msg
    assert "\n" not in msg


def test_good_suite_resolves_paths_and_env(tmp_path, monkeypatch, tiny_random_fp32):
    monkeypatch.setenv("LDM_BENCH_TEST_ART", str(tiny_random_fp32))
    path = write_suite(tmp_path, GOOD_HEAD + """
        [quality]
        n = 3
        [[variant]]
        name = "rt"
        kind = "runtime"
        artifact = "${LDM_BENCH_TEST_ART}"
        [[variant]]
        name = "q"
        kind = "runtime"
        build = { quantize = "rt", calib_size = 2 }
        """)
    suite = load_suite(path)
    assert [v.name for v in suite.variants] == ["rt", "q"]
    assert suite.variants[0].options["artifact"] == str(tiny_random_fp32.resolve())
    assert suite.variants[1].build == {**suite.variants[1].build, "kind": "quantize", "quantize": "rt", "calib_size": 2}
    assert suite.quality["steps"] == 2 and suite.quality["batch"] == 1  # inherited from [settings]


def test_cli_rejects_bad_suite_before_any_work(tmp_path):
    path = write_suite(tmp_path, BAD_SUITES["negative steps"])
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "ldm_deploy.bench.cli", "run", str(path), "-o", str(out)],
                          check=False, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"ldm-bench: error: {path}:{marked_line(path)}:"), proc.stderr
    assert not out.exists() and not list(tmp_path.glob(".ldm-tmp-*"))


def test_summary_stats_and_memory_sampler():
    s = summarize([0.3, 0.1, 0.2, 0.5])
    assert (s["min"], s["max"], s["n"]) == (0.1, 0.5, 4)
    assert s["median"] == pytest.approx(0.25) and s["median"] <= s["p90"] <= s["max"]
    with MemorySampler(0.005) as m:
        base = m.rss_now()
        block = np.ones(160 * 2**20 // 8)  # 160 MiB, touched
        import time

        time.sleep(0.05)
        del block
    r = m.result()
    assert r["peak_rss_bytes"] >= base + 150 * 2**20
    assert r["rss_samples"] >= 3


# --------------------------------------------------------------------------- real runs


def run_suite_text(artifact: Path) -> str:
    return f"""
        name = "tiny-test"
        [settings]
        height = 64
        width = 64
        batch = 1
        steps = 6  # end to end must clearly outweigh one (single-sample) U-Net step
        guidance = 5.0
        warmup = 1
        repeats = 1
        [quality]
        n = 4
        batch = 2
        steps = 2
        reference = "torch"
        [[variant]]
        name = "torch"
        kind = "diffusers"
        model = "tiny-random"
        [[variant]]
        name = "fp32"
        kind = "runtime"
        artifact = "{artifact}"
        [[variant]]
        name = "int8"
        kind = "runtime"
        build = {{ quantize = "fp32", calib_size = 2, calib_steps = 2, holdout = 0, quality_prompts = 0 }}
        [[variant]]
        name = "ort-cuda"
        kind = "runtime"
        artifact = "{artifact}"
        backend = "ort-cuda"
        """


@pytest.fixture(scope="module")
def bench_setup(tmp_path_factory, tiny_random_fp32):
    root = tmp_path_factory.mktemp("bench")
    suite = write_suite(root, run_suite_text(tiny_random_fp32))
    return root, suite


@pytest.fixture(scope="module")
def local_run(bench_setup):
    from ldm_deploy.bench.runner import run_suite

    root, suite_path = bench_setup
    out = root / "results"
    results = run_suite(load_suite(suite_path), out, work_dir=root / "work", progress=False)
    return out, results


def test_tiny_run_writes_every_output(local_run, tiny_random_fp32):
    out, _ = local_run
    for name in OUTPUTS:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert not list(out.parent.glob(".ldm-tmp-*"))
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["suite"]["name"] == "tiny-test" and "onnxruntime" in on_disk["versions"]
    assert on_disk["machine"]["logical_cpus"] >= 1
    rows = {v["name"]: v for v in on_disk["variants"]}
    assert [rows[n]["status"] for n in ("torch", "fp32", "int8", "ort-cuda")] == ["ok", "ok", "ok", "skipped"]
    assert "'cuda' is not available" in rows["ort-cuda"]["reason"]
    for name in ("torch", "fp32", "int8"):
        v = rows[name]
        for op in ("text_encoder", "unet_step", "vae_decode", "end_to_end"):
            st = v["latency"][op]
            assert st["n"] == 1 and 0 < st["min"] <= st["median"] <= st["p90"] <= st["max"]
        assert v["latency"]["end_to_end"]["median"] > v["latency"]["unet_step"]["median"]
        assert v["throughput_images_per_s"] == pytest.approx(1 / v["latency"]["end_to_end"]["median"])
        assert v["memory"]["peak_rss_bytes"] >= v["rss_after_load_bytes"] > 50 * 2**20
        assert v["quality"]["n"] == 4 and v["quality_images"]["source"] == "local"
    manifest = json.loads((tiny_random_fp32 / "manifest.json").read_text())
    expected = sum(i["bytes"] for rel, i in manifest["files"].items()
                   if rel.split("/")[0] in ("text_encoder", "unet", "vae_decoder", "tokenizer", "scheduler"))
    assert rows["fp32"]["size"]["bytes"] == expected
    assert rows["int8"]["build"]["recipe"]["kind"] == "quantize"
    assert rows["int8"]["size"]["bytes"] < rows["fp32"]["size"]["bytes"]
    # the runtime reproduces diffusers from the same latents; INT8 is close but not identical
    assert rows["fp32"]["quality"]["psnr"] >= 35
    assert rows["int8"]["quality"]["psnr"] < rows["fp32"]["quality"]["psnr"]
    assert "psnr" not in rows["torch"]["quality"]
    md = (out / "results.md").read_text()
    for name in ("torch", "fp32", "int8"):
        assert f"| {name} |" in md
    assert "**skipped**" in md and "latency.png" in md and "pareto.png" in md
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["variant"] for r in table] == ["torch", "fp32", "int8", "ort-cuda"]
    from PIL import Image

    for png in ("latency.png", "pareto.png"):
        with Image.open(out / png) as im:
            assert im.format == "PNG" and im.size[0] > 300
    _check_plot_content(on_disk)


def _check_plot_content(results: dict) -> None:
    """What the PNGs draw: one labelled bar per variant and component ending at its median, and
    one quality-vs-latency point per variant at its measured values."""
    import matplotlib.pyplot as plt

    from ldm_deploy.bench.plots import latency_figure, pareto_figure
    from ldm_deploy.bench.results import pareto_metric, quality_value

    ok = [v for v in results["variants"] if v["status"] == "ok"]
    names = [v["name"] for v in ok]
    fig = latency_figure(results)
    per_component, end_to_end = fig.axes[:2]
    assert [t.get_text() for t in end_to_end.get_yticklabels()] == names
    ends = [p.get_x() + p.get_width() for p in end_to_end.patches]
    assert ends == pytest.approx([v["latency"]["end_to_end"]["median"] for v in ok])
    ends = [p.get_x() + p.get_width() for p in per_component.patches]
    assert ends == pytest.approx([v["latency"][op]["median"] for op in ("text_encoder", "unet_step", "vae_decode")
                                  for v in ok])
    plt.close(fig)

    fig = pareto_figure(results)
    (ax,) = fig.axes
    key, label, _ = pareto_metric(ok)
    points = {c.get_label(): tuple(c.get_offsets()[0]) for c in ax.collections}
    expected = {v["name"]: (v["latency"]["end_to_end"]["median"], quality_value(v["quality"], key)) for v in ok
                if quality_value(v["quality"], key) is not None}
    assert len(expected) >= 2 and points.keys() == expected.keys()
    for name, xy in expected.items():
        assert points[name] == pytest.approx(xy)
    assert ax.get_ylabel() == label and any(line.get_label() == "Pareto front" for line in ax.lines)
    plt.close(fig)


def test_report_regenerates_outputs(local_run, tmp_path):
    import shutil

    from ldm_deploy.bench.cli import main

    out, _ = local_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    before = (copy / "results.md").read_text()
    for name in OUTPUTS[1:]:
        (copy / name).unlink()
    with pytest.raises(SystemExit) as ex:
        main(["report", str(copy)])
    assert ex.value.code == 0
    assert all((copy / n).is_file() for n in OUTPUTS)
    assert (copy / "results.md").read_text() == before
    with pytest.raises(SystemExit) as ex:
        main(["report", str(tmp_path / "nothing")])
    assert ex.value.code == 1


def test_crashed_run_leaves_no_results(bench_setup, monkeypatch, tmp_path):
    from ldm_deploy.bench import runner

    def boom(*a, **k):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(runner, "build_all", boom)
    out = tmp_path / "results"
    with pytest.raises(RuntimeError, match="simulated crash"):
        runner.run_suite(load_suite(bench_setup[1]), out, progress=False)
    assert not out.exists() and not list(tmp_path.glob(".ldm-tmp-*"))


def test_ray_sharding_gives_the_same_metrics(bench_setup, local_run):
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'ldm-deploy[ray]')")
    from ldm_deploy.bench.runner import run_suite

    root, suite_path = bench_setup
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        results = run_suite(load_suite(suite_path), root / "results-ray", work_dir=root / "work", ray="local",
                            progress=False)
    finally:
        ray.shutdown()
    _, local = local_run
    ray_rows = {v["name"]: v for v in results["variants"]}
    assert ray_rows["int8"]["build"]["reused"] is True  # same recipe, same work dir
    for v in local["variants"]:
        if v["status"] != "ok":
            continue
        r = ray_rows[v["name"]]
        assert r["quality_images"]["source"] == "ray" and r["quality_images"]["shards"] == 2
        for key in ("adherence", "adherence_seen", "adherence_heldout", "domain_fid", "psnr", "ssim",
                    "per_attribute"):
            assert r["quality"].get(key) == v["quality"].get(key), (v["name"], key)


def test_clip_score_needs_a_local_model(tmp_path, monkeypatch):
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizer,
    )

    from ldm_deploy.bench.quality import CLIP_MODEL_ENV, clip_score
    from ldm_deploy.models import CLIP_TOKENIZER_DIR

    monkeypatch.delenv(CLIP_MODEL_ENV, raising=False)
    images = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    value, note = clip_score(images, ["a cat"] * 3, None)
    assert value is None and CLIP_MODEL_ENV in note
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    cfg = CLIPConfig(text_config=small, vision_config={**small, "image_size": 32, "patch_size": 8}, projection_dim=16)
    CLIPModel(cfg).save_pretrained(tmp_path)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=processor, tokenizer=CLIPTokenizer.from_pretrained(CLIP_TOKENIZER_DIR)).save_pretrained(
        tmp_path)
    value, note = clip_score(images, ["a cat", "a dog", "a red circle"], str(tmp_path))
    assert isinstance(value, float) and 0.0 <= value <= 100.0 and str(tmp_path) in note
