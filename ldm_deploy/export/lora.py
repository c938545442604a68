"""LoRA adapters fused into a pipeline's U-Net and text encoder before export (``ldm-export --lora``).

An adapter is a safetensors file (or a directory holding one) in any format diffusers reads:
kohya (``lora_unet_*`` / ``lora_te_*`` with ``.alpha``), diffusers (``unet.*.lora.down.weight``,
``text_encoder.*.lora_linear_layer.*``) or PEFT (``*.lora_A.weight`` / ``*.lora_B.weight``).
``StableDiffusionPipeline.lora_state_dict`` parses and converts it; every LoRA pair is then matched
against the model *before* anything is changed: a pair that names no module, or whose shapes do
not fit that module (an adapter of another base model, or a corrupt one), refuses the adapter
(diffusers itself only warns about keys it could not place).

Fusing (``W <- W + scale * alpha / rank * up @ down`` for every adapter):

* U-Net: diffusers' PEFT backend, ``load_lora_into_unet`` per adapter, ``set_adapters`` with the
  scales, ``fuse_lora`` and ``unload_lora`` (plain modules again, no LoRA branches in the graph);
  each fused weight is then checked against the delta computed here, so an adapter that diffusers
  silently failed to place is caught.
* text encoder: the same formula applied here to the converted pairs. diffusers loads text-encoder
  LoRAs through transformers' PEFT integration, which in transformers 5 wants a newer ``peft``
  than is released; transformers 5 also dropped the ``text_model.`` level from ``CLIPTextModel``
  module names that existing adapters use, which is mapped here.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ..errors import LdmDeployError, first_line

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..models import LoadedModel

#: File a diffusers ``save_lora_weights`` directory holds.
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
COMPONENT_PREFIXES = {"unet": "unet", "text_encoder": "text_encoder"}
MAX_SCALE = 100.0
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")


@dataclass(frozen=True)
class LoraSpec:
    """One ``--lora PATH[:SCALE]`` argument."""

    path: Path
    scale: float = 1.0

    @property
    def label(self) -> str:
        return f"{self.path}:{self.scale:g}"


@dataclass
class LoraPair:
    """One adapted module: ``delta = scale * alpha / rank * up @ down``."""

    module: str  # name in the component as written in the adapter (converted to diffusers/PEFT naming)
    down: "torch.Tensor"  # [rank, in] or [rank, in, kh, kw]
    up: "torch.Tensor"  # [out, rank] or [out, rank, 1, 1]
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta(self, scale: float) -> "torch.Tensor":
        factor = scale * ((self.alpha / self.rank) if self.alpha is not None else 1.0)
        d = self.up.float().flatten(1) @ self.down.float().flatten(1)
        return factor * d


@dataclass
class LoraFile:
    """A parsed adapter: its pairs per component plus what the manifest records."""

    spec: LoraSpec
    file: Path
    sha256: str
    pairs: dict[str, dict[str, LoraPair]] = field(default_factory=dict)  # component -> module -> pair
    raw: tuple[dict[str, Any], dict[str, float] | None] | None = None  # diffusers' (state_dict, alphas)

    def manifest_entry(self) -> dict[str, Any]:
        ranks = sorted({p.rank for comp in self.pairs.values() for p in comp.values()})
        return {
            "name": self.spec.path.name,
            "path": str(self.spec.path),
            "file": self.file.name,
            "sha256": self.sha256,
            "scale": self.spec.scale,
            "rank": ranks[0] if len(ranks) == 1 else ranks,
            "modules": {c: len(p) for c, p in self.pairs.items()},
        }


# --------------------------------------------------------------------------- arguments


def parse_lora_arg(text: str) -> LoraSpec:
    """``PATH`` or ``PATH:SCALE`` (a path that itself exists wins over a trailing ``:...``)."""
    text = str(text).strip()
    if not text:
        raise LdmDeployError("--lora needs a path (PATH or PATH:SCALE)")
    path, scale = text, 1.0
    if ":" in text and not Path(text).exists():
        head, tail = text.rsplit(":", 1)
        if head and not re.match(r"^[A-Za-z]$", head):  # not a Windows drive letter
            if not _NUMBER.match(tail.strip()):
                raise LdmDeployError(f"--lora {text}: scale {tail!r} is not a number (use PATH:SCALE, e.g. "
                                     f"{head}:0.8)")
            path, scale = head, float(tail)
    if not math.isfinite(scale) or abs(scale) > MAX_SCALE:
        raise LdmDeployError(f"--lora {text}: scale {scale:g} is out of range (|scale| <= {MAX_SCALE:g})")
    return LoraSpec(Path(path).expanduser(), scale)


def weights_file(spec: LoraSpec) -> Path:
    """The safetensors file of an adapter given as a file or a directory."""
    p = spec.path
    if p.is_dir():
        if (p / DIFFUSERS_WEIGHT_NAME).is_file():
            return p / DIFFUSERS_WEIGHT_NAME
        found = sorted(f for f in p.glob("*.safetensors") if f.is_file())
        if len(found) == 1:
            return found[0]
        if not found:
            raise LdmDeployError(f"LoRA directory {p} holds no .safetensors file")
        raise LdmDeployError(f"LoRA directory {p} holds {len(found)} .safetensors files "
                             f"({', '.join(f.name for f in found[:4])}); pass the file itself")
    if not p.exists():
        raise LdmDeployError(f"LoRA file {p} does not exist")
    if not p.is_file():
        raise LdmDeployError(f"LoRA path {p} is not a file or directory")
    if p.suffix.lower() != ".safetensors":
        raise LdmDeployError(f"LoRA file {p} is not a .safetensors file (pickled weights are not loaded)")
    return p


def check_lora_specs(specs: list[LoraSpec]) -> list[Path]:
    """Before the model loads: every adapter exists and is a safetensors file, none given twice."""
    files = [weights_file(s) for s in specs]
    seen: dict[Path, LoraSpec] = {}
    for s, f in zip(specs, files):
        key = f.resolve()
        if key in seen:
            raise LdmDeployError(f"LoRA {f} is given twice ({seen[key].label} and {s.label}); give it once "
                                 "with the summed scale")
        seen[key] = s
    return files


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- reading


def read_lora(spec: LoraSpec, file: Path | None = None) -> LoraFile:
    """Parse an adapter with diffusers' reader (kohya, diffusers and PEFT formats) into pairs."""
    import torch
    from diffusers import StableDiffusionPipeline

    file = file or weights_file(spec)
    try:
        out = StableDiffusionPipeline.lora_state_dict(str(file.parent), weight_name=file.name)
    except Exception as e:  # not safetensors, not a LoRA, a format diffusers does not know
        raise LdmDeployError(f"could not read LoRA {file}: {first_line(e)}") from None
    state_dict, alphas = out[0], out[1]
    lf = LoraFile(spec, file, sha256_file(file), raw=(state_dict, alphas))
    by_comp: dict[str, dict[str, Any]] = {}
    foreign: set[str] = set()
    for k, v in state_dict.items():
        comp, _, rest = k.partition(".")
        if comp in COMPONENT_PREFIXES and rest:
            by_comp.setdefault(comp, {})[rest] = v
        else:
            foreign.add(comp)
    if foreign:
        raise LdmDeployError(f"LoRA {file.name} adapts parts an SD1.x pipeline does not have "
                             f"({', '.join(sorted(foreign)[:4])}): an adapter for another base model")
    if not by_comp:
        raise LdmDeployError(f"LoRA {file.name} holds no LoRA weights")
    alphas = alphas or {}
    for comp, sd in by_comp.items():
        renamed = _convert_names(comp, list(sd))
        comp_alphas = {}
        for ak, av in alphas.items():
            c, _, rest = ak.partition(".")
            if c == comp and rest.endswith(".alpha") and rest[:-6] in renamed:
                comp_alphas[_module_of(renamed[rest[:-6]])] = float(av)
        pairs: dict[str, dict[str, Any]] = {}
        for old, new in renamed.items():
            t = sd[old]
            if not isinstance(t, torch.Tensor):
                continue
            if new.endswith(".alpha"):
                comp_alphas[new[:-6]] = float(t)
                continue
            m = re.match(r"^(.*)\.lora_([AB])(\.[^.]+)?\.weight$", new)
            if m is None:
                raise LdmDeployError(f"LoRA {file.name}: cannot read key {comp}.{old}")
            pairs.setdefault(m[1], {})[m[2]] = t
        lf.pairs[comp] = {}
        for mod, ab in pairs.items():
            if set(ab) != {"A", "B"}:
                raise LdmDeployError(f"LoRA {file.name}: {comp}.{mod} has only its lora_{''.join(ab)} weight")
            lf.pairs[comp][mod] = LoraPair(mod, ab["A"], ab["B"], comp_alphas.get(mod))
    return lf


