"""Layer combines: the hooked layers of one encoder -> its tokens, chosen by ``layer_merge``.

Each aligns the hooked layers of one encoder to the target grid and, with ``normalize`` (the
default), layer-normalises each over channels, so layers and encoders of very different scale
(DINOv2's deep layers, CLIP's residual stream) meet on equal footing; ``normalize=False`` takes the
raw block outputs, as the papers that concatenate them do. Alignment, normalisation, weighting and
slotting run as one ``encoder_fusion.kernels.grid_fuse`` call; ``sparse_token`` and ``mmfuser`` then
rearrange or attend over the result in :meth:`LayerCombine.finish`:

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

Dense Connector is Yao et al., NeurIPS 2024 (``concat``, ``dense_channel`` and ``sparse_token`` are
its three ways to use several layers of one encoder); MMFuser is Cao et al. 2024.

``N`` is ``F.layer_norm`` with ``eps = 1e-6`` without affine, or the identity with
``normalize=False``. A combine's tokens are one or more token sets, each the grid's cells averaged
over a stride (``LayerCombine.strides``: ``(1,)``, the grid itself, for all but ``sparse_token``);
the encoder merges of :mod:`encoder_fusion.merge` take that layout.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

import encoder_fusion.kernels
from encoder_fusion.align import Aligner, attention_heads
from encoder_fusion.registry import Registry

LN_EPS = 1e-6

LAYER_COMBINES: Registry[LayerCombine] = Registry("layer_merge")


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


class CombineShape(NamedTuple):
    """The layers a combine is built for: one encoder's hooked layers, aligned to the target grid.

    ``in_dim`` is the encoder's width (before alignment), ``dim`` the width after it (``in_dim``
    unless the aligner folds tokens into channels), ``num_layers`` how many layers the encoder
    hooks and ``grid`` the target grid (H, W).
    """

    in_dim: int
    dim: int
    num_layers: int
    grid: tuple[int, ...]


class LayerCombine(nn.Module):
    """Combines the ``num_layers`` hooked layers of one encoder into its tokens.

    Args:
        shape: the layers it combines; their fields are attributes of the combine too.
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

    def __init__(self, shape: CombineShape, normalize: bool = True) -> None:
        super().__init__()
        self.in_dim, self.dim, self.num_layers, self.grid = shape
        self.normalize = normalize
        self.out_dim = self.dim
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

    def __init__(self, shape: CombineShape, normalize: bool = True) -> None:
        super().__init__(shape, normalize)
        self.num_slots = shape.num_layers

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

    def __init__(self, shape: CombineShape, normalize: bool = True) -> None:
        super().__init__(shape, normalize)
        self.out_dim = shape.dim * shape.num_layers


@LAYER_COMBINES.register("weighted_ln")
class WeightedLayerNorm(LayerCombine):
    """COMM's multi-level merge: ``sum_l softmax(a)_l * LN_l(A_l x_l)`` (no LN with ``normalize=False``).

    Args:
        linear: put a learned ``in_dim x in_dim`` Linear ``A_l`` on each layer first. It runs before
            alignment, where the grid is smallest; with a linear resampler (bilinear, nearest, area,
            whose weights sum to one) the order makes no difference to the result.
    """

    def __init__(self, shape: CombineShape, normalize: bool = True, *, linear: bool = False) -> None:
        super().__init__(shape, normalize)
        if not isinstance(linear, bool):
            raise ValueError(f"layer_merge='weighted_ln' option linear={linear!r} must be true or false")
        in_dim, dim, num_layers, _ = shape
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
        if self.ln_weight is None or self.ln_bias is None:  # normalize=False
            return None, None
        return list(self.ln_weight.unbind(0)), list(self.ln_bias.unbind(0))

    def transform(self, index: int, x: torch.Tensor) -> torch.Tensor:
        return x if self.linears is None else self.linears[index](x)

    def learned_weights(self) -> list[float]:
        return torch.softmax(self.logits.detach().float(), dim=0).tolist()


