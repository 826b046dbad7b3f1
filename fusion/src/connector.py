"""Connectors: project fused vision tokens (B, N, in_dim) to the language model's width (B, N, out_dim).

Configured by a mapping ``{"kind": ..., "out_dim": ..., "final_norm": false, **options}`` (or just
the kind's name, or None for ``identity``). Kinds:

- ``identity``: no parameters; ``out_dim`` must be absent or equal to ``in_dim``.
- ``linear``: one Linear (LLaVA-1's projector).
- ``mlp``: ``depth`` Linears with a GELU between each pair: LLaVA-1.5's ``mlp{depth}x_gelu``
  (``in -> out -> ... -> out``; ``depth=1`` is ``linear``).
- ``fused_gelu_mlp``: Prismatic's projector for fused backbones:
  ``in -> 4*in -> GELU -> out -> GELU -> out``.

``final_norm: true`` appends a LayerNorm over ``out_dim``. ``out_dim`` defaults to ``in_dim``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from encoder_fusion.memory import check_fits
from encoder_fusion.registry import Registry

CONNECTORS: Registry[Connector] = Registry("connector")


def check_positive(value: object, what: str) -> int:
    """Return ``value`` when it is a positive int.

    Raises:
        ValueError: naming ``what`` and the value.
    """
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return value


class Connector(nn.Module):
    """Maps tokens (B, N, in_dim) to (B, N, out_dim) with ``layers``, then an optional LayerNorm.

    Args:
        in_dim: the fused token width.
        out_dim: the target width (default ``in_dim``).
        final_norm: append a LayerNorm over ``out_dim``.

    Raises:
        ValueError: a non-positive width or a non-boolean ``final_norm``.
    """

    def __init__(self, in_dim: int, *, out_dim: int | None = None, final_norm: bool = False) -> None:
        super().__init__()
        self.in_dim = check_positive(in_dim, "connector in_dim")
        self.out_dim = in_dim if out_dim is None else check_positive(out_dim, "connector out_dim")
        if not isinstance(final_norm, bool):
            raise ValueError(f"connector final_norm={final_norm!r} must be true or false")
        # the first projection alone holds in_dim x out_dim float32 weights
        check_fits(
            f"connector {self.in_dim} -> {self.out_dim}",
            4.0 * self.in_dim * self.out_dim,
            "a connector out_dim the machine can hold (a language model's hidden size)",
        )
        self.layers = self.build_layers()
        self.norm = nn.LayerNorm(self.out_dim) if final_norm else nn.Identity()

    def build_layers(self) -> nn.Module:
        """The projection proper, in_dim -> out_dim."""
        raise NotImplementedError

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Project tokens (B, N, in_dim) to (B, N, out_dim)."""
        return self.norm(self.layers(tokens))


@CONNECTORS.register("identity")
class IdentityConnector(Connector):
    """Passes tokens through (optionally layer-normalised).

    Raises:
        ValueError: an ``out_dim`` different from ``in_dim``.
    """

    def build_layers(self) -> nn.Module:
        if self.out_dim != self.in_dim:
            raise ValueError(
                f"connector kind 'identity' keeps the width {self.in_dim}, but out_dim={self.out_dim}; "
                "use kind 'linear' or 'mlp' to change it"
            )
        return nn.Identity()


@CONNECTORS.register("linear")
class LinearConnector(Connector):
    """One Linear in_dim -> out_dim."""

    def build_layers(self) -> nn.Module:
        return nn.Linear(self.in_dim, self.out_dim)


@CONNECTORS.register("mlp")
class MLPConnector(Connector):
    """LLaVA's ``mlp{depth}x_gelu``: Linear(in, out), then ``depth - 1`` times GELU, Linear(out, out).

    Args:
        depth: the number of Linears (default 2, LLaVA-1.5).
    """

    def __init__(
        self, in_dim: int, *, out_dim: int | None = None, final_norm: bool = False, depth: int = 2
    ) -> None:
        self.depth = check_positive(depth, "connector depth")
        super().__init__(in_dim, out_dim=out_dim, final_norm=final_norm)

    def build_layers(self) -> nn.Module:
        layers: list[nn.Module] = [nn.Linear(self.in_dim, self.out_dim)]
        for _ in range(self.depth - 1):
            layers += [nn.GELU(), nn.Linear(self.out_dim, self.out_dim)]
        return nn.Sequential(*layers)


@CONNECTORS.register("fused_gelu_mlp")
class FusedGeluMLPConnector(Connector):
    """Prismatic's ``FusedMLPProjector``: in -> 4*in -> GELU -> out -> GELU -> out."""

    def build_layers(self) -> nn.Module:
        hidden = 4 * self.in_dim
        return nn.Sequential(
            nn.Linear(self.in_dim, hidden),
            nn.GELU(),
            nn.Linear(hidden, self.out_dim),
            nn.GELU(),
            nn.Linear(self.out_dim, self.out_dim),
        )


def build_connector(connector: str | Mapping[str, Any] | None, in_dim: int) -> Connector:
    """Build a connector from its config (a kind name, a ``{"kind": ...}`` mapping, or None: identity).

    Raises:
        ValueError: unknown kind or option, a bad width or depth.
    """
    return CONNECTORS.build("identity" if connector is None else connector, in_dim)
