"""Hugging Face transformers vision towers: CLIPVisionModel, Dinov2Model, Dinov2WithRegistersModel and
SiglipVisionModel, chosen from the config's ``model_type``."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from timm.layers import resample_abs_pos_embed
from torch import nn

from fusion.encoders.base import Encoder, EncoderSpec, Preprocessing, unknown_model_error
from fusion.encoders.weights import (
    RANDOM_WEIGHTS,
    cached_hub_file,
    find_checkpoint_in_folder,
    hub_checkpoint,
    hub_offline,
    load_checked,
    local_weights_path,
    read_state_dict,
    weights_missing,
)

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)
HF_CHECKPOINTS = ("model.safetensors", "pytorch_model.bin")
# PIL resampling codes that Hugging Face image processors store
PIL_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}


@dataclass(frozen=True)
class HfFamily:
    """How to read one family of Hugging Face vision towers.

    Attributes:
        model_class: the transformers class built from the vision config.
        blocks, final_norm, pre_norm: attribute paths inside the model (pre_norm None: none).
        has_cls: a CLS token leads the sequence (SigLIP has none).
        interpolate_flag: the embeddings take ``interpolate_pos_encoding`` (CLIP, SigLIP); DINOv2's
            always interpolate.
        mean, std, interpolation, resize: the image processor's defaults.
        register_attr: the config attribute counting register tokens, if any.
    """

    model_class: str
    blocks: str
    final_norm: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pre_norm: str | None = None
    has_cls: bool = True
    interpolate_flag: bool = True
    interpolation: str = "bicubic"
    resize: str = "crop"
    register_attr: str | None = None


CLIP = HfFamily(
    "CLIPVisionModel", "encoder.layers", "post_layernorm", CLIP_MEAN, CLIP_STD, pre_norm="pre_layrnorm"
)
DINOV2 = HfFamily(
    "Dinov2Model", "encoder.layer", "layernorm", IMAGENET_MEAN, IMAGENET_STD, interpolate_flag=False
)
DINOV2_REG = HfFamily(
    "Dinov2WithRegistersModel", "encoder.layer", "layernorm", IMAGENET_MEAN, IMAGENET_STD,
    interpolate_flag=False, register_attr="num_register_tokens",
)  # fmt: skip
SIGLIP = HfFamily(
    "SiglipVisionModel", "encoder.layers", "post_layernorm", HALF, HALF,
    has_cls=False, interpolation="bilinear", resize="squash",
)  # fmt: skip
# model_type of a config -> family; the full two-tower types read their vision_config
FAMILIES: dict[str, HfFamily] = {
    "clip_vision_model": CLIP,
    "clip": CLIP,
    "dinov2": DINOV2,
    "dinov2_with_registers": DINOV2_REG,
    "siglip_vision_model": SIGLIP,
    "siglip": SIGLIP,
}
# parameter names of older transformers releases (and of the hub checkpoints) -> current ones;
# applied only to keys the model lacks, so either release loads either layout
LEGACY_RENAMES: tuple[tuple[str, str], ...] = (
    (r"\.attention\.attention\.query\.", ".attention.q_proj."),
    (r"\.attention\.attention\.key\.", ".attention.k_proj."),
    (r"\.attention\.attention\.value\.", ".attention.v_proj."),
    (r"\.attention\.output\.dense\.", ".attention.o_proj."),
    (r"\.mlp\.weights_out\.", ".mlp.down_proj."),
)
# prefixes that wrap a vision tower inside a larger checkpoint (CLIPModel, heads on top of DINOv2)
TOWER_PREFIXES = ("vision_model.", "dinov2.", "model.")


def _attr(module: nn.Module, dotted: str) -> nn.Module:
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


def _core(model: nn.Module) -> nn.Module:
    """The module holding embeddings, encoder and norms (older releases wrap it in ``vision_model``)."""
    return getattr(model, "vision_model", model)


class TransformersEncoder(Encoder):
    """A Hugging Face vision tower read layer by layer.

    Position embeddings are interpolated to the input grid by the model's own embeddings
    (``interpolate_pos_encoding=True`` for CLIP and SigLIP; DINOv2 always interpolates).
    """

    def __init__(self, spec: EncoderSpec, model: nn.Module, *, family: HfFamily, **geometry) -> None:
        super().__init__(spec, model, **geometry)
        self.family = family

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        core = _core(self.model)
        if self.family.interpolate_flag:
            tokens = core.embeddings(pixels, interpolate_pos_encoding=True)
        else:
            tokens = core.embeddings(pixels)
        if self.family.pre_norm is not None:
            tokens = _attr(core, self.family.pre_norm)(tokens)
        return tokens

    def blocks(self) -> Sequence[nn.Module]:
        return _attr(_core(self.model), self.family.blocks)

    def run_block(self, block: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        out = block(tokens, attention_mask=None)
        return out[0] if isinstance(out, tuple) else out  # older releases return tuples

    def final_norm(self, tokens: torch.Tensor) -> torch.Tensor:
        return _attr(_core(self.model), self.family.final_norm)(tokens)


# -- config -------------------------------------------------------------------------------------
def _looks_like_hub_id(name: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", name))


def _hub_config(repo: str, spec: EncoderSpec):
    try:
        return transformers.AutoConfig.from_pretrained(repo, local_files_only=True)
    except (OSError, ValueError):
        pass
    if not hub_offline():
        try:
            return transformers.AutoConfig.from_pretrained(repo)
        except (OSError, ValueError):
            pass
    raise ValueError(
        f"EncoderSpec.model={spec.model!r}: the config of this Hugging Face repo is not in the local cache "
        f"and the hub is {'offline' if hub_offline() else 'unreachable or has no such repo'}; give a local "
        f"model folder, or a model type ({', '.join(FAMILIES)}) with model_kwargs"
    )


def resolve_config(spec: EncoderSpec) -> tuple[object, Path | str | None]:
    """The model's config and where its weights live (a folder, a hub repo id, or None).

    ``spec.model`` is a local folder holding ``config.json``, a model type (``"dinov2"``,
    ``"clip_vision_model"``, ...; the config is built in code) or a hub repo id (its config must be
    in the local cache, or the hub online).

    Raises:
        ValueError: unknown model name, or a hub config that cannot be had.
    """
    folder = Path(spec.model).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise ValueError(f"EncoderSpec.model={spec.model!r} is a folder without config.json")
        return transformers.AutoConfig.from_pretrained(str(folder)), folder
    if spec.model in FAMILIES:
        return transformers.AutoConfig.for_model(spec.model), None
    if _looks_like_hub_id(spec.model):
        return _hub_config(spec.model, spec), spec.model
    raise unknown_model_error(
        "transformers",
        spec.model,
        FAMILIES,
        hint=f"; accepted: a local model folder, a hub repo id, or a model type ({', '.join(FAMILIES)})",
    )


def vision_config_of(config, spec: EncoderSpec) -> tuple[object, HfFamily]:
    """The vision part of ``config`` with ``spec.model_kwargs`` applied, and its family.

    Raises:
        ValueError: an unsupported model type, or a model_kwargs key the config lacks.
    """
    family = FAMILIES.get(config.model_type)
    if family is None:
        raise ValueError(
            f"EncoderSpec.model={spec.model!r} has model_type {config.model_type!r}; encoder {spec.name!r} "
            f"accepts: {', '.join(FAMILIES)}"
        )
    vision = getattr(config, "vision_config", None) or config
    for key, value in (spec.model_kwargs or {}).items():
        if not hasattr(vision, key):
            raise ValueError(
                f"EncoderSpec.model_kwargs key {key!r} is not a setting of {type(vision).__name__} "
                f"({spec.model!r})"
            )
        setattr(vision, key, value)
    built_in_code = spec.model in FAMILIES
    if built_in_code and spec.image_size is not None and "image_size" not in (spec.model_kwargs or {}):
        # a config built in code gets a position table of the input size (HF tables are square)
        vision.image_size = max(spec.image_size)
    return vision, family


# -- weights ------------------------------------------------------------------------------------
def fit_keys(state_dict: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Strip tower prefixes (``vision_model.`` of a CLIPModel / SiglipModel checkpoint, ``dinov2.``
    of a classifier) and rename keys of older releases to the model's names."""
    for prefix in TOWER_PREFIXES:
        if not any(k in expected for k in state_dict) and any(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    fitted = {}
    for key, value in state_dict.items():
        if key not in expected:
            for pattern, replacement in LEGACY_RENAMES:
                renamed = re.sub(pattern, replacement, key)
                if renamed in expected:
                    key = renamed
                    break
            else:
                gate = key.replace(".mlp.weights_in.", ".mlp.gate_proj.")
                if ".mlp.weights_in." in key and gate in expected:  # fused SwiGLU input of giant
                    up = key.replace(".mlp.weights_in.", ".mlp.up_proj.")
                    fitted[gate], fitted[up] = value.chunk(2, dim=0)
                    continue
        fitted[key] = value
    return fitted


def resample_position_table(state_dict: dict, model: nn.Module, family: HfFamily) -> dict:
    """Resample a checkpoint's position table made for another image_size to the model's."""
    core = _core(model)
    if family.interpolate_flag:
        key, table = "embeddings.position_embedding.weight", core.embeddings.position_embedding.weight
        prefix = 1 if family.has_cls else 0
    else:
        key, table = "embeddings.position_embeddings", core.embeddings.position_embeddings
        prefix = 1
    key = next((k for k in state_dict if k.endswith(key)), None)
    if key is None or state_dict[key].shape == table.shape or state_dict[key].shape[-1] != table.shape[-1]:
        return state_dict
    side = round((table.shape[-2] - prefix) ** 0.5)
    pos = state_dict[key]
    batched = pos if pos.ndim == 3 else pos[None]
    # bicubic without antialias: what Hugging Face's interpolate_pos_encoding does at run time
    resampled = resample_abs_pos_embed(batched, (side, side), num_prefix_tokens=prefix, antialias=False)
    return {**state_dict, key: resampled if pos.ndim == 3 else resampled[0]}


def load_hf_checkpoint(model: nn.Module, family: HfFamily, path, what: str) -> None:
    """Load a checkpoint file or model folder (Hugging Face layout, also a whole CLIPModel /
    SiglipModel) into a vision tower, strictly.

    Raises:
        FileNotFoundError: nothing at ``path``.
        ValueError: unreadable file, or a checkpoint of another architecture.
    """
    state_dict = fit_keys(read_state_dict(path), set(model.state_dict()))
    load_checked(model, resample_position_table(state_dict, model, family), str(path), what)


def preprocessing_of(
    family: HfFamily, vision, source: Path | str | None, image_size: tuple[int, int] | None
) -> Preprocessing:
    """The image processor's mean / std / resampling when its config is at hand, else the family's."""
    processor = {}
    if isinstance(source, Path):
        found = source / "preprocessor_config.json"
        found = found if found.is_file() else None
    elif isinstance(source, str):
        found = cached_hub_file(source, ["preprocessor_config.json"])
    else:
        found = None
    if found is not None:
        processor = json.loads(Path(found).read_text())
    crop = processor.get("crop_size") if processor.get("do_center_crop", True) else None
    crop = crop or processor.get("size") or vision.image_size  # older processors store plain ints
    if isinstance(crop, dict):
        crop = (crop["height"], crop["width"]) if "height" in crop else crop.get("shortest_edge")
    crop = crop or vision.image_size
    default_size = crop if isinstance(crop, (list, tuple)) else (crop, crop)
    return Preprocessing(
        image_size=image_size or tuple(default_size),
        mean=tuple(float(v) for v in processor.get("image_mean", family.mean)),
        std=tuple(float(v) for v in processor.get("image_std", family.std)),
        interpolation=PIL_RESAMPLE.get(processor.get("resample"), family.interpolation),
        resize=family.resize,
    )


def _weights_location(spec: EncoderSpec, source: Path | str | None) -> tuple[Path | None, str]:
    """The checkpoint to load (or None) and what was looked for."""
    path = local_weights_path(spec.weights)
    if path is not None:
        return path, str(path)
    repo = spec.weights or source
    if isinstance(repo, Path):
        return find_checkpoint_in_folder(repo), str(repo)
    if repo is None:
        return None, f"weights of model type {spec.model!r} (a model type names no checkpoint)"
    return hub_checkpoint(repo, HF_CHECKPOINTS), f"Hugging Face repo {repo!r} in the local cache"


def build_transformers_encoder(spec: EncoderSpec) -> Encoder:
    """Build a Hugging Face vision tower from ``spec`` and load its weights, offline first.

    ``spec.model``: a local model folder, a hub repo id, or a model type (``clip_vision_model``,
    ``dinov2``, ``dinov2_with_registers``, ``siglip_vision_model``) whose config is built in code.
    ``spec.weights``: None (the model folder's or repo's own weights), a local checkpoint file or
    folder, a hub repo id, or ``"random"``. ``spec.model_kwargs`` override config attributes
    (``num_hidden_layers``, ``hidden_size``, ...). ``spec.image_size`` is the input size; the
    position table keeps the checkpoint's size and is interpolated to the input grid.

    Raises:
        ValueError: unknown model, unsupported model type, a checkpoint that does not fit.
        FileNotFoundError: a missing weights path, or no weights with ``on_missing="error"``.
    """
    config, source = resolve_config(spec)
    vision, family = vision_config_of(config, spec)
    model = getattr(transformers, family.model_class)(vision)
    what = f"transformers {family.model_class} ({spec.model})"
    if spec.weights == RANDOM_WEIGHTS:
        weights_loaded = "random"
    else:
        path, looked_for = _weights_location(spec, source)
        if path is None:
            weights_loaded = weights_missing(
                spec,
                looked_for,
                "Give EncoderSpec.weights a local checkpoint or Hugging Face model folder, or fill the "
                "Hugging Face cache (HF_HOME) while online.",
            )
        else:
            load_hf_checkpoint(model, family, path, what)
            weights_loaded = "pretrained"
    patch = vision.patch_size
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    registers = getattr(vision, family.register_attr, 0) if family.register_attr else 0
    return TransformersEncoder(
        spec,
        model,
        family=family,
        patch_size=int(patch),
        width=int(vision.hidden_size),
        depth=len(_attr(_core(model), family.blocks)),
        num_prefix_tokens=int(family.has_cls) + int(registers),
        preprocessing=preprocessing_of(family, vision, source, spec.image_size),
        weights_loaded=weights_loaded,
    )

