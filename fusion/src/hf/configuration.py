"""The transformers configurations: the fused encoder as a vision model, and the LLaVA-family VLM whose
vision tower it is.

:class:`FusedEncoderConfig` holds the whole :attr:`FusedEncoder.config` (encoder specs, hooks,
strategies, connector); :class:`FusedLlavaConfig` is :class:`~transformers.LlavaConfig` with that
as its ``vision_config``. Both are plain JSON in a saved folder's ``config.json``.
"""

from __future__ import annotations

from typing import Any, ClassVar, cast

from transformers import AutoConfig, LlavaConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec


class FusedEncoderConfig(PreTrainedConfig):
    """A :class:`~encoder_fusion.FusedEncoder` as a transformers configuration.

    Args:
        fused: :attr:`FusedEncoder.config`, the plain dict :meth:`FusedEncoder.from_config` takes.
        encoder_weights: encoder name -> ``"pretrained"`` or ``"random"``: the weights the encoders
            held when the model was built, and so the weights a saved folder holds.
        hidden_size: the width of the fused tokens (the connector's ``out_dim``); a VLM checks it
            against its language model's.
        output_tokens: the number of tokens per image, which a processor expands ``<image>`` to.
    """

    model_type = "fused_encoder"
    base_config_key = "vision_config"

    fused: dict[str, Any] | None = None
    encoder_weights: dict[str, str] | None = None
    hidden_size: int = 0
    output_tokens: int = 0


class FusedLlavaConfig(LlavaConfig):
    """:class:`~transformers.LlavaConfig` with a :class:`FusedEncoderConfig` as ``vision_config``.

    The fused encoder's connector is the projector, so the LLaVA projector fields
    (``projector_hidden_act``, ``multimodal_projector_bias``, ``vision_feature_layer``,
    ``vision_feature_select_strategy``) are unused; ``image_seq_length`` is the fused encoder's
    ``output_tokens``.
    """

    model_type = "fused_llava"
    sub_configs_defaults: ClassVar[dict[str, SubConfigSpec]] = {
        "vision_config": SubConfigSpec(config_class=FusedEncoderConfig),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen2"),
    }

    @property
    def fused_config(self) -> FusedEncoderConfig:
        """``vision_config``, typed: the parent types it as any configuration or a dict."""
        return cast(FusedEncoderConfig, self.vision_config)

    @property
    def language_config(self) -> PreTrainedConfig:
        """``text_config``, typed."""
        return cast(PreTrainedConfig, self.text_config)
