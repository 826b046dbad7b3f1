"""The transformers models: the fused encoder as a vision model, and the LLaVA-family VLM it feeds.

:class:`FusedLlavaForConditionalGeneration` is :class:`~transformers.LlavaForConditionalGeneration`
with two changes, both forced by the fused grid:

* the vision tower is a :class:`FusedEncoderModel`, whose own connector is the projector, so the
  model has no ``multi_modal_projector``: the image features are ``FusedEncoder(images)`` itself;
* DeepStack token sets (``deepstack_layers``) are added to the hidden states of the first decoder
  layers at the image positions during the prefill, as Qwen3-VL's text model takes them.

Everything else (the placeholder scatter, the cache, ``generate``, the loss, saving, tied
embeddings) is LLaVA's own code. The frozen backbones are saved with the model: a saved folder
holds every tensor, so loading it needs neither the hub nor the checkpoints the encoders were
built from.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar, cast

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    LlavaForConditionalGeneration,
    LlavaModel,
    PreTrainedConfig,
    PreTrainedModel,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava.modeling_llava import LlavaPreTrainedModel

from encoder_fusion.encoders.weights import RANDOM_WEIGHTS
from encoder_fusion.hf.configuration import FusedEncoderConfig, FusedLlavaConfig
from encoder_fusion.model import FusedEncoder


def architecture_only(fused_config: dict[str, Any]) -> dict[str, Any]:
    """``fused_config`` with every encoder built on random weights: the architecture a saved folder's
    tensors are loaded into (so no checkpoint the encoders first came from is needed)."""
    config = copy.deepcopy(fused_config)
    config["encoders"] = [{**spec, "weights": RANDOM_WEIGHTS} for spec in config["encoders"]]
    return config


def persist_buffers(module: nn.Module) -> None:
    """Make every buffer of ``module`` persistent, so a saved folder holds it.

    transformers builds a model on the meta device before loading its tensors and leaves
    non-persistent buffers uninitialised unless the model's own init recomputes them. The
    backbones' buffers (pixel mean and std, attention masks, rotary tables) are each library's
    own, so they are saved with the weights instead.
    """
    for submodule in module.modules():
        submodule._non_persistent_buffers_set.clear()


class FusedEncoderModel(PreTrainedModel):
    """A :class:`~encoder_fusion.FusedEncoder` as a transformers model: raw images in
    (``pixel_values``: (B, 3, H, W), uint8 or float in [0, 1]; every encoder resizes and normalises
    them its own way), fused tokens out.

    Attributes:
        fused: the :class:`~encoder_fusion.FusedEncoder`.
    """

    config_class = FusedEncoderConfig
    config: FusedEncoderConfig
    base_model_prefix = "fused"
    main_input_name = "pixel_values"
    input_modalities: ClassVar[Any] = ("image",)

    def __init__(self, config: FusedEncoderConfig, fused: FusedEncoder | None = None) -> None:
        super().__init__(config)
        if fused is None:
            if not config.fused:
                raise ValueError(
                    "FusedEncoderConfig.fused is empty; accepted: a FusedEncoder.config dict "
                    "(build the config with FusedEncoderConfig.of(fused))"
                )
            fused = FusedEncoder.from_config(architecture_only(config.fused))
        persist_buffers(fused)
        self.fused = fused
        self.post_init()

    @classmethod
    def config_of(cls, fused: FusedEncoder) -> FusedEncoderConfig:
        """The configuration that rebuilds ``fused``'s architecture."""
        return FusedEncoderConfig(
            fused=fused.config,
            encoder_weights=fused.weights_status(),
            hidden_size=fused.head.out_dim,
            # the count for images of the processor's default size (build_processor)
            output_tokens=fused.output_tokens(fused.image_size),
        )

    def _init_weights(self, module: nn.Module) -> None:
        # the encoders come initialised (or loaded) by their own libraries and the head by its own
        # constructors; a saved folder's tensors overwrite both
        return None

    def forward(
        self, pixel_values: torch.Tensor | list[torch.Tensor], **kwargs: Any
    ) -> BaseModelOutputWithPooling:
        """The fused tokens as ``last_hidden_state`` (B, output_tokens, hidden_size) and, per image,
        as ``pooler_output`` (a list of (output_tokens, hidden_size)); the DeepStack token sets, each
        like ``last_hidden_state``, as ``hidden_states`` (empty without ``deepstack_layers``).

        A list of (3, H, W) images (a model tiled with ``grid="auto"``, each image its own grid) gives
        each image's own count: ``last_hidden_state`` and each set then hold the images' tokens one
        after another, (1, total, hidden_size)."""
        tokens, extras = self.fused.forward_deepstack(pixel_values)
        if isinstance(tokens, list):
            return BaseModelOutputWithPooling(
                last_hidden_state=torch.cat(tokens)[None],
                pooler_output=cast(Any, tokens),
                hidden_states=tuple(torch.cat(extra)[None] for extra in extras),
            )
        # LLaVA's forward concatenates pooler_output, a list of per-image features
        pooler = cast(Any, list(tokens))
        return BaseModelOutputWithPooling(
            last_hidden_state=tokens, pooler_output=pooler, hidden_states=tuple(extras)
        )


