"""encoder-fusion: multi-layer CLIP + DINOv2 feature fusion for vision-language models."""

from encoder_fusion.align import ALIGNERS
from encoder_fusion.combine import LAYER_COMBINES
from encoder_fusion.connector import CONNECTORS
from encoder_fusion.encoders.base import EncoderSpec
from encoder_fusion.geometry import EncoderGeometry
from encoder_fusion.head import FusionHead
from encoder_fusion.hooks import HookSpec
from encoder_fusion.merge import ENCODER_MERGES
from encoder_fusion.model import FusedEncoder


def strategies() -> dict[str, list[str]]:
    """Each strategy argument (``align``, ``layer_merge``, ``encoder_merge``, ``connector``) and the
    names it accepts, sorted: the choices an unknown name would list, without having to provoke one."""
    registries = (ALIGNERS, LAYER_COMBINES, ENCODER_MERGES, CONNECTORS)
    return {registry.what: sorted(registry.names()) for registry in registries}


__all__ = ["EncoderGeometry", "EncoderSpec", "FusedEncoder", "FusionHead", "HookSpec", "strategies"]
