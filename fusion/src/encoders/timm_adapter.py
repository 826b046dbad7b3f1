"""timm backbones read through ``forward_intermediates``: ViTs (CLIP, SigLIP, SigLIP2, DINOv2, RADIO),
Eva (DINOv3, Perception Encoder), NaFlexVit (NaFlex SigLIP2, C-RADIO) and ConvNeXt (CLIP towers).

The timm trunk helpers here (:data:`TIMM_FAMILIES`, :func:`trunk_settings`, :func:`prune_trunk`)
also serve open_clip's ``TimmModel`` towers, which are timm trunks inside a CLIP model.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import timm
import torch
from timm.data.config import resolve_data_config
from torch import nn

from encoder_fusion.encoders.base import (
    Encoder,
    EncoderSpec,
    LayerInfo,
    LayerTokens,
    Preprocessing,
    as_rgb,
    channels_last,
    unknown_model_error,
)
from encoder_fusion.encoders.weights import (
    RANDOM_WEIGHTS,
    fit_problems,
    hub_checkpoint,
    load_checked,
    local_weights_path,
    read_state_dict,
    url_checkpoint,
    weights_missing,
)

# files a timm hub repo may hold, besides the one its pretrained config names
TIMM_HUB_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


@dataclass(frozen=True)
class TimmFamily:
    """One family of timm models this adapter reads, keyed by the timm module that defines it.

    Attributes:
        examples: what the family holds (for error messages).
        sized: the model has a position table built for ``img_size``; it is built with that size
            and ``dynamic_img_size=True``, so any input (non-square included) resamples the table.
        final_norm: the attribute ``forward_intermediates(norm=True)`` applies.
        stages: hooks index the stages of a hierarchical model, and timm normalises only the last
            stage (ConvNeXt); otherwise they index blocks and every block can be normalised.
    """

    examples: str
    sized: bool = False
    final_norm: str = "norm"
    stages: bool = False


TIMM_FAMILIES: dict[str, TimmFamily] = {
    "vision_transformer": TimmFamily("vit_*: CLIP, SigLIP, SigLIP2 (.v2_webli), DINOv2, RADIO", sized=True),
    "eva": TimmFamily("vit_*_dinov3, vit_pe_core/spatial/lang_*: DINOv3, Perception Encoder", sized=True),
    "naflexvit": TimmFamily("naflexvit_*: NaFlex SigLIP2, C-RADIO v3 / v4"),
    "convnext": TimmFamily(
        "convnext_*: CLIP ConvNeXt (.clip_*), DINOv3 ConvNeXt", final_norm="norm_pre", stages=True
    ),
}


def accepted_families() -> str:
    """The timm families an encoder accepts, for error messages."""
    return "; ".join(f"{module} ({family.examples})" for module, family in TIMM_FAMILIES.items())


def timm_family(arch: str, spec: EncoderSpec) -> TimmFamily:
    """The family of timm architecture ``arch``, by the timm module that defines it.

    Raises:
        ValueError: a timm model of a family this adapter does not read (a ResNet, a MLP-Mixer, ...).
    """
    module = timm.models.model_entrypoint(arch).__module__.rsplit(".", 1)[-1]
    if module not in TIMM_FAMILIES:
        raise ValueError(
            f"EncoderSpec.model={spec.model!r} is a timm {module} model; encoder {spec.name!r} accepts "
            f"timm models with a spatial forward_intermediates of these families: {accepted_families()}"
        )
    return TIMM_FAMILIES[module]


def family_of(trunk: nn.Module) -> TimmFamily:
    """The family of a built timm model (checked by :func:`timm_family` before it was built)."""
    return TIMM_FAMILIES[type(trunk).__module__.rsplit(".", 1)[-1]]


def check_post_norm(trunk: nn.Module, family: TimmFamily, indices: Sequence[int], spec: EncoderSpec) -> None:
    """Refuse ``norm="post"`` where timm's ``forward_intermediates(norm=True)`` would not normalise
    every hooked layer, rather than return unnormalised layers under that name.

    Raises:
        ValueError: no final norm (C-RADIO; a ConvNeXt whose norm sits in its head, after pooling), or
            ConvNeXt stages other than the last hooked.
    """
    if spec.hooks.norm != "post":
        return
    depth = len(feature_info(trunk))
    if isinstance(getattr(trunk, family.final_norm), nn.Identity):
        reason = f"it has no final norm before pooling ({family.final_norm} is nn.Identity)"
    elif family.stages and list(indices) != [depth - 1]:
        reason = f"timm normalises only its last stage ({depth - 1}), and layers {list(indices)} were hooked"
    else:
        return
    raise ValueError(
        f"HookSpec.norm='post' is not available for encoder {spec.name!r}: timm {type(trunk).__name__} "
        f"{spec.model!r}: {reason}; accepted: norm='pre'"
    )


def feature_info(trunk: nn.Module) -> list[dict[str, Any]]:
    """timm's ``feature_info`` of a trunk: per layer its channels and reduction. Every model timm
    builds has it, which the nn.Module that ``timm.create_model`` returns cannot say."""
    return cast("list[dict[str, Any]]", trunk.feature_info)


def trunk_settings(trunk: nn.Module) -> dict:
    """The :class:`Encoder` geometry of a timm trunk: its layers from timm's ``feature_info``, its
    prefix tokens, and what its hooks index."""
    return {
        "layers": [LayerInfo(info["num_chs"], info["reduction"]) for info in feature_info(trunk)],
        "num_prefix_tokens": int(getattr(trunk, "num_prefix_tokens", 0)),
        "unit": "stages" if family_of(trunk).stages else "blocks",
    }


def prune_trunk(trunk: nn.Module, spec: EncoderSpec, indices: Sequence[int]) -> None:
    """Check ``norm`` against a loaded timm trunk, then prune it after the deepest hooked layer with
    timm's ``prune_intermediate_layers`` (later blocks or stages, and the head, are dropped).

    Raises:
        ValueError: ``norm="post"`` where it cannot apply.
    """
    check_post_norm(trunk, family_of(trunk), sorted(indices), spec)
    # every trunk timm builds has it (see feature_info)
    trunk.prune_intermediate_layers(list(indices), prune_norm=False, prune_head=True)  # pyright: ignore[reportCallIssue]


class TimmEncoder(Encoder):
    """A timm model read with ``forward_intermediates``, pruned after the deepest hooked layer."""

    def __init__(self, spec: EncoderSpec, trunk: nn.Module, **settings) -> None:
        super().__init__(spec, trunk, **trunk_settings(trunk), **settings)
        prune_trunk(trunk, spec, self.layer_indices)

    def read_layers(self, pixels: torch.Tensor) -> list[LayerTokens]:
        # return_prefix_tokens only where there are some: Eva fails on it without prefix tokens
        extra = {"return_prefix_tokens": True} if self.num_prefix_tokens else {}
        out = self.model.forward_intermediates(  # pyright: ignore[reportCallIssue]  (see feature_info)
            pixels,
            indices=sorted(self.layer_indices),
            norm=self.spec.hooks.norm == "post",
            output_fmt="NCHW",
            intermediates_only=True,
            **extra,
        )
        if self.num_prefix_tokens:
            return channels_last([grid for grid, _ in out], [prefix for _, prefix in out])
        return channels_last(out, None)


def _model_name(spec: EncoderSpec, tag: str | None) -> tuple[str, TimmFamily]:
    """The timm name with the pretrained tag to use (the weights tag, else the one in the model
    name), and the model's family."""
    arch, model_tag = timm.models.split_model_name_tag(spec.model)
    if not timm.is_model(arch):
        raise unknown_model_error("timm", spec.model, timm.list_models())
    family = timm_family(arch, spec)
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
    return name, family


