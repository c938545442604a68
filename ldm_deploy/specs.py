"""Component specs: the one declaration of each exported graph's inputs, outputs, dtypes and
dynamic axes, read by export, validation, calibration, TensorRT profiles and runtime binding.

Pure data and numpy-free arithmetic: this module must stay importable without torch.

Dynamic axes (the ``dim_param`` names written into the ONNX graphs, one TensorRT profile
dimension each):

================  =========================================================  ================
axis              meaning                                                    used by
================  =========================================================  ================
``batch``         prompts per call (B)                                       text_encoder, VAE
``unet_batch``    U-Net batch: 2B with classifier-free guidance, B without   unet
``height``        latent height (image height / vae_scale)                   unet, vae_decoder
``width``         latent width  (image width / vae_scale)                    unet, vae_decoder
``image_height``  image height in pixels                                     vae_encoder (in), vae_decoder (out)
``image_width``   image width in pixels                                      vae_encoder (in), vae_decoder (out)
``sequence``      text tokens the U-Net attends to: 77 x prompt windows      unet (``--long-prompts``)
================  =========================================================  ================

The text encoder's token sequence is static (77 for CLIP). The U-Net's is too, unless the artifact
was exported with ``--long-prompts``: then ``encoder_hidden_states`` has the dynamic ``sequence``
axis (``ShapeRanges.sequence``: 77 .. 77 x :data:`MAX_PROMPT_CHUNKS`), so that the runtime can
concatenate the embeddings of several 77-token windows of one prompt.

With feature caching (DeepCache, arXiv:2312.00858; ``ldm-export --deepcache``) the U-Net is two
graphs from the same weights: ``unet`` also outputs ``cache_feature`` (the hidden state entering
the last layers of the last up block) and ``unet_shallow`` (the first layers of the first down
block and those last up layers) takes it as an input. Both are declared here like the others.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal, Union

from .errors import LdmDeployError

Point = Literal["min", "opt", "max"]
Dim = Union[int, str]

AXES = ("batch", "unet_batch", "height", "width", "image_height", "image_width", "sequence")
#: Long prompts: at most this many 77-token windows (75 prompt tokens each) per prompt.
MAX_PROMPT_CHUNKS = 3
COMPONENTS = ("text_encoder", "unet", "vae_encoder", "vae_decoder")
#: Graphs that exist only with an export option (``unet_shallow``: ``--deepcache``).
OPTIONAL_COMPONENTS = ("unet_shallow",)

# "float" follows the artifact's I/O precision (float32, or float16 for fp16 I/O).
FLOAT = "float"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # "float" | "float32" | "int32" | "int64"
    shape: tuple[Dim, ...]

    def resolve_dtype(self, io_dtype: str) -> str:
        return io_dtype if self.dtype == FLOAT else self.dtype

    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}

    def concrete_shape(self, sizes: dict[str, int]) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else sizes[d] for d in self.shape)


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def input_shapes(self, sizes: dict[str, int]) -> dict[str, tuple[int, ...]]:
        return {t.name: t.concrete_shape(sizes) for t in self.inputs}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ComponentSpec":
        def tensors(items: list[dict]) -> tuple[TensorSpec, ...]:
            return tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in items)

        return cls(d["name"], tensors(d["inputs"]), tensors(d["outputs"]))


@dataclass(frozen=True)
class ModelDims:
    """The static sizes of one model that the specs depend on (read from its configs)."""

    text_hidden: int = 768
    seq_len: int = 77
    latent_channels: int = 4
    image_channels: int = 3
    vae_scale: int = 8  # pixels per latent cell
    unet_factor: int = 8  # the U-Net's total downsampling: latent sizes must be multiples of it
    vae_scaling_factor: float = 0.18215

    @property
    def size_multiple(self) -> int:
        """Image sizes (pixels) must be multiples of this."""
        return self.vae_scale * self.unet_factor


@dataclass(frozen=True)
class DeepCacheDims:
    """Where the U-Net is split for feature caching.

    ``depth``: layers of the first down block the shallow graph runs (1 .. layers per block); the
    shallow graph then runs the last ``depth + 1`` layers of the last up block, and the cached
    feature is the hidden state entering the first of those (``channels`` wide, at the latent
    resolution)."""

    depth: int
    channels: int


def component_specs(dims: ModelDims, deepcache: DeepCacheDims | None = None,
                    long_prompts: bool = False) -> dict[str, ComponentSpec]:
    """The SD components' I/O, with this model's static sizes filled in (and the two U-Net graphs
    of feature caching when ``deepcache`` is given; with ``long_prompts`` the U-Net's text
    sequence is the dynamic ``sequence`` axis)."""
    c, s, d = dims.latent_channels, dims.seq_len, dims.text_hidden
    context_len: Dim = "sequence" if long_prompts else s
    specs = {
        "text_encoder": ComponentSpec(
            "text_encoder",
            inputs=(TensorSpec("input_ids", "int32", ("batch", s)),),
            outputs=(TensorSpec("text_embeddings", FLOAT, ("batch", s, d)),),
        ),
        "unet": ComponentSpec(
            "unet",
            inputs=(
                TensorSpec("sample", FLOAT, ("unet_batch", c, "height", "width")),
                TensorSpec("timestep", FLOAT, (1,)),
                TensorSpec("encoder_hidden_states", FLOAT, ("unet_batch", context_len, d)),
            ),
            outputs=(TensorSpec("noise_pred", FLOAT, ("unet_batch", c, "height", "width")),),
        ),
        "vae_encoder": ComponentSpec(
            "vae_encoder",
            inputs=(TensorSpec("image", FLOAT, ("batch", dims.image_channels, "image_height", "image_width")),),
            # mean and log-variance of the latent distribution, unscaled (as diffusers' VAE)
            outputs=(TensorSpec("latent_parameters", FLOAT, ("batch", 2 * c, "height", "width")),),
        ),
        "vae_decoder": ComponentSpec(
            "vae_decoder",
            inputs=(TensorSpec("latent", FLOAT, ("batch", c, "height", "width")),),
            outputs=(TensorSpec("image", FLOAT, ("batch", dims.image_channels, "image_height", "image_width")),),
        ),
    }
    if deepcache is not None:
        unet = specs["unet"]
        feature = TensorSpec("cache_feature", FLOAT, ("unet_batch", deepcache.channels, "height", "width"))
        specs["unet"] = ComponentSpec("unet", unet.inputs, unet.outputs + (feature,))
        specs["unet_shallow"] = ComponentSpec("unet_shallow", unet.inputs + (feature,), unet.outputs)
    return specs


#: The largest image side (pixels) any stage accepts: 8x SD1.5's native 512, a latent of 512x512.
#: Beyond it a single activation of the U-Net or VAE no longer fits in memory; refusing up front
#: beats failing with an allocation of tens of GB minutes into an export.
MAX_IMAGE_SIDE = 4096
#: The largest batch (prompts x images per prompt; the U-Net gets twice as many with CFG).
MAX_BATCH = 64


def check_image_side(label: str, value: int, size_multiple: int, vae_scale: int = 8) -> None:
    """An image side in pixels must be a positive multiple of the VAE scale and of the model's
    ``size_multiple`` (VAE scale x U-Net downsampling), at most :data:`MAX_IMAGE_SIDE`; one clear
    line otherwise."""
    check_side_bounds(label, value, vae_scale)
    if value % vae_scale:
        raise LdmDeployError(f"{label} {value} is not a multiple of {vae_scale} (the VAE's scale)")
    if value % size_multiple:
        raise LdmDeployError(
            f"{label} {value} is not a multiple of {size_multiple} (required by this model: its U-Net downsamples "
            f"the {vae_scale}x-smaller latent {size_multiple // vae_scale}x)")


def check_side_bounds(label: str, value: int, vae_scale: int = 8) -> None:
    """What holds for an image side whatever the model: a positive integer, at most
    :data:`MAX_IMAGE_SIDE` (checked before a model is loaded)."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise LdmDeployError(f"{label} {value!r} is not a positive multiple of {vae_scale}")
    if value > MAX_IMAGE_SIDE:
        raise LdmDeployError(f"{label} {value} exceeds the largest supported image side {MAX_IMAGE_SIDE}")