@contextlib.contextmanager
def deepstack_hooks(
    layers: Sequence[nn.Module], extras: Sequence[torch.Tensor], mask: torch.Tensor
) -> Iterator[None]:
    """While open, decoder layer ``k`` adds DeepStack set ``k`` (flattened over the images, in
    placeholder order) to its output hidden states at the image positions ``mask`` (B, L)."""

    def add(extra: torch.Tensor, module: nn.Module, args: tuple, output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output
        if hidden.shape[1] != mask.shape[1]:  # a decode step: no image positions
            return output
        added = torch.zeros_like(hidden).masked_scatter(mask.unsqueeze(-1), extra.to(hidden.dtype))
        hidden = hidden + added
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handles = [
        layer.register_forward_hook(functools.partial(add, extra)) for layer, extra in zip(layers, extras)
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class FusedLlavaModel(LlavaModel):
    """:class:`~transformers.LlavaModel` whose vision tower is a :class:`FusedEncoderModel` and whose
    projector is the fused encoder's own connector (see the module docstring)."""

    config_class = FusedLlavaConfig
    config: FusedLlavaConfig

    def __init__(self, config: FusedLlavaConfig) -> None:
        LlavaPreTrainedModel.__init__(self, config)
        check_widths(config.fused_config.hidden_size, config.language_config.hidden_size)
        self.vision_tower = FusedEncoderModel(config.fused_config)
        self.language_model = AutoModel.from_config(config.language_config)
        self.post_init()

    @property
    def fused(self) -> FusedEncoder:
        """The :class:`~encoder_fusion.FusedEncoder` of the vision tower."""
        return cast(FusedEncoderModel, self.vision_tower).fused

    def get_image_features(
        self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None, **kwargs: Any
    ) -> BaseModelOutputWithPooling:
        """``FusedEncoder(pixel_values)``: per image (output_tokens, hidden) in ``pooler_output``, the
        DeepStack sets in ``hidden_states``. With ``image_sizes`` (B, 2), each padded image is first
        cut back to its own size. LLaVA's layer-selection arguments do not apply."""
        if image_sizes is None:
            return self.vision_tower(pixel_values)
        return self.vision_tower(unpadded(pixel_values, image_sizes))

    def get_placeholder_mask(
        self, input_ids: torch.LongTensor, inputs_embeds: torch.Tensor, image_features: torch.Tensor
    ) -> torch.Tensor:
        """LLaVA's mask of the image positions, with an error that says what to fix."""
        if input_ids is None:
            image_embedding = self.get_input_embeddings()(
                torch.tensor(self.config.image_token_id, device=inputs_embeds.device)
            )
            mask = (inputs_embeds == image_embedding).all(-1)
        else:
            mask = input_ids == self.config.image_token_id
        placeholders, features = int(mask.sum()), image_features.shape[0]
        if placeholders != features:
            per_image = self.config.fused_config.output_tokens
            raise ValueError(
                f"the prompts hold {placeholders} image placeholder token(s) "
                f"(id {self.config.image_token_id}) "
                f"for {features // per_image} image(s) of {per_image} tokens each; accepted: exactly "
                f"{features}, one run of {per_image} per image, as build_processor(...) writes them "
                "(a processor whose image_token_id differs from this model's writes none)"
            )
        return mask.unsqueeze(-1)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        **kwargs: Any,
    ):
        """LLaVA's forward, after checking the prompt length and with the DeepStack sets of the images
        added to the first decoder layers during the prefill."""
        self.check_positions(input_ids if input_ids is not None else inputs_embeds, kwargs)
        image_sizes = kwargs.pop("image_sizes", None)
        if pixel_values is not None and mm_encoder_outputs is None:
            images = pixel_values if image_sizes is None else unpadded(pixel_values, image_sizes)
            if input_ids is not None:
                self.check_images(input_ids, images)
            mm_encoder_outputs = {"image": self.vision_tower(images)}
        extras = () if mm_encoder_outputs is None else mm_encoder_outputs["image"].hidden_states or ()
        if not extras:
            return super().forward(
                input_ids=input_ids,
                inputs_embeds=inputs_embeds,
                mm_encoder_outputs=mm_encoder_outputs,
                **kwargs,
            )
        layers = cast(Sequence[nn.Module], self.language_model.layers)
        if len(extras) > len(layers):
            raise ValueError(
                f"{len(extras)} DeepStack token sets need as many decoder layers, but the language model "
                f"has {len(layers)}; accepted: at most {len(layers)} deepstack_layers entries"
            )
        if input_ids is None:
            raise ValueError(
                "DeepStack token sets need input_ids to find the image positions; got inputs_embeds"
            )
        mask = input_ids == self.config.image_token_id
        flat = [extra.reshape(-1, extra.shape[-1]) for extra in extras]
        with deepstack_hooks(layers, flat, mask):
            return super().forward(
                input_ids=input_ids,
                inputs_embeds=inputs_embeds,
                mm_encoder_outputs=mm_encoder_outputs,
                **kwargs,
            )

    def check_images(self, input_ids: torch.Tensor, images: torch.Tensor | list[torch.Tensor]) -> None:
        """Before any encoder runs: the placeholders must be ``output_tokens`` per image given (a
        batch, or a list of images of their own sizes), each image's own count.
        (:meth:`get_placeholder_mask` checks them against the features themselves, which precomputed
        ``mm_encoder_outputs`` may hold in any count.)

        Raises:
            ValueError: naming both counts.
        """
        placeholders = int((input_ids == self.config.image_token_id).sum())
        # the count for an image of its size (a tiled model's "auto" grid follows it)
        counts = [self.fused.output_tokens(tuple(image.shape[-2:])) for image in images]
        if placeholders != sum(counts):
            shown = f"of {counts[0]} tokens each" if len(set(counts)) == 1 else f"of {counts} tokens"
            raise ValueError(
                f"{len(counts)} image(s) {shown} were given, but the prompts hold "
                f"{placeholders} image placeholder token(s) (id {self.config.image_token_id}); accepted: "
                f"{sum(counts)}, "
                "as build_processor(...) expands each <image> (check that its image_token_id is this model's "
                "config.image_token_id)"
            )

    def check_positions(self, inputs: torch.Tensor | None, kwargs: dict) -> None:
        """A prompt (after the cached positions) longer than the language model's positions raises a
        ValueError naming both lengths, before any encoder runs."""
        limit = getattr(self.config.language_config, "max_position_embeddings", None)
        if inputs is None or limit is None:
            return
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        cached = cache.get_seq_length() if cache is not None else 0
        length = cached + inputs.shape[1]
        if length > limit:
            raise ValueError(
                f"the prompt is {length} tokens long (image placeholders included"
                f"{', after the cache' if cached else ''}), "
                f"but the language model has {limit} positions (text_config.max_position_embeddings); "
                f"accepted: at most {limit} tokens"
            )


def unpadded(pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> list[torch.Tensor]:
    """Each image of a padded (B, 3, H, W) batch cut back to its own ``image_sizes`` row (height, width).

    Raises:
        ValueError: ``image_sizes`` not (B, 2), or a size beyond the padded batch's.
    """
    batch, _, height, width = pixel_values.shape
    if tuple(image_sizes.shape) != (batch, 2):
        raise ValueError(
            f"image_sizes must be (B, 2) = ({batch}, 2) for {batch} image(s), got {tuple(image_sizes.shape)}"
        )
    sizes = [(int(h), int(w)) for h, w in image_sizes.tolist()]
    if not all(0 < h <= height and 0 < w <= width for h, w in sizes):
        raise ValueError(
            f"image_sizes {sizes} must lie within the padded images' {height}x{width}; accepted: the "
            "processor's image_sizes for these pixel_values"
        )
    return [image[:, :h, :w] for image, (h, w) in zip(pixel_values, sizes)]


def check_widths(vision: int, text: int) -> None:
    """The fused tokens (``vision`` wide) must be as wide as the language model's hidden states.

    Raises:
        ValueError: naming both widths and the connector's ``out_dim`` to set.
    """
    if vision != text:
        raise ValueError(
            f"the fused encoder's tokens are {vision} wide but the language model's hidden size is {text}; "
            f"accepted: a connector with out_dim={text} (e.g. connector={{'kind': 'mlp', 'out_dim': {text}}})"
        )


class FusedLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """:class:`~transformers.LlavaForConditionalGeneration` around a :class:`FusedLlavaModel`: LLaVA's
    language-model head, loss and ``generate``, with the fused encoder's tokens as image features."""

    config_class = FusedLlavaConfig
    config: FusedLlavaConfig

    def __init__(self, config: FusedLlavaConfig) -> None:
        LlavaPreTrainedModel.__init__(self, config)
        self.model = FusedLlavaModel(config)
        text = config.language_config
        self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        self.post_init()

    @property
    def fused(self) -> FusedEncoder:
        """The :class:`~encoder_fusion.FusedEncoder` of the vision tower."""
        return cast(FusedLlavaModel, self.model).fused

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any):
        """transformers' ``from_pretrained``, refusing a folder of another architecture before any
        weight is read (transformers would only warn, then fail on the first mismatch).

        Raises:
            ValueError: the folder's ``model_type`` is not ``fused_llava``, naming it.
        """
        config = kwargs.get("config")
        if not isinstance(config, PreTrainedConfig):
            config = AutoConfig.from_pretrained(pretrained_model_name_or_path, **hub_kwargs(kwargs))
        if not isinstance(config, FusedLlavaConfig):
            raise ValueError(
                f"{pretrained_model_name_or_path} holds a {config.model_type!r} model, not a fused VLM; "
                f"accepted: a folder written by {cls.__name__}.save_pretrained "
                f"(model_type {FusedLlavaConfig.model_type!r}); "
                "build one from a language model with encoder_fusion.hf.build_vlm"
            )
        return super().from_pretrained(pretrained_model_name_or_path, *args, **{**kwargs, "config": config})


def hub_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of ``from_pretrained`` that say where and how to find a folder."""
    keys = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")
    return {key: kwargs[key] for key in keys if key in kwargs}
