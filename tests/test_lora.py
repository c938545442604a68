"""LoRA adapters fused before export (``ldm-export --lora``): reading kohya / diffusers / PEFT files,
fusing at scales, refusing adapters that do not fit, parity of the exported graphs with the fused
model, and a quantized LoRA artifact."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, run_cli
from ldm_deploy.errors import LdmDeployError
from ldm_deploy.export.lora import LoraSpec, fuse_loras, parse_lora_arg

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
SHIPPED = ROOT / "ldm_deploy" / "assets" / "lora" / "tiny-noir.safetensors"


def _peft_adapter(model, rank: int, seed: int, text_encoder: bool = True, magnitude: float = 0.05):
    """PEFT LoRA layers with random (non-zero) A and B on copies of ``model``'s U-Net / text encoder."""
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(seed)
    unet = copy.deepcopy(model.unet)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=UNET_TARGETS))
    te = None
    if text_encoder:
        te = copy.deepcopy(model.text_encoder)
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=TEXT_TARGETS), te)
    with torch.no_grad():
        for m in (unet, te):
            for n, p in ([] if m is None else m.named_parameters()):
                if "lora_A" in n:
                    p.normal_(0, 1.0 / p.shape[1] ** 0.5)
                elif "lora_B" in n:
                    p.normal_(0, magnitude)
    return unet, te


