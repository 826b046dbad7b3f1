"""encoder-fusion: multi-layer CLIP + DINOv2 feature fusion for vision-language models."""

# fusion.multilayer registers the layer merges of the newer methods (Dense Connector, MMFuser)
# beside those of fusion.merge; importing it here completes the registry for every user of fusion.
from fusion import multilayer  # noqa: F401
from fusion.encoders.base import EncoderSpec
from fusion.hooks import HookSpec
from fusion.model import EncoderGeometry, FusedEncoder, FusionHead

__all__ = ["EncoderGeometry", "EncoderSpec", "FusedEncoder", "FusionHead", "HookSpec"]