def check_batch_size(label: str, value: int) -> None:
    """A batch size must be an integer in [1, :data:`MAX_BATCH`]; one clear line otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_BATCH:
        raise LdmDeployError(f"{label} {value!r} is not an integer in [1, {MAX_BATCH}]")


@dataclass(frozen=True)
class ShapeRanges:
    """min/opt/max of every dynamic axis. Built from user-facing batch and image-size ranges;
    one instance drives export (dynamic dims), validation (opt), TensorRT profiles and runtime
    checks."""

    batch: tuple[int, int, int]
    image_height: tuple[int, int, int]
    image_width: tuple[int, int, int]
    vae_scale: int = 8
    size_multiple: int = 64
    cfg: bool = True
    #: tokens of text context the U-Net takes (only a ``--long-prompts`` U-Net has it dynamic)
    sequence: tuple[int, int, int] = (77, 77, 77)

    def __post_init__(self) -> None:
        for name in ("batch", "image_height", "image_width"):
            lo, opt, hi = getattr(self, name)
            if not (1 <= lo <= opt <= hi):
                raise ValueError(f"{name} range must satisfy 1 <= min <= opt <= max, got {lo}:{opt}:{hi}")
        for name in ("image_height", "image_width"):
            for v in getattr(self, name):
                if v % self.size_multiple:
                    raise ValueError(f"{name} {v} is not a multiple of {self.size_multiple}")

    def axes(self) -> dict[str, tuple[int, int, int]]:
        b, h, w, f = self.batch, self.image_height, self.image_width, self.vae_scale
        unet = (b[0], 2 * b[1], 2 * b[2]) if self.cfg else b
        return {
            "batch": b,
            "unet_batch": unet,
            "height": tuple(v // f for v in h),
            "width": tuple(v // f for v in w),
            "image_height": h,
            "image_width": w,
            "sequence": tuple(self.sequence),
        }

    def sizes(self, point: Point = "opt") -> dict[str, int]:
        i = ("min", "opt", "max").index(point)
        return {name: r[i] for name, r in self.axes().items()}

    def check_image(self, height: int, width: int) -> None:
        """Image size (pixels) against the model's multiple and these ranges: one clear line."""
        for label, v, (lo, _, hi) in (("height", height, self.image_height), ("width", width, self.image_width)):
            check_image_side(label, v, self.size_multiple, self.vae_scale)
            if not lo <= v <= hi:
                raise LdmDeployError(f"{label} {v} is outside the artifact's exported range [{lo}, {hi}]")

    def check_batch(self, n: int) -> None:
        """Images per call (prompts x images per prompt) against the batch range."""
        if n < 1:
            raise LdmDeployError(f"a call needs at least one image, got batch {n}")
        if n > self.batch[2]:
            raise LdmDeployError(f"{n} images per call exceed the artifact's max batch {self.batch[2]}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["axes"] = self.axes()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ShapeRanges":
        keys = ("batch", "image_height", "image_width", "vae_scale", "size_multiple", "cfg", "sequence")
        return cls(**{k: tuple(d[k]) if isinstance(d[k], list) else d[k] for k in keys if k in d})


@dataclass
class TrtProfile:
    """One TensorRT optimization profile: input name -> (min, opt, max) shapes."""

    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)


def trt_profile(spec: ComponentSpec, ranges: ShapeRanges) -> TrtProfile:
    """Derive the TensorRT optimization profile of a component from its spec and the ranges."""
    pts = [ranges.sizes(p) for p in ("min", "opt", "max")]
    return TrtProfile({t.name: tuple(t.concrete_shape(s) for s in pts) for t in spec.inputs})  # type: ignore[misc]
