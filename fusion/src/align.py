"""Grid alignment: bring one encoder's (B, h, w, C) token grid onto the target grid (B, H, W, C').

Every aligner is an ``nn.Module`` built as ``Aligner(in_dim, in_grid, out_grid, **options)`` that
reports its output width as ``out_dim``. Modes, by registry name:

- ``bilinear``, ``bicubic``, ``nearest``: ``F.interpolate`` (``align_corners=False``, no antialias,
  the same semantics as ``encoder_fusion.kernels.grid_fuse``); width unchanged; the identity when the grid
  fits.
- ``area``: adaptive average pooling (``F.interpolate(mode="area")``), up or down.
- ``pixel_unshuffle``: each ``kh x kw`` block of neighbouring tokens folded into channels (Eagle's
  treatment of SAM), ``C' = C * kh * kw``; the source grid must be a whole multiple of the target.
- ``learned``: ``H*W`` learned queries cross-attend over the source tokens (Cambrian's resampler
  in its simplest form); width unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from encoder_fusion.kernels.reference import resample
from encoder_fusion.memory import check_fits
from encoder_fusion.registry import Registry

ALIGNERS: Registry[Aligner] = Registry("align")


class Aligner(nn.Module):
    """Maps a channels-last grid (B, h, w, in_dim) to (B, H, W, out_dim).

    Args:
        in_dim: channels of the source grid.
        in_grid: the source grid (h, w).
        out_grid: the target grid (H, W).

    Raises:
        ValueError: when the source grid cannot be brought onto the target by this mode.
    """

    def __init__(self, in_dim: int, in_grid: tuple[int, int], out_grid: tuple[int, int]) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.in_grid = tuple(in_grid)
        self.out_grid = tuple(out_grid)
        self.out_dim = in_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Align ``x`` (B, h, w, in_dim) onto the target grid: (B, H, W, out_dim)."""
        raise NotImplementedError


class Interpolate(Aligner):
    """``F.interpolate`` of the grid; each subclass is registered under the mode it resamples with,
    so its name and its mode cannot disagree."""

    mode: ClassVar[str]

    def __init_subclass__(cls, *, mode: str, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.mode = mode
        ALIGNERS.register(mode)(cls)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Resample ``x`` (B, h, w, C) to (B, H, W, C); the identity when the grid already fits."""
        return resample(x, self.out_grid, self.mode)


class Bilinear(Interpolate, mode="bilinear"):
    """Bilinear interpolation, ``align_corners=False``."""


class Bicubic(Interpolate, mode="bicubic"):
    """Bicubic interpolation, ``align_corners=False``."""


class Nearest(Interpolate, mode="nearest"):
    """Nearest-neighbour sampling (PyTorch's ``nearest``: source index ``floor(i * h / H)``)."""


class Area(Interpolate, mode="area"):
    """Adaptive average pooling: each target cell averages the source cells it covers."""


@ALIGNERS.register("pixel_unshuffle")
class PixelUnshuffle(Aligner):
    """Fold each ``kh x kw`` block of neighbouring tokens into channels.

    The output channel ``c * kh * kw + i * kw + j`` holds channel ``c`` of the token at offset
    ``(i, j)`` inside its block: ``F.pixel_unshuffle``'s order, extended to ``kh != kw``.

    Raises:
        ValueError: the source grid is not a whole multiple of the target grid in both directions.
    """

    def __init__(self, in_dim: int, in_grid: tuple[int, int], out_grid: tuple[int, int]) -> None:
        super().__init__(in_dim, in_grid, out_grid)
        (h, w), (target_h, target_w) = self.in_grid, self.out_grid
        if h % target_h or w % target_w:
            raise ValueError(
                f"align='pixel_unshuffle' cannot fold a {h}x{w} grid onto {target_h}x{target_w}: "
                f"the source grid must be a whole multiple of the target in both directions "
                f"(e.g. target {h // 2}x{w // 2} when both are even); use an interpolating mode otherwise"
            )
        self.factor = (h // target_h, w // target_w)
        self.out_dim = in_dim * self.factor[0] * self.factor[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, _, channels = x.shape
        (target_h, target_w), (kh, kw) = self.out_grid, self.factor
        blocks = x.reshape(batch, target_h, kh, target_w, kw, channels)
        return blocks.permute(0, 1, 3, 5, 2, 4).reshape(batch, target_h, target_w, self.out_dim)


def attention_heads(width: int, heads: int | None) -> int:
    """The head count for attention over ``width`` channels: ``heads`` if given, else the largest of
    8, 4, 2, 1 that divides ``width``.

    Raises:
        ValueError: ``heads`` not a positive divisor of ``width``.
    """
    if heads is None:
        return next(h for h in (8, 4, 2, 1) if width % h == 0)
    if not isinstance(heads, int) or heads <= 0 or width % heads:
        raise ValueError(f"heads={heads!r} must be a positive divisor of the width {width}")
    return heads


@ALIGNERS.register("learned")
class LearnedQueries(Aligner):
    """``H*W`` learned queries cross-attending over the ``h*w`` source tokens.

    The source tokens are layer-normalised and used as keys and values; each query owns one
    target cell, so the result reshapes onto the target grid.

    Args:
        heads: attention heads (default: the largest of 8, 4, 2, 1 dividing ``in_dim``).
    """

    def __init__(
        self, in_dim: int, in_grid: tuple[int, int], out_grid: tuple[int, int], *, heads: int | None = None
    ) -> None:
        super().__init__(in_dim, in_grid, out_grid)
        heads = attention_heads(in_dim, heads)
        cells, keys = out_grid[0] * out_grid[1], in_grid[0] * in_grid[1]
        # one attention map per head, a row per target cell: what one image's forward holds at once
        check_fits(
            f"align 'learned' onto {out_grid[0]}x{out_grid[1]} ({cells} queries over {keys} tokens)",
            4.0 * cells * (in_dim + heads * keys),
            "a target grid the machine can hold (the encoders' own grids are 14x14 to 64x64)",
        )
        self.queries = nn.Parameter(torch.randn(out_grid[0] * out_grid[1], in_dim) * 0.02)
        self.norm = nn.LayerNorm(in_dim)
        self.attention = nn.MultiheadAttention(in_dim, heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        keys = self.norm(x.reshape(batch, -1, x.shape[-1]))
        queries = self.queries.to(keys.dtype).expand(batch, -1, -1)
        out, _ = self.attention(queries, keys, keys, need_weights=False)
        return out.reshape(batch, *self.out_grid, self.out_dim)


def build_aligner(
    align: str | Mapping[str, Any], in_dim: int, in_grid: tuple[int, int], out_grid: tuple[int, int]
) -> Aligner:
    """Build the aligner named by ``align`` (a name or ``{"kind": name, **options}``).

    Raises:
        ValueError: unknown mode or option, or a grid this mode cannot align.
    """
    return ALIGNERS.build(align, in_dim, tuple(in_grid), tuple(out_grid))
