"""The one interface every encoder adapter implements, and the spec that names an encoder."""

from __future__ import annotations

import difflib
import math
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from encoder_fusion.hooks import HookSpec

SOURCES = ("timm", "open_clip", "transformers")
# how far float pixels may stray outside [0, 1] from rounding (a resize, a colour conversion)
PIXEL_SLACK = 1e-3
ON_MISSING = ("error", "random")
RESIZE_MODES = ("crop", "squash")


def as_rgb(values: Sequence[float]) -> tuple[float, float, float]:
    """A library's per-channel mean or std (any sequence of three numbers) as three floats."""
    red, green, blue = (float(v) for v in values)
    return red, green, blue


def as_hw(size: int | Sequence[int], what: str) -> tuple[int, int]:
    """Turn an int or an (h, w) pair into an (h, w) tuple of positive ints."""
    if isinstance(size, int) and not isinstance(size, bool):
        size = (size, size)
    if (
        not isinstance(size, Sequence)
        or len(size) != 2
        or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)
    ):
        raise ValueError(f"{what} must be a positive int or an (height, width) pair, got {size!r}")
    return int(size[0]), int(size[1])


@dataclass(frozen=True)
class EncoderSpec:
    """Names one vision encoder and how to read it.

    Args:
        name: a short label of the encoder inside a fused model (``"clip"``, ``"dino"``).
        source: the library that builds it: ``"timm"``, ``"open_clip"`` or ``"transformers"``.
        model: the source's model name (``"vit_small_patch14_reg4_dinov2"``, ``"ViT-B-16"``,
            ``"openai/clip-vit-large-patch14"``) or a local Hugging Face folder.
        weights: a pretrained tag or repo id, a local checkpoint file or folder, or None for the
            source's default pretrained weights.
        image_size: the encoder's input size, an int or (height, width); None keeps the model's.
        hooks: the layers to read (:class:`~encoder_fusion.HookSpec` or a mapping of its fields).
        on_missing: ``"error"`` raises when no weights can be had offline; ``"random"`` warns and
            keeps the random initialisation, stamped as such in every result.
        model_kwargs: architecture overrides passed to the source's constructor (``depth``,
            ``embed_dim``, ...): how tests and smoke runs build the real architectures at tiny sizes.
    """

    name: str
    source: str
    model: str
    weights: str | None = None
    image_size: int | tuple[int, int] | None = None
    hooks: HookSpec = field(default_factory=HookSpec)
    on_missing: str = "error"
    model_kwargs: dict | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"EncoderSpec.name must be a non-empty string, got {self.name!r}")
        if self.source not in SOURCES:
            raise ValueError(
                f"EncoderSpec.source={self.source!r} for encoder {self.name!r} is unknown; "
                f"accepted: {', '.join(SOURCES)}"
            )
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"EncoderSpec.model for encoder {self.name!r} must be a model name")
        weights = self.weights
        if weights is not None and (
            not isinstance(weights, (str, os.PathLike)) or not os.fspath(weights).strip()
        ):
            # an empty path would name the working directory, and load whatever checkpoint lies there
            raise ValueError(
                f"EncoderSpec.weights={weights!r} for encoder {self.name!r} names nothing; accepted: None "
                "(the source's default pretrained weights), 'random', a pretrained tag or hub repo id, or "
                "a local checkpoint file or folder"
            )
        if self.on_missing not in ON_MISSING:
            raise ValueError(
                f"EncoderSpec.on_missing={self.on_missing!r} is unknown; accepted: {', '.join(ON_MISSING)}"
            )
        if self.image_size is not None:
            object.__setattr__(self, "image_size", as_hw(self.image_size, "EncoderSpec.image_size"))
        object.__setattr__(self, "hooks", HookSpec.from_any(self.hooks))
        if self.model_kwargs is not None:
            if not hasattr(self.model_kwargs, "items"):
                raise ValueError(
                    f"EncoderSpec.model_kwargs for encoder {self.name!r} must be a mapping, "
                    f"got {type(self.model_kwargs).__name__}"
                )
            object.__setattr__(self, "model_kwargs", dict(self.model_kwargs.items()))

    @property
    def image_hw(self) -> tuple[int, int] | None:
        """``image_size`` as ``__post_init__`` leaves it, (height, width) or None, typed as such."""
        return None if self.image_size is None else as_hw(self.image_size, "EncoderSpec.image_size")

    @classmethod
    def from_any(cls, value: EncoderSpec | dict) -> EncoderSpec:
        """Build from an EncoderSpec or a mapping of its fields (a dict or an OmegaConf node)."""
        if isinstance(value, EncoderSpec):
            return value
        if not hasattr(value, "items"):
            raise ValueError(f"an encoder must be an EncoderSpec or a mapping, got {type(value).__name__}")
        data = dict(value.items())
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(
                f"EncoderSpec got unknown field(s) {unknown}; accepted: {', '.join(cls.__dataclass_fields__)}"
            )
        missing = [f for f in ("name", "source", "model") if f not in data]
        if missing:
            raise ValueError(f"EncoderSpec is missing required field(s) {missing}")
        if isinstance(data.get("image_size"), Sequence) and not isinstance(data["image_size"], str):
            data["image_size"] = tuple(data["image_size"])
        return cls(**data)


