"""EncoderGeometry: what the trainable parts of a fused encoder know of one encoder, so that they
can be built and trained on cached features without the encoder itself."""

from __future__ import annotations

import dataclasses

from encoder_fusion.encoders import Encoder
from encoder_fusion.encoders.base import as_hw


@dataclasses.dataclass(frozen=True)
class EncoderGeometry:
    """What the trainable head needs to know of one encoder.

    Args:
        name: the encoder's label (unique within a head).
        width: channels of its hooked layers.
        grid: its token grid (h, w).
        num_layers: how many layers it hooks.
        layers: the hooked block indices as its ``HookSpec.layers`` writes them (what
            ``deepstack_layers`` names); None when not known.

    Raises:
        ValueError: an empty name, a non-positive width or layer count, a malformed grid, or
            ``layers`` that are not ``num_layers`` ints.
    """

    name: str
    width: int
    grid: tuple[int, int]
    num_layers: int
    layers: tuple[int, ...] | None = None

    @classmethod
    def of(cls, encoder: Encoder) -> EncoderGeometry:
        """The geometry of a built encoder."""
        spec = encoder.spec
        return cls(
            spec.name, encoder.width, encoder.grid_size(), len(encoder.layer_indices), spec.hooks.layers
        )

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"EncoderGeometry.name must be a non-empty string, got {self.name!r}")
        for field in ("width", "num_layers"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(
                    f"EncoderGeometry.{field} of encoder {self.name!r} must be a positive int, got {value!r}"
                )
        object.__setattr__(self, "grid", as_hw(self.grid, f"EncoderGeometry.grid of encoder {self.name!r}"))
        if self.layers is not None:
            layers = tuple(self.layers)
            if len(layers) != self.num_layers or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in layers
            ):
                raise ValueError(
                    f"EncoderGeometry.layers of encoder {self.name!r} must be {self.num_layers} block "
                    f"indices (num_layers), got {self.layers!r}"
                )
            object.__setattr__(self, "layers", layers)
