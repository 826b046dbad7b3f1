"""Layer combine (the hooked layers of one encoder -> one grid) and encoder merge (encoders -> tokens).

Layer combines, by ``layer_merge`` name. Every combine layer-normalises each hooked layer over
channels after alignment, so layers and encoders of very different scale (DINOv2's deep layers,
CLIP's residual stream) meet on equal footing; this is also what lets ``kernels.grid_fuse`` run
alignment, normalisation, weighting and the encoder concat in one pass:

- ``last``: ``LN(x_L)``, the last layer in ``HookSpec.layers`` order; no parameters.
- ``mean``: ``(1/L) * sum_l LN(x_l)``; no parameters.
- ``concat``: ``[LN(x_1), ..., LN(x_L)]`` side by side in channels (width ``L * C``); no parameters.
- ``weighted_ln`` (COMM): ``sum_l softmax(a)_l * LN_l(A_l x_l)`` with a learned affine per layer
  norm, learned logits ``a`` (zeros at start: equal weights) and, with ``linear: true``, a learned
  ``C x C`` Linear ``A_l`` per layer applied before alignment (identity otherwise).

``LN`` is ``F.layer_norm`` with ``eps = 1e-6``, without affine unless stated.

Encoder merges, by ``encoder_merge`` name; each takes the encoders' combined grids (B, H, W, C_e)
and returns tokens (B, N, D):

- ``channel_concat`` (Prismatic, Eagle): ``N = H*W``, ``D = sum C_e``.
- ``sequence_concat``: all tokens of encoder 0 (row-major), then all of encoder 1, ...: ``N = E*H*W``.
- ``interleave`` (Interleaved-MoF): location 0 of encoder 0, location 0 of encoder 1, ...,
  location 1 of encoder 0, ...: ``N = E*H*W``.
- ``add`` (COMM): the element-wise sum.
- ``gated_add``: ``sum_e sigmoid(g_e) * x_e`` with learned per-channel gates ``g_e`` (zeros at start).
- ``cross_attention``: ``H*W`` learned queries attend over every token of every encoder (each
  encoder's tokens tagged with a learned source embedding); ``N = H*W``.

All but ``channel_concat`` need the encoders at one width: set ``merge_dim`` so that the head
projects each encoder to it first.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

import kernels
from fusion.align import Aligner, Registry, attention_heads

LN_EPS = 1e-6

LAYER_COMBINES = Registry("layer_merge")
ENCODER_MERGES = Registry("encoder_merge")


class FuseInputs(NamedTuple):
    """The arguments of one encoder's share of a ``kernels.grid_fuse`` call.

    ``slots`` are relative to the encoder's first output slot; ``ln_weight`` / ``ln_bias`` are None
    when the combine has no affine.
    """

    sources: list[torch.Tensor]
    slots: list[int]
    weights: torch.Tensor
    ln_weight: list[torch.Tensor] | None
    ln_bias: list[torch.Tensor] | None


class LayerCombine(nn.Module):
    """Combines the ``num_layers`` hooked layers of one encoder into one grid.

    Args:
        in_dim: the encoder's width (before alignment).
        dim: the width after alignment (``in_dim`` unless the aligner folds tokens into channels).
        num_layers: how many layers the encoder hooks.

    Attributes:
        out_dim: the width of the combined grid.
        num_slots: how many ``grid_fuse`` output slots the combine fills (``concat``: one per layer).
    """

    def __init__(self, in_dim: int, dim: int, num_layers: int) -> None:
        super().__init__()
        self.in_dim, self.dim, self.num_layers = in_dim, dim, num_layers
        self.out_dim = dim
        self.num_slots = 1

    # -- what each combine states ---------------------------------------------------------------
    def used_layers(self) -> list[int]:
        """Indices (into the hooked layers) that enter the combine."""
        return list(range(self.num_layers))

    def slots(self) -> list[int]:
        """The output slot of each used layer."""
        return [0] * len(self.used_layers())

    def weights(self, reference: torch.Tensor) -> torch.Tensor:
        """The weight of each used layer, on ``reference``'s device."""
        count = len(self.used_layers())
        return torch.full((count,), 1.0 / count, device=reference.device)

    def affine(self) -> tuple[list[torch.Tensor] | None, list[torch.Tensor] | None]:
        """Per used layer the LayerNorm (weight, bias), or (None, None) for a plain LayerNorm."""
        return None, None

    def transform(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """A per-token map of hooked layer ``index``, applied before alignment (identity here)."""
        return x

    def learned_weights(self) -> list[float] | None:
        """The softmax-normalised learned layer weights, or None when the combine learns none."""
        return None

    # -- shared ---------------------------------------------------------------------------------
    def fuse_inputs(self, layers: Sequence[torch.Tensor]) -> FuseInputs:
        """The sources, slots, weights and affine this combine feeds ``grid_fuse`` for ``layers``."""
        used = self.used_layers()
        sources = [self.transform(i, layers[i]) for i in used]
        ln_weight, ln_bias = self.affine()
        return FuseInputs(sources, self.slots(), self.weights(sources[0]), ln_weight, ln_bias)

    def forward(self, layers: Sequence[torch.Tensor], aligner: Aligner) -> torch.Tensor:
        """Align each used layer with ``aligner`` and combine: (B, H, W, out_dim).

        The LayerNorm, weighting and slotting run as one ``kernels.grid_fuse`` call on the
        already-aligned grids (its resample is then the identity).
        """
        inputs = self.fuse_inputs(layers)
        aligned = [aligner(x) for x in inputs.sources]
        fused = kernels.grid_fuse(
            aligned,
            aligner.out_grid,
            groups=inputs.slots,
            layer_weights=inputs.weights,
            ln_weight=inputs.ln_weight,
            ln_bias=inputs.ln_bias,
            mode="nearest",
            eps=LN_EPS,
        )
        return fused.reshape(fused.shape[0], *aligner.out_grid, fused.shape[-1])


@LAYER_COMBINES.register("last")
class LastLayer(LayerCombine):
    """``LN(x_L)``: the last hooked layer (in ``HookSpec.layers`` order), layer-normalised."""

    def used_layers(self) -> list[int]:
        return [self.num_layers - 1]


@LAYER_COMBINES.register("mean")
class MeanOfLayers(LayerCombine):
    """``(1/L) * sum_l LN(x_l)``: the mean of the layer-normalised layers."""


@LAYER_COMBINES.register("concat")
class ConcatLayers(LayerCombine):
    """``[LN(x_1), ..., LN(x_L)]`` side by side in channels, in hooks order."""

    def __init__(self, in_dim: int, dim: int, num_layers: int) -> None:
        super().__init__(in_dim, dim, num_layers)
        self.out_dim = dim * num_layers
        self.num_slots = num_layers

    def slots(self) -> list[int]:
        return list(range(self.num_layers))

    def weights(self, reference: torch.Tensor) -> torch.Tensor:
        return torch.ones(self.num_layers, device=reference.device)


@LAYER_COMBINES.register("weighted_ln")
class WeightedLayerNorm(LayerCombine):
    """COMM's multi-level merge: ``sum_l softmax(a)_l * LN_l(A_l x_l)``.

    Args:
        linear: put a learned ``in_dim x in_dim`` Linear ``A_l`` on each layer first. It runs before
            alignment, where the grid is smallest; with a linear resampler (bilinear, nearest, area,
            whose weights sum to one) the order makes no difference to the result.
    """

    def __init__(self, in_dim: int, dim: int, num_layers: int, *, linear: bool = False) -> None:
        super().__init__(in_dim, dim, num_layers)
        if not isinstance(linear, bool):
            raise ValueError(f"layer_merge='weighted_ln' option linear={linear!r} must be true or false")
        self.logits = nn.Parameter(torch.zeros(num_layers))
        self.ln_weight = nn.Parameter(torch.ones(num_layers, dim))
        self.ln_bias = nn.Parameter(torch.zeros(num_layers, dim))
        self.linears = nn.ModuleList(nn.Linear(in_dim, in_dim) for _ in range(num_layers)) if linear else None

    def weights(self, reference: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits.float(), dim=0)

    def affine(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return list(self.ln_weight.unbind(0)), list(self.ln_bias.unbind(0))

    def transform(self, index: int, x: torch.Tensor) -> torch.Tensor:
        return x if self.linears is None else self.linears[index](x)

    def learned_weights(self) -> list[float]:
        return torch.softmax(self.logits.detach().float(), dim=0).tolist()


def build_layer_combine(layer_merge: object, in_dim: int, dim: int, num_layers: int) -> LayerCombine:
    """Build the layer combine named by ``layer_merge`` (a name or ``{"kind": name, **options}``).

    Raises:
        ValueError: unknown name or option (the message lists the accepted ones).
    """
    return LAYER_COMBINES.build(layer_merge, in_dim, dim, num_layers)


# -- encoder merge ------------------------------------------------------------------------------


class EncoderMerge(nn.Module):
    """Merges the encoders' combined grids (B, H, W, C_e) into tokens (B, N, out_dim).

    Args:
        names: the encoders' names, for messages.
        widths: each encoder's width ``C_e`` as it reaches the merge.
        grid: the target grid (H, W).

    Attributes:
        out_dim: the token width ``D``; output_tokens: ``N``.
    """

    def __init__(self, names: Sequence[str], widths: Sequence[int], grid: tuple[int, int]) -> None:
        super().__init__()
        self.names, self.widths, self.grid = list(names), list(widths), tuple(grid)
        self.out_dim = self.common_width()
        self.output_tokens = grid[0] * grid[1]

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

    def forward(self, grids: Sequence[torch.Tensor]) -> torch.Tensor:
        """Merge one (B, H, W, C_e) grid per encoder into tokens (B, output_tokens, out_dim)."""
        raise NotImplementedError

    def to_grid(self, tokens: torch.Tensor) -> torch.Tensor:
        """Map tokens (B, N, D') of this merge's layout back onto the grid: (B, H, W, D')."""
        return tokens.reshape(tokens.shape[0], *self.grid, tokens.shape[-1])


def register_merge(name: str):
    """Register an encoder merge and remember its name for messages."""

    def add(cls: type) -> type:
        cls.registry_name = name
        return ENCODER_MERGES.register(name)(cls)

    return add


@register_merge("channel_concat")
class ChannelConcat(EncoderMerge):
    """Encoders side by side in channels: ``D = sum C_e``, in encoder order."""

    def common_width(self) -> int:
        return sum(self.widths)

    def forward(self, grids: Sequence[torch.Tensor]) -> torch.Tensor:
        merged = torch.cat(list(grids), dim=-1)
        return merged.reshape(merged.shape[0], -1, merged.shape[-1])


@register_merge("sequence_concat")
class SequenceConcat(EncoderMerge):
    """All tokens of encoder 0 (row-major), then all tokens of encoder 1, ...: ``N = E*H*W``."""

    def __init__(self, names: Sequence[str], widths: Sequence[int], grid: tuple[int, int]) -> None:
        super().__init__(names, widths, grid)
        self.output_tokens = len(self.names) * grid[0] * grid[1]

    def forward(self, grids: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat([g.reshape(g.shape[0], -1, g.shape[-1]) for g in grids], dim=1)

    def to_grid(self, tokens: torch.Tensor) -> torch.Tensor:
        """The mean over encoders of their tokens at each location."""
        per_encoder = tokens.reshape(tokens.shape[0], len(self.names), *self.grid, tokens.shape[-1])
        return per_encoder.mean(dim=1)


@register_merge("interleave")
class Interleave(EncoderMerge):
    """Location by location, one token of each encoder in turn: ``N = E*H*W``."""

    def __init__(self, names: Sequence[str], widths: Sequence[int], grid: tuple[int, int]) -> None:
        super().__init__(names, widths, grid)
        self.output_tokens = len(self.names) * grid[0] * grid[1]

    def forward(self, grids: Sequence[torch.Tensor]) -> torch.Tensor:
        stacked = torch.stack(list(grids), dim=3)  # (B, H, W, E, C)
        return stacked.reshape(stacked.shape[0], -1, stacked.shape[-1])

    def to_grid(self, tokens: torch.Tensor) -> torch.Tensor:
        """The mean over encoders of their tokens at each location."""
        per_location = tokens.reshape(tokens.shape[0], *self.grid, len(self.names), tokens.shape[-1])
        return per_location.mean(dim=3)


@register_merge("add")
class Add(EncoderMerge):
    """The element-wise sum of the encoders' grids."""

    def forward(self, grids: Sequence[torch.Tensor]) -> torch.Tensor:
        merged = torch.stack(list(grids), dim=0).sum(dim=0)
        return merged.reshape(merged.shape[0], -1, merged.shape[-1])


@register_merge("gated_add")
class GatedAdd(EncoderMerge):
    """``sum_e sigmoid(g_e) * x_e`` with a learned gate per encoder and channel (zeros at start: 1/2)."""

    def __init__(self, names: Sequence[str], widths: Sequence[int], grid: tuple[int, int]) -> None:
        super().__init__(names, widths, grid)
        self.gates = nn.Parameter(torch.zeros(len(self.names), self.out_dim))

    def forward(self, grids: Sequence[torch.Tensor]) -> torch.Tensor:
        stacked = torch.stack(list(grids), dim=0)  # (E, B, H, W, C)
        gates = torch.sigmoid(self.gates).to(stacked.dtype)[:, None, None, None, :]
        merged = (gates * stacked).sum(dim=0)
        return merged.reshape(merged.shape[0], -1, merged.shape[-1])


@register_merge("cross_attention")
class CrossAttention(EncoderMerge):
    """``H*W`` learned queries attend over the tokens of all encoders.

    Keys and values are every encoder's tokens, layer-normalised, each plus a learned embedding of
    its encoder. Query ``i`` belongs to grid cell ``i`` (row-major), so the output maps back onto
    the grid by a reshape.

    Args:
        heads: attention heads (default: the largest of 8, 4, 2, 1 dividing the width).
    """

    def __init__(
        self, names: Sequence[str], widths: Sequence[int], grid: tuple[int, int], *, heads: int | None = None
    ) -> None:
        super().__init__(names, widths, grid)
        width = self.out_dim
        self.queries = nn.Parameter(torch.randn(self.output_tokens, width) * 0.02)
        self.source_embedding = nn.Parameter(torch.randn(len(self.names), width) * 0.02)
        self.norm = nn.LayerNorm(width)
        self.attention = nn.MultiheadAttention(width, attention_heads(width, heads), batch_first=True)

    def forward(self, grids: Sequence[torch.Tensor]) -> torch.Tensor:
        batch = grids[0].shape[0]
        tagged = [
            g.reshape(batch, -1, g.shape[-1]) + self.source_embedding[e].to(g.dtype)
            for e, g in enumerate(grids)
        ]
        keys = self.norm(torch.cat(tagged, dim=1))
        queries = self.queries.to(keys.dtype).expand(batch, -1, -1)
        out, _ = self.attention(queries, keys, keys, need_weights=False)
        return out


def build_encoder_merge(
    encoder_merge: object, names: Sequence[str], widths: Sequence[int], grid: tuple[int, int]
) -> EncoderMerge:
    """Build the encoder merge named by ``encoder_merge`` (a name or ``{"kind": name, **options}``).

    Raises:
        ValueError: unknown name or option; encoders of different widths for a merge that needs one.
    """
    return ENCODER_MERGES.build(encoder_merge, list(names), list(widths), tuple(grid))
