"""A small CNN judge that reads the attributes of a shapes image.

The classifier predicts, from a 64x64 RGB image, the five attributes of
:class:`ldm_deploy.data.shapes.Attributes` (shape, colour, background, size,
position), one softmax head each. It is trained on procedurally rendered images
(train *and* held-out combinations: it is a judge, not the model under test) with
light corruptions (noise, blur, colour offsets) so that it stays reliable on the
slightly imperfect images a diffusion model produces. Its penultimate layer is
used as the feature space for the domain FID of :mod:`ldm_deploy.quality.harness`.

Seeds: the classifier draws its training data from seeds
``TRAIN_SEED_BASE + k`` (100000+) and validates on ``VAL_SEED_BASE + k``
(200000+), far away from the evaluation prompts (seed 1234) and the harness'
reference renders.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm_deploy.data.shapes import COLORS, POSITIONS, SHAPES, SIZES, Attributes, make_dataset

__all__ = [
    "ATTRIBUTE_NAMES",
    "ATTRIBUTE_VALUES",
    "attribute_labels",
    "IMAGE_SIZE",
    "DEFAULT_WEIGHTS",
    "AttributeClassifier",
    "to_uint8_batch",
    "train_classifier",
    "measure_accuracy",
    "load_default_classifier",
]

IMAGE_SIZE = 64
ATTRIBUTE_NAMES: tuple[str, ...] = ("shape", "color", "background", "size", "position")
ATTRIBUTE_VALUES: dict[str, tuple[str, ...]] = {
    "shape": tuple(SHAPES),
    "color": tuple(COLORS),
    "background": tuple(COLORS),
    "size": tuple(SIZES),
    "position": tuple(POSITIONS),
}
TRAIN_SEED_BASE = 100_000
VAL_SEED_BASE = 200_000
DEFAULT_WEIGHTS = Path(__file__).resolve().parents[1] / "assets" / "quality" / "attribute_classifier.pt"


# --------------------------------------------------------------------------- input handling


def to_uint8_batch(images: Any, size: int = IMAGE_SIZE) -> np.ndarray:
    """Normalise ``images`` to a uint8 ``[N, size, size, 3]`` array.

    Accepts a uint8 ``HxWx3`` array, a ``[N, H, W, 3]`` array, a PIL image, or a
    list/tuple of arrays and PIL images. Float arrays are taken to be in ``[0, 1]``
    when their maximum is <= 1, else in ``[0, 255]``. Grayscale / RGBA inputs are
    converted to RGB, other sizes are resized (bilinear) to ``size``.
    """
    from PIL import Image

    def one(img: Any) -> np.ndarray:
        if isinstance(img, Image.Image):
            img = img.convert("RGB")
            if img.size != (size, size):
                img = img.resize((size, size), Image.BILINEAR)
            return np.asarray(img, dtype=np.uint8)
        arr = np.asarray(img)
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=-1)
        if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
            raise ValueError(f"expected an HxWx3 image, got shape {arr.shape}")
        if arr.shape[-1] == 1:
            arr = np.repeat(arr, 3, axis=-1)
        arr = arr[..., :3]
        if arr.dtype != np.uint8:
            arr = arr.astype(np.float64)
            if arr.size and np.nanmax(arr) <= 1.0:
                arr = arr * 255.0
            arr = np.clip(np.nan_to_num(np.rint(arr)), 0, 255).astype(np.uint8)
        if arr.shape[:2] != (size, size):
            arr = np.asarray(Image.fromarray(arr).resize((size, size), Image.BILINEAR), dtype=np.uint8)
        return arr

    if isinstance(images, np.ndarray) and images.ndim == 4:
        if images.dtype == np.uint8 and images.shape[1:] == (size, size, 3):
            return images
        return np.stack([one(im) for im in images]) if len(images) else np.empty((0, size, size, 3), np.uint8)
    if isinstance(images, (np.ndarray, Image.Image)):
        return one(images)[None]
    images = list(images)
    if not images:
        return np.empty((0, size, size, 3), dtype=np.uint8)
    return np.stack([one(im) for im in images])


def _to_tensor(batch_uint8: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.array(batch_uint8, dtype=np.uint8, copy=True)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def attribute_labels(attrs: Sequence[Attributes]) -> dict[str, torch.Tensor]:
    """Class indices into :data:`ATTRIBUTE_VALUES`, one ``[N]`` tensor per attribute name."""
    out = {}
    for name in ATTRIBUTE_NAMES:
        idx = {v: i for i, v in enumerate(ATTRIBUTE_VALUES[name])}
        out[name] = torch.tensor([idx[getattr(a, name)] for a in attrs], dtype=torch.long)
    return out


# --------------------------------------------------------------------------- network


class _Net(nn.Module):
    def __init__(self, width: int = 32, feature_dim: int = 64) -> None:
        super().__init__()
        w = width

        def block(cin: int, cout: int, stride: int = 1, k: int = 3) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.body = nn.Sequential(
            *block(3, w // 2, stride=2, k=5),  # 32x32
            *block(w // 2, w),
            nn.MaxPool2d(2),  # 16x16
            *block(w, 2 * w),
            nn.MaxPool2d(2),  # 8x8
            *block(2 * w, 2 * w),
            nn.MaxPool2d(2),  # 4x4
        )
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(2 * w * 16, feature_dim), nn.ReLU(inplace=True))
        self.heads = nn.ModuleDict({n: nn.Linear(feature_dim, len(ATTRIBUTE_VALUES[n])) for n in ATTRIBUTE_NAMES})

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(x)
        return {n: h(f) for n, h in self.heads.items()}


# --------------------------------------------------------------------------- public class


class AttributeClassifier:
    """Predicts shape / colour / background / size / position of 64x64 shapes images.

    ``predict(images)`` returns one ``dict`` of attribute name -> value per image;
    ``features(images)`` returns the penultimate-layer activations ``[N, D]``
    (float64), the feature space of the domain FID.
    """

    def __init__(self, net: _Net | None = None, config: dict | None = None, meta: dict | None = None) -> None:
        self.config = dict(config or {"width": 32, "feature_dim": 64})
        self.net = net if net is not None else _Net(**self.config)
        self.net.eval()
        self.meta = dict(meta or {})

    @property
    def feature_dim(self) -> int:
        return int(self.config["feature_dim"])

    @torch.no_grad()
    def _run(self, images: Any, batch_size: int, want: str) -> Any:
        batch = to_uint8_batch(images)
        self.net.eval()
        outs: list[Any] = []
        for i in range(0, len(batch), batch_size):
            x = _to_tensor(batch[i : i + batch_size])
            if want == "features":
                outs.append(self.net.features(x).double().numpy())
            else:
                outs.append({k: torch.softmax(v, dim=1).double().numpy() for k, v in self.net(x).items()})
        if want == "features":
            return np.concatenate(outs) if outs else np.empty((0, self.feature_dim))
        return {
            n: (np.concatenate([o[n] for o in outs]) if outs else np.empty((0, len(ATTRIBUTE_VALUES[n]))))
            for n in ATTRIBUTE_NAMES
        }

    def predict_proba(self, images: Any, batch_size: int = 256) -> dict[str, np.ndarray]:
        """Per-attribute class probabilities, ``{name: [N, n_values]}`` (order: :data:`ATTRIBUTE_VALUES`)."""
        return self._run(images, batch_size, "proba")

    def predict(self, images: Any, batch_size: int = 256) -> list[dict[str, str]]:
        """Predicted attributes, one ``{"shape": ..., "color": ..., ...}`` dict per image."""
        proba = self.predict_proba(images, batch_size)
        idx = {n: proba[n].argmax(axis=1) for n in ATTRIBUTE_NAMES}
        n_img = len(idx["shape"])
        return [{n: ATTRIBUTE_VALUES[n][int(idx[n][i])] for n in ATTRIBUTE_NAMES} for i in range(n_img)]

    def features(self, images: Any, batch_size: int = 256) -> np.ndarray:
        """Penultimate-layer features, float64 ``[N, feature_dim]``."""
        return self._run(images, batch_size, "features")

    # ---------------------------------------------------------------- persistence

    def save(self, path: str | Path) -> Path:
        """Save weights (float32) + config + metadata to ``path`` (a ``torch.save`` file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}
        torch.save(
            {"format": "ldm_deploy.attribute_classifier/1", "config": json.dumps(self.config),
             "meta": json.dumps(self.meta), "state_dict": state},
            path,
        )
        return path

    @classmethod
    def load(cls, path: str | Path) -> "AttributeClassifier":
        blob = torch.load(Path(path), map_location="cpu", weights_only=True)
        if blob.get("format") != "ldm_deploy.attribute_classifier/1":
            raise ValueError(f"{path}: not an attribute classifier checkpoint")
        config = json.loads(blob["config"])
        net = _Net(**config)
        net.load_state_dict(blob["state_dict"])
        return cls(net, config, json.loads(blob["meta"]))


