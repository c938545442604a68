"""Issue #21: no data loss on a racing output directory, one-line errors from every CLI (exit 1,
no traceback, no output left), bad values refused, no symlinks followed out of an artifact, and
clear ``LdmDeployError`` messages from the Python API.

The CLIs run in-process (their ``main``, as the console scripts call it) so that failures can be
injected (a full disk, a directory appearing mid-run); a traceback there is an uncaught exception
and fails the test. The argv decoding of a non-UTF-8 prompt and the missing-scipy import run in
subprocesses, as a user would see them.
"""

from __future__ import annotations

import errno
import importlib
import json
import os
import shutil
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT

from ldm_deploy import artifact as artifact_mod
from ldm_deploy.artifact import Artifact, ArtifactWriter, rename_noreplace
from ldm_deploy.errors import LdmDeployError, cli_entry

TOOLS = {
    "ldm-export": "ldm_deploy.export.cli",
    "ldm-generate": "ldm_deploy.runtime.cli",
    "ldm-quantize": "ldm_deploy.quantize.cli",
}
FAST_EXPORT = ("--model", "tiny-random", "--components", "vae_decoder", "--no-validate", "-q")
GEN = ("a red circle", "--steps", "2", "-q")
QUANT = ("--calib-size", "2", "--calib-steps", "2", "--holdout", "1", "--quality-prompts", "0", "-q")


def run_tool(capsys, tool: str, *args: str) -> tuple[int, str]:
    """``tool``'s ``main(args)`` in this process: (exit code, stderr)."""
    main = importlib.import_module(TOOLS[tool]).main
    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        main([str(a) for a in args])
    return done.value.code, capsys.readouterr().err


def assert_one_line_error(tool: str, code: int, err: str, *needles: str) -> None:
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith(f"{tool}: error:"), (code, err)
    for n in needles:
        assert n in lines[0], lines[0]


def assert_nothing_left(out: Path) -> None:
    assert not os.path.lexists(out), f"{out} was left behind"
    parent = out.parent if out.parent.is_dir() else None
    if parent is not None:
        left = [p.name for p in parent.iterdir() if p.name.startswith((".ldm-tmp-", ".ldm-old-", f".{out.name}"))]
        assert not left, f"temporary files left: {left}"


@pytest.fixture(params=["renameat2", "mkdir-fallback"])
def rename_impl(request, monkeypatch):
    """Both ways :func:`rename_noreplace` refuses an existing target."""
    if request.param == "renameat2":
        if artifact_mod._renameat2 is None:
            pytest.skip("no renameat2 in this libc")
    else:
        monkeypatch.setattr(artifact_mod, "_renameat2", None)
    return request.param


@pytest.fixture
def art_copy(tiny_random_fp32, tmp_path):
    """A fresh copy of the tiny-random artifact to break."""
    dst = tmp_path / "art"
    shutil.copytree(tiny_random_fp32, dst)
    return dst


def _edit_manifest(art: Path, edit) -> None:  # type: ignore[no-untyped-def]
    m = json.loads((art / "manifest.json").read_text())
    edit(m)
    (art / "manifest.json").write_text(json.dumps(m))


def _read_only(directory: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """``directory`` unwritable: chmod, or (root ignores modes) ``os.access`` says so."""
    if os.geteuid() != 0:
        directory.chmod(0o555)
    else:
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == directory else real(p, mode, **kw))


# --- data loss: the final rename never replaces anything --------------------------------------

@pytest.mark.parametrize("existing", ["empty-dir", "dir-with-data", "file"])
def test_rename_noreplace_refuses_any_existing_target(tmp_path, rename_impl, existing):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "new.txt").write_text("new")
    if existing == "file":
        dst.write_text("user data")
    else:
        dst.mkdir()
        if existing == "dir-with-data":
            (dst / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError):
        rename_noreplace(src, dst)
    assert (src / "new.txt").is_file()
    assert dst.is_file() if existing == "file" else sorted(os.listdir(dst)) == (["keep.txt"] if existing != "empty-dir" else [])
    rename_noreplace(src, tmp_path / "free")
    assert (tmp_path / "free" / "new.txt").read_text() == "new"


