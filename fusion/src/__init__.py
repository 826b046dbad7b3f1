"""encoder-fusion: multi-layer CLIP + DINOv2 feature fusion for vision-language models."""

from encoder_fusion.encoders.base import EncoderSpec
from encoder_fusion.geometry import EncoderGeometry
from encoder_fusion.head import FusionHead
from encoder_fusion.hooks import HookSpec
from encoder_fusion.model import FusedEncoder

__all__ = ["EncoderGeometry", "EncoderSpec", "FusedEncoder", "FusionHead", "HookSpec"]
