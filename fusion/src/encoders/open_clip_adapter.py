"""open_clip image towers read through their ``forward_intermediates``: open_clip's own ViTs (ViT-B-16,
ViT-L-14-336, ...) and the towers it builds as timm trunks inside a ``TimmModel`` (SigLIP, SigLIP2,
Perception Encoder ``PE-Core-*``, ConvNeXt ``convnext_*``)."""

from __future__ import annotations

import dataclasses
import functools
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import cast

import open_clip
import open_clip.timm_model
import torch
from open_clip.model import CLIPVisionCfg, _build_vision_tower
from open_clip.transform import PreprocessCfg, merge_preprocess_dict
from open_clip.transformer import VisionTransformer
from timm.layers.pos_embed import resample_abs_pos_embed
from torch import nn

from encoder_fusion.encoders.base import (
    Encoder,
    EncoderSpec,
    LayerInfo,
    LayerTokens,
    Preprocessing,
    as_hw,
    as_rgb,
    channels_last,
    unknown_model_error,
)
from encoder_fusion.encoders.timm_adapter import (
    accepted_families,
    creation_kwargs,
    prune_trunk,
    timm_family,
    trunk_settings,
)
from encoder_fusion.encoders.weights import (
    RANDOM_WEIGHTS,
    hub_checkpoint,
    load_checked,
    local_weights_path,
    read_state_dict,
    take_prefix,
    url_checkpoint,
    weights_missing,
)

VISION_FIELDS = frozenset(f.name for f in dataclasses.fields(CLIPVisionCfg))
# what TimmModel itself reads from the vision config; every other key goes to its timm trunk
TIMM_TOWER_FIELDS = frozenset(
    {"image_size", "patch_dropout"} | {f for f in VISION_FIELDS if f.startswith("timm_")}
)
# model-level settings: QuickGELU and the CLIP embedding (projection) size
MODEL_FIELDS = frozenset({"quick_gelu", "output_dim"})
OPEN_CLIP_HUB_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
OPEN_CLIP_URL_CACHE = "~/.cache/clip"
# open_clip resize modes -> ours; "longest" pads, which the eval transform of these towers never uses
RESIZE_MODES = {"shortest": "crop", "squash": "squash", "longest": "crop"}


class OpenClipTower(Encoder):
    """An open_clip vision tower, read through its own ``forward_intermediates`` (both kinds of tower
    have one, with the same arguments)."""

    model: VisionTransformer | open_clip.timm_model.TimmModel

    def read_layers(self, pixels: torch.Tensor) -> list[LayerTokens]:
        out = self.model.forward_intermediates(
            pixels,
            indices=sorted(self.layer_indices),
            normalize_intermediates=self.spec.hooks.norm == "post",
            intermediates_only=True,
            output_fmt="NCHW",
            output_extra_tokens=self.num_prefix_tokens > 0,
        )
        # open_clip types each value of this dict as Tensor | list; asked for indices, they are lists
        grids = cast("list[torch.Tensor]", out["image_intermediates"])
        return channels_last(grids, cast("list[torch.Tensor] | None", out.get("image_intermediates_prefix")))


