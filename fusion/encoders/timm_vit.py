"""timm Vision Transformers: DINOv2 (also with registers), CLIP and SigLIP ViTs."""

from __future__ import annotations

from collections.abc import Sequence

import timm
import torch
from timm.layers import Format
from timm.models import VisionTransformer
from timm.models.vision_transformer import checkpoint_filter_fn
from torch import nn

from fusion.encoders.base import Encoder, EncoderSpec, Preprocessing, unknown_model_error
from fusion.encoders.weights import (
    RANDOM_WEIGHTS,
    hub_checkpoint,
    load_checked,
    local_weights_path,
    read_state_dict,
    url_checkpoint,
    weights_missing,
)

VIT_MODULE = "timm.models.vision_transformer"
# files a timm hub repo may hold, besides the one its pretrained config names
TIMM_HUB_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


class TimmEncoder(Encoder):
    """A timm :class:`~timm.models.VisionTransformer` read block by block.

    The trunk runs with a dynamic image size, so its position embedding is resampled to whatever
    grid the input gives (non-square included), exactly as timm's ``dynamic_img_size=True`` does.
    """

    @property
    def trunk(self) -> VisionTransformer:
        """The timm VisionTransformer inside ``model`` (the model itself here)."""
        return self.model

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        trunk = self.trunk
        tokens = trunk.patch_embed(pixels)
        tokens = trunk._pos_embed(tokens)  # prefix tokens + position embedding resampled to the grid
        tokens = trunk.patch_drop(tokens)
        return trunk.norm_pre(tokens)

    def blocks(self) -> Sequence[nn.Module]:
        return self.trunk.blocks

    def final_norm(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.trunk.norm(tokens)


def make_dynamic(trunk: VisionTransformer) -> None:
    """Switch a timm ViT built for one input size to any size, as ``dynamic_img_size=True`` would."""
    trunk.dynamic_img_size = True
    trunk.patch_embed.strict_img_size = False
    trunk.patch_embed.flatten = False
    trunk.patch_embed.output_fmt = Format.NHWC


def trunk_geometry(trunk: nn.Module, spec: EncoderSpec) -> dict:
    """patch_size, width, depth and num_prefix_tokens of a timm VisionTransformer.

    Raises:
        ValueError: not a plain ViT (a hybrid or hierarchical model), or non-square patches.
    """
    if not isinstance(trunk, VisionTransformer):
        raise ValueError(
            f"EncoderSpec.model={spec.model!r} builds a timm {type(trunk).__name__}; encoder {spec.name!r} "
            "accepts timm VisionTransformer models (vit_*: DINOv2, CLIP, SigLIP)"
        )
    patch_h, patch_w = trunk.patch_embed.patch_size
    if patch_h != patch_w:
        raise ValueError(f"encoder {spec.name!r}: non-square patches {patch_h}x{patch_w} are not supported")
    return {
        "patch_size": patch_h,
        "width": trunk.embed_dim,
        "depth": len(trunk.blocks),
        "num_prefix_tokens": trunk.num_prefix_tokens,
    }


def _model_name(spec: EncoderSpec, tag: str | None) -> str:
    """The timm name with the pretrained tag to use: the weights tag, else the one in the model name."""
    arch, model_tag = timm.models.split_model_name_tag(spec.model)
    if not timm.is_model(arch):
        raise unknown_model_error("timm", spec.model, timm.list_models())
    module = timm.models.model_entrypoint(arch).__module__
    if module != VIT_MODULE:
        family = module.rsplit(".", 1)[-1]
        raise ValueError(
            f"EncoderSpec.model={spec.model!r} is a timm {family} model; encoder {spec.name!r} accepts "
            "timm VisionTransformer models (vit_*: DINOv2, CLIP, SigLIP)"
        )
    tag = tag or model_tag
    name = f"{arch}.{tag}" if tag else arch
    try:
        timm.models.get_pretrained_cfg(name)
    except RuntimeError as error:
        tags = [n.split(".", 1)[1] for n in timm.list_pretrained(f"{arch}.*")]
        raise ValueError(
            f"pretrained tag {tag!r} is unknown for timm model {arch!r}; "
            f"accepted: {', '.join(tags) or 'none'}"
        ) from error
    return name


def load_timm_checkpoint(trunk: VisionTransformer, path, what: str) -> None:
    """Load a checkpoint file into a timm ViT through timm's own filter.

    The filter converts the original DINOv2 release and OpenAI / open_clip CLIP layouts, and resamples
    the position embedding to the model's grid, so another ``image_size`` is not an error.

    Raises:
        FileNotFoundError: nothing at ``path``.
        ValueError: unreadable file, or a checkpoint of another architecture.
    """
    state_dict = read_state_dict(path)
    try:
        state_dict = checkpoint_filter_fn(state_dict, trunk)
    except (RuntimeError, KeyError, ValueError, IndexError) as error:
        raise ValueError(
            f"checkpoint {path} does not fit {what} (is it another architecture?): "
            f"{type(error).__name__}: {str(error)[:200]}"
        ) from error
    if isinstance(trunk.head, nn.Identity):
        # the classifier / projection head is not part of the encoder (built with num_classes=0)
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("head.")}
    load_checked(trunk, state_dict, str(path), what)


