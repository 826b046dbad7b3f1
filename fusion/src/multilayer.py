"""The layer combines of the newer multi-layer methods, registered under ``layer_merge`` beside
those of :mod:`encoder_fusion.merge` (whose docstring states every combine's formula):

- ``dense_channel`` and ``sparse_token``: Dense Connector (Yao et al., NeurIPS 2024), two of its
  three ways to use several layers of one encoder; the third, sparse channel integration, is
  ``concat``.
- ``mmfuser``: MMFuser (Cao et al. 2024), the deep layer's tokens as queries over the shallower
  layers' tokens.

Each aligns and (with ``normalize``) layer-normalises the hooked layers in one
``encoder_fusion.kernels.grid_fuse`` call, like every combine; ``sparse_token`` and ``mmfuser`` then rearrange
or attend over the result in :meth:`~encoder_fusion.merge.LayerCombine.finish`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from encoder_fusion.align import attention_heads
from encoder_fusion.merge import LAYER_COMBINES, LayerCombine, PerLayerSlots


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

    def __init__(
        self,
        in_dim: int,
        dim: int,
        num_layers: int,
        grid: Sequence[int],
        normalize: bool = True,
        *,
        layer_groups: int = 2,
    ) -> None:
        super().__init__(in_dim, dim, num_layers, grid, normalize)
        self.check(num_layers, grid, {"layer_groups": layer_groups})
        sizes = [num_layers // layer_groups + (g < num_layers % layer_groups) for g in range(layer_groups)]
        self.groups = [g for g, size in enumerate(sizes) for _ in range(size)]
        self.out_dim = dim * layer_groups
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

    def __init__(
        self,
        in_dim: int,
        dim: int,
        num_layers: int,
        grid: Sequence[int],
        normalize: bool = True,
        *,
        stride: int = 8,
    ) -> None:
        super().__init__(in_dim, dim, num_layers, grid, normalize)
        self.check(num_layers, grid, {"stride": stride})
        self.stride = stride
        self.strides = (1,) + (stride,) * (num_layers - 1)

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

    def __init__(
        self,
        in_dim: int,
        dim: int,
        num_layers: int,
        grid: Sequence[int],
        normalize: bool = True,
        *,
        heads: int | None = None,
    ) -> None:
        super().__init__(in_dim, dim, num_layers, grid, normalize)
        self.check(num_layers, grid, {"heads": heads})
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