class OpenClipEncoder(OpenClipTower):
    """An open_clip :class:`~open_clip.transformer.VisionTransformer`, pruned after the deepest hooked
    block by its ``prune_intermediate_layers``. Its position table has the fixed grid of the size it
    was built for (``image_size``; a checkpoint of another size is resampled at load), so it reads
    pixels of that size only.

    Raises:
        ValueError: ``norm="post"`` on a tower that applies its final norm after attention pooling.
    """

    model: VisionTransformer

    def __init__(self, spec: EncoderSpec, tower: VisionTransformer, **settings) -> None:
        depth = len(tower.transformer.resblocks)
        width, patch = tower.conv1.out_channels, tower.conv1.stride[0]
        super().__init__(
            spec, tower, layers=[LayerInfo(width, patch)] * depth, num_prefix_tokens=1, **settings
        )
        if spec.hooks.norm == "post" and tower.attn_pool is not None:
            raise ValueError(
                f"HookSpec.norm='post' is not available for encoder {spec.name!r}: open_clip model "
                f"{spec.model!r} applies its final norm after attention pooling; accepted: norm='pre'"
            )
        tower.prune_intermediate_layers(list(self.layer_indices), prune_norm=False, prune_head=True)

    def read_layers(self, pixels: torch.Tensor) -> list[LayerTokens]:
        grid = tuple(size // self.stride for size in pixels.shape[-2:])
        if grid != tuple(self.model.grid_size):
            raise ValueError(
                f"pixels for encoder {self.spec.name!r} (open_clip {self.spec.model}) are "
                f"{tuple(pixels.shape[-2:])}, a {grid[0]}x{grid[1]} grid; its position table is built for "
                f"{self.image_size} ({self.model.grid_size[0]}x{self.model.grid_size[1]}); accepted: "
                "pixels of its image_size (encoder.preprocess gives them)"
            )
        return super().read_layers(pixels)


class OpenClipTimmEncoder(OpenClipTower):
    """An open_clip ``TimmModel`` tower read with its ``forward_intermediates``; its timm trunk is
    checked and pruned as the timm adapter does it."""

    def __init__(self, spec: EncoderSpec, tower: open_clip.timm_model.TimmModel, **settings) -> None:
        super().__init__(spec, tower, **trunk_settings(tower.trunk), **settings)
        prune_trunk(tower.trunk, spec, self.layer_indices)


# image tower class -> its encoder; other towers (ModifiedResNet) are refused
TOWERS: dict[type, Callable[..., OpenClipTower]] = {
    VisionTransformer: OpenClipEncoder,
    open_clip.timm_model.TimmModel: OpenClipTimmEncoder,
}


@contextmanager
def timm_trunk_overrides(overrides: dict) -> Iterator[None]:
    """Route architecture overrides into the ``timm.create_model`` call of open_clip's ``TimmModel``,
    which forwards no architecture arguments of its own (how tiny SigLIP towers are built)."""
    if not overrides:
        yield
        return
    real_timm = open_clip.timm_model.timm
    open_clip.timm_model.timm = types.SimpleNamespace(
        create_model=functools.partial(real_timm.create_model, **overrides)
    )
    try:
        yield
    finally:
        open_clip.timm_model.timm = real_timm


def split_model_kwargs(spec: EncoderSpec, is_timm: bool) -> tuple[dict, dict, dict]:
    """Split ``spec.model_kwargs`` into (model config, vision config, timm trunk) overrides.

    ``heads`` becomes open_clip's ``head_width`` (width // heads); ``output_dim`` is the CLIP
    embedding size. For timm towers, keys TimmModel does not read itself go to the timm trunk.

    Raises:
        ValueError: a key that is neither a vision-config field nor (for timm towers) a timm argument.
    """
    model_level, vision, trunk = {}, {}, {}
    for key, value in (spec.model_kwargs or {}).items():
        if key in MODEL_FIELDS:
            model_level[key] = value
        elif is_timm:
            (vision if key in TIMM_TOWER_FIELDS else trunk)[key] = value
        elif key in VISION_FIELDS or key == "heads":
            vision[key] = value
        else:
            raise ValueError(
                f"EncoderSpec.model_kwargs key {key!r} is not an open_clip vision setting of {spec.model!r}; "
                f"accepted: heads, {', '.join(sorted(VISION_FIELDS | MODEL_FIELDS))}"
            )
    return model_level, vision, trunk


def _pretrained_tag(spec: EncoderSpec, wants_file: bool) -> str | None:
    """The open_clip pretrained tag to use: ``spec.weights``, else the model's first tag."""
    tags = open_clip.list_pretrained_tags_by_model(spec.model)
    if wants_file or spec.weights == RANDOM_WEIGHTS:
        return tags[0] if tags else None  # its preprocessing is the architecture's canonical one
    tag = spec.weights or (tags[0] if tags else None)
    if tag is not None and tag not in tags:
        raise ValueError(
            f"EncoderSpec.weights={tag!r} is neither a local path nor a pretrained tag of open_clip model "
            f"{spec.model!r}; accepted tags: {', '.join(tags) or 'none'}"
        )
    return tag


def _tag_checkpoint(pretrained: dict) -> Path | None:
    """The tag's checkpoint from the Hugging Face or open_clip caches, else downloaded when online."""
    hub = pretrained.get("hf_hub", "")
    if hub:
        repo, filename = hub.rstrip("/"), ""
        if not hub.endswith("/"):
            repo, filename = hub.rsplit("/", 1)
        found = hub_checkpoint(repo, [filename] if filename else OPEN_CLIP_HUB_FILES)
        if found is not None:
            return found
    return url_checkpoint(pretrained.get("url", ""), [OPEN_CLIP_URL_CACHE])


def resample_position_embeddings(state_dict: dict, tower: nn.Module) -> dict:
    """Resample the checkpoint's position table to the tower's grid (another image_size)."""
    state_dict = dict(state_dict)
    if isinstance(tower, VisionTransformer) and "positional_embedding" in state_dict:
        pos = state_dict["positional_embedding"]
        if pos.shape != tower.positional_embedding.shape and pos.ndim == 2:
            state_dict["positional_embedding"] = resample_abs_pos_embed(
                pos.unsqueeze(0), new_size=list(tower.grid_size), num_prefix_tokens=1
            )[0]
    trunk = getattr(tower, "trunk", None)
    table = getattr(trunk, "pos_embed", None)  # a ConvNeXt trunk has none
    if trunk is not None and table is not None and "trunk.pos_embed" in state_dict:
        pos = state_dict["trunk.pos_embed"]
        if pos.shape != table.shape and pos.ndim == 3:
            prefix = 0 if trunk.no_embed_class else trunk.num_prefix_tokens
            state_dict["trunk.pos_embed"] = resample_abs_pos_embed(
                pos, new_size=list(trunk.patch_embed.grid_size), num_prefix_tokens=prefix
            )
    return state_dict


def load_open_clip_checkpoint(tower: nn.Module, path, what: str) -> None:
    """Load a full CLIP checkpoint (its ``visual.`` part), a tower-only state dict or an OpenAI
    TorchScript archive into an open_clip image tower.

    Raises:
        FileNotFoundError: nothing at ``path``.
        ValueError: unreadable file, or a checkpoint of another architecture.
    """
    state_dict = take_prefix(read_state_dict(path), "visual.")
    load_checked(tower, resample_position_embeddings(state_dict, tower), str(path), what)


def preprocessing_of(model_cfg: dict, pretrained: dict, image_size: tuple[int, int]) -> Preprocessing:
    """open_clip's preprocessing: its defaults, the model config's, then the pretrained tag's."""
    merged = merge_preprocess_dict(PreprocessCfg(), model_cfg.get("preprocess_cfg", {}))
    merged = merge_preprocess_dict(merged, pretrained)
    interpolation = merged["interpolation"]
    return Preprocessing(
        image_size=image_size,
        mean=as_rgb(merged["mean"]),
        std=as_rgb(merged["std"]),
        interpolation=interpolation if interpolation in ("bilinear", "bicubic", "nearest") else "bicubic",
        resize=RESIZE_MODES.get(merged["resize_mode"], "crop"),
    )


def _build_tower(spec: EncoderSpec, model_cfg: dict, quick_gelu: bool) -> nn.Module:
    """The image tower of ``model_cfg`` with ``spec``'s overrides.

    Raises:
        ValueError: a timm trunk of a family the timm adapter does not read, or model_kwargs the
            tower does not take.
    """
    vision_cfg = dict(model_cfg["vision_cfg"])
    timm_name = vision_cfg.get("timm_model_name")
    model_level, vision, trunk_kwargs = split_model_kwargs(spec, bool(timm_name))
    heads = vision.pop("heads", None)
    vision_cfg.update(vision)
    if heads is not None:
        vision_cfg["head_width"] = vision_cfg.get("width", CLIPVisionCfg.width) // heads
    if spec.image_size is not None:
        vision_cfg["image_size"] = spec.image_size
    if timm_name:
        family = timm_family(timm_name, spec)
        vision_cfg["timm_model_pretrained"] = False  # weights come from the CLIP checkpoint, below
        # the trunk at the tower's size with a dynamic size, as the timm adapter builds it
        trunk_kwargs = creation_kwargs(family, as_hw(vision_cfg["image_size"], "image_size"), trunk_kwargs)
    quick_gelu = model_level.get("quick_gelu", quick_gelu)
    embed_dim = model_level.get("output_dim", model_cfg["embed_dim"])
    try:
        with timm_trunk_overrides(trunk_kwargs):
            tower = _build_vision_tower(embed_dim, CLIPVisionCfg(**vision_cfg), quick_gelu=quick_gelu)
    except (TypeError, AssertionError) as error:  # an unknown argument, or sizes that do not agree
        raise ValueError(
            f"EncoderSpec.model_kwargs={spec.model_kwargs} are not accepted by open_clip model "
            f"{spec.model!r}: {error or type(error).__name__}"
        ) from error
    return tower


def build_open_clip_encoder(spec: EncoderSpec) -> Encoder:
    """Build an open_clip image tower from ``spec`` and load its weights, offline first.

    ``spec.model`` is an open_clip model name (``open_clip.list_models()``). ``spec.weights``: None
    (the model's first pretrained tag), a pretrained tag (``"openai"``, ``"laion2b_s34b_b88k"``), a
    local checkpoint (full CLIP state dict, tower state dict, OpenAI TorchScript archive), or
    ``"random"``. ``spec.model_kwargs`` update the vision config (``width``, ``layers``, ``heads``,
    ``patch_size``, ...), set ``quick_gelu`` / ``embed_dim``, or, for timm towers, go to the timm
    trunk (``depth``, ``embed_dim``, ``num_heads``, ``depths``, ``dims``). A tag trained with
    QuickGELU (OpenAI's) gets it.

    Raises:
        ValueError: unknown model or tag, a tower this adapter does not read (ResNet), a checkpoint
            that does not fit.
        FileNotFoundError: a missing weights path, or no weights with ``on_missing="error"``.
    """
    model_cfg = open_clip.get_model_config(spec.model)
    if model_cfg is None:
        raise unknown_model_error("open_clip", spec.model, open_clip.list_models())
    wants_random = spec.weights == RANDOM_WEIGHTS
    path = None if wants_random else local_weights_path(spec.weights)
    tag = _pretrained_tag(spec, wants_file=path is not None)
    pretrained = open_clip.get_pretrained_cfg(spec.model, tag) if tag else {}
    loads_tag = path is None and not wants_random
    quick_gelu = bool(model_cfg.get("quick_gelu", False) or (loads_tag and pretrained.get("quick_gelu")))
    tower = _build_tower(spec, model_cfg, quick_gelu)
    encoder_class = TOWERS.get(type(tower))
    if encoder_class is None:
        raise ValueError(
            f"open_clip model {spec.model!r} has a {type(tower).__name__} image tower; encoder "
            f"{spec.name!r} accepts open_clip VisionTransformer towers (ViT-*) and TimmModel towers of "
            f"these families: {accepted_families()}"
        )
    assert isinstance(tower, (VisionTransformer, open_clip.timm_model.TimmModel))  # the towers of TOWERS
    what = f"open_clip model {spec.model!r}"
    if wants_random:
        weights_loaded = "random"
    elif path is not None:
        load_open_clip_checkpoint(tower, path, what)
        weights_loaded = "pretrained"
    else:
        found = _tag_checkpoint(pretrained) if pretrained else None
        if found is None:
            weights_loaded = weights_missing(
                spec,
                f"open_clip pretrained tag {tag!r} of {spec.model!r} in the Hugging Face and "
                f"{OPEN_CLIP_URL_CACHE} caches",
                "Give EncoderSpec.weights a local checkpoint (open_clip or OpenAI CLIP file), or fill the "
                "caches while online.",
            )
        else:
            load_open_clip_checkpoint(tower, found, what)
            weights_loaded = "pretrained"
    height, width = tower.image_size
    return encoder_class(
        spec,
        tower,
        preprocessing=preprocessing_of(model_cfg, pretrained, (int(height), int(width))),
        weights_loaded=weights_loaded,
    )
