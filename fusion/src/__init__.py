"""encoder-fusion: multi-layer CLIP + DINOv2 feature fusion for vision-language models."""

# encoder_fusion.multilayer registers the layer merges of the newer methods (Dense Connector, MMFuser)
# beside those of encoder_fusion.merge; importing it here completes the registry for every user of fusion.
from encoder_fusion import multilayer  # noqa: F401
from encoder_fusion.encoders.base import EncoderSpec
from encoder_fusion.geometry import EncoderGeometry
from encoder_fusion.head import FusionHead
from encoder_fusion.hooks import HookSpec
from encoder_fusion.model import FusedEncoder

__all__ = ["EncoderGeometry", "EncoderSpec", "FusedEncoder", "FusionHead", "HookSpec"]