@dataclass(frozen=True)
class Preprocessing:
    """An encoder's own pixel pipeline: resize to ``image_size``, then normalise with mean and std.

    ``resize="crop"`` scales the image to cover ``image_size / crop_pct`` and centre-crops
    ``image_size`` (timm's eval transform; ``crop_pct=1`` is the CLIP and DINOv2 one); ``"squash"``
    resizes straight to ``image_size`` (SigLIP, Perception Encoder in open_clip).
    """

    image_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    resize: str = "crop"
    crop_pct: float = 1.0

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_MODES:
            raise ValueError(
                f"Preprocessing.resize={self.resize!r} is unknown; accepted: {', '.join(RESIZE_MODES)}"
            )
        if not 0.0 < self.crop_pct <= 1.0:
            raise ValueError(f"Preprocessing.crop_pct={self.crop_pct!r} must be in (0, 1]")


class LayerTokens(NamedTuple):
    """One hooked layer: the patch grid ``(B, h, w, C)`` and, when kept, the prefix tokens ``(B, P, C)``."""

    grid: torch.Tensor
    prefix: torch.Tensor | None


class LayerInfo(NamedTuple):
    """What one readable layer of a backbone gives: ``channels``, and ``reduction``, its grid's stride
    in pixels (a ViT's patch size; 4, 8, 16, 32 for the four stages of a ConvNeXt)."""

    channels: int
    reduction: int


def unknown_model_error(source: str, model: str, known: Iterable[str], hint: str = "") -> ValueError:
    """A ValueError for a model name ``source`` does not know, suggesting the closest known names."""
    close = difflib.get_close_matches(model, list(known), n=5, cutoff=0.5)
    suggestion = f"; did you mean {', '.join(close)}?" if close else ""
    return ValueError(f"EncoderSpec.model={model!r} is not a known {source} model{suggestion}{hint}")


def check_images(images: torch.Tensor, min_size: int, encoder: str) -> None:
    """Raise a ValueError naming the problem when ``images`` is not a (B, 3, H, W) image batch."""
    if not isinstance(images, torch.Tensor):
        raise ValueError(
            f"images for encoder {encoder!r} must be a torch.Tensor, got {type(images).__name__}"
        )
    if images.layout != torch.strided:
        raise TypeError(
            f"images for encoder {encoder!r} are a {images.layout} tensor; accepted: a dense tensor "
            "(call images.to_dense())"
        )
    if images.device.type == "meta":
        raise ValueError(
            f"images for encoder {encoder!r} are on the meta device, which holds no pixel values; "
            "accepted: images on a real device (cpu, cuda)"
        )
    if images.ndim != 4:
        raise ValueError(
            f"images for encoder {encoder!r} must be 4-D (B, 3, H, W), got shape {tuple(images.shape)}"
        )
    if images.shape[1] != 3:
        raise ValueError(
            f"images for encoder {encoder!r} must have 3 channels (B, 3, H, W), got {images.shape[1]} "
            f"in shape {tuple(images.shape)}"
        )
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise ValueError(
            f"images for encoder {encoder!r} must be uint8 (0..255) or float in [0, 1], got {images.dtype}"
        )
    if images.shape[0] == 0:
        raise ValueError(f"images for encoder {encoder!r} is an empty batch")
    if min(images.shape[-2:]) < min_size:
        raise ValueError(
            f"images for encoder {encoder!r} are {tuple(images.shape[-2:])} pixels, smaller than one "
            f"patch of {min_size}; accepted: height and width >= {min_size}"
        )


