"""INT8 post-training quantization (ldm-quantize) on tiny-random artifacts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from ldm_deploy.artifact import Artifact
from ldm_deploy.quantize.build import quantize_artifact
from ldm_deploy.quantize.calibration import collect_calibration, selection
from ldm_deploy.quantize.cli import main as quantize_main
from ldm_deploy.quantize.recipes import quantize_onnx, recipe
from ldm_deploy.quantize.ranges import (
    brute_force_minmax,
    calibration_targets,
    collect_ranges,
    load_structure,
)
from ldm_deploy.runtime import Pipeline

FAST = dict(calib_size=4, calib_steps=4, holdout=2, quality_prompts=1)


@pytest.fixture(scope="module")
def calib(tiny_random_fp32):
    pipe = Pipeline.load(tiny_random_fp32, components=("text_encoder", "unet", "vae_decoder"))
    return collect_calibration(pipe, ["a small red circle on a blue background, top left", "a photo of a cat"],
                               size=6, steps=6, per_run=3)


@pytest.fixture(scope="module")
def cpu_int8(tiny_random_fp32, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "cpu-int8"
    quantize_artifact(tiny_random_fp32, out, target="cpu", **FAST)
    return out


@pytest.fixture(scope="module")
def trt_int8(tiny_random_trt, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "trt-int8"
    quantize_artifact(tiny_random_trt, out, target="tensorrt", method="percentile", **FAST)
    return out


# --------------------------------------------------------------------------- calibration


def test_selection_spreads_steps_over_runs():
    n_runs, picks = selection(size=64, steps=20)
    assert n_runs == 13
    assert sorted({j for _, j in picks}) == list(range(20))
    run0 = [j for r, j in picks if r == 0]
    assert min(run0) <= 1 and max(run0) >= 15  # one run contributes early and late steps


def test_calibration_comes_from_real_cfg_trajectories(calib, tiny_random_fp32):
    assert len(calib) == 6 and calib.runs == 2
    from ldm_deploy.runtime.scheduler import DDIMScheduler

    sched = DDIMScheduler.from_config(json.loads((tiny_random_fp32 / "scheduler" / "scheduler_config.json").read_text()))
    sched.set_timesteps(6)
    traj = [int(t) for t in sched.timesteps]
    assert sorted(set(calib.timesteps)) == sorted(traj)  # every step of the trajectory, first to last
    for b in calib.batches:
        assert b["sample"].shape[0] == 2 and b["encoder_hidden_states"].shape[0] == 2  # CFG: 2B with B = 1
        assert not np.allclose(b["encoder_hidden_states"][0], b["encoder_hidden_states"][1])  # uncond != cond
        assert np.array_equal(b["sample"][0], b["sample"][1])  # same latent twice
    # latents evolve along the trajectory: the first step is pure noise (std ~ 1), later ones differ
    first = calib.batches[int(np.argmax(calib.timesteps))]["sample"]
    assert 0.7 < float(first.std()) < 1.3
    meta = calib.meta()
    assert meta["unet_batch"] == 2 and meta["distinct_steps"] == 6 and meta["timestep_range"] == [min(traj), max(traj)]


# --------------------------------------------------------------------------- ranges


def test_streaming_ranges_equal_brute_force(calib, tiny_random_fp32):
    model = tiny_random_fp32 / "unet" / "model.onnx"
    targets = calibration_targets(load_structure(model))
    assert len(targets) > 100
    streamed = collect_ranges(model, calib.batches, targets, "minmax").minmax()
    brute = brute_force_minmax(model, calib.batches, targets)
    for t in targets:
        np.testing.assert_allclose(streamed[t], brute[t], rtol=1e-6, atol=1e-7, err_msg=t)


def test_ranges_of_a_model_with_external_data(calib, tiny_random_fp32, tmp_path):
    """SD-scale U-Nets keep their weights in external data: the augmented copies must still find
    them (ONNX Runtime refuses data paths that resolve outside the model's directory)."""
    model = tiny_random_fp32 / "unet" / "model.onnx"
    ext = tmp_path / "art" / "unet" / "model.onnx"
    ext.parent.mkdir(parents=True)
    onnx.save_model(onnx.load(str(model)), str(ext), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=0)
    targets = calibration_targets(load_structure(ext))
    batches = calib.batches[:2]
    ranges = collect_ranges(ext, batches, targets, "minmax").minmax()
    assert ranges == collect_ranges(model, batches, targets, "minmax").minmax()
    summary = quantize_onnx(ext, tmp_path / "q.onnx", ranges, recipe("cpu"))  # shape inference on it too
    assert summary["quantize_linear"] > 0
    assert sorted(p.name for p in ext.parent.iterdir()) == ["model.onnx", "model.onnx.data"]
    assert sorted(p.name for p in (tmp_path / "art").iterdir()) == ["unet"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ldm-quant-")]


def test_chunked_ranges_equal_unchunked(calib, tiny_random_fp32):
    model = tiny_random_fp32 / "unet" / "model.onnx"
    targets = calibration_targets(load_structure(model))[:120]
    batches = calib.batches[:3]
    whole = collect_ranges(model, batches, targets, "minmax", strategy="expose", max_calib_memory=None)
    budget = whole.estimated_bytes // 5  # a "tiny" budget: five or more runs over the set
    chunked = collect_ranges(model, batches, targets, "minmax", strategy="expose", max_calib_memory=budget)
    assert len(whole.chunks) == 1 and len(chunked.chunks) >= 5
    assert whole.minmax() == chunked.minmax()
    reduced = collect_ranges(model, batches, targets, "minmax").minmax()
    for t in targets:
        np.testing.assert_allclose(reduced[t], whole.minmax()[t], rtol=1e-6, atol=1e-7)
    # histogram methods: same histograms, hence same ranges, whatever the chunking
    hw = collect_ranges(model, batches, targets, "percentile", max_calib_memory=None)
    hc = collect_ranges(model, batches, targets, "percentile", max_calib_memory=budget)
    assert len(hc.chunks) >= 5
    for t in targets:
        assert np.array_equal(hw.stats[t].hist, hc.stats[t].hist)
    assert hw.ranges("percentile") == hc.ranges("percentile")
    assert hw.ranges("mse", symmetric=True) == hc.ranges("mse", symmetric=True)
    lo, hi = hw.ranges("minmax")[targets[5]]
    plo, phi = hw.ranges("percentile", percentile=99.0)[targets[5]]
    assert lo <= plo <= phi <= hi


# --------------------------------------------------------------------------- targets


def _unet(art: Path) -> onnx.ModelProto:
    return onnx.load(str(art / "unet" / "model.onnx"))


def test_tensorrt_target_is_symmetric_int8_qdq(trt_int8, tiny_random_fp32):
    model = _unet(trt_int8)
    onnx.checker.check_model(model)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    qs = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    dqs = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert qs and len(qs) == len(dqs)
    for n in qs + dqs:
        zp = inits[n.input[2]]
        assert zp.dtype == np.int8 and not zp.any(), n.name
    for q in qs:  # every Q feeds exactly DQs: pairs
        assert all(c.op_type == "DequantizeLinear" for c in consumers[q.output[0]])
    for n in model.graph.node:
        assert n.op_type != "Softmax" or not any(
            c.op_type == "QuantizeLinear" for c in consumers.get(n.input[0], [])), "Softmax input quantized"
    # runs on ORT CPU
    import onnxruntime as ort

    s = ort.InferenceSession(str(trt_int8 / "unet" / "model.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    out = s.run(None, {"sample": rng.standard_normal((2, 4, 8, 8), dtype=np.float32),
                       "timestep": np.array([500.0], np.float32),
                       "encoder_hidden_states": rng.standard_normal((2, 77, 32), dtype=np.float32)})[0]
    assert out.shape == (2, 4, 8, 8) and np.isfinite(out).all()
    q = Artifact.open(trt_int8).manifest["quantization"]
    assert q["target"] == "tensorrt" and q["method"] == "percentile"
    assert q["quality"]["unet_heldout"]["cosine"] > 0.98


def test_cpu_target_close_to_fp32_and_default_exclusions(cpu_int8, tiny_random_fp32):
    m = Artifact.open(cpu_int8).manifest
    q = m["quantization"]
    assert q["target"] == "cpu" and q["components"] == ["unet"]
    assert q["quality"]["unet_heldout"]["cosine"] > 0.99
    assert q["quality"]["images"]["psnr_mean"] > 20
    cal = q["calibration"]
    assert cal["size"] == 4 and cal["steps"] == 4 and cal["seed"] == 0 and len(cal["timesteps"]) == 4
    assert q["exclusions"]["excluded_nodes"]["unet"] == len(q["per_component"]["unet"]["excluded"]) > 0
    model = _unet(cpu_int8)
    producers = {o: n for n in model.graph.node for o in n.output}
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    def fed_by_dq(node: onnx.NodeProto) -> bool:
        return any(producers.get(i) is not None and producers[i].op_type == "DequantizeLinear" for i in node.input)
    by_name = {n.name: n for n in model.graph.node}
    for name in ("/unet/conv_in/Conv", "/unet/conv_out/Conv", "/unet/time_embedding/linear_1/Gemm",
                 "/unet/time_embedding/linear_2/Gemm", "/unet/down_blocks.0/resnets.0/time_emb_proj/Gemm"):
        assert not fed_by_dq(by_name[name]), name
    assert fed_by_dq(by_name["/unet/down_blocks.0/resnets.0/conv1/Conv"])
    kv = [n for n in model.graph.node if "/attn2/to_k/" in n.name and n.op_type == "MatMul"]
    assert kv and not any(fed_by_dq(n) for n in kv)  # cross-attention K/V kept fp32 by default
    # untouched components are byte-identical copies; the source still verifies
    for c in ("text_encoder", "vae_decoder", "vae_encoder"):
        a = (tiny_random_fp32 / c / "model.onnx").read_bytes()
        assert a == (cpu_int8 / c / "model.onnx").read_bytes()
    Artifact.open(tiny_random_fp32).verify()
    Artifact.open(cpu_int8).verify()


def test_runtime_pipeline_runs_quantized_artifact(cpu_int8, tiny_random_fp32):
    """The INT8 artifact's images are close to its fp32 source's from the same seed, and closer
    than the source's own image from another seed (so closeness is not just similar statistics)."""
    from ldm_deploy.numerics import psnr

    prompt = "a small red circle on a blue background, top left"
    int8 = Pipeline.load(cpu_int8)(prompt, num_inference_steps=3, seed=1, output_type="np").images
    fp32 = Pipeline.load(tiny_random_fp32)
    same = fp32(prompt, num_inference_steps=3, seed=1, output_type="np").images
    other = fp32(prompt, num_inference_steps=3, seed=2, output_type="np").images
    assert int8.shape == (1, 64, 64, 3) and np.isfinite(int8).all()
    assert psnr(int8, same, 1.0) >= 20.0, psnr(int8, same, 1.0)
    assert psnr(int8, same, 1.0) > psnr(other, same, 1.0) + 3.0, (psnr(int8, same, 1.0), psnr(other, same, 1.0))


def test_calibrating_while_another_thread_generates_with_the_same_pipeline(tiny_random_fp32, cpu_int8, tmp_path):
    """Calibration observes the shared Pipeline instead of swapping its components: an
    ldm-quantize run on one thread and generation on another, through one Pipeline, each give
    exactly what they give alone (cpu_int8 was quantized alone, with its own Pipeline)."""
    import threading

    pipe = Pipeline.load(tiny_random_fp32)
    prompt = "a large green square on a white background"
    serial = [pipe(prompt, num_inference_steps=3, seed=s, output_type="np").images for s in range(4)]
    done: dict = {}

    def quantize() -> None:
        try:
            done["manifest"] = quantize_artifact(tiny_random_fp32, tmp_path / "int8", target="cpu", pipeline=pipe,
                                                 **FAST)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            done["error"] = e

    worker = threading.Thread(target=quantize)
    worker.start()
    generated = overlapped = 0
    while worker.is_alive() or generated < 8:
        overlapped += worker.is_alive()
        images = pipe(prompt, num_inference_steps=3, seed=generated % 4, output_type="np").images
        assert np.array_equal(images, serial[generated % 4]), f"generation {generated} changed"
        generated += 1
    worker.join()
    assert "error" not in done, done.get("error")
    assert overlapped >= 2  # generation really overlapped the calibration
    a = (tmp_path / "int8" / "unet" / "model.onnx").read_bytes()
    assert a == (cpu_int8 / "unet" / "model.onnx").read_bytes()
    shared, alone = done["manifest"]["quantization"], json.loads((cpu_int8 / "manifest.json").read_text())["quantization"]
    assert shared["calibration"] == alone["calibration"]


def test_sensitivity_table(tiny_random_fp32, calib):
    from ldm_deploy.quantize.sensitivity import sensitivity_markdown, sensitivity_table
    from ldm_deploy.quantize.recipes import quantizable_nodes, recipe

    model = tiny_random_fp32 / "unet" / "model.onnx"
    st = load_structure(model)
    rng = collect_ranges(model, calib.batches[:2], calibration_targets(st), "minmax").ranges()
    cand = [n for n in quantizable_nodes(st, ("Conv", "MatMul", "Gemm"), True) if "/up_blocks.3/" in n]
    rows = sensitivity_table(model, rng, recipe("cpu"), cand, calib.batches[:1])
    assert len(rows) >= 2 and all(0.9 < r["cosine"] <= 1.0 + 1e-9 for r in rows)
    assert rows[0]["rel_l2"] >= rows[-1]["rel_l2"]
    assert "| group |" in sensitivity_markdown(rows, "unet")


# --------------------------------------------------------------------------- bad input


def _fail(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as e:
        quantize_main(list(argv))
    assert e.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("ldm-quantize: error:") and "\n" not in err and "Traceback" not in err
    return err


def test_bad_inputs(tiny_random_fp32, tmp_path, capsys):
    src = str(tiny_random_fp32)
    out = tmp_path / "out"
    before = json.loads((tiny_random_fp32 / "manifest.json").read_text())["files"]

    fake16 = tmp_path / "fp16"
    fake16.mkdir()
    m = json.loads((tiny_random_fp32 / "manifest.json").read_text())
    m.update(precision="fp16", io_dtype="float16")
    (fake16 / "manifest.json").write_text(json.dumps(m))
    assert "fp16" in _fail(capsys, str(fake16), "-o", str(out))

    assert "does not exist" in _fail(capsys, src, "-o", str(out), "--calib-prompts", str(tmp_path / "missing.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    assert "no prompts" in _fail(capsys, src, "-o", str(out), "--calib-prompts", str(empty))
    assert "unknown component" in _fail(capsys, src, "-o", str(out), "--components", "unet,refiner")
    assert "matches no node" in _fail(capsys, src, "-o", str(out), "--exclude", "*/no_such_block/*")
    assert "--optimize tensorrt" in _fail(capsys, src, "-o", str(out), "--target", "tensorrt")  # ORT-only MHA ops
    assert "matches no node" in _fail(capsys, src, "-o", str(out), "--exclude", "re:^/unet/nothing\\d+$")
    with pytest.raises(Exception, match="empty"):
        quantize_artifact(tiny_random_fp32, out, prompts=[], **FAST)

    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ldm-tmp-")]
    assert json.loads((tiny_random_fp32 / "manifest.json").read_text())["files"] == before
    Artifact.open(tiny_random_fp32).verify()


def test_cli_exclude_pattern_and_prompt_file(tiny_random_fp32, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a large green square on a red background, center\n# comment\na small blue circle\n")
    out = tmp_path / "q"
    with pytest.raises(SystemExit) as e:
        quantize_main([str(tiny_random_fp32), "-o", str(out), "--calib-prompts", str(prompts), "--calib-size", "2",
                       "--calib-steps", "2", "--holdout", "1", "--quality-prompts", "0", "-q",
                       "--exclude", "*/mid_block/*", "--method", "mse"])
    assert e.value.code == 0
    assert "wrote" in capsys.readouterr().out
    q = Artifact.open(out).manifest["quantization"]
    assert q["calibration"]["prompts"] == ["a large green square on a red background, center", "a small blue circle"]
    assert q["exclusions"]["nodes_per_pattern"]["*/mid_block/*"] > 0
    assert any("/mid_block/" in n for n in q["per_component"]["unet"]["excluded"])
    shutil.rmtree(out)


# --------------------------------------------------------------------------- --ranges-from


def test_ranges_from_reproduces_the_graph_and_takes_new_exclusions(cpu_int8, tiny_random_fp32, tmp_path):
    same = quantize_artifact(tiny_random_fp32, tmp_path / "same", target="cpu", ranges_from=str(cpu_int8),
                             holdout=2, quality_prompts=1)
    first = Artifact.open(cpu_int8).manifest["quantization"]
    q = same["quantization"]
    # same ranges + same recipe: the same INT8 graph, reported on the same held-out batches and image
    assert (tmp_path / "same" / "unet" / "model.onnx").read_bytes() == (cpu_int8 / "unet" / "model.onnx").read_bytes()
    assert q["quality"]["unet_heldout"]["cosine"] == pytest.approx(first["quality"]["unet_heldout"]["cosine"], abs=1e-9)
    assert q["quality"]["images"]["psnr"] == pytest.approx(first["quality"]["images"]["psnr"])
    assert q["calibration"]["ranges_from"] == str(cpu_int8.absolute())
    assert q["calibration"]["prompts"] == first["calibration"]["prompts"]
    assert q["per_component"]["unet"]["range_passes"] == 0

    fewer = quantize_artifact(tiny_random_fp32, tmp_path / "fewer", target="cpu", ranges_from=str(cpu_int8),
                              exclude=["*/mid_block/*"], holdout=1, quality_prompts=0)["quantization"]
    assert fewer["per_component"]["unet"]["excluded_nodes"] > first["per_component"]["unet"]["excluded_nodes"]
    assert fewer["per_component"]["unet"]["quantize_linear"] < first["per_component"]["unet"]["quantize_linear"]


def test_ranges_from_bad_inputs(cpu_int8, tiny_random_fp32, tiny_random_trt, tmp_path, capsys):
    src, out, prev = str(tiny_random_fp32), str(tmp_path / "out"), str(cpu_int8)
    assert "no ranges to reuse" in _fail(capsys, src, "-o", out, "--ranges-from", src)
    assert "--method minmax" in _fail(capsys, src, "-o", out, "--ranges-from", prev, "--method", "mse")
    assert "calibrated on" in _fail(capsys, str(tiny_random_trt), "-o", out, "--ranges-from", prev)
    assert "--sensitivity" in _fail(capsys, src, "-o", out, "--ranges-from", prev, "--sensitivity")
    assert "does not exist" in _fail(capsys, src, "-o", out, "--ranges-from", str(tmp_path / "missing"))
    assert not Path(out).exists()


def _int8_weight_extremes(art: Path) -> tuple[int, int]:
    lo = hi = 0
    for t in _unet(art).graph.initializer:
        if t.data_type == onnx.TensorProto.INT8:
            a = numpy_helper.to_array(t)
            lo, hi = min(lo, int(a.min())), max(hi, int(a.max()))
    return lo, hi


def test_reduce_range_gives_7_bit_weights(cpu_int8, tiny_random_fp32, tmp_path):
    full = _int8_weight_extremes(cpu_int8)
    assert full[0] <= -100 and full[1] >= 100  # full-range int8 weights by default
    out = tmp_path / "rr"
    m = quantize_artifact(tiny_random_fp32, out, target="cpu", ranges_from=str(cpu_int8), reduce_range=True,
                          holdout=2, quality_prompts=0)["quantization"]
    lo, hi = _int8_weight_extremes(out)
    assert -64 <= lo and hi <= 64 and hi - lo > 100  # 7 bits, still used
    assert m["recipe"]["reduce_range"] is True
    first = Artifact.open(cpu_int8).manifest["quantization"]
    assert m["per_component"]["unet"]["quantize_linear"] == first["per_component"]["unet"]["quantize_linear"]
    assert m["quality"]["unet_heldout"]["cosine"] > 0.99


def test_reduce_range_only_for_the_cpu_target():
    with pytest.raises(Exception, match="--reduce-range is for the cpu target"):
        recipe("tensorrt", reduce_range=True)


def test_saturation_warning_on_avx2_without_vnni(cpu_int8, monkeypatch):
    import warnings

    from ldm_deploy.runtime import cpu_features
    from ldm_deploy.runtime.cpu_features import int8_saturation_warning, u8s8_saturates

    avx2, vnni = frozenset({"sse4_2", "avx2"}), frozenset({"avx2", "avx512f", "avx512_vnni"})
    assert u8s8_saturates(avx2) and not u8s8_saturates(vnni) and not u8s8_saturates(frozenset())
    m = Artifact.open(cpu_int8).manifest
    assert "--reduce-range" in int8_saturation_warning(m, avx2)
    assert int8_saturation_warning(m, vnni) is None
    rr = json.loads(json.dumps(m))
    rr["quantization"]["recipe"]["reduce_range"] = True
    assert int8_saturation_warning(rr, avx2) is None
    assert int8_saturation_warning({"precision": "fp32"}, avx2) is None

    monkeypatch.setattr(cpu_features, "cpu_flags", lambda: avx2)
    with pytest.warns(RuntimeWarning, match="--reduce-range"):
        Pipeline.load(cpu_int8, components=("unet",))
    monkeypatch.setattr(cpu_features, "cpu_flags", lambda: vnni)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Pipeline.load(cpu_int8, components=("unet",))
