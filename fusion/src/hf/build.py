"""Building the VLM and its processor from a :class:`~encoder_fusion.FusedEncoder` and a language model."""

from __future__ import annotations

import copy
import os
from typing import Any, cast

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from encoder_fusion.hf.configuration import FusedLlavaConfig
from encoder_fusion.hf.modeling import FusedEncoderModel, FusedLlavaForConditionalGeneration, check_widths
from encoder_fusion.hf.processing import FusedImageProcessor, FusedLlavaProcessor
from encoder_fusion.model import FusedEncoder
from encoder_fusion.tiling import AUTO


def causal_lm(language_model: Any) -> PreTrainedModel:
    """A transformers causal LM from an instance, a configuration (random weights) or a folder / hub name.

    Raises:
        ValueError: anything else, naming its type and what is accepted.
    """
    if isinstance(language_model, PreTrainedModel):
        if language_model.get_output_embeddings() is None:
            raise ValueError(
                f"language_model is a {type(language_model).__name__}, which has no language-model head; "
                "accepted: a causal LM (AutoModelForCausalLM), its config, or its folder"
            )
        return language_model
    if isinstance(language_model, PreTrainedConfig):
        return AutoModelForCausalLM.from_config(language_model)
    if isinstance(language_model, (str, os.PathLike)):
        config = AutoConfig.from_pretrained(language_model)
        if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
            raise ValueError(
                f"language_model {language_model} holds a {config.model_type!r} model, not a causal LM; "
                "accepted: a folder or hub name of a causal LM (one AutoModelForCausalLM loads: qwen2, "
                "llama, ...)"
            )
        return AutoModelForCausalLM.from_pretrained(language_model, config=config)
    raise ValueError(
        f"language_model is a {type(language_model).__name__}; accepted: a transformers causal LM "
        "(AutoModelForCausalLM instance), a PreTrainedConfig, or a folder or hub name"
    )


def build_vlm(
    fused: FusedEncoder, language_model: Any, *, image_token_id: int | None = None
) -> FusedLlavaForConditionalGeneration:
    """A LLaVA-family transformers VLM whose image features are ``fused``'s tokens, the same weights.

    Args:
        fused: the fused encoder; its connector is the projector, so its ``out_dim`` must equal the
            language model's hidden size. Its modules are shared, not copied.
        language_model: a transformers causal LM (an instance, shared not copied; a config, built on
            random weights; or a folder or hub name).
        image_token_id: the token id of the image placeholder: pass the processor's
            (``build_processor(...).image_token_id``). An id one past the language model's
            embedding rows grows them by one row, as a tokenizer that gained ``<image>`` needs; None
            takes that id, which is the processor's whenever the tokenizer was as long as the
            embeddings.

    Raises:
        ValueError: ``fused`` is not a FusedEncoder, widths that differ, more DeepStack sets than
            decoder layers, an ``image_token_id`` past the next token, or a language model that is
            not a causal LM; each names the value and what is accepted.
    """
    if not isinstance(fused, FusedEncoder):
        raise ValueError(f"fused is a {type(fused).__name__}; accepted: an encoder_fusion.FusedEncoder")
    lm = causal_lm(language_model)
    text_config = lm.config.get_text_config()
    check_widths(fused.head.out_dim, text_config.hidden_size)  # before the language model changes
    sets, layers = len(fused.head.deepstack.entries), text_config.num_hidden_layers
    if sets > layers:
        raise ValueError(
            f"the fused encoder has {sets} DeepStack token sets but the language model only {layers} decoder "
            f"layers; accepted: at most {layers} deepstack_layers entries"
        )
    rows = cast(nn.Embedding, lm.get_input_embeddings()).num_embeddings
    if image_token_id is None:
        image_token_id = rows
    if not isinstance(image_token_id, int) or not 0 <= image_token_id <= rows:
        raise ValueError(
            f"image_token_id={image_token_id!r} is not a token of the language model nor the next one; "
            f"accepted: an int in [0, {rows}] ({rows} adds a token after the vocabulary), or None for {rows}"
        )
    if image_token_id == rows:
        lm.resize_token_embeddings(rows + 1, mean_resizing=False)
    config = FusedLlavaConfig(
        vision_config=FusedEncoderModel.config_of(fused),
        text_config=lm.config.get_text_config(),
        image_token_index=image_token_id,
        image_seq_length=fused.output_tokens(fused.image_size),
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
    )
    # built on the meta device (no memory, no init), then given the real parts
    with torch.device("meta"):
        vlm = FusedLlavaForConditionalGeneration(config)
    vlm.model.vision_tower = FusedEncoderModel(config.fused_config, fused=fused)
    vlm.model.language_model = lm.base_model
    vlm.lm_head = cast(nn.Linear, lm.get_output_embeddings())
    vlm.tie_weights()
    vlm.generation_config = copy.deepcopy(lm.generation_config)
    return vlm


def build_processor(
    fused: FusedEncoder,
    tokenizer: PreTrainedTokenizerBase,
    image_token: str = "<image>",
    *,
    size: int | tuple[int, int] | None = None,
) -> FusedLlavaProcessor:
    """A processor whose ``processor(images=[...], text=[...], return_tensors="pt")`` gives
    ``input_ids`` with each ``image_token`` expanded to ``fused.output_tokens()`` placeholders,
    ``attention_mask`` and ``pixel_values``.

    Args:
        fused: the fused encoder the images are for.
        tokenizer: the language model's tokenizer, changed in place: ``image_token`` is added as a
            special token when it lacks one, and it pads on the left, as batched generation needs.
        image_token: the placeholder written in prompts, one per image.
        size: the (height, width) every image is resized to before the encoders resize it their
            own way; default ``fused.image_size`` (the largest encoder input size, times a fixed
            tiling grid). Every image then has the same token count: ``fused.output_tokens(size)``.
            With ``grid="auto"``, each image is instead resized to the grid its own aspect ratio
            picks, and its ``image_token`` expands to that grid's count (``image_sizes`` in the
            batch says where each padded image ends).

    Raises:
        ValueError: ``fused`` is not a FusedEncoder, an empty ``image_token``, or a bad ``size``.
    """
    if not isinstance(fused, FusedEncoder):
        raise ValueError(f"fused is a {type(fused).__name__}; accepted: an encoder_fusion.FusedEncoder")
    if not isinstance(image_token, str) or not image_token:
        raise ValueError(f"image_token must be a non-empty string, got {image_token!r}")
    if size is None:
        size = fused.image_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    if not all(isinstance(side, int) and side > 0 for side in (height, width)):
        raise ValueError(f"size must be an int or (height, width) of ints > 0, got {size!r}")
    if image_token not in tokenizer.get_vocab():
        tokenizer.add_tokens([image_token], special_tokens=True)
    tokenizer.padding_side = "left"
    auto = fused.tiler is not None and fused.tiler.spec.grid == AUTO
    image_processor = FusedImageProcessor(
        size={"height": height, "width": width},
        tiling=fused.tiler.spec.as_dict() if auto and fused.tiler is not None else None,
        tile_size=fused.tile_size if auto else None,
    )
    return FusedLlavaProcessor(
        image_processor,
        tokenizer,
        image_token=image_token,
        image_tokens=fused.output_tokens((height, width)),
        tile_tokens=fused.head.output_tokens if auto else None,
    )