def check_pixel_values(images: torch.Tensor, encoder: str, *, unit_range: bool) -> None:
    """Refuse pixels that would poison every token of their image without an error: NaN or Inf, and
    (``unit_range``, for raw images) float values outside [0, 1], such as 0..255 or -1..1 images,
    which normalisation would take to hundreds. One pass over the batch (its minimum and maximum);
    the offending images are found only when there are some.

    Raises:
        ValueError: naming the images (their index in the batch) or the range found, and the fix.
    """
    if not images.is_floating_point() or images.numel() == 0:
        return  # integer pixels are finite, and uint8 is 0..255 by its type
    low, high = (float(v) for v in torch.aminmax(images.detach()))
    if not (math.isfinite(low) and math.isfinite(high)):
        bad = (~torch.isfinite(images.detach())).flatten(1).any(dim=1).nonzero().flatten().tolist()
        shown = ", ".join(str(i) for i in bad[:8]) + (" ..." if len(bad) > 8 else "")
        raise ValueError(
            f"images for encoder {encoder!r} hold NaN or Inf pixels in image(s) {shown} of the batch of "
            f"{images.shape[0]}; accepted: finite pixels"
        )
    if unit_range and (low < -PIXEL_SLACK or high > 1 + PIXEL_SLACK):
        raise ValueError(
            f"images for encoder {encoder!r} are {images.dtype} with values in [{low:.4g}, {high:.4g}]; "
            "accepted: uint8 0..255, or float in [0, 1]. Convert 0..255 floats with images / 255, and "
            "-1..1 (already normalised) ones with (images + 1) / 2"
        )