def _module_of(peft_key: str) -> str:
    return re.sub(r"\.lora_[AB](\.[^.]+)?\.weight$", "", peft_key)


def _convert_names(component: str, keys: list[str]) -> dict[str, str]:
    """Old key -> PEFT key (``<module>.lora_A.weight``) with diffusers' converters, mapped through
    values that carry each key's index (the converters only rename)."""
    import torch
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft, convert_unet_state_dict_to_peft

    if all(re.search(r"\.lora_[AB](\.[^.]+)?\.weight$|\.alpha$", k) for k in keys):
        return {k: k for k in keys}
    tagged = {k: torch.tensor([i]) for i, k in enumerate(keys)}
    try:
        if component == "unet":
            conv = convert_unet_state_dict_to_peft(tagged)
        else:
            conv = convert_state_dict_to_peft(convert_state_dict_to_diffusers(tagged))
    except Exception as e:
        raise LdmDeployError(f"cannot read the {component} keys of the LoRA ({first_line(e)})") from None
    return {keys[int(v[0])]: k for k, v in conv.items()}


# --------------------------------------------------------------------------- matching


def _resolve(modules: dict[str, Any], name: str) -> str | None:
    """The model's module name for an adapter's module name (``text_model.`` level or not)."""
    if name in modules:
        return name
    if name.startswith("text_model.") and name[len("text_model."):] in modules:
        return name[len("text_model."):]
    if "text_model." + name in modules:
        return "text_model." + name
    return None


