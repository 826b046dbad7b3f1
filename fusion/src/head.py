"""FusionHead: the trainable part of a fused encoder (alignment, layer combine, encoder merge,
connector, and the DeepStack extra token sets of :mod:`encoder_fusion.deepstack`).

It knows each encoder only by its :class:`~encoder_fusion.geometry.EncoderGeometry`, so it can be trained
on cached features;
:class:`encoder_fusion.model.FusedEncoder` puts it behind the encoders.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch
from torch import nn

import encoder_fusion.kernels
from encoder_fusion.align import ALIGNERS, build_aligner
from encoder_fusion.combine import (
    LAYER_COMBINES,
    LN_EPS,
    LayerCombine,
    build_layer_combine,
    check_layer_merge,
)
from encoder_fusion.connector import build_connector
from encoder_fusion.deepstack import DeepStack
from encoder_fusion.encoders.base import as_hw
from encoder_fusion.geometry import EncoderGeometry
from encoder_fusion.kernels import NonFiniteError
from encoder_fusion.memory import check_fits
from encoder_fusion.merge import ENCODER_MERGES, build_encoder_merge


class FusionHead(nn.Module):
    """The trainable part: align each hooked layer to ``grid``, combine each encoder's layers, merge
    the encoders, project with the connector.

    Args:
        geometries: one :class:`EncoderGeometry` per encoder, in merge order.
        grid: the target grid (H, W) or an int; None takes the first encoder's grid.
        align: an alignment mode of :mod:`encoder_fusion.align` (a name or ``{"kind": ..., **options}``).
        layer_merge: a layer combine of :mod:`encoder_fusion.combine`.
        encoder_merge: an encoder merge of :mod:`encoder_fusion.merge`.
        connector: a connector config of :mod:`encoder_fusion.connector` (None: identity).
        merge_dim: when set, each encoder's combined tokens are projected by a Linear to this width
            before the merge; merges other than ``channel_concat`` need it when widths differ.
        normalize: True (default) layer-normalises each aligned layer over channels before the layer
            combine (``last`` and ``mean`` included, without affine; see :mod:`encoder_fusion.combine`), so
            encoders of different scale meet on equal footing; False takes the raw layers.
        deepstack_layers: encoder name -> some of its hooked layers (block indices as in its
            ``HookSpec.layers``; the geometries must carry ``layers``): each becomes an extra token
            set of :meth:`forward_deepstack` (see :mod:`encoder_fusion.deepstack`).

    With ``channel_concat``, no ``merge_dim``, an alignment that ``encoder_fusion.kernels.grid_fuse`` supports
    (bilinear, nearest, area) and a layer combine whose tokens are its ``grid_fuse`` output,
    alignment, layer combine and encoder merge of every encoder run as ONE
    ``encoder_fusion.kernels.grid_fuse`` call (``fused_route`` is True); otherwise each encoder's layers are
    aligned by its aligner and combined by one ``grid_fuse`` call on the aligned grids. Both routes compute
    the same function.

    Attributes:
        grid: the target grid (H, W); geometries: the encoders' geometries; normalize; fused_route:
            whether forward takes the one-call ``grid_fuse`` route; aligners, combines, projections,
            merge, connector, deepstack: the stages, one aligner / combine / projection per encoder.

    Raises:
        ValueError: no geometries, repeated names, a bad grid, ``merge_dim`` or ``normalize``,
            unknown strategy names or options, hooked layers or grids a layer combine cannot take,
            grids one alignment cannot align, encoder widths a merge cannot take, token layouts
            that differ between encoders, bad ``deepstack_layers`` or main tokens they cannot be
            added to.
    """

    def __init__(
        self,
        geometries: Sequence[EncoderGeometry],
        grid: int | Sequence[int] | None = None,
        align: str | Mapping[str, Any] = "bilinear",
        layer_merge: str | Mapping[str, Any] = "weighted_ln",
        encoder_merge: str | Mapping[str, Any] = "channel_concat",
        connector: str | Mapping[str, Any] | None = None,
        merge_dim: int | None = None,
        normalize: bool = True,
        deepstack_layers: Mapping[str, Sequence[int]] | None = None,
    ) -> None:
        super().__init__()
        geometries = list(geometries)
        if not geometries or not all(isinstance(g, EncoderGeometry) for g in geometries):
            raise ValueError(f"FusionHead needs a non-empty list of EncoderGeometry, got {geometries!r}")
        names = [g.name for g in geometries]
        if len(set(names)) != len(names):
            raise ValueError(f"encoder names must be unique within one fused model, got {names}")
        if merge_dim is not None and (
            not isinstance(merge_dim, int) or isinstance(merge_dim, bool) or merge_dim <= 0
        ):
            raise ValueError(f"merge_dim must be None or a positive int, got {merge_dim!r}")
        if not isinstance(normalize, bool):
            raise ValueError(f"normalize must be true or false, got {normalize!r}")
        self.geometries = geometries
        self.grid = as_hw(geometries[0].grid if grid is None else grid, "grid")
        # every hooked layer of every encoder is aligned to the grid, in float32, for each image
        check_fits(
            f"grid {self.grid[0]}x{self.grid[1]} (one image's aligned layers)",
            4.0 * self.grid[0] * self.grid[1] * sum(g.width * g.num_layers for g in geometries),
            "a grid the machine can hold (the encoders' own grids are 14x14 to 64x64)",
        )
        self.merge_dim = merge_dim
        self.normalize = normalize
        check_layer_merge(layer_merge, {g.name: g.num_layers for g in geometries}, self.grid)
        aligners = [build_aligner(align, g.width, g.grid, self.grid) for g in geometries]
        self.aligners = nn.ModuleList(aligners)
        combines = [
            build_layer_combine(layer_merge, g.width, aligner.out_dim, g.num_layers, self.grid, normalize)
            for g, aligner in zip(geometries, aligners)
        ]
        self.combines = nn.ModuleList(combines)
        layouts = {g.name: c.strides for g, c in zip(geometries, combines)}
        if len(set(layouts.values())) > 1:
            counts = {name: len(strides) for name, strides in layouts.items()}
            raise ValueError(
                f"layer_merge={LAYER_COMBINES.kind(layer_merge)!r} gives each encoder one token set per "
                f"hooked layer; the encoders' tokens line up only when they hook as many layers, got "
                f"{counts}"
            )
        self.projections = nn.ModuleList(
            nn.Identity() if merge_dim is None else nn.Linear(combine.out_dim, merge_dim)
            for combine in combines
        )
        widths = [c.out_dim if merge_dim is None else merge_dim for c in combines]
        self.merge = build_encoder_merge(encoder_merge, names, widths, self.grid, combines[0].strides)
        self.connector = build_connector(connector, self.merge.out_dim)
        self.deepstack = DeepStack(
            deepstack_layers, geometries, aligners, self.grid, connector, self.out_dim, normalize
        )
        cells = self.grid[0] * self.grid[1]
        if self.deepstack.entries and self.output_tokens != cells:
            raise ValueError(
                f"deepstack_layers adds each extra token set onto the main tokens, one per grid cell "
                f"({self.grid[0]}x{self.grid[1]} = {cells}), but layer_merge="
                f"{LAYER_COMBINES.kind(layer_merge)!r} with encoder_merge="
                f"{ENCODER_MERGES.kind(encoder_merge)!r} gives {self.output_tokens}; accepted: merges "
                "with one main token per cell (any but sparse_token, sequence_concat and interleave)"
            )
        align_kind = ALIGNERS.kind(align)
        self.fused_route = (
            align_kind in encoder_fusion.kernels.MODES
            and ENCODER_MERGES.kind(encoder_merge) == "channel_concat"
            and merge_dim is None
            and all(c.fused_output for c in combines)
        )
        self.fuse_mode = align_kind

    @property
    def output_tokens(self) -> int:
        """The number of tokens ``forward`` emits per image."""
        return self.merge.output_tokens

    @property
    def out_dim(self) -> int:
        """The width of the emitted tokens (the connector's ``out_dim``)."""
        return self.connector.out_dim

    def check_grids(self, grids: Sequence[Sequence[torch.Tensor]]) -> None:
        """Raise a ValueError naming the encoder and layer when ``grids`` does not fit the geometries."""
        if len(grids) != len(self.geometries):
            raise ValueError(
                f"FusionHead expects one list of layer grids per encoder "
                f"({len(self.geometries)}: {[g.name for g in self.geometries]}), got {len(grids)}"
            )
        batch = None
        for geometry, layers in zip(self.geometries, grids):
            if isinstance(layers, torch.Tensor) or len(layers) != geometry.num_layers:
                count = "a tensor" if isinstance(layers, torch.Tensor) else f"{len(layers)} grids"
                raise ValueError(
                    f"encoder {geometry.name!r} hooks {geometry.num_layers} layer(s) but got {count}; "
                    "give a list of (B, h, w, C) grids per encoder"
                )
            expected = (*geometry.grid, geometry.width)
            for index, layer in enumerate(layers):
                if (
                    not isinstance(layer, torch.Tensor)
                    or layer.ndim != 4
                    or tuple(layer.shape[1:]) != expected
                ):
                    shape = tuple(layer.shape) if isinstance(layer, torch.Tensor) else type(layer).__name__
                    raise ValueError(
                        f"encoder {geometry.name!r} layer {index} has shape {shape}; expected "
                        f"(B, {expected[0]}, {expected[1]}, {expected[2]}) from its geometry"
                    )
                batch = layer.shape[0] if batch is None else batch
                if layer.shape[0] != batch:
                    raise ValueError(
                        f"encoder {geometry.name!r} layer {index} has batch size {layer.shape[0]}, "
                        f"another grid has {batch}; all grids must share the batch"
                    )

    def forward(self, grids: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
        """Fuse the hooked grids: ``grids[e][l]`` is encoder e's hooked layer l as (B, h, w, C).

        Returns:
            The main tokens (B, output_tokens, out_dim).

        Raises:
            ValueError: grids that do not match the geometries (count, shape, batch).
        """
        self.check_grids(grids)
        if self.fused_route:
            tokens = self.forward_fused(grids)
        else:
            combined = []
            # a ModuleList yields plain Modules to a type checker: these are the combines __init__ built
            combines = cast("Sequence[LayerCombine]", self.combines)
            for geometry, aligner, combine, projection, layers in zip(
                self.geometries, self.aligners, combines, self.projections, grids
            ):
                try:
                    combined.append(projection(combine(layers, aligner)))
                except NonFiniteError as error:
                    raise self.poisoned(error, [(geometry, combine)]) from None
            tokens = self.merge(combined)
        return self.connector(tokens)

    def poisoned(
        self, error: NonFiniteError, encoders: Sequence[tuple[EncoderGeometry, LayerCombine]]
    ) -> NonFiniteError:
        """``grid_fuse``'s non-finite source, named by its encoder and hooked layer (``encoders``: the
        geometry and layer combine of each encoder whose layers the call read, in order)."""
        sources = [(geometry, i) for geometry, combine in encoders for i in combine.used_layers()]
        geometry, index = sources[error.source]
        if error.in_output:
            return NonFiniteError(
                f"the fused tokens of encoder {geometry.name!r} are NaN or Inf although its features are "
                f"finite ({error})",
                error.source,
                in_output=True,
            )
        layer = geometry.layers[index] if geometry.layers is not None else index
        return NonFiniteError(
            f"encoder {geometry.name!r}, hooked layer {layer} (HookSpec.layers[{index}]), holds NaN or Inf; "
            "accepted: finite features (check the images and the encoder's weights)",
            error.source,
        )

    def forward_deepstack(
        self, grids: Sequence[Sequence[torch.Tensor]]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The main tokens, as :meth:`forward`, and the DeepStack extra token sets, each
        (B, output_tokens, out_dim): one per ``deepstack_layers`` entry, in order (none without)."""
        return self(grids), self.deepstack(grids)

    def forward_fused(self, grids: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
        """Align, combine and channel-concat every encoder in one ``encoder_fusion.kernels.grid_fuse``
        call."""
        sources, groups, weights, ln_weight, ln_bias = [], [], [], [], []
        first_slot = 0
        # a ModuleList yields plain Modules to a type checker: these are the combines __init__ built
        combines = cast("Sequence[LayerCombine]", self.combines)
        for combine, layers in zip(combines, grids):
            inputs = combine.fuse_inputs(layers)
            sources += inputs.sources
            groups += [first_slot + slot for slot in inputs.slots]
            weights.append(inputs.weights)
            ln_weight += inputs.ln_weight or [None] * len(inputs.sources)
            ln_bias += inputs.ln_bias or [None] * len(inputs.sources)
            first_slot += combine.num_slots
        # under autocast one encoder may arrive in bf16 and another in fp32; grid_fuse takes one dtype
        dtype = functools.reduce(torch.promote_types, (s.dtype for s in sources))
        try:
            return encoder_fusion.kernels.grid_fuse(
                [s.to(dtype) for s in sources],
                self.grid,
                groups=groups,
                layer_weights=torch.cat(weights),
                ln_weight=ln_weight if any(w is not None for w in ln_weight) else None,
                ln_bias=ln_bias if any(b is not None for b in ln_bias) else None,
                mode=self.fuse_mode,
                eps=LN_EPS,
                normalize=self.normalize,
            )
        except NonFiniteError as error:
            raise self.poisoned(error, list(zip(self.geometries, combines))) from None

    def to_grid(self, tokens: torch.Tensor) -> torch.Tensor:
        """Map output tokens (B, output_tokens, D') back onto the target grid: (B, H, W, D').

        A reshape for one token per location; otherwise (``sequence_concat``, ``interleave``,
        ``sparse_token``) each location the mean of the tokens that cover it.

        Raises:
            ValueError: not (B, output_tokens, D').
        """
        if not isinstance(tokens, torch.Tensor) or tokens.ndim != 3 or tokens.shape[1] != self.output_tokens:
            shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise ValueError(f"to_grid takes tokens (B, {self.output_tokens}, D), got {shape}")
        return self.merge.to_grid(tokens)

    def layer_weights(self) -> dict[str, list[float]]:
        """Each encoder's softmax-normalised learned layer weights (``weighted_ln``); else empty."""
        combines = cast("Sequence[LayerCombine]", self.combines)  # as in forward_fused
        learned = {g.name: c.learned_weights() for g, c in zip(self.geometries, combines)}
        return {name: weights for name, weights in learned.items() if weights is not None}
