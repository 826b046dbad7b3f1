"""Hugging Face transformers vision towers, chosen from the config's ``model_type``: CLIPVisionModel,
Dinov2Model, Dinov2WithRegistersModel, DINOv3ViTModel, SiglipVisionModel and Siglip2VisionModel.

A tower is read through its own ``output_hidden_states`` after its layer list is cut after the
deepest hooked layer: the layers after it are not in the model any more, so they never run.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from timm.layers.pos_embed import resample_abs_pos_embed
from torch import nn
from transformers import PreTrainedModel
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import WeightRenaming
from transformers.models.siglip2.image_processing_siglip2 import convert_image_to_patches

from encoder_fusion.encoders.base import (
    Encoder,
    EncoderSpec,
    LayerInfo,
    LayerTokens,
    Preprocessing,
    as_rgb,
    unknown_model_error,
)
from encoder_fusion.encoders.weights import (
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
# PIL resampling codes that Hugging Face image processors store (keyed by object: the lookup takes
# whatever JSON value a processor config holds under "resample")
PIL_RESAMPLE: dict[object, str] = {0: "nearest", 2: "bilinear", 3: "bicubic"}


# -- model inputs from normalised (B, 3, H, W) pixels, per family ---------------------------------
def interpolated_inputs(pixels: torch.Tensor, patch: int) -> dict:
    """CLIP and SigLIP: the position table resampled to the input grid by the model itself."""
    return {"pixel_values": pixels, "interpolate_pos_encoding": True}


def pixel_inputs(pixels: torch.Tensor, patch: int) -> dict:
    """DINOv2 (always interpolates its table) and DINOv3 (rotary positions, any grid)."""
    return {"pixel_values": pixels}


def patch_inputs(pixels: torch.Tensor, patch: int) -> dict:
    """SigLIP2 (NaFlex): each image as flattened patches by its image processor's own function, all
    of them valid, and the grid each image has."""
    grid_h, grid_w = pixels.shape[-2] // patch, pixels.shape[-1] // patch
    return {
        "pixel_values": torch.stack([convert_image_to_patches(image, patch) for image in pixels]),
        "pixel_attention_mask": torch.ones(
            len(pixels), grid_h * grid_w, dtype=torch.long, device=pixels.device
        ),
        "spatial_shapes": torch.tensor([[grid_h, grid_w]] * len(pixels), device=pixels.device),
    }


def image_size_side(vision) -> int:
    """The input side most configs are built for, in pixels."""
    return vision.image_size


def patch_count_side(vision) -> int:
    """SigLIP2 configs size their position table by patch count, not pixels."""
    return math.isqrt(vision.num_patches) * vision.patch_size


@dataclass(frozen=True)
class HfFamily:
    """How to read one family of Hugging Face vision towers.

    Attributes:
        model_class: the transformers class built from the vision config.
        blocks, final_norm: attribute paths inside the model of its layer list and final norm.
        mean, std, interpolation, resize: the image processor's defaults.
        inputs: the model's inputs from normalised pixels and the patch size.
        position_table: the state-dict name of a learned position table (None: rotary positions).
        default_side: the input side the config is built for (the default ``image_size``).
        has_cls: a CLS token leads the sequence (SigLIP has none).
        register_attr: the config attribute counting register tokens, if any.
    """

    model_class: str
    blocks: str
    final_norm: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    inputs: Callable[[torch.Tensor, int], dict] = interpolated_inputs
    position_table: str | None = "embeddings.position_embedding.weight"
    default_side: Callable[[object], int] = image_size_side
    has_cls: bool = True
    interpolation: str = "bicubic"
    resize: str = "crop"
    register_attr: str | None = None


CLIP = HfFamily("CLIPVisionModel", "encoder.layers", "post_layernorm", CLIP_MEAN, CLIP_STD)
DINOV2 = HfFamily(
    "Dinov2Model", "encoder.layer", "layernorm", IMAGENET_MEAN, IMAGENET_STD, inputs=pixel_inputs,
    position_table="embeddings.position_embeddings",
)  # fmt: skip
DINOV2_REG = HfFamily(
    "Dinov2WithRegistersModel", "encoder.layer", "layernorm", IMAGENET_MEAN, IMAGENET_STD,
    inputs=pixel_inputs, position_table="embeddings.position_embeddings", register_attr="num_register_tokens",
)  # fmt: skip
DINOV3 = HfFamily(
    "DINOv3ViTModel", "model.layer", "norm", IMAGENET_MEAN, IMAGENET_STD, inputs=pixel_inputs,
    position_table=None, interpolation="bilinear", resize="squash", register_attr="num_register_tokens",
)  # fmt: skip
SIGLIP = HfFamily(
    "SiglipVisionModel", "encoder.layers", "post_layernorm", HALF, HALF,
    has_cls=False, interpolation="bilinear", resize="squash",
)  # fmt: skip
SIGLIP2 = HfFamily(
    "Siglip2VisionModel", "encoder.layers", "post_layernorm", HALF, HALF, inputs=patch_inputs,
    default_side=patch_count_side, has_cls=False, interpolation="bilinear", resize="squash",
)  # fmt: skip
# model_type of a config -> family; the full two-tower types read their vision_config
FAMILIES: dict[str, HfFamily] = {
    "clip_vision_model": CLIP,
    "clip": CLIP,
    "dinov2": DINOV2,
    "dinov2_with_registers": DINOV2_REG,
    "dinov3_vit": DINOV3,
    "siglip_vision_model": SIGLIP,
    "siglip": SIGLIP,
    "siglip2_vision_model": SIGLIP2,
    "siglip2": SIGLIP2,
}
# prefixes that wrap a vision tower inside a larger checkpoint (CLIPModel, heads on top of DINOv2)
TOWER_PREFIXES = ("vision_model.", "dinov2.", "model.")


def _attr(module: nn.Module, dotted: str) -> Any:
    """The attribute at the ``dotted`` path: a submodule, a module list or a parameter, by path."""
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


def _core(model: nn.Module) -> nn.Module:
    """The module holding embeddings, encoder and norms (older releases wrap it in ``vision_model``)."""
    return getattr(model, "vision_model", model)


def cut_layers(model: nn.Module, family: HfFamily, last: int) -> None:
    """Cut the model's layer list after layer ``last``: the layers after it are dropped."""
    parent, name = family.blocks.rsplit(".", 1)
    holder = _attr(_core(model), parent)
    setattr(holder, name, getattr(holder, name)[: last + 1])