def match(lf: LoraFile, model: "LoadedModel") -> dict[str, dict[str, str]]:
    """Adapter module -> model module, per component; refuses an adapter that does not fit."""
    import torch

    out: dict[str, dict[str, str]] = {}
    total = sum(len(p) for p in lf.pairs.values())
    unmatched: list[str] = []
    bad_shape: list[str] = []
    for comp, pairs in lf.pairs.items():
        modules = dict(getattr(model, comp).named_modules())
        out[comp] = {}
        for name, pair in pairs.items():
            target = _resolve(modules, name)
            if target is None:
                unmatched.append(f"{comp}.{name}")
                continue
            mod = modules[target]
            w = getattr(mod, "weight", None)
            if not isinstance(w, torch.Tensor) or not isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
                unmatched.append(f"{comp}.{name} ({type(mod).__name__})")
                continue
            down, up = pair.down, pair.up
            fits = (down.shape[0] == up.shape[1] and up.shape[0] == w.shape[0] and down.shape[1] == w.shape[1]
                    and (isinstance(mod, torch.nn.Linear) and down.dim() == 2 and up.dim() == 2
                         or isinstance(mod, torch.nn.Conv2d) and down.dim() == 4 and tuple(down.shape[2:]) ==
                         tuple(w.shape[2:]) and tuple(up.shape[2:]) == (1, 1)))
            if not fits:
                bad_shape.append(f"{comp}.{target}: down {list(down.shape)} / up {list(up.shape)} vs weight "
                                 f"{list(w.shape)}")
                continue
            out[comp][name] = target
    name = lf.file.name
    if len(unmatched) == total:
        raise LdmDeployError(f"LoRA {name} does not fit this model: none of its {total} adapted modules exists in it "
                             f"(e.g. {unmatched[0]}); an adapter for another base model?")
    problems = []
    if unmatched:
        problems.append(f"{len(unmatched)} of its {total} adapted modules do not exist in it (e.g. {unmatched[0]})")
    if bad_shape:
        problems.append(f"{len(bad_shape)} of its {total} adapted modules have other shapes (e.g. {bad_shape[0]})")
    if problems:
        raise LdmDeployError(f"LoRA {name} does not fit this model: {'; '.join(problems)}; an adapter for another "
                             "base model, or a damaged one?")
    return out


