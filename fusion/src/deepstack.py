"""DeepStack (Qwen3-VL): extra visual token sets that a language model adds in its first layers.

``deepstack_layers`` maps an encoder's name to some of its hooked layers, block indices written as
in its ``HookSpec.layers``. Besides the main tokens, the head then gives one extra token set per
entry, encoders in the head's order and each encoder's entries in the order given: that layer
aligned to the target grid, layer-normalised (unless ``normalize=False``) and projected by a
connector of its own (the main connector's kind and options) to the main tokens' width:
``(B, H*W, D)``, token ``i`` at grid cell ``i`` like the main tokens, which must therefore be one
per cell. A language model adds extra set ``k`` to the hidden states of its decoder layer ``k`` at
the visual positions; the probes of ``benchmarks`` see the main tokens plus the sum of the sets.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from encoder_fusion.align import Aligner
from encoder_fusion.combine import build_layer_combine
from encoder_fusion.connector import CONNECTORS
from encoder_fusion.geometry import EncoderGeometry


def deepstack_entries(
    deepstack_layers: Mapping[str, Sequence[int]] | None, hooks: Mapping[str, Sequence[int] | None]
) -> list[tuple[int, int]]:
    """Check ``deepstack_layers`` against the hooks and return, per extra token set, (encoder index,
    position in that encoder's hooked layers).

    Args:
        deepstack_layers: encoder name -> block indices among its hooked layers; None for none.
        hooks: encoder name -> its ``HookSpec.layers`` as written (None: not known), in head order.

    Raises:
        ValueError: not a mapping of lists of ints, an encoder the model does not have, an entry
            that is not among that encoder's hooked layers, or one named twice.
    """
    if deepstack_layers is None:
        return []
    if not isinstance(deepstack_layers, Mapping):
        raise ValueError(
            "deepstack_layers must map encoder names to lists of hooked block indices, "
            f"got {deepstack_layers!r}"
        )
    unknown = [name for name in deepstack_layers if name not in hooks]
    if unknown:
        raise ValueError(
            f"deepstack_layers names encoder(s) {unknown} that this model does not have; "
            f"accepted: {', '.join(hooks)}"
        )
    entries = []
    for index, (name, hooked) in enumerate(hooks.items()):
        chosen = deepstack_layers.get(name, [])
        if isinstance(chosen, (str, int)) or not isinstance(chosen, Sequence):
            raise ValueError(f"deepstack_layers[{name!r}] must be a list of block indices, got {chosen!r}")
        if not chosen:
            continue
        if hooked is None:
            raise ValueError(
                f"deepstack_layers[{name!r}] needs the hooked block indices of encoder {name!r}; "
                "give them as EncoderGeometry.layers"
            )
        for position, layer in enumerate(chosen):
            if isinstance(layer, bool) or not isinstance(layer, int) or layer not in hooked:
                raise ValueError(
                    f"deepstack_layers[{name!r}] entry {layer!r} is not among the hooked layers of "
                    f"encoder {name!r}; accepted: {', '.join(map(str, hooked))} (its HookSpec.layers "
                    "as written)"
                )
            if layer in chosen[:position]:
                raise ValueError(f"deepstack_layers[{name!r}] names layer {layer} twice: {list(chosen)}")
            entries.append((index, list(hooked).index(layer)))
    return entries


class DeepStack(nn.Module):
    """The extra token sets of ``deepstack_layers`` (see the module docstring).

    Args:
        deepstack_layers: encoder name -> hooked block indices, or None for no extra sets.
        geometries: the head's :class:`~encoder_fusion.geometry.EncoderGeometry`, in head order.
        aligners: the head's aligners, one per encoder; each set is aligned by its encoder's, which
            stays the head's (see ``aligners`` below).
        grid: the target grid (H, W).
        connector: the main connector's config; each set gets one of its kind and options.
        out_dim: the main tokens' width.
        normalize: layer-normalise each layer (as the head does).

    Attributes:
        entries: (encoder index, hooked-layer position) per set; aligners, combines, connectors: one
            per set. ``aligners`` is a tuple, not a ModuleList: a set shares its encoder's aligner
            with the main tokens (a learned one is trained by both), and the head alone registers
            it, so its parameters are saved once, under the head's name.

    Raises:
        ValueError: as :func:`deepstack_entries`, or a connector that cannot project a layer's
            width to ``out_dim`` (the identity, when the widths differ).
    """

    def __init__(
        self,
        deepstack_layers: Mapping[str, Sequence[int]] | None,
        geometries: Sequence[EncoderGeometry],
        aligners: Sequence[Aligner],
        grid: tuple[int, int],
        connector: str | Mapping[str, Any] | None,
        out_dim: int,
        normalize: bool,
    ) -> None:
        super().__init__()
        self.entries = deepstack_entries(deepstack_layers, {g.name: g.layers for g in geometries})
        self.aligners = tuple(aligners[index] for index, _ in self.entries)
        self.combines = nn.ModuleList()
        self.connectors = nn.ModuleList()
        config = {**CONNECTORS.canonical("identity" if connector is None else connector), "out_dim": out_dim}
        for index, position in self.entries:
            geometry, width = geometries[index], aligners[index].out_dim
            assert geometry.layers is not None  # deepstack_entries took this entry from them
            self.combines.append(build_layer_combine("last", geometry.width, width, 1, grid, normalize))
            try:
                self.connectors.append(CONNECTORS.build(config, width))
            except ValueError as error:
                raise ValueError(
                    f"deepstack_layers[{geometry.name!r}] layer {geometry.layers[position]}: its own "
                    f"connector must project width {width} to the main tokens' {out_dim}: {error}"
                ) from None

    def forward(self, grids: Sequence[Sequence[torch.Tensor]]) -> list[torch.Tensor]:
        """The extra sets (B, H*W, out_dim) of ``grids[e][l]`` (as the head takes them)."""
        return [
            connector(combine([grids[index][position]], aligner))
            for (index, position), aligner, combine, connector in zip(
                self.entries, self.aligners, self.combines, self.connectors
            )
        ]
