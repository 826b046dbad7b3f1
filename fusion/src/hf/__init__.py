"""The fused encoder inside a transformers vision-language model.

Importing this package registers the classes with transformers' Auto classes, so that
``AutoConfig``, ``AutoModel``, ``AutoModelForImageTextToText``, ``AutoImageProcessor`` and
``AutoProcessor`` load a saved folder. :func:`build_vlm` puts a :class:`~encoder_fusion.FusedEncoder`
and a causal language model into :class:`FusedLlavaForConditionalGeneration` (LLaVA's own model
with the fused encoder as its vision tower and projector); :func:`build_processor` gives the
processor that expands each ``<image>`` to the fused encoder's token count.
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageTextToText,
    AutoProcessor,
)

from encoder_fusion.hf.build import build_processor, build_vlm
from encoder_fusion.hf.configuration import FusedEncoderConfig, FusedLlavaConfig
from encoder_fusion.hf.modeling import FusedEncoderModel, FusedLlavaForConditionalGeneration, FusedLlavaModel
from encoder_fusion.hf.processing import FusedImageProcessor, FusedLlavaProcessor

AutoConfig.register(FusedEncoderConfig.model_type, FusedEncoderConfig, exist_ok=True)
AutoConfig.register(FusedLlavaConfig.model_type, FusedLlavaConfig, exist_ok=True)
AutoModel.register(FusedEncoderConfig, FusedEncoderModel, exist_ok=True)
AutoModel.register(FusedLlavaConfig, FusedLlavaModel, exist_ok=True)
AutoModelForImageTextToText.register(FusedLlavaConfig, FusedLlavaForConditionalGeneration, exist_ok=True)
AutoImageProcessor.register(
    FusedLlavaConfig, image_processor_classes={"torchvision": FusedImageProcessor}, exist_ok=True
)
AutoProcessor.register(FusedLlavaConfig, FusedLlavaProcessor, exist_ok=True)

__all__ = [
    "FusedEncoderConfig",
    "FusedEncoderModel",
    "FusedImageProcessor",
    "FusedLlavaConfig",
    "FusedLlavaForConditionalGeneration",
    "FusedLlavaModel",
    "FusedLlavaProcessor",
    "build_processor",
    "build_vlm",
]
