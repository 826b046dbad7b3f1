"""encoder-fusion: multi-layer CLIP + DINOv2 feature fusion for vision-language models."""

from fusion.encoders.base import EncoderSpec
from fusion.hooks import HookSpec
from fusion.model import EncoderGeometry, FusedEncoder, FusionHead

__all__ = ["EncoderGeometry", "EncoderSpec", "FusedEncoder", "FusionHead", "HookSpec"]