@LAYER_COMBINES.register("dense_channel")
class DenseChannel(LayerCombine):
    """Dense Connector's dense channel integration: the means of ``layer_groups`` consecutive groups
    of hooked layers (in hooks order), side by side in channels: ``[mean_{l in g_1} N(x_l), ...]``.

    Group sizes differ by at most one, the earlier groups the larger (12 layers in 2 groups: 6 and
    6; 11 layers: 6 and 5). It is ``grid_fuse`` with one output slot per group and each layer
    weighted ``1/|group|``, so it rides the head's one-call route like ``mean`` and ``concat``.

    Args:
        layer_groups: how many groups (from 1 to the number of hooked layers; 2 in the paper).
    """

    def __init__(self, shape: CombineShape, normalize: bool = True, *, layer_groups: int = 2) -> None:
        super().__init__(shape, normalize)
        self.check(shape.num_layers, shape.grid, {"layer_groups": layer_groups})
        count = shape.num_layers
        sizes = [count // layer_groups + (g < count % layer_groups) for g in range(layer_groups)]
        self.groups = [g for g, size in enumerate(sizes) for _ in range(size)]
        self.out_dim = shape.dim * layer_groups
        self.num_slots = layer_groups

    @classmethod
    def check(cls, num_layers: int, grid: Sequence[int] | None, options: dict[str, Any]) -> None:
        groups = options["layer_groups"]
        if not isinstance(groups, int) or isinstance(groups, bool) or not 1 <= groups <= num_layers:
            raise ValueError(
                f"layer_merge='dense_channel' option layer_groups={groups!r} must be an int from 1 to "
                f"the number of hooked layers ({num_layers})"
            )

    def slots(self) -> list[int]:
        return list(self.groups)

    def weights(self, reference: torch.Tensor) -> torch.Tensor:
        sizes = Counter(self.groups)
        return torch.tensor([1.0 / sizes[g] for g in self.groups], device=reference.device)


@LAYER_COMBINES.register("sparse_token")
class SparseToken(PerLayerSlots):
    """Dense Connector's sparse token integration: the last hooked layer's tokens, then every other
    hooked layer's tokens (in hooks order) averaged over ``stride`` consecutive tokens, all along the
    sequence: ``H*W + (L-1) * (H*W // stride)`` tokens of width ``C``.

    The averaging runs over the row-major sequence, as the paper's 1-D average pooling does, and like
    it drops a remainder of fewer than ``stride`` tokens at the end (a 14x14 grid gives 24 tokens
    per layer at stride 8). Its token layout (``strides``) tells the encoder merges and ``to_grid``
    which cells each token covers.

    Args:
        stride: tokens averaged into one (8 in the paper); the grid must hold at least that many.
    """

    fused_output = False

    def __init__(self, shape: CombineShape, normalize: bool = True, *, stride: int = 8) -> None:
        super().__init__(shape, normalize)
        self.check(shape.num_layers, shape.grid, {"stride": stride})
        self.stride = stride
        self.strides = (1,) + (stride,) * (shape.num_layers - 1)

    @classmethod
    def check(cls, num_layers: int, grid: Sequence[int] | None, options: dict[str, Any]) -> None:
        stride = options["stride"]
        if not isinstance(stride, int) or isinstance(stride, bool) or stride < 1:
            raise ValueError(f"layer_merge='sparse_token' option stride={stride!r} must be an int >= 1")
        if grid is not None and grid[0] * grid[1] < stride:
            raise ValueError(
                f"layer_merge='sparse_token' averages every {stride} consecutive tokens (option stride), "
                f"but the {grid[0]}x{grid[1]} grid has only {grid[0] * grid[1]}, too few for one; "
                f"accepted: a grid of at least {stride} tokens, or stride <= {grid[0] * grid[1]}"
            )

    def finish(self, fused: torch.Tensor) -> torch.Tensor:
        layers = fused.split(self.dim, dim=-1)
        batch, cells, width = layers[0].shape
        kept = cells // self.stride * self.stride
        pooled = [x[:, :kept].reshape(batch, -1, self.stride, width).mean(dim=2) for x in layers[:-1]]
        return torch.cat([layers[-1], *pooled], dim=1)


@LAYER_COMBINES.register("mmfuser")
class MMFuser(PerLayerSlots):
    """MMFuser: the deepest hooked layer's tokens cross-attend over the shallower layers' tokens,
    then self-attention, with a residual to the deep tokens:
    ``x_L + y + SA(LN(y))`` with ``y = CA(LN(x_L), LN([x_1; ...; x_{L-1}]))``.

    The deepest layer is the last in hooks order (hooks list layers shallow to deep, as every preset
    does); the shallower layers' tokens are concatenated along the sequence. Plain multi-head
    attention stands in for the paper's deformable attention, and its learned layer scales (zero at
    start) are left out, so the attention is trained from its first step.

    Args:
        heads: attention heads (default: the largest of 8, 4, 2, 1 dividing the width).
    """

    fused_output = False

    def __init__(self, shape: CombineShape, normalize: bool = True, *, heads: int | None = None) -> None:
        super().__init__(shape, normalize)
        self.check(shape.num_layers, shape.grid, {"heads": heads})
        dim = shape.dim
        count = attention_heads(dim, heads)
        self.query_norm, self.key_norm, self.norm = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.cross_attention = nn.MultiheadAttention(dim, count, batch_first=True)
        self.self_attention = nn.MultiheadAttention(dim, count, batch_first=True)

    @classmethod
    def check(cls, num_layers: int, grid: Sequence[int] | None, options: dict[str, Any]) -> None:
        if num_layers < 2:
            raise ValueError(
                f"layer_merge='mmfuser' needs at least 2 hooked layers (the deepest as queries, the "
                f"others as keys and values), got {num_layers}; accepted: hooks with 2 or more layers"
            )

    def finish(self, fused: torch.Tensor) -> torch.Tensor:
        layers = fused.split(self.dim, dim=-1)
        deep = layers[-1]
        keys = self.key_norm(torch.cat(layers[:-1], dim=1))
        attended, _ = self.cross_attention(self.query_norm(deep), keys, keys, need_weights=False)
        mixed = self.norm(attended)
        refined, _ = self.self_attention(mixed, mixed, mixed, need_weights=False)
        return deep + attended + refined


def build_layer_combine(
    layer_merge: str | Mapping[str, Any],
    in_dim: int,
    dim: int,
    num_layers: int,
    grid: Sequence[int],
    normalize: bool = True,
) -> LayerCombine:
    """Build the layer combine named by ``layer_merge`` (a name or ``{"kind": name, **options}``).

    Raises:
        ValueError: unknown name or option (the message lists the accepted ones), or hooked layers,
            a grid or options the combine cannot take.
    """
    return LAYER_COMBINES.build(layer_merge, CombineShape(in_dim, dim, num_layers, tuple(grid)), normalize)


def check_layer_merge(
    layer_merge: str | Mapping[str, Any], hooked: Mapping[str, int], grid: tuple[int, int] | None
) -> None:
    """Check that ``layer_merge`` can take each encoder's number of hooked layers on ``grid`` (None:
    not known yet) before anything is built.

    Args:
        hooked: encoder name -> how many layers it hooks.

    Raises:
        ValueError: an unknown strategy or option, or a count or grid it cannot take (the message
            names the encoder).
    """
    combine, options = LAYER_COMBINES.strategy(layer_merge)
    for name, count in hooked.items():
        try:
            combine.check(count, grid, options)
        except ValueError as error:
            raise ValueError(f"encoder {name!r}: {error}") from None