class Encoder(nn.Module):
    """A frozen backbone read at several layers through its library's own intermediate-layer API.

    Adapters (one per source library) build the model and load its weights; their subclass resolves
    the hooks here, then prunes the model after the deepest hooked layer with the library's own call
    (so later blocks or stages never run) and implements :meth:`read_layers`. This class checks
    pixels, puts the layers in the order of ``spec.hooks.layers`` and applies the prefix policy.

    Attributes:
        spec: the :class:`EncoderSpec` it was built from.
        depth: how many layers (blocks, or ConvNeXt stages) the full model has.
        layers: a :class:`LayerInfo` for each of them.
        num_prefix_tokens: CLS, register and summary tokens before the patch tokens (0 for a ConvNeXt).
        preprocessing: its own :class:`Preprocessing`.
        weights_loaded: ``"pretrained"`` or ``"random"``.
        layer_indices: the hooked layers as non-negative indices, in ``spec.hooks.layers`` order
            (resolved against ``depth``; ``unit`` names the layers in its messages).
        stride: the largest reduction among the hooked layers; pixels are cropped to a multiple of it.
    """

    pixel_mean: torch.Tensor  # buffers, registered in __init__
    pixel_std: torch.Tensor

    def __init__(
        self,
        spec: EncoderSpec,
        model: nn.Module,
        *,
        layers: Sequence[LayerInfo],
        num_prefix_tokens: int,
        preprocessing: Preprocessing,
        weights_loaded: str,
        unit: str = "blocks",
    ) -> None:
        super().__init__()
        self.spec = spec
        self.model = model
        self.layers = tuple(LayerInfo(int(c), int(r)) for c, r in layers)
        self.depth = len(self.layers)
        self.num_prefix_tokens = num_prefix_tokens
        self.preprocessing = preprocessing
        self.weights_loaded = weights_loaded
        self.layer_indices = spec.hooks.resolve(self.depth, spec.name, unit)
        self.stride = max(self.layers[i].reduction for i in self.layer_indices)
        self._cropped: set[tuple[int, int]] = set()
        if min(preprocessing.image_size) < self.stride:
            raise ValueError(
                f"EncoderSpec.image_size={tuple(preprocessing.image_size)} for encoder {spec.name!r} is "
                f"smaller than one {self.stride}-pixel patch, which leaves no token; accepted: image_size "
                f">= {self.stride} (a multiple of {self.stride} uses every pixel)"
            )
        self.warn_crop(preprocessing.image_size)
        mean = torch.tensor(preprocessing.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(preprocessing.std, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("pixel_mean", mean, persistent=False)
        self.register_buffer("pixel_std", std, persistent=False)
        # locked-image tuning: the backbone never trains, and dropout / drop-path stay off
        self.model.requires_grad_(False)
        self.model.eval()

    def read_layers(self, pixels: torch.Tensor) -> list[LayerTokens]:
        """Run the library's intermediate-layer API on ``pixels`` (a multiple of :attr:`stride`).

        Returns:
            One :class:`LayerTokens` per hooked layer in block order (``sorted(layer_indices)``),
            channels-last, with the prefix tokens ``(B, num_prefix_tokens, C)`` (P may be 0).
        """
        raise NotImplementedError

    # -- shared ---------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> Encoder:
        """Set training mode; a frozen backbone (no parameter requires grad) stays in eval mode."""
        super().train(mode)
        if not any(p.requires_grad for p in self.model.parameters()):
            self.model.eval()
        return self

    def _one(self, what: str, values: list[int]) -> int:
        """The value all hooked layers share, else a ValueError saying a fused model needs one."""
        if len(set(values)) != 1:
            raise ValueError(
                f"encoder {self.spec.name!r} hooks layers {list(self.spec.hooks.layers)} of different "
                f"{what}s {values}; a fused model takes one {what} per encoder: hook stages of one "
                "width (e.g. layers=[-1])"
            )
        return values[0]

    @property
    def width(self) -> int:
        """Channels of the hooked layers (all of one width, as a fused model needs)."""
        return self._one("width", [self.layers[i].channels for i in self.layer_indices])

    @property
    def patch_size(self) -> int:
        """Stride in pixels of the hooked layers' grids (a ViT's patch size)."""
        return self._one("stride", [self.layers[i].reduction for i in self.layer_indices])

    @property
    def image_size(self) -> tuple[int, int]:
        """The (height, width) this encoder resizes every image to."""
        return self.preprocessing.image_size

    def grid_size(self, image_size: tuple[int, int] | None = None) -> tuple[int, int]:
        """The (h, w) token grid for pixels of ``image_size`` (default: the encoder's own input size)."""
        height, width = image_size or self.image_size
        return height // self.patch_size, width // self.patch_size

    def warn_crop(self, size: tuple[int, int]) -> None:
        """Warn, once per size, that pixels of ``size`` lose their last partial patch row or column."""
        height, width = (side - side % self.stride for side in size)
        if (height, width) == tuple(size) or size in self._cropped:
            return
        self._cropped.add(size)
        warnings.warn(
            f"encoder {self.spec.name!r}: {size[0]}x{size[1]} pixels are not a multiple of its "
            f"{self.stride}-pixel patch; it reads the top-left {height}x{width} "
            f"({height // self.stride}x{width // self.stride} patches) and drops the rest. Set "
            f"image_size to a multiple of {self.stride} to use every pixel",
            UserWarning,
            stacklevel=3,
        )

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Turn raw images (uint8 0..255 or float in [0, 1], (B, 3, H, W), any size) into this
        encoder's normalised pixels of shape (B, 3, *image_size), float32.

        Raises:
            ValueError: not a 4-D 3-channel uint8/float batch, smaller than one patch, NaN or Inf
                pixels (the images named), or float values outside [0, 1].
        """
        check_images(images, self.stride, self.spec.name)
        check_pixel_values(images, self.spec.name, unit_range=True)
        pixels = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        pixels = resize_images(pixels, self.preprocessing)
        return (pixels - self.pixel_mean) / self.pixel_std

    def forward_tokens(self, pixels: torch.Tensor) -> list[LayerTokens]:
        """Run the encoder on preprocessed pixels; one :class:`LayerTokens` per hooked layer, in the
        order of ``spec.hooks.layers``. Prefix tokens are returned only with ``hooks.prefix="keep"``.

        Pixels whose height or width is not a multiple of :attr:`stride` lose the last partial
        patch row / column, as a strided patch embedding would ignore it; every model (NaFlex ones,
        which would fail on it, included) sees the same pixels.

        Raises:
            ValueError: pixels that are not (B, 3, H, W), are smaller than one patch, or hold NaN or
                Inf (the images named).
        """
        check_images(pixels, self.stride, self.spec.name)
        if not pixels.is_floating_point():
            raise ValueError(
                f"encoder {self.spec.name!r} got {pixels.dtype} images in forward_tokens / forward_grids, "
                "which take normalised float pixels; accepted: encoder.preprocess(images) first "
                "(FusedEncoder does it)"
            )
        check_pixel_values(pixels, self.spec.name, unit_range=False)
        # a model cast with .half() / .bfloat16() reads pixels of its own dtype, as timm casts them
        weight = next(self.model.parameters(), None)
        if weight is not None and weight.is_floating_point() and pixels.dtype != weight.dtype:
            pixels = pixels.to(weight.dtype)
        self.warn_crop((pixels.shape[-2], pixels.shape[-1]))
        height, width = (size - size % self.stride for size in pixels.shape[-2:])
        read = self.read_layers(pixels[..., :height, :width])
        by_index = dict(zip(sorted(self.layer_indices), read))
        keep = self.spec.hooks.prefix == "keep"
        return [
            LayerTokens(by_index[i].grid, by_index[i].prefix if keep else None) for i in self.layer_indices
        ]

    def forward_grids(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """One ``(B, h, w, C)`` channels-last grid per hooked layer, in ``spec.hooks.layers`` order."""
        return [layer.grid for layer in self.forward_tokens(pixels)]

    def forward(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """Same as :meth:`forward_grids`."""
        return self.forward_grids(pixels)


def resize_images(pixels: torch.Tensor, preprocessing: Preprocessing) -> torch.Tensor:
    """Resize a float batch to ``preprocessing.image_size`` by its resize mode (no-op when it fits).

    Both modes first resize to ``image_size / crop_pct`` (covering it in ``"crop"`` mode, keeping the
    aspect ratio; exactly in ``"squash"`` mode), then centre-crop ``image_size``: timm's eval
    transform for either ``crop_mode``.
    """
    target_h, target_w = preprocessing.image_size
    height, width = pixels.shape[-2:]
    if (height, width) == (target_h, target_w):
        return pixels
    mode = preprocessing.interpolation
    kwargs = {"antialias": True, "align_corners": False} if mode in ("bilinear", "bicubic") else {}
    crop_pct = preprocessing.crop_pct
    if preprocessing.resize == "crop":
        scale = max(target_h / height, target_w / width) / crop_pct
        scaled = (max(target_h, round(height * scale)), max(target_w, round(width * scale)))
    else:
        scaled = (math.floor(target_h / crop_pct), math.floor(target_w / crop_pct))
    pixels = F.interpolate(pixels, size=scaled, mode=mode, **kwargs)
    top, left = (scaled[0] - target_h) // 2, (scaled[1] - target_w) // 2
    pixels = pixels[..., top : top + target_h, left : left + target_w]
    # bicubic overshoots; keep pixels in the range the normalisation was fitted on
    return pixels.clamp(0.0, 1.0)


def channels_last(
    grids: Sequence[torch.Tensor], prefixes: Sequence[torch.Tensor] | None
) -> list[LayerTokens]:
    """Library outputs as :class:`LayerTokens`: NCHW grids -> contiguous ``(B, h, w, C)`` (the layout
    ``encoder_fusion.kernels.grid_fuse`` reads), and no prefix tokens -> an empty ``(B, 0, C)`` tensor."""
    layers = []
    for index, grid in enumerate(grids):
        grid = grid.permute(0, 2, 3, 1).contiguous()
        prefix = prefixes[index] if prefixes is not None else grid.new_zeros(grid.shape[0], 0, grid.shape[-1])
        layers.append(LayerTokens(grid, prefix))
    return layers
