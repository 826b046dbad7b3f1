"""Layer combine (the hooked layers of one encoder -> its tokens) and encoder merge (encoders -> tokens).

Layer combines, by ``layer_merge`` name. Each aligns the hooked layers of one encoder to the target
grid and, with ``normalize`` (the default), layer-normalises each over channels, so layers and
encoders of very different scale (DINOv2's deep layers, CLIP's residual stream) meet on equal
footing; ``normalize=False`` takes the raw block outputs, as the papers that concatenate them do.
Alignment, normalisation, weighting and slotting run as one ``encoder_fusion.kernels.grid_fuse`` call:

- ``last``: ``N(x_L)``, the last layer in ``HookSpec.layers`` order; no parameters.
- ``mean``: ``(1/L) * sum_l N(x_l)``; no parameters.
- ``concat``: ``[N(x_1), ..., N(x_L)]`` side by side in channels (width ``L * C``); no parameters.
  This is Dense Connector's sparse channel integration.
- ``weighted_ln`` (COMM): ``sum_l softmax(a)_l * LN_l(A_l x_l)`` with a learned affine per layer
  norm, learned logits ``a`` (zeros at start: equal weights) and, with ``linear: true``, a learned
  ``C x C`` Linear ``A_l`` per layer applied before alignment (identity otherwise). With
  ``normalize=False``: ``sum_l softmax(a)_l * A_l x_l``, no affine.
- ``dense_channel`` (Dense Connector's dense channel integration): the hooked layers split into
  ``layer_groups`` consecutive groups, the mean of each, side by side in channels (width ``G * C``).
- ``sparse_token`` (Dense Connector's sparse token integration): ``[N(x_L); P(N(x_1)); ...;
  P(N(x_{L-1}))]`` along the sequence, ``P`` the mean of every ``stride`` consecutive tokens.
- ``mmfuser`` (MMFuser): ``x_L + y + SA(LN(y))`` with ``y = CA(LN(x_L), LN([x_1; ...; x_{L-1}]))``
  over the ``N(x_l)``: the deepest layer's tokens as queries over the shallower layers' tokens.

The last three, the newer multi-layer methods, are defined in :mod:`encoder_fusion.multilayer`.

``N`` is ``F.layer_norm`` with ``eps = 1e-6`` without affine, or the identity with
``normalize=False``. A combine's tokens are one or more token sets, each the grid's cells averaged
over a stride (``LayerCombine.strides``: ``(1,)``, the grid itself, for all but ``sparse_token``).

Encoder merges, by ``encoder_merge`` name; each takes the encoders' tokens (B, N, C_e), all in one
layout, and returns tokens (B, N', D):

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

from collections.abc import Sequence
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

import encoder_fusion.kernels
from encoder_fusion.align import Aligner, attention_heads
from encoder_fusion.registry import Registry

LN_EPS = 1e-6

LAYER_COMBINES = Registry("layer_merge")
ENCODER_MERGES = Registry("encoder_merge")


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


class FuseInputs(NamedTuple):
    """The arguments of one encoder's share of a ``encoder_fusion.kernels.grid_fuse`` call.

    ``slots`` are relative to the encoder's first output slot; ``ln_weight`` / ``ln_bias`` are None
    when the combine has no affine.
    """

    sources: list[torch.Tensor]
    slots: list[int]
    weights: torch.Tensor
    ln_weight: list[torch.Tensor] | None
    ln_bias: list[torch.Tensor] | None


class LayerCombine(nn.Module):
    """Combines the ``num_layers`` hooked layers of one encoder into its tokens.

    Args:
        in_dim: the encoder's width (before alignment).
        dim: the width after alignment (``in_dim`` unless the aligner folds tokens into channels).
        num_layers: how many layers the encoder hooks.
        grid: the target grid (H, W).
        normalize: layer-normalise each aligned layer (True) or take it raw.

    Attributes:
        out_dim: the width of the tokens.
        num_slots: how many ``grid_fuse`` output slots the combine fills (``concat``: one per layer).
        strides: the token layout: one stride per token set (see the module docstring).
        fused_output: the tokens are the ``grid_fuse`` output as is (no :meth:`finish` step), so the
            head may fuse every encoder in one call.

    Raises:
        ValueError: hooked layers or options the combine cannot take (see :meth:`check`).
    """

    fused_output: ClassVar[bool] = True

    def __init__(
        self, in_dim: int, dim: int, num_layers: int, grid: Sequence[int], normalize: bool = True
    ) -> None:
        super().__init__()
        self.in_dim, self.dim, self.num_layers = in_dim, dim, num_layers
        self.grid, self.normalize = tuple(grid), normalize
        self.out_dim = dim
        self.num_slots = 1
        self.strides: tuple[int, ...] = (1,)

    @classmethod
    def check(cls, num_layers: int, grid: Sequence[int] | None, options: dict[str, Any]) -> None:
        """Raise a ValueError when the combine cannot take ``num_layers`` hooked layers on ``grid``
        (None: not known yet) with ``options``; builds nothing, so it can run before the encoders."""

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

    def finish(self, fused: torch.Tensor) -> torch.Tensor:
        """The tokens (B, N, out_dim) from the ``grid_fuse`` output (B, H*W, num_slots * dim)."""
        return fused

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
        """Align each used layer with ``aligner`` and combine: tokens (B, N, out_dim).

        The LayerNorm, weighting and slotting run as one ``encoder_fusion.kernels.grid_fuse`` call on the
        already-aligned grids (its resample is then the identity), then :meth:`finish`.
        """
        inputs = self.fuse_inputs(layers)
        aligned = [aligner(x) for x in inputs.sources]
        fused = encoder_fusion.kernels.grid_fuse(
            aligned,
            aligner.out_grid,
            groups=inputs.slots,
            layer_weights=inputs.weights,
            ln_weight=inputs.ln_weight,
            ln_bias=inputs.ln_bias,
            mode="nearest",
            eps=LN_EPS,
            normalize=self.normalize,
        )
        return self.finish(fused)


class PerLayerSlots(LayerCombine):
    """Every hooked layer in its own ``grid_fuse`` slot, weight one: ``[N(x_1), ..., N(x_L)]``."""

    def __init__(
        self, in_dim: int, dim: int, num_layers: int, grid: Sequence[int], normalize: bool = True
    ) -> None:
        super().__init__(in_dim, dim, num_layers, grid, normalize)
        self.num_slots = num_layers

    def slots(self) -> list[int]:
        return list(range(self.num_layers))

    def weights(self, reference: torch.Tensor) -> torch.Tensor:
        return torch.ones(self.num_layers, device=reference.device)


@LAYER_COMBINES.register("last")
class LastLayer(LayerCombine):
    """``N(x_L)``: the last hooked layer (in ``HookSpec.layers`` order)."""

    def used_layers(self) -> list[int]:
        return [self.num_layers - 1]


@LAYER_COMBINES.register("mean")
class MeanOfLayers(LayerCombine):
    """``(1/L) * sum_l N(x_l)``: the mean of the (normalised) layers."""


@LAYER_COMBINES.register("concat")
class ConcatLayers(PerLayerSlots):
    """``[N(x_1), ..., N(x_L)]`` side by side in channels, in hooks order (Dense Connector's sparse
    channel integration)."""

    def __init__(
        self, in_dim: int, dim: int, num_layers: int, grid: Sequence[int], normalize: bool = True
    ) -> None:
        super().__init__(in_dim, dim, num_layers, grid, normalize)
        self.out_dim = dim * num_layers


@LAYER_COMBINES.register("weighted_ln")
class WeightedLayerNorm(LayerCombine):
    """COMM's multi-level merge: ``sum_l softmax(a)_l * LN_l(A_l x_l)`` (no LN with ``normalize=False``).

    Args:
        linear: put a learned ``in_dim x in_dim`` Linear ``A_l`` on each layer first. It runs before
            alignment, where the grid is smallest; with a linear resampler (bilinear, nearest, area,
            whose weights sum to one) the order makes no difference to the result.
    """

    def __init__(
        self,
        in_dim: int,
        dim: int,
        num_layers: int,
        grid: Sequence[int],
        normalize: bool = True,
        *,
        linear: bool = False,
    ) -> None:
        super().__init__(in_dim, dim, num_layers, grid, normalize)
        if not isinstance(linear, bool):
            raise ValueError(f"layer_merge='weighted_ln' option linear={linear!r} must be true or false")
        self.logits = nn.Parameter(torch.zeros(num_layers))
        # the affine belongs to the LayerNorm: raw layers have neither
        self.ln_weight = nn.Parameter(torch.ones(num_layers, dim)) if normalize else None
        self.ln_bias = nn.Parameter(torch.zeros(num_layers, dim)) if normalize else None
        self.linears = nn.ModuleList(nn.Linear(in_dim, in_dim) for _ in range(num_layers)) if linear else None

    def weights(self, reference: torch.Tensor) -> torch.Tensor:
        # in at least fp32 (a half-precision head keeps its weights exact enough) and in fp64 for
        # a float64 head, so that it matches a float64 reference
        return torch.softmax(self.logits, dim=0, dtype=torch.promote_types(self.logits.dtype, torch.float32))

    def affine(self) -> tuple[list[torch.Tensor] | None, list[torch.Tensor] | None]:
        if not self.normalize:
            return None, None
        return list(self.ln_weight.unbind(0)), list(self.ln_bias.unbind(0))

    def transform(self, index: int, x: torch.Tensor) -> torch.Tensor:
        return x if self.linears is None else self.linears[index](x)

    def learned_weights(self) -> list[float]:
        return torch.softmax(self.logits.detach().float(), dim=0).tolist()


def build_layer_combine(
    layer_merge: object, in_dim: int, dim: int, num_layers: int, grid: Sequence[int], normalize: bool = True
) -> LayerCombine:
    """Build the layer combine named by ``layer_merge`` (a name or ``{"kind": name, **options}``).

    Raises:
        ValueError: unknown name or option (the message lists the accepted ones), or hooked layers,
            a grid or options the combine cannot take.
    """
    return LAYER_COMBINES.build(layer_merge, in_dim, dim, num_layers, tuple(grid), normalize)


# -- encoder merge ------------------------------------------------------------------------------


class EncoderMerge(nn.Module):
    """Merges the encoders' tokens (B, N, C_e), all in one layout, into tokens (B, output_tokens, out_dim).

    Args:
        names: the encoders' names, for messages.
        widths: each encoder's width ``C_e`` as it reaches the merge.
        grid: the target grid (H, W).
        strides: the token layout of every encoder (``LayerCombine.strides``): one set of the grid's
            cells by default.

    Attributes:
        out_dim: the token width ``D``; output_tokens: ``N'``; tokens: ``N``, each encoder's.
    """

    def __init__(
        self,
        names: Sequence[str],
        widths: Sequence[int],
        grid: tuple[int, int],
        strides: Sequence[int] = (1,),
    ) -> None:
        super().__init__()
        self.names, self.widths, self.grid = list(names), list(widths), tuple(grid)
        self.strides = tuple(strides)
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


def register_merge(name: str):
    """Register an encoder merge and remember its name for messages."""

    def add(cls: type) -> type:
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

    def __init__(
        self,
        names: Sequence[str],
        widths: Sequence[int],
        grid: tuple[int, int],
        strides: Sequence[int] = (1,),
    ) -> None:
        super().__init__(names, widths, grid, strides)
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

    def __init__(
        self,
        names: Sequence[str],
        widths: Sequence[int],
        grid: tuple[int, int],
        strides: Sequence[int] = (1,),
    ) -> None:
        super().__init__(names, widths, grid, strides)
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

    def __init__(
        self,
        names: Sequence[str],
        widths: Sequence[int],
        grid: tuple[int, int],
        strides: Sequence[int] = (1,),
        *,
        heads: int | None = None,
    ) -> None:
        super().__init__(names, widths, grid, strides)
        width = self.out_dim
        self.output_tokens = grid[0] * grid[1]
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
    encoder_merge: object,
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
    return ENCODER_MERGES.build(encoder_merge, list(names), list(widths), tuple(grid), tuple(strides))