@pytest.mark.parametrize("appears", ["empty-dir", "dir-with-data"])
def test_directory_appearing_at_output_mid_export_survives(tmp_path, capsys, monkeypatch, rename_impl, appears):
    import ldm_deploy.export.tokenizer as tok

    out = tmp_path / "out"
    real = tok.write_tokenizer

    def racing_write_tokenizer(src, dst):  # type: ignore[no-untyped-def]
        out.mkdir()  # the user (or another run) creates OUT while the export runs
        if appears == "dir-with-data":
            (out / "keep.txt").write_text("user data")
        real(src, dst)

    monkeypatch.setattr(tok, "write_tokenizer", racing_write_tokenizer)
    code, err = run_tool(capsys, "ldm-export", *FAST_EXPORT, "-o", out)
    assert_one_line_error("ldm-export", code, err, "appeared while this stage ran", "left untouched")
    assert sorted(os.listdir(out)) == (["keep.txt"] if appears == "dir-with-data" else [])
    if appears == "dir-with-data":
        assert (out / "keep.txt").read_text() == "user data"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ldm-")]


def test_two_runs_to_one_output_only_the_first_succeeds(tmp_path, rename_impl):
    out = tmp_path / "out"
    first, second = ArtifactWriter(out), ArtifactWriter(out)  # both started before either finished
    for w, text in ((first, "first"), (second, "second")):
        w.__enter__()
        (w.path / "who.txt").write_text(text)
    first.__exit__(None, None, None)
    with pytest.raises(LdmDeployError, match="appeared while this stage ran"):
        second.__exit__(None, None, None)
    assert (out / "who.txt").read_text() == "first"
    Artifact.open(out).verify()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ldm-")]


def test_overwrite_replaces_the_old_output_and_leaves_nothing_aside(tmp_path, rename_impl):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with ArtifactWriter(out, overwrite=True) as w:
        (w.path / "new.txt").write_text("new")
    assert sorted(os.listdir(out)) == ["manifest.json", "new.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ldm-")]


# --- one line, exit 1, nothing left: ldm-export ------------------------------------------------

@pytest.mark.parametrize("args, needles", [
    (["--opset", "5"], ["opset 5", "14 to 20"]),
    (["--opset", "99"], ["opset 99", "14 to 20"]),
    (["--height", "100000"], ["height 100000", "largest supported image side 4096"]),
    (["--height", "0"], ["height 0"]),
    (["--width", "0"], ["width 0"]),
    (["--min-size", "512", "--max-size", "128"], ["min-size 512 is larger than max-size 128"]),
    (["--max-batch", "0"], ["max-batch 0"]),
], ids=["opset5", "opset99", "height100000", "height0", "width0", "min>max", "max-batch0"])
def test_export_bad_options_fail_before_loading(tmp_path, capsys, monkeypatch, args, needles):
    import ldm_deploy.models as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    out = tmp_path / "out"
    code, err = run_tool(capsys, "ldm-export", *FAST_EXPORT, *args, "-o", out)
    assert_one_line_error("ldm-export", code, err, *needles)
    assert_nothing_left(out)