def _load_pretrained(trunk: VisionTransformer, spec: EncoderSpec, name: str) -> str:
    """Load the pretrained weights of timm model ``name`` from caches or the hub; ``weights_loaded``."""
    cfg = timm.models.get_pretrained_cfg(name)
    repo = cfg.hf_hub_id if cfg is not None else None
    files = ([cfg.hf_hub_filename] if cfg is not None and cfg.hf_hub_filename else []) + list(TIMM_HUB_FILES)
    path = hub_checkpoint(repo, files) if repo else None
    if path is None and cfg is not None and cfg.url:
        path = url_checkpoint(cfg.url)
    if path is None:
        looked = f"timm pretrained weights {name!r}" + (f" (hub repo {repo})" if repo else "")
        return weights_missing(
            spec,
            looked,
            "Give EncoderSpec.weights a local checkpoint (.safetensors / .pth / original DINOv2 or "
            "OpenAI CLIP file), or fill the Hugging Face cache (HF_HOME) while online.",
        )
    load_timm_checkpoint(trunk, path, f"timm model {name!r}")
    return "pretrained"


def preprocessing_of(trunk: VisionTransformer, image_size: tuple[int, int]) -> Preprocessing:
    """The eval transform of timm's data config (mean, std, interpolation) at ``image_size``."""
    config = timm.data.resolve_data_config({}, model=trunk)
    interpolation = config.get("interpolation", "bicubic")
    return Preprocessing(
        image_size=image_size,
        mean=tuple(float(v) for v in config["mean"]),
        std=tuple(float(v) for v in config["std"]),
        interpolation=interpolation if interpolation in ("bilinear", "bicubic", "nearest") else "bicubic",
        resize="crop",
    )


def build_timm_encoder(spec: EncoderSpec) -> TimmEncoder:
    """Build a timm ViT encoder from ``spec`` and load its weights, offline first.

    ``spec.weights``: None (the model's default pretrained tag), a timm pretrained tag, a local
    checkpoint file or folder, or ``"random"`` (the random initialisation on purpose).
    ``spec.model_kwargs`` go to ``timm.create_model`` (``depth``, ``embed_dim``, ``num_heads``,
    ``reg_tokens``, ...); ``spec.image_size`` becomes ``img_size``.

    Raises:
        ValueError: unknown model or tag, a non-ViT model, a checkpoint that does not fit.
        FileNotFoundError: a missing weights path, or no weights with ``on_missing="error"``.
    """
    wants_random = spec.weights == RANDOM_WEIGHTS
    path = None if wants_random else local_weights_path(spec.weights)
    name = _model_name(spec, None if path is not None or wants_random else spec.weights)
    kwargs = dict(spec.model_kwargs or {})
    if spec.image_size is not None:
        kwargs["img_size"] = spec.image_size
    kwargs.setdefault("dynamic_img_size", True)
    kwargs.setdefault("num_classes", 0)  # features only: no classifier or CLIP projection head
    try:
        trunk = timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as error:
        raise ValueError(
            f"EncoderSpec.model_kwargs {sorted(spec.model_kwargs or {})} are not accepted by timm model "
            f"{name!r}: {error}"
        ) from error
    geometry = trunk_geometry(trunk, spec)
    make_dynamic(trunk)
    if wants_random:
        weights_loaded = "random"
    elif path is not None:
        load_timm_checkpoint(trunk, path, f"timm model {name!r}")
        weights_loaded = "pretrained"
    else:
        weights_loaded = _load_pretrained(trunk, spec, name)
    image_size = spec.image_size or tuple(trunk.patch_embed.img_size)
    return TimmEncoder(
        spec,
        trunk,
        preprocessing=preprocessing_of(trunk, image_size),
        weights_loaded=weights_loaded,
        **geometry,
    )