# --------------------------------------------------------------------------- fusing


def fuse_loras(model: "LoadedModel", specs: list[LoraSpec], log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Check every adapter against ``model``, then fuse them all at their scales; returns the
    manifest entries. Nothing in ``model`` changes unless every adapter fits."""
    import torch

    files = check_lora_specs(specs)
    parsed = [read_lora(s, f) for s, f in zip(specs, files)]
    matches = [match(lf, model) for lf in parsed]
    # What each module gets: (pair, scale) per adapter, summed into deltas when they are needed (the
    # U-Net's one module at a time, to check what diffusers fused).
    terms: dict[str, dict[str, list[tuple[LoraPair, float]]]] = {}
    for lf, mt in zip(parsed, matches):
        for comp, names in mt.items():
            for name, target in names.items():
                terms.setdefault(comp, {}).setdefault(target, []).append((lf.pairs[comp][name], lf.spec.scale))
    with torch.no_grad():
        if "unet" in terms:
            _fuse_unet(model, parsed, terms["unet"])
        if "text_encoder" in terms:
            modules = dict(model.text_encoder.named_modules())
            for target, ts in terms["text_encoder"].items():
                w = modules[target].weight
                w.add_(_delta(ts).reshape(w.shape).to(w.dtype))
    entries = [lf.manifest_entry() for lf in parsed]
    for e in entries:
        log(f"fused LoRA {e['name']} at scale {e['scale']:g} (rank {e['rank']}; "
            + ", ".join(f"{n} {c} modules" for c, n in ((c, n) for c, n in e["modules"].items())) + ")")
    return entries


def _delta(terms: list[tuple[LoraPair, float]]) -> "torch.Tensor":
    out = terms[0][0].delta(terms[0][1])
    for pair, scale in terms[1:]:
        out = out + pair.delta(scale)
    return out


def _fuse_unet(model: "LoadedModel", parsed: list[LoraFile], terms: dict[str, list[tuple[LoraPair, float]]]) -> None:
    import torch
    from diffusers import StableDiffusionPipeline

    unet = model.unet
    modules = dict(unet.named_modules())
    before = {t: modules[t].weight.detach().clone() for t in terms}
    names = []
    for i, lf in enumerate(parsed):
        if "unet" not in lf.pairs:
            continue
        state_dict, alphas = lf.raw  # type: ignore[misc]
        sd = {k: v for k, v in state_dict.items() if k.startswith("unet.")}
        al = {k: v for k, v in (alphas or {}).items() if k.startswith("unet.")} or None
        name = f"lora_{i}"
        try:
            StableDiffusionPipeline.load_lora_into_unet(sd, al, unet=unet, adapter_name=name)
        except (ValueError, RuntimeError, KeyError) as e:
            _unload(unet)
            raise LdmDeployError(f"diffusers could not load LoRA {lf.file.name} into the U-Net: {first_line(e)}") from None
        names.append((name, lf.spec.scale))
    unet.set_adapters([n for n, _ in names], weights=[s for _, s in names])
    unet.fuse_lora(lora_scale=1.0, adapter_names=[n for n, _ in names])
    _unload(unet)
    modules = dict(unet.named_modules())
    for target, ts in terms.items():
        d = _delta(ts)
        w0 = before.pop(target)
        got = (modules[target].weight.detach().float() - w0.float()).flatten(1)
        # rounding of W + delta in the weights' dtype, plus float noise in the delta itself
        eps = torch.finfo(w0.dtype).eps
        tol = 4 * eps * (float(w0.abs().max()) + float(d.abs().max())) + 1e-5 * max(1.0, float(d.abs().max()))
        err = float((got - d).abs().max())
        if err > tol:
            raise LdmDeployError(f"the fused U-Net weight {target} differs from base + LoRA delta by {err:.3g} "
                                 "(diffusers did not apply the adapter as read)")


def _unload(unet) -> None:  # type: ignore[no-untyped-def]
    if any("lora" in n for n, _ in unet.named_modules()):
        unet.unload_lora()