def load_timm_checkpoint(trunk: nn.Module, path, what: str) -> None:
    """Load a checkpoint file into a timm model through the checkpoint filter of its own timm module.

    The filters convert the original releases (DINOv2, DINOv3, C-RADIO) and OpenAI / open_clip CLIP
    layouts, and resample a position table to the model's grid, so another
    ``image_size`` is not an error.

    Raises:
        FileNotFoundError: nothing at ``path``.
        ValueError: unreadable file, or a checkpoint of another architecture.
    """
    state_dict = read_state_dict(path)
    checkpoint_filter = importlib.import_module(type(trunk).__module__).checkpoint_filter_fn
    try:
        state_dict = checkpoint_filter(state_dict, trunk)
    except (RuntimeError, KeyError, ValueError, IndexError, AttributeError) as error:
        # the filter fails inside a conversion; the keys say which checkpoint this is
        problems = fit_problems(trunk.state_dict(), state_dict) or [f"{type(error).__name__}: {error}"]
        raise ValueError(
            f"checkpoint {path} does not fit {what} (is it another architecture or size?); "
            + "; ".join(problems)
        ) from error
    # the classifier the encoder is built without (num_classes=0) is not part of the encoder
    expected = trunk.state_dict()
    state_dict = {k: v for k, v in state_dict.items() if k in expected or not k.startswith("head.")}
    load_checked(trunk, state_dict, str(path), what)


