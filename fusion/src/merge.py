"""Encoder merges: the encoders' tokens -> the fused tokens, chosen by ``encoder_merge``.

Each takes the encoders' tokens (B, N, C_e), all in one layout (the layer combines' of
:mod:`encoder_fusion.combine`), and returns tokens (B, N', D):

- ``channel_concat`` (Prismatic, Eagle): token by token, ``N' = N``, ``D = sum C_e``.
- ``sequence_concat``: all tokens of encoder 0, then all of encoder 1, ...: ``N' = E*N``.
- ``interleave`` (Interleaved-MoF): token 0 of encoder 0, token 0 of encoder 1, ..., token 1 of
  encoder 0, ...: ``N' = E*N``.
- ``add`` (COMM): the element-wise sum.
- ``gated_add``: ``sum_e sigmoid(g_e) * x_e`` with learned per-channel gates ``g_e`` (zeros at start).
- ``cross_attention``: ``H*W`` learned queries attend over every token of every encoder (each
  encoder's tokens tagged with a learned source embedding); ``N' = H*W``.

All but ``channel_concat`` need the encoders at one width: set ``merge_dim`` so that the head
projects each encoder to it first. ``to_grid`` maps merged tokens back onto the grid: each cell the
mean of the tokens that cover it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

from encoder_fusion.align import attention_heads
from encoder_fusion.registry import Registry

ENCODER_MERGES: Registry[EncoderMerge] = Registry("encoder_merge")


def layout_tokens(grid: Sequence[int], strides: Sequence[int]) -> int:
    """Tokens of a layout: per token set, the grid's cells averaged over its stride (remainder dropped)."""
    cells = grid[0] * grid[1]
    return sum(cells // stride for stride in strides)


def layout_to_grid(tokens: torch.Tensor, grid: Sequence[int], strides: Sequence[int]) -> torch.Tensor:
    """Tokens (B, N, D) of a layout back onto the grid (B, H, W, D): each cell the mean of the
    tokens that cover it (a token of stride s covers s consecutive cells, row-major)."""
    batch, width = tokens.shape[0], tokens.shape[-1]
    cells = grid[0] * grid[1]
    sets = tokens.split([cells // stride for stride in strides], dim=1)
    total = tokens.new_zeros(batch, cells, width)
    count = tokens.new_zeros(cells, 1)
    for stride, part in zip(strides, sets):
        covered = part.shape[1] * stride
        total[:, :covered] += part.repeat_interleave(stride, dim=1)
        count[:covered] += 1
    return (total / count).reshape(batch, *grid, width)


class MergeShape(NamedTuple):
    """The encoders' tokens a merge is built for.

    ``names`` are the encoders' names, for messages; ``widths`` each encoder's width ``C_e`` as it
    reaches the merge; ``grid`` the target grid (H, W); ``strides`` the token layout of every encoder
    (``LayerCombine.strides``; ``(1,)``: one set of the grid's cells).
    """

    names: tuple[str, ...]
    widths: tuple[int, ...]
    grid: tuple[int, ...]
    strides: tuple[int, ...]


class EncoderMerge(nn.Module):
    """Merges the encoders' tokens (B, N, C_e), all in one layout, into tokens (B, output_tokens, out_dim).

    Args:
        shape: the tokens it merges; its fields are attributes of the merge too (``names`` and
            ``widths`` as lists).

    Attributes:
        out_dim: the token width ``D``; output_tokens: ``N'``; tokens: ``N``, each encoder's.
        registry_name: the ``encoder_merge`` name, for messages.
    """

    registry_name: ClassVar[str]

    def __init__(self, shape: MergeShape) -> None:
        super().__init__()
        self.names, self.widths = list(shape.names), list(shape.widths)
        self.grid, self.strides = shape.grid, shape.strides
        self.out_dim = self.common_width()
        self.tokens = layout_tokens(self.grid, self.strides)
        self.output_tokens = self.tokens

    def common_width(self) -> int:
        """The one width all encoders share.

        Raises:
            ValueError: the encoders differ in width (the message says to set ``merge_dim``).
        """
        if len(set(self.widths)) != 1:
            kind = type(self).registry_name
            widths = dict(zip(self.names, self.widths))
            raise ValueError(
                f"encoder_merge={kind!r} needs every encoder at one width, got {widths}; set merge_dim "
                f"to project each encoder to a common width first, or use encoder_merge='channel_concat'"
            )
        return self.widths[0]

    def forward(self, tokens: Sequence[torch.Tensor]) -> torch.Tensor:
        """Merge one (B, N, C_e) token tensor per encoder into (B, output_tokens, out_dim)."""
        raise NotImplementedError

    def to_grid(self, tokens: torch.Tensor) -> torch.Tensor:
        """Map tokens (B, output_tokens, D') back onto the grid: (B, H, W, D'), each cell the mean of
        the tokens that cover it."""
        return layout_to_grid(tokens, self.grid, self.strides)


def register_merge(name: str) -> Callable[[type[EncoderMerge]], type[EncoderMerge]]:
    """Register an encoder merge and remember its name for messages."""

    def add(cls: type[EncoderMerge]) -> type[EncoderMerge]:
        cls.registry_name = name
        return ENCODER_MERGES.register(name)(cls)

    return add


@register_merge("channel_concat")
class ChannelConcat(EncoderMerge):
    """Encoders side by side in channels, token by token: ``D = sum C_e``, in encoder order."""

    def common_width(self) -> int:
        return sum(self.widths)

    def forward(self, tokens: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat(list(tokens), dim=-1)


class EveryTokenMerge(EncoderMerge):
    """A merge that keeps every token of every encoder in the sequence: ``N' = E*N``."""

    def __init__(self, shape: MergeShape) -> None:
        super().__init__(shape)
        self.output_tokens = len(self.names) * self.tokens


@register_merge("sequence_concat")
class SequenceConcat(EveryTokenMerge):
    """All tokens of encoder 0, then all tokens of encoder 1, ...: ``N' = E*N``."""

    def forward(self, tokens: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat(list(tokens), dim=1)

    def to_grid(self, tokens: torch.Tensor) -> torch.Tensor:
        """The mean over encoders of their tokens at each location."""
        per_encoder = tokens.reshape(tokens.shape[0], len(self.names), self.tokens, tokens.shape[-1])
        return super().to_grid(per_encoder.mean(dim=1))


@register_merge("interleave")
class Interleave(EveryTokenMerge):
    """Token by token, one of each encoder in turn: ``N' = E*N``."""

    def forward(self, tokens: Sequence[torch.Tensor]) -> torch.Tensor:
        stacked = torch.stack(list(tokens), dim=2)  # (B, N, E, C)
        return stacked.reshape(stacked.shape[0], -1, stacked.shape[-1])

    def to_grid(self, tokens: torch.Tensor) -> torch.Tensor:
        """The mean over encoders of their tokens at each location."""
        per_token = tokens.reshape(tokens.shape[0], self.tokens, len(self.names), tokens.shape[-1])
        return super().to_grid(per_token.mean(dim=2))


@register_merge("add")
class Add(EncoderMerge):
    """The element-wise sum of the encoders' tokens."""

    def forward(self, tokens: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.stack(list(tokens), dim=0).sum(dim=0)


@register_merge("gated_add")
class GatedAdd(EncoderMerge):
    """``sum_e sigmoid(g_e) * x_e`` with a learned gate per encoder and channel (zeros at start: 1/2)."""

    def __init__(self, shape: MergeShape) -> None:
        super().__init__(shape)
        self.gates = nn.Parameter(torch.zeros(len(self.names), self.out_dim))

    def forward(self, tokens: Sequence[torch.Tensor]) -> torch.Tensor:
        stacked = torch.stack(list(tokens), dim=0)  # (E, B, N, C)
        gates = torch.sigmoid(self.gates).to(stacked.dtype)[:, None, None, :]
        return (gates * stacked).sum(dim=0)


@register_merge("cross_attention")
class CrossAttention(EncoderMerge):
    """``H*W`` learned queries attend over the tokens of all encoders.

    Keys and values are every encoder's tokens, layer-normalised, each plus a learned embedding of
    its encoder. Query ``i`` belongs to grid cell ``i`` (row-major), so the output maps back onto
    the grid by a reshape.

    Args:
        heads: attention heads (default: the largest of 8, 4, 2, 1 dividing the width).
    """

    def __init__(self, shape: MergeShape, *, heads: int | None = None) -> None:
        super().__init__(shape)
        width = self.out_dim
        self.output_tokens = self.grid[0] * self.grid[1]
        self.queries = nn.Parameter(torch.randn(self.output_tokens, width) * 0.02)
        self.source_embedding = nn.Parameter(torch.randn(len(self.names), width) * 0.02)
        self.norm = nn.LayerNorm(width)
        self.attention = nn.MultiheadAttention(width, attention_heads(width, heads), batch_first=True)

    def forward(self, tokens: Sequence[torch.Tensor]) -> torch.Tensor:
        tagged = [t + self.source_embedding[e].to(t.dtype) for e, t in enumerate(tokens)]
        keys = self.norm(torch.cat(tagged, dim=1))
        queries = self.queries.to(keys.dtype).expand(keys.shape[0], -1, -1)
        out, _ = self.attention(queries, keys, keys, need_weights=False)
        return out

    def to_grid(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens.reshape(tokens.shape[0], *self.grid, tokens.shape[-1])


def build_encoder_merge(
    encoder_merge: str | Mapping[str, Any],
    names: Sequence[str],
    widths: Sequence[int],
    grid: tuple[int, int],
    strides: Sequence[int] = (1,),
) -> EncoderMerge:
    """Build the encoder merge named by ``encoder_merge`` (a name or ``{"kind": name, **options}``)
    for encoders whose tokens have the layout ``strides``.

    Raises:
        ValueError: unknown name or option; encoders of different widths for a merge that needs one.
    """
    shape = MergeShape(tuple(names), tuple(widths), tuple(grid), tuple(strides))
    return ENCODER_MERGES.build(encoder_merge, shape)