class TransformersEncoder(Encoder):
    """A Hugging Face vision tower, cut after its deepest hooked layer, read from its hidden states.

    Positions follow the input grid, non-square included: the model resamples its own table
    (``interpolate_pos_encoding`` for CLIP and SigLIP; DINOv2 always; SigLIP2 from the grid it is
    given) or uses rotary positions (DINOv3).
    """

    def __init__(self, spec: EncoderSpec, model: nn.Module, *, family: HfFamily, **settings) -> None:
        super().__init__(spec, model, **settings)
        self.family = family
        cut_layers(model, family, max(self.layer_indices))

    def read_layers(self, pixels: torch.Tensor) -> list[LayerTokens]:
        hidden = self.model(
            **self.family.inputs(pixels, self.stride), output_hidden_states=True
        ).hidden_states
        final_norm = _attr(_core(self.model), self.family.final_norm)
        grid_h, grid_w = (size // self.stride for size in pixels.shape[-2:])
        layers = []
        for index in sorted(self.layer_indices):
            tokens = hidden[index + 1]  # hidden[0] is the embedding output
            if self.spec.hooks.norm == "post":
                tokens = final_norm(tokens)
            patches = tokens[:, self.num_prefix_tokens :]
            grid = patches.reshape(patches.shape[0], grid_h, grid_w, patches.shape[-1])
            layers.append(LayerTokens(grid, tokens[:, : self.num_prefix_tokens]))
        return layers


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
        config = folder / "config.json"
        if not config.is_file():
            raise ValueError(f"EncoderSpec.model={spec.model!r} is a folder without config.json")
        try:
            return transformers.AutoConfig.from_pretrained(str(folder)), folder
        except (OSError, ValueError) as error:  # not JSON, or no model_type transformers knows
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ValueError(
                f"EncoderSpec.model={spec.model!r}: {config} is not a Hugging Face model config ({reason}); "
                f"accepted: the config.json of a vision model of type {', '.join(FAMILIES)}"
            ) from None
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


def vision_config_of(config, spec: EncoderSpec) -> tuple[Any, HfFamily]:
    """The vision part of ``config`` with ``spec.model_kwargs`` applied, and its family.

    Raises:
        ValueError: an unsupported model type, a model_kwargs key the config lacks, or a width the
            attention heads do not divide.
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
    heads = getattr(vision, "num_attention_heads", None)
    if heads and vision.hidden_size % heads:
        raise ValueError(
            f"EncoderSpec.model_kwargs={spec.model_kwargs} give {type(vision).__name__} hidden_size "
            f"{vision.hidden_size} and num_attention_heads {heads} ({spec.model!r}); accepted: a hidden_size "
            "that num_attention_heads divides"
        )
    sized_in_pixels = hasattr(vision, "image_size")  # SigLIP2 counts patches; its table is resampled anyway
    built_in_code = spec.model in FAMILIES
    size = spec.image_hw
    if (
        built_in_code
        and sized_in_pixels
        and size is not None
        and "image_size" not in (spec.model_kwargs or {})
    ):
        # a config built in code gets a position table of the input size (HF tables are square)
        vision.image_size = max(size)
    return vision, family


# -- weights ------------------------------------------------------------------------------------
def fit_keys(state_dict: dict[str, torch.Tensor], model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """Strip tower prefixes (``vision_model.`` of a CLIPModel / SiglipModel checkpoint, ``dinov2.``
    of a classifier), then rename the keys the model lacks with transformers' own table of checkpoint
    renamings (older releases' DINOv2 attention names, DINOv3's hub layout without ``model.``)."""
    expected = set(model.state_dict())
    for prefix in TOWER_PREFIXES:
        if not any(k in expected for k in state_dict) and any(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    fitted = {}
    for key, value in state_dict.items():
        if key not in expected:
            for renaming in renamings:
                key = renaming.rename_source_key(key)[0]
            gate = key.replace(".mlp.weights_in.", ".mlp.gate_proj.")
            if ".mlp.weights_in." in key and gate in expected:
                # the fused SwiGLU input of DINOv2 giant, which the table converts, not renames
                up = key.replace(".mlp.weights_in.", ".mlp.up_proj.")
                fitted[gate], fitted[up] = value.chunk(2, dim=0)
                continue
        fitted[key] = value
    return fitted


def resample_position_table(state_dict: dict, model: nn.Module, family: HfFamily) -> dict:
    """Resample a checkpoint's position table made for another image_size to the model's."""
    if family.position_table is None:  # rotary positions: nothing sized to resample
        return state_dict
    table = _attr(_core(model), family.position_table)
    prefix = 1 if family.has_cls else 0
    key = next((k for k in state_dict if k.endswith(family.position_table)), None)
    if key is None or state_dict[key].shape == table.shape or state_dict[key].shape[-1] != table.shape[-1]:
        return state_dict
    side = round((table.shape[-2] - prefix) ** 0.5)
    pos = state_dict[key]
    batched = pos if pos.ndim == 3 else pos[None]
    # bicubic without antialias: what Hugging Face's interpolate_pos_encoding does at run time
    resampled = resample_abs_pos_embed(batched, [side, side], num_prefix_tokens=prefix, antialias=False)
    return {**state_dict, key: resampled if pos.ndim == 3 else resampled[0]}


def load_hf_checkpoint(model: PreTrainedModel, family: HfFamily, path, what: str) -> None:
    """Load a checkpoint file or model folder (Hugging Face layout, also a whole CLIPModel /
    SiglipModel) into a vision tower, strictly.

    Raises:
        FileNotFoundError: nothing at ``path``.
        ValueError: unreadable file, or a checkpoint of another architecture.
    """
    state_dict = fit_keys(read_state_dict(path), model)
    load_checked(model, resample_position_table(state_dict, model, family), str(path), what)


def _as_hw(size) -> tuple[int, int] | None:
    """An image processor's size entry (an int, ``{"height", "width"}``, ``{"shortest_edge"}``) as (h, w)."""
    if isinstance(size, dict):
        size = (size["height"], size["width"]) if "height" in size else size.get("shortest_edge")
    if isinstance(size, int):
        return size, size
    return tuple(size) if size else None


def preprocessing_of(
    family: HfFamily, vision, source: Path | str | None, image_size: tuple[int, int] | None
) -> Preprocessing:
    """The image processor's mean / std / resampling / size when its config is at hand, else the
    family's. A processor that resizes the shortest edge then centre-crops (DINOv2: 256 then 224)
    gives its ratio as ``crop_pct``."""
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
    size = processor.get("size")
    crop = _as_hw(processor.get("crop_size")) if processor.get("do_center_crop", True) else None
    edge = size.get("shortest_edge") if isinstance(size, dict) else None
    side = family.default_side(vision)
    return Preprocessing(
        image_size=image_size or crop or _as_hw(size) or (side, side),
        mean=as_rgb(processor.get("image_mean", family.mean)),
        std=as_rgb(processor.get("image_std", family.std)),
        interpolation=PIL_RESAMPLE.get(processor.get("resample"), family.interpolation),
        resize=family.resize,
        crop_pct=min(1.0, min(crop) / edge) if crop and edge else 1.0,
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
    ``dinov2``, ``dinov2_with_registers``, ``dinov3_vit``, ``siglip_vision_model``,
    ``siglip2_vision_model``) whose config is built in code. ``spec.weights``: None (the model
    folder's or repo's own weights), a local checkpoint file or folder, a hub repo id, or
    ``"random"``. ``spec.model_kwargs`` override config attributes (``num_hidden_layers``,
    ``hidden_size``, ...). ``spec.image_size`` is the input size; the position table keeps the
    checkpoint's size and is interpolated to the input grid.

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
    patch = int(patch[0] if isinstance(patch, (list, tuple)) else patch)
    depth = len(_attr(_core(model), family.blocks))
    registers = getattr(vision, family.register_attr, 0) if family.register_attr else 0
    return TransformersEncoder(
        spec,
        model,
        family=family,
        layers=[LayerInfo(vision.hidden_size, patch)] * depth,
        num_prefix_tokens=int(family.has_cls) + int(registers),
        preprocessing=preprocessing_of(family, vision, source, spec.image_hw),
        weights_loaded=weights_loaded,
    )