def _load_pretrained(trunk: nn.Module, spec: EncoderSpec, name: str) -> str:
    """Load the pretrained weights of timm model ``name`` from caches or the hub; ``weights_loaded``."""
    cfg = timm.models.get_pretrained_cfg(name)
    repo = cfg.hf_hub_id if cfg is not None else None
    files = ([cfg.hf_hub_filename] if cfg is not None and cfg.hf_hub_filename else []) + list(TIMM_HUB_FILES)
    path = hub_checkpoint(repo, files) if repo else None
    if path is None and cfg is not None and isinstance(cfg.url, str) and cfg.url:
        path = url_checkpoint(cfg.url)
    if path is None:
        looked = f"timm pretrained weights {name!r}" + (f" (hub repo {repo})" if repo else "")
        return weights_missing(
            spec,
            looked,
            "Give EncoderSpec.weights a local checkpoint (.safetensors / .pth, an original DINOv2, "
            "DINOv3 or C-RADIO release, an OpenAI CLIP file), or fill the Hugging Face cache (HF_HOME) "
            "while online.",
        )
    load_timm_checkpoint(trunk, path, f"timm model {name!r}")
    return "pretrained"


def timm_preprocessing(trunk: nn.Module, image_size: tuple[int, int] | None) -> Preprocessing:
    """timm's eval transform of the model's data config: mean, std, interpolation, crop mode and
    crop_pct, at ``image_size`` (None: the data config's input size, e.g. 256 for DINOv3)."""
    config = resolve_data_config({}, model=trunk)
    interpolation = config.get("interpolation", "bicubic")
    return Preprocessing(
        image_size=image_size or tuple(config["input_size"][1:]),
        mean=as_rgb(config["mean"]),
        std=as_rgb(config["std"]),
        interpolation=interpolation if interpolation in INTERPOLATIONS else "bicubic",
        resize="squash" if config.get("crop_mode") == "squash" else "crop",
        crop_pct=float(config.get("crop_pct", 1.0)),
    )


def creation_kwargs(family: TimmFamily, image_size: tuple[int, int] | None, overrides: dict) -> dict:
    """What a timm trunk of ``family`` is built with: a sized model at ``image_size`` (None: its
    default) with a dynamic size, then ``overrides`` (architecture settings) on top."""
    kwargs = {}
    if family.sized:
        kwargs["dynamic_img_size"] = True
        if image_size is not None:
            kwargs["img_size"] = image_size
    return {**kwargs, **overrides}


def build_timm_encoder(spec: EncoderSpec) -> TimmEncoder:
    """Build a timm encoder from ``spec`` and load its weights, offline first.

    ``spec.weights``: None (the model's default pretrained tag), a timm pretrained tag, a local
    checkpoint file or folder, or ``"random"`` (the random initialisation on purpose).
    ``spec.model_kwargs`` go to ``timm.create_model`` (``depth``, ``embed_dim``, ``num_heads``,
    ``reg_tokens``, ``depths``, ``dims``, ...). ConvNeXt hooks are stage indices (see README).

    Raises:
        ValueError: unknown model or tag, a family this adapter does not read, a checkpoint that
            does not fit, ``norm="post"`` where the model has no final norm for the hooked layers.
        FileNotFoundError: a missing weights path, or no weights with ``on_missing="error"``.
    """
    wants_random = spec.weights == RANDOM_WEIGHTS
    path = None if wants_random else local_weights_path(spec.weights)
    name, family = _model_name(spec, None if path is not None or wants_random else spec.weights)
    # features only: no classifier head
    kwargs = {**creation_kwargs(family, spec.image_hw, spec.model_kwargs or {}), "num_classes": 0}
    try:
        trunk = timm.create_model(name, pretrained=False, **kwargs)
    except (TypeError, AssertionError) as error:  # an unknown argument, or sizes that do not agree
        raise ValueError(
            f"EncoderSpec.model_kwargs={spec.model_kwargs} are not accepted by timm model {name!r}: "
            f"{error or type(error).__name__}"
        ) from error
    if wants_random:
        weights_loaded = "random"
    elif path is not None:
        load_timm_checkpoint(trunk, path, f"timm model {name!r}")
        weights_loaded = "pretrained"
    else:
        weights_loaded = _load_pretrained(trunk, spec, name)
    return TimmEncoder(
        spec,
        trunk,
        preprocessing=timm_preprocessing(trunk, spec.image_hw),
        weights_loaded=weights_loaded,
    )