_DEFAULT: AttributeClassifier | None = None


def load_default_classifier(cached: bool = True) -> AttributeClassifier:
    """The classifier shipped with the package (``ldm_deploy/assets/quality/attribute_classifier.pt``)."""
    global _DEFAULT
    if not DEFAULT_WEIGHTS.is_file():
        raise FileNotFoundError(
            f"{DEFAULT_WEIGHTS} is missing; rebuild it with `python scripts/train_quality_classifier.py`"
        )
    if _DEFAULT is None or not cached:
        clf = AttributeClassifier.load(DEFAULT_WEIGHTS)
        if not cached:
            return clf
        _DEFAULT = clf
    return _DEFAULT


# --------------------------------------------------------------------------- training


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Light corruptions in the normalised [-1, 1] space: colour offsets, blur, noise."""
    n = x.shape[0]
    # per-image, per-channel offset (about +-8 grey levels) and mild contrast change
    x = x * (1.0 + 0.08 * (torch.rand(n, 1, 1, 1, generator=gen) - 0.5))
    x = x + 0.065 * (torch.rand(n, 3, 1, 1, generator=gen) * 2 - 1)
    # blur a third of the images with a random-strength 3x3 kernel
    blur = torch.rand(n, generator=gen) < 0.33
    if blur.any():
        xb = x[blur]
        a = torch.rand(xb.shape[0], 1, 1, 1, generator=gen) * 0.6
        smooth = F.avg_pool2d(F.pad(xb, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
        x = x.clone()
        x[blur] = (1 - a) * xb + a * smooth
    # gaussian pixel noise with a per-image std of 0..~10 grey levels
    sigma = torch.rand(n, 1, 1, 1, generator=gen) * 0.08
    x = x + sigma * torch.randn(x.shape, generator=gen)
    return x.clamp(-1.0, 1.0)


def measure_accuracy(clf: AttributeClassifier, n: int = 2000, seed: int = VAL_SEED_BASE) -> dict[str, float]:
    """Per-attribute accuracy (and all-correct rate) on ``n`` fresh generator images (split "all")."""
    images, _, attrs = make_dataset(n, seed=seed, split="all")
    preds = clf.predict(images)
    acc = {name: float(np.mean([p[name] == getattr(a, name) for p, a in zip(preds, attrs)])) for name in ATTRIBUTE_NAMES}
    acc["all"] = float(np.mean([all(p[k] == getattr(a, k) for k in ATTRIBUTE_NAMES) for p, a in zip(preds, attrs)]))
    return acc


def train_classifier(
    n: int = 24_000,
    seed: int = 0,
    steps: int = 1_500,
    batch_size: int = 64,
    lr: float = 3e-3,
    width: int = 32,
    feature_dim: int = 64,
    augment: bool = True,
    threads: int | None = 1,
    log: Callable[[str], None] | None = print,
) -> AttributeClassifier:
    """Train an :class:`AttributeClassifier` on ``n`` generator images (split "all").

    The images come from ``make_dataset`` with seeds ``TRAIN_SEED_BASE + seed*1000 + k``
    in chunks of 2000, so the training data never overlaps the evaluation prompts.
    ``steps`` AdamW steps with a one-cycle learning-rate schedule; everything is seeded.
    """
    if threads is not None:
        torch.set_num_threads(int(threads))
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    chunks, attrs_all = [], []
    chunk = 2000
    for k in range((n + chunk - 1) // chunk):
        imgs, _, attrs = make_dataset(min(chunk, n - k * chunk), seed=TRAIN_SEED_BASE + seed * 1000 + k, split="all")
        chunks.append(imgs)
        attrs_all.extend(attrs)
    data = torch.from_numpy(np.concatenate(chunks)).permute(0, 3, 1, 2).contiguous()  # uint8 NCHW
    labels = attribute_labels(attrs_all)
    if log:
        log(f"rendered {len(data)} images in {time.perf_counter() - t0:.1f}s")

    config = {"width": int(width), "feature_dim": int(feature_dim)}
    net = _Net(**config)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    net.train()
    perm = torch.randperm(len(data), generator=gen)
    pos = 0
    for step in range(steps):
        if pos + batch_size > len(perm):
            perm, pos = torch.randperm(len(data), generator=gen), 0
        idx = perm[pos : pos + batch_size]
        pos += batch_size
        x = data[idx].float() / 127.5 - 1.0
        if augment:
            x = _augment(x, gen)
        out = net(x)
        loss = sum(F.cross_entropy(out[k], labels[k][idx]) for k in ATTRIBUTE_NAMES)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log and (step % 250 == 0 or step == steps - 1):
            log(f"step {step:5d}  loss {loss.item():.4f}  {time.perf_counter() - t0:.1f}s")
    net.eval()
    meta = {
        "n": int(n), "seed": int(seed), "steps": int(steps), "batch_size": int(batch_size), "lr": float(lr),
        "augment": bool(augment), "train_seconds": round(time.perf_counter() - t0, 1),
        "train_seed_base": TRAIN_SEED_BASE, "torch": torch.__version__,
    }
    return AttributeClassifier(net, config, meta)
