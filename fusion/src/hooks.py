"""Which layers of an encoder to read, and how: the declarative hook specification."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

NORMS = ("pre", "post")
PREFIX_POLICIES = ("drop", "keep")


@dataclass(frozen=True)
class HookSpec:
    """Layers to read from one encoder.

    Args:
        layers: block indices (stage indices for a ConvNeXt); negatives count from the end (-1 is
            the last block, -2 the penultimate one that LLaVA and Prismatic read).
        norm: ``"pre"`` returns the raw block output; ``"post"`` applies the model's final norm to
            each hooked layer (timm ``norm=True``, open_clip ``normalize_intermediates``).
        prefix: ``"drop"`` discards CLS and register tokens; ``"keep"`` returns them beside the grid.

    Raises:
        ValueError: empty or non-integer ``layers``, duplicated layers, unknown ``norm`` or ``prefix``.
    """

    layers: tuple[int, ...] = (-1,)
    norm: str = "pre"
    prefix: str = "drop"

    def __post_init__(self) -> None:
        layers = self.layers
        if isinstance(layers, int) or not isinstance(layers, Sequence) or isinstance(layers, str):
            raise ValueError(f"HookSpec.layers must be a list of block indices, got {layers!r}")
        if len(layers) == 0:
            raise ValueError("HookSpec.layers is empty; give at least one block index, e.g. [-2]")
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
            raise ValueError(f"HookSpec.layers must hold integers, got {list(layers)!r}")
        object.__setattr__(self, "layers", tuple(int(i) for i in layers))
        if self.norm not in NORMS:
            raise ValueError(f"HookSpec.norm={self.norm!r} is unknown; accepted: {', '.join(NORMS)}")
        if self.prefix not in PREFIX_POLICIES:
            raise ValueError(
                f"HookSpec.prefix={self.prefix!r} is unknown; accepted: {', '.join(PREFIX_POLICIES)}"
            )

    def resolve(self, depth: int, encoder: str = "encoder", unit: str = "blocks") -> tuple[int, ...]:
        """Return the hooked layer indices as non-negative integers, in the order given.

        Args:
            depth: how many layers the encoder has.
            encoder: its name, for messages.
            unit: what its layers are (``"blocks"``; ``"stages"`` for a ConvNeXt), for messages.

        Raises:
            ValueError: more layers than the encoder has, an index outside ``[-depth, depth)``, or
                two entries naming one layer.
        """
        if len(self.layers) > depth:
            raise ValueError(
                f"HookSpec.layers {list(self.layers)} hooks {len(self.layers)} layers but encoder "
                f"{encoder!r} has {depth} {unit}; accepted: at most {depth} distinct indices in "
                f"{-depth}..{depth - 1}"
            )
        resolved = []
        for index in self.layers:
            if not -depth <= index < depth:
                raise ValueError(
                    f"HookSpec.layers index {index} is out of range for encoder {encoder!r} of depth "
                    f"{depth} ({depth} {unit}); accepted: {-depth}..{depth - 1}"
                )
            resolved.append(index % depth)
        if len(set(resolved)) != len(resolved):
            raise ValueError(
                f"HookSpec.layers {list(self.layers)} name the same layer twice for encoder {encoder!r} "
                f"(depth {depth}: resolved to {resolved})"
            )
        return tuple(resolved)

    @classmethod
    def from_any(cls, value: HookSpec | dict | None) -> HookSpec:
        """Build from a HookSpec, a mapping of its fields (a config node) or None (the default)."""
        if value is None:
            return cls()
        if isinstance(value, HookSpec):
            return value
        if hasattr(value, "items"):
            data = dict(value.items())
            unknown = sorted(set(data) - set(cls.__dataclass_fields__))
            if unknown:
                raise ValueError(f"HookSpec got unknown field(s) {unknown}; accepted: layers, norm, prefix")
            if "layers" in data:
                data["layers"] = list(data["layers"])
            return cls(**data)
        raise ValueError(f"hooks must be a HookSpec or a mapping, got {type(value).__name__}")
