"""encoder-fusion: multi-layer CLIP + DINOv2 feature fusion for vision-language models."""

from fusion.encoders.base import EncoderSpec
from fusion.hooks import HookSpec

__all__ = ["EncoderSpec", "HookSpec"]