def make_adapter(path: Path, model, rank: int = 4, seed: int = 0, fmt: str = "diffusers", text_encoder: bool = True,
                 alpha: float | None = None) -> tuple[Path, object, object]:
    """Write a LoRA for ``model`` in ``fmt`` (diffusers | peft | kohya); returns the file and the PEFT
    modules it came from. ``alpha`` (kohya only) is written as the adapter's alpha, which scales the
    delta by alpha / rank relative to the PEFT modules."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    unet, te = _peft_adapter(model, rank, seed, text_encoder)
    u_sd = get_peft_model_state_dict(unet)
    t_sd = get_peft_model_state_dict(te) if te is not None else {}
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "diffusers":
        StableDiffusionPipeline.save_lora_weights(
            str(path.parent), unet_lora_layers=convert_state_dict_to_diffusers(u_sd),
            text_encoder_lora_layers=convert_state_dict_to_diffusers(t_sd) if t_sd else None,
            weight_name=path.name, safe_serialization=True)
    elif fmt == "peft":
        sd = {f"unet.{k}": v for k, v in u_sd.items()} | {f"text_encoder.{k}": v for k, v in t_sd.items()}
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    elif fmt == "kohya":
        sd = {}
        for prefix, d, extra in (("lora_unet_", u_sd, ""), ("lora_te_", t_sd, "text_model.")):
            for k, v in d.items():
                mod, ab = k.rsplit(".lora_", 1)
                key = prefix + (extra + mod).replace(".", "_")
                sd[key + (".lora_down.weight" if ab.startswith("A") else ".lora_up.weight")] = v.contiguous()
                sd[key + ".alpha"] = torch.tensor(float(alpha if alpha is not None else rank))
        save_file(sd, str(path))
    else:
        raise ValueError(fmt)
    return path, unet, te


@pytest.fixture()
def base():
    from ldm_deploy.models import build_random

    torch.manual_seed(0)
    return build_random("tiny-random")


def _unet_inputs(model, batch: int = 2):
    g = torch.Generator().manual_seed(3)
    return (torch.randn(batch, 4, 8, 8, generator=g), torch.tensor([500.0]),
            torch.randn(batch, 77, model.text_encoder.config.hidden_size, generator=g))


def _unet_out(unet, inputs):
    with torch.no_grad():
        return unet(inputs[0], inputs[1], encoder_hidden_states=inputs[2]).sample


def _te_out(te, ids):
    with torch.no_grad():
        return te(ids).last_hidden_state


IDS = torch.tensor([[0, 320, 2442, 736, 7117, 525, 320, 1746, 5994, 2] + [2] * 67])


# --------------------------------------------------------------------------- arguments


@pytest.mark.parametrize("text, path, scale", [
    ("a.safetensors", "a.safetensors", 1.0),
    ("dir/a.safetensors:0.5", "dir/a.safetensors", 0.5),
    ("a.safetensors:-1", "a.safetensors", -1.0),
    ("a.safetensors:1e-1", "a.safetensors", 0.1),
])
def test_parse_lora_arg(text, path, scale):
    spec = parse_lora_arg(text)
    assert spec.path == Path(path) and spec.scale == pytest.approx(scale)


@pytest.mark.parametrize("text, needle", [
    ("x.safetensors:abc", "scale 'abc' is not a number"),
    ("x.safetensors:nan", "not a number"),
    ("x.safetensors:1e9", "out of range"),
    ("", "needs a path"),
])
def test_parse_lora_arg_refuses(text, needle):
    with pytest.raises(LdmDeployError, match=needle):
        parse_lora_arg(text)


def test_existing_path_with_colon_is_a_path(tmp_path):
    f = tmp_path / "a:b.safetensors"
    f.write_bytes(b"")
    assert parse_lora_arg(str(f)) == LoraSpec(f, 1.0)


# --------------------------------------------------------------------------- fusing is what PEFT/diffusers compute


@pytest.mark.parametrize("fmt", ["diffusers", "peft", "kohya"])
def test_fused_model_equals_unmerged_peft_model(tmp_path, base, fmt):
    """Each format, fused at scale 1, gives the outputs of the PEFT model it was saved from."""
    f, peft_unet, peft_te = make_adapter(tmp_path / f"{fmt}.safetensors", base, fmt=fmt)
    inputs = _unet_inputs(base)
    before_unet, before_te = _unet_out(base.unet, inputs), _te_out(base.text_encoder, IDS)
    entries = fuse_loras(base, [LoraSpec(f, 1.0)], log=lambda s: None)
    want_unet, want_te = _unet_out(peft_unet, inputs), _te_out(peft_te, IDS)
    got_unet, got_te = _unet_out(base.unet, inputs), _te_out(base.text_encoder, IDS)
    assert (want_unet - before_unet).abs().max() > 1e-2  # the adapter does something
    assert (want_te - before_te).abs().max() > 1e-2
    torch.testing.assert_close(got_unet, want_unet, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got_te, want_te, atol=1e-4, rtol=1e-4)
    assert not any("lora" in n for n, _ in base.unet.named_modules())  # plain modules for the export
    assert entries[0]["modules"]["text_encoder"] == 4 * base.text_encoder.config.num_hidden_layers
    assert entries[0]["modules"]["unet"] == sum(1 for n, _ in base.unet.named_modules()
                                                if n.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v")
                                                or n.endswith("to_out.0"))


def test_scales_and_kohya_alpha(tmp_path, base):
    """Two adapters at scales 0.5 and -1 (the second kohya with alpha = rank / 2): the fused
    weights are base + 0.5 * d1 - 0.5 * d2, the deltas of the PEFT modules."""
    f1, u1, t1 = make_adapter(tmp_path / "a.safetensors", base, seed=1)
    f2, u2, t2 = make_adapter(tmp_path / "b.safetensors", base, seed=2, rank=8, fmt="kohya", alpha=4)
    w0 = {n: p.detach().clone() for n, p in list(base.unet.named_parameters()) + list(base.text_encoder.named_parameters())}
    fuse_loras(base, [LoraSpec(f1, 0.5), LoraSpec(f2, -1.0)], log=lambda s: None)

    def delta(peft_module, name):  # B @ A of one module
        mods = dict(peft_module.named_modules())
        return mods[name].lora_B["default"].weight @ mods[name].lora_A["default"].weight

    for comp, p1, p2, name in ((base.unet, u1, u2, "mid_block.attentions.0.transformer_blocks.0.attn2.to_k"),
                               (base.text_encoder, t1, t2, "encoder.layers.1.self_attn.out_proj")):
        got = dict(comp.named_modules())[name].weight
        want = w0[name + ".weight"] + 0.5 * delta(p1, name) - 1.0 * (4 / 8) * delta(p2, name)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_unet_matches_diffusers_load_lora_weights(tmp_path, base):
    """The U-Net fused here equals diffusers' own ``pipe.load_lora_weights`` + ``fuse_lora``
    (U-Net-only adapter: diffusers' text-encoder path needs a newer peft than this transformers)."""
    f, _, _ = make_adapter(tmp_path / "u.safetensors", base, text_encoder=False, seed=5)
    ref = copy.deepcopy(base)
    pipe = ref.diffusers_pipeline()
    pipe.load_lora_weights(str(f.parent), weight_name=f.name, adapter_name="x")
    pipe.set_adapters(["x"], adapter_weights=[0.7])
    pipe.fuse_lora(adapter_names=["x"])
    pipe.unload_lora_weights()
    fuse_loras(base, [LoraSpec(f, 0.7)], log=lambda s: None)
    inputs = _unet_inputs(base)
    torch.testing.assert_close(_unet_out(base.unet, inputs), _unet_out(pipe.unet, inputs), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- adapters that do not fit


def _rewrite(src: Path, dst: Path, fn) -> Path:
    from safetensors.torch import load_file, save_file

    sd = fn(load_file(str(src)))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(dst))
    return dst


def test_adapter_of_another_base_model_is_refused(tmp_path, base):
    from ldm_deploy.models import load_model

    f, _, _ = make_adapter(tmp_path / "tiny.safetensors", load_model("tiny"))  # 48/96/128 channels
    with pytest.raises(LdmDeployError, match=r"have other shapes .*another base model"):
        fuse_loras(base, [LoraSpec(f, 1.0)], log=lambda s: None)


def test_refusal_leaves_the_model_unchanged(tmp_path, base):
    good, _, _ = make_adapter(tmp_path / "good.safetensors", base, seed=1)
    bad = _rewrite(good, tmp_path / "bad.safetensors",
                   lambda sd: {k.replace("mid_block.attentions.0", "mid_block.attentions.5"): v for k, v in sd.items()})
    w0 = {n: p.detach().clone() for n, p in base.unet.named_parameters()}
    with pytest.raises(LdmDeployError, match=r"\d+ of its \d+ adapted modules do not exist"):
        fuse_loras(base, [LoraSpec(good, 1.0), LoraSpec(bad, 1.0)], log=lambda s: None)
    assert all(torch.equal(p, w0[n]) for n, p in base.unet.named_parameters())


def _cli_error(proc) -> str:
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("ldm-export: error:"), proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[-1]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """A good diffusers-format adapter for tiny-random and broken variants of it."""
    from ldm_deploy.models import build_random

    d = tmp_path_factory.mktemp("adapters")
    good, _, _ = make_adapter(d / "good.safetensors", build_random("tiny-random"), seed=1)
    two, _, _ = make_adapter(d / "two" / "pytorch_lora_weights.safetensors", build_random("tiny-random"), seed=2,
                             fmt="kohya", alpha=2)
    no_match = _rewrite(good, d / "nomatch.safetensors",
                        lambda sd: {k.replace("transformer_blocks.0", "transformer_blocks.7").replace(
                            "layers.", "blocks."): v for k, v in sd.items()})
    bad_rank = _rewrite(good, d / "badrank.safetensors",  # up weights of rank 8 against downs of rank 4
                        lambda sd: {k: (torch.cat([v, v], 1) if ".up." in k or "lora_B" in k else v)
                                    for k, v in sd.items()})
    return {"good": good, "two": two.parent, "nomatch": no_match, "badrank": bad_rank}


@pytest.mark.parametrize("case, arg, needle", [
    ("missing", "{d}/absent.safetensors", "does not exist"),
    ("scale", "{good}:abc", "scale 'abc' is not a number"),
    ("nomatch", "{nomatch}", "none of its 88 adapted modules exists"),
    ("badrank", "{badrank}", "have other shapes"),
])
def test_bad_adapter_is_one_line_error_and_nothing_written(tmp_path, adapters, case, arg, needle):
    out = tmp_path / "out"
    arg = arg.format(d=tmp_path, **{k: str(v) for k, v in adapters.items()})
    line = _cli_error(run_cli("ldm-export", "--model", "tiny-random", "--lora", arg, "-o", str(out)))
    assert needle in line, line
    assert not out.exists()
    assert not list(tmp_path.glob(".ldm-tmp-*"))


# --------------------------------------------------------------------------- export parity


def _ort_unet(artifact: Path, inputs):
    import onnxruntime as ort

    s = ort.InferenceSession(str(artifact / "unet" / "model.onnx"), providers=["CPUExecutionProvider"])
    return s.run(None, {"sample": inputs[0].numpy(), "timestep": inputs[1].numpy(),
                        "encoder_hidden_states": inputs[2].numpy()})[0]


def test_export_with_one_and_two_adapters(tmp_path, adapters):
    """Parity with the fused model passes; the graph is the fused model's, not the base's; the
    manifest names each adapter with its sha256 and scale."""
    from ldm_deploy.export.exporter import ExportOptions, export_model
    from ldm_deploy.export.lora import sha256_file
    from ldm_deploy.models import build_random

    comps = ("unet", "text_encoder")
    specs = {"one": (LoraSpec(adapters["good"], 0.8),),
             "two": (LoraSpec(adapters["good"], 0.8), LoraSpec(adapters["two"], -0.5))}
    inputs = _unet_inputs(build_random("tiny-random"))
    base_out = _unet_out(build_random("tiny-random").unet, inputs).numpy()
    for label, loras in specs.items():
        out = tmp_path / label
        m = export_model("tiny-random", out, ExportOptions(loras=loras, components=comps), log=lambda s: None)
        assert {v["status"] for v in m["validation"].values()} == {"passed"}, m["validation"]
        manifest = json.loads((out / "manifest.json").read_text())
        assert [(e["name"], e["scale"], e["sha256"]) for e in manifest["loras"]] == [
            (s.path.name, s.scale, sha256_file(s.path if s.path.is_file() else s.path / "pytorch_lora_weights.safetensors"))
            for s in loras]
        fused = build_random("tiny-random")
        fuse_loras(fused, list(loras), log=lambda s: None)
        got = _ort_unet(out, inputs)
        np.testing.assert_allclose(got, _unet_out(fused.unet, inputs).numpy(), atol=2e-4, rtol=1e-3)
        assert np.abs(got - base_out).max() > 1e-2, "the exported U-Net is the base model's"


def test_quantize_a_lora_artifact(tmp_path, adapters):
    from ldm_deploy.export.exporter import ExportOptions, export_model
    from ldm_deploy.quantize.build import quantize_artifact
    from ldm_deploy.runtime import Pipeline

    art = tmp_path / "lora-fp32"
    export_model("tiny-random", art, ExportOptions(loras=(LoraSpec(adapters["good"], 1.0),),
                                                   components=("text_encoder", "unet", "vae_decoder")),
                 log=lambda s: None)
    q = tmp_path / "lora-int8"
    quantize_artifact(art, q, target="cpu", calib_size=4, calib_steps=4, holdout=2, quality_prompts=1)
    images = Pipeline.load(q)("a small red circle on a blue background, top left", num_inference_steps=3,
                              seed=0, output_type="np").images
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()
    assert json.loads((q / "manifest.json").read_text())["loras"] == json.loads(
        (art / "manifest.json").read_text())["loras"]


@pytest.mark.skipif(not SHIPPED.is_file(), reason="the shipped tiny LoRA is not in this checkout")
def test_export_tiny_with_the_shipped_adapter(tmp_path):
    proc = run_cli("ldm-export", "--model", "tiny", "--lora", f"{SHIPPED}:1.0", "--components",
                   "text_encoder,unet", "-o", str(tmp_path / "noir"))
    assert proc.returncode == 0, proc.stderr
    m = json.loads((tmp_path / "noir" / "manifest.json").read_text())
    assert {v["status"] for v in m["validation"].values()} == {"passed"}
    assert m["loras"][0]["name"] == "tiny-noir.safetensors" and m["loras"][0]["modules"]["text_encoder"] > 0


def test_unet_weights_diffusers_did_not_fuse_are_caught(tmp_path, base, monkeypatch):
    """The fused U-Net is checked against the deltas read from the file: a fuse that silently
    does nothing (as diffusers does with keys it cannot place) is an error, not a base-model export."""
    from diffusers import UNet2DConditionModel

    f, _, _ = make_adapter(tmp_path / "a.safetensors", base, text_encoder=False)
    monkeypatch.setattr(UNet2DConditionModel, "fuse_lora", lambda self, *a, **k: None)
    with pytest.raises(LdmDeployError, match="diffusers did not apply the adapter"):
        fuse_loras(base, [LoraSpec(f, 1.0)], log=lambda s: None)