def test_export_output_under_a_regular_file(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code, err = run_tool(capsys, "ldm-export", *FAST_EXPORT, "-o", tmp_path / "file" / "out")
    assert_one_line_error("ldm-export", code, err, "is not a directory")
    assert (tmp_path / "file").read_text() == "x"


def test_export_read_only_output(tmp_path, capsys, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    _read_only(ro, monkeypatch)
    code, err = run_tool(capsys, "ldm-export", *FAST_EXPORT, "-o", ro / "out")
    assert_one_line_error("ldm-export", code, err, "not writable")
    ro.chmod(0o755)
    assert os.listdir(ro) == []


def test_export_disk_full_leaves_nothing(tmp_path, capsys, monkeypatch):
    def full(path, data):  # type: ignore[no-untyped-def]
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(artifact_mod, "write_json", full)  # the manifest, the last write
    out = tmp_path / "out"
    code, err = run_tool(capsys, "ldm-export", *FAST_EXPORT, "-o", out)
    assert_one_line_error("ldm-export", code, err, os.strerror(errno.ENOSPC))
    assert_nothing_left(out)


def test_export_pickle_text_encoder_weights(tmp_path, capsys, tiny_random_torch):
    import torch

    pipe = tmp_path / "pipe"
    tiny_random_torch.save_pretrained(pipe)
    te = pipe / "text_encoder"
    state = dict(tiny_random_torch.text_encoder.state_dict(), extra=Fraction(1, 3))  # not a tensor
    for f in te.glob("*.safetensors"):
        f.unlink()
    torch.save(state, te / "pytorch_model.bin")
    out = tmp_path / "out"
    code, err = run_tool(capsys, "ldm-export", "--model", pipe, "-q", "-o", out)
    assert_one_line_error("ldm-export", code, err, "text_encoder/", "pickle", "safetensors")
    assert_nothing_left(out)


# --- one line, exit 1, nothing left: ldm-generate ----------------------------------------------

@pytest.mark.parametrize("args, needles", [
    (["--seed", "-1"], ["seed", "non-negative"]),
    (["--steps", "10000"], ["num_inference_steps", "[1, 1000]", "10000"]),
    (["--height", "0"], ["height 0"]),
    (["--height", "100000"], ["height 100000"]),
    (["--eta", "2"], ["eta must be in [0, 1]"]),
    (["--eta", "nan"], ["eta must be in [0, 1]"]),
    (["--threads", "-1"], ["threads", "-1"]),
    (["--num-images", "0"], ["num_images_per_prompt"]),
], ids=["seed-1", "steps10000", "height0", "height100000", "eta2", "eta-nan", "threads-1", "num-images0"])
def test_generate_bad_values(tiny_random_fp32, tmp_path, capsys, args, needles):
    out = tmp_path / "out.png"
    code, err = run_tool(capsys, "ldm-generate", tiny_random_fp32, *GEN, *args, "-o", out)
    assert_one_line_error("ldm-generate", code, err, *needles)
    assert_nothing_left(out)


def test_generate_nan_init_image(tiny_random_fp32, tmp_path, capsys):
    nan = tmp_path / "nan.tiff"
    Image.fromarray(np.full((64, 64), np.nan, np.float32), mode="F").save(nan)
    out = tmp_path / "out.png"
    code, err = run_tool(capsys, "ldm-generate", tiny_random_fp32, *GEN, "--image", nan, "-o", out)
    assert_one_line_error("ldm-generate", code, err, "NaN")
    assert_nothing_left(out)


def test_generate_output_under_a_regular_file_fails_before_generating(tiny_random_fp32, tmp_path, capsys,
                                                                    monkeypatch):
    import ldm_deploy.runtime.pipeline as pipeline

    monkeypatch.setattr(pipeline.Pipeline, "load", lambda *a, **k: pytest.fail("generated before checking -o"))
    (tmp_path / "file").write_text("x")
    code, err = run_tool(capsys, "ldm-generate", tiny_random_fp32, *GEN, "-o", tmp_path / "file" / "out.png")
    assert_one_line_error("ldm-generate", code, err, "is not a directory")


def test_generate_read_only_output(tiny_random_fp32, tmp_path, capsys, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    _read_only(ro, monkeypatch)
    code, err = run_tool(capsys, "ldm-generate", tiny_random_fp32, *GEN, "-o", ro / "out.png")
    assert_one_line_error("ldm-generate", code, err, "not writable")
    ro.chmod(0o755)
    assert os.listdir(ro) == []


def test_generate_disk_full_leaves_no_image(tiny_random_fp32, tmp_path, capsys, monkeypatch):
    def full(self, fp, *a, **k):  # type: ignore[no-untyped-def]
        Path(fp).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(fp))

    monkeypatch.setattr(Image.Image, "save", full)
    out = tmp_path / "out.png"
    code, err = run_tool(capsys, "ldm-generate", tiny_random_fp32, *GEN, "--num-images", "2", "-o", out)
    assert_one_line_error("ldm-generate", code, err, os.strerror(errno.ENOSPC))
    assert os.listdir(tmp_path) == []


def test_generate_non_utf8_prompt_from_argv(tiny_random_fp32, tmp_path):
    out = tmp_path / "out.png"
    proc = subprocess.run(
        [sys.executable, "-m", "ldm_deploy.runtime.cli", str(tiny_random_fp32), b"caf\xe9 \xff", "--steps", "2",
         "-q", "-o", str(out)],
        capture_output=True, cwd=ROOT, timeout=120, env={**os.environ, "PYTHONIOENCODING": "utf-8"},
    )
    err = proc.stderr.decode("utf-8", "replace")
    assert_one_line_error("ldm-generate", proc.returncode, err, "not valid UTF-8")
    assert_nothing_left(out)


# --- malformed and escaping artifacts ---------------------------------------------------------

@pytest.mark.parametrize("key", ["model_dims", "shape_ranges", "components", "unet", "unet-spec", "files"])
def test_manifest_missing_keys(art_copy, tmp_path, capsys, key):
    def edit(m):  # type: ignore[no-untyped-def]
        if key == "unet":
            del m["components"]["unet"]
        elif key == "unet-spec":
            del m["components"]["unet"]["spec"]["inputs"]
        else:
            del m[key]

    _edit_manifest(art_copy, edit)
    out = tmp_path / "out.png"
    code, err = run_tool(capsys, "ldm-generate", art_copy, *GEN, "-o", out)
    needle = {"unet": "no component 'unet'", "unet-spec": "spec of component 'unet'",
              "files": "list of files and their hashes"}.get(key, f"lacks {key}")
    assert_one_line_error("ldm-generate", code, err, needle)
    assert_nothing_left(out)


def test_manifest_not_an_object(art_copy, tmp_path, capsys):
    (art_copy / "manifest.json").write_text("[1, 2]")
    code, err = run_tool(capsys, "ldm-generate", art_copy, *GEN, "-o", tmp_path / "out.png")
    assert_one_line_error("ldm-generate", code, err, "not an ldm-deploy manifest")


def test_quantize_manifest_missing_keys(art_copy, tmp_path, capsys):
    _edit_manifest(art_copy, lambda m: m["components"]["unet"].pop("file"))
    out = tmp_path / "q"
    code, err = run_tool(capsys, "ldm-quantize", art_copy, "-o", out, *QUANT)
    assert_one_line_error("ldm-quantize", code, err, "component 'unet' is missing or malformed")
    assert_nothing_left(out)


@pytest.mark.parametrize("verify", [True, False], ids=["verify", "no-verify"])
@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json"])
def test_tokenizer_file_that_is_not_json(art_copy, tmp_path, capsys, verify, name):
    (art_copy / "tokenizer" / name).write_text("not json {")
    out = tmp_path / "out.png"
    code, err = run_tool(capsys, "ldm-generate", art_copy, *GEN, "-o", out, *([] if verify else ["--no-verify"]))
    assert_one_line_error("ldm-generate", code, err, "does not match the hash" if verify else name)
    assert_nothing_left(out)


@pytest.mark.parametrize("verify", [True, False], ids=["verify", "no-verify"])
@pytest.mark.parametrize("rel", ["unet/model.onnx", "tokenizer/tokenizer.json", "tokenizer"])
def test_symlinks_out_of_the_artifact_are_refused(art_copy, tmp_path, capsys, verify, rel):
    outside = tmp_path / "outside" / Path(rel).name
    outside.parent.mkdir()
    shutil.move(art_copy / rel, outside)  # same bytes, so the manifest hashes still match
    (art_copy / rel).symlink_to(outside, target_is_directory=outside.is_dir())
    out = tmp_path / "out.png"
    code, err = run_tool(capsys, "ldm-generate", art_copy, *GEN, "-o", out, *([] if verify else ["--no-verify"]))
    assert_one_line_error("ldm-generate", code, err, "leads outside the artifact", "refusing to follow")
    assert_nothing_left(out)


def test_quantize_refuses_a_symlinked_model(art_copy, tmp_path, capsys):
    outside = tmp_path / "outside.onnx"
    shutil.move(art_copy / "unet" / "model.onnx", outside)
    (art_copy / "unet" / "model.onnx").symlink_to(outside)
    out = tmp_path / "q"
    code, err = run_tool(capsys, "ldm-quantize", art_copy, "-o", out, *QUANT)
    assert_one_line_error("ldm-quantize", code, err, "leads outside the artifact")
    assert_nothing_left(out)


def test_links_inside_the_artifact_are_fine(art_copy):
    (art_copy / "unet" / "alias.onnx").symlink_to("model.onnx")
    assert Artifact.open(art_copy).file("unet/alias.onnx") == art_copy / "unet" / "alias.onnx"
    with pytest.raises(LdmDeployError, match="leads outside"):
        Artifact.open(art_copy).file("../art/../outside")


# --- ldm-quantize: bad values, scipy ----------------------------------------------------------

@pytest.mark.parametrize("args, needles", [
    (["--method", "percentile", "--percentile", "150"], ["percentile 150", "(0, 100]"]),
    (["--threads", "-1"], ["threads", "-1"]),
], ids=["percentile150", "threads-1"])
def test_quantize_bad_values(tiny_random_fp32, tmp_path, capsys, args, needles):
    out = tmp_path / "q"
    code, err = run_tool(capsys, "ldm-quantize", tiny_random_fp32, "-o", out, *QUANT, *args)
    assert_one_line_error("ldm-quantize", code, err, *needles)
    assert_nothing_left(out)


def test_quantize_output_under_a_regular_file(tiny_random_fp32, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code, err = run_tool(capsys, "ldm-quantize", tiny_random_fp32, "-o", tmp_path / "file" / "q", *QUANT)
    assert_one_line_error("ldm-quantize", code, err, "is not a directory")


_NO_SCIPY = """
import sys
class NoScipy:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] == 'scipy':
            raise ModuleNotFoundError("No module named 'scipy'", name='scipy')
sys.meta_path.insert(0, NoScipy())
from ldm_deploy.quantize.cli import main
main(sys.argv[1:])
"""


def test_quantize_runs_without_scipy(tiny_random_fp32, tmp_path):
    """scipy is not a dependency of ldm-quantize: it runs (end to end) where scipy is missing."""
    out = tmp_path / "q"
    proc = subprocess.run([sys.executable, "-c", _NO_SCIPY, str(tiny_random_fp32), "-o", str(out), *QUANT],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (out / "manifest.json").is_file()


def test_scipy_is_a_dependency_of_what_imports_it():
    """ldm_deploy.quality.metrics imports scipy; ldm-bench (its only CLI user) installs it."""
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    importers = {p.relative_to(ROOT).as_posix() for p in (ROOT / "ldm_deploy").rglob("*.py")
                 if "import scipy" in p.read_text() or "from scipy" in p.read_text()}
    assert importers == {"ldm_deploy/quality/metrics.py"}
    assert any(r.startswith("scipy") for r in extras["bench"])


def test_missing_optional_dependency_is_one_line(capsys):
    @cli_entry("ldm-bench")
    def main() -> int:
        raise ModuleNotFoundError("No module named 'scipy'", name="scipy")

    with pytest.raises(SystemExit) as done:
        main()
    assert_one_line_error("ldm-bench", done.value.code, capsys.readouterr().err, "scipy", "ldm-deploy[bench]")

    @cli_entry("ldm-bench")
    def buggy() -> int:
        raise ModuleNotFoundError("No module named 'ldm_deploy.nope'", name="ldm_deploy.nope")

    with pytest.raises(ModuleNotFoundError):  # a bug keeps its traceback
        buggy()


# --- the Python API: LdmDeployError, not TypeError / IndexError / AttributeError ---------------

@pytest.fixture(scope="module")
def pipe(tiny_random_fp32):
    from ldm_deploy.runtime import Pipeline

    return Pipeline.load(tiny_random_fp32)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(prompt=None), "prompt must be a string or a list of strings, got NoneType"),
    (dict(prompt=123), "got int"),
    (dict(prompt=["a", 7]), "non-strings"),
    (dict(prompt="caf\udce9"), "not valid UTF-8"),
    (dict(prompt="a", negative_prompt="\ud800"), "negative_prompt is not valid UTF-8"),
    (dict(prompt="a", negative_prompt=5), "negative_prompt must be a string"),
    (dict(prompt="a", image=np.zeros((64, 64), np.uint8)), r"HxWx3 array, got ndarray of shape \(64, 64\)"),
    (dict(prompt="a", image="init.png"), "not the path 'init.png'"),
    (dict(prompt="a", image=Path("init.png")), "not the path"),
    (dict(prompt="a", image=np.full((64, 64, 3), np.nan, np.float32)), "NaN"),
    (dict(prompt="a", seed=-1), "seed must be a non-negative integer"),
    (dict(prompt="a", seed=1.5), "seed must be a non-negative integer"),
    (dict(prompt="a", eta=1.5), r"eta must be in \[0, 1\]"),
    (dict(prompt="a", height=0), "height 0"),
    (dict(prompt="a", num_inference_steps=10_000), "num_inference_steps"),
])
def test_python_api_errors(pipe, kwargs, needle):
    with pytest.raises(LdmDeployError, match=needle):
        pipe(**{"num_inference_steps": 2, **kwargs})
