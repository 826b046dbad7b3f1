"""Probe features of tiled images, read as a tiled :class:`encoder_fusion.FusedEncoder` reads them.

Every region of an image (its tiles, row-major, then the whole image when the thumbnail is kept) goes
through each frozen encoder as an image of its own, so the cache holds the regions' grids like any
other images' (:func:`encoder_fusion.benchmarks.run.prepare.tiled_grids`). A probe split keeps one
row per image, so an image's regions are stacked along the grid's height: layer ``l`` of an encoder
is ``(N, regions * h, w, C)``. :class:`TiledHead` undoes that stacking, runs the fusion head on every
region in one batch and assembles the tokens as :class:`encoder_fusion.tiling.Tiler` does (the same
order, the same learned separator), so a probe trains on what the tiled model would emit.
"""

from __future__ import annotations

import torch
from torch import nn

from encoder_fusion import FusionHead
from encoder_fusion.tiling import Tiler, TilingSpec

Grids = list[list[torch.Tensor]]  # [encoder][layer] -> (N, h, w, C)


def stack_regions(tiles: torch.Tensor, whole: torch.Tensor | None, grid: tuple[int, int]) -> torch.Tensor:
    """One layer's grids of every tile ``(N * rows * cols, h, w, C)`` (each image's row-major) and of
    every whole image ``(N, h, w, C)`` or None -> ``(N, regions * h, w, C)``, each image's regions
    stacked along the height: its tiles, then its whole image."""
    count = grid[0] * grid[1]
    _, height, width, channels = tiles.shape
    regions = tiles.reshape(-1, count, height, width, channels)
    if whole is not None:
        regions = torch.cat([regions, whole[:, None]], dim=1)
    return regions.reshape(regions.shape[0], -1, width, channels)


class TiledHead(nn.Module):
    """A fusion head reading the stacked region grids of :func:`stack_regions`, with the forward
    contract of :class:`encoder_fusion.FusionHead` (what the probes call).

    Args:
        head: the fusion head of one region (a :class:`encoder_fusion.FusionHead`).
        spec: the tiling; its ``thumbnail`` says whether the stacks end with the whole image and where
            its tokens go, its ``newline`` whether a learned separator follows each row of tiles.
        grid: the ``(rows, cols)`` every image of the split was cut into.
    """

    def __init__(self, head: FusionHead, spec: TilingSpec, grid: tuple[int, int]) -> None:
        super().__init__()
        self.head, self.grid = head, grid
        self.tiler = Tiler(spec, head.out_dim)
        self.tiles = grid[0] * grid[1]
        self.regions = self.tiles + (spec.thumbnail != "none")

    def _unstack(self, grids: Grids) -> tuple[Grids, int]:
        """The stacked grids as one batch of regions: every image's tiles, then every whole image."""
        batch = grids[0][0].shape[0]
        regions = []
        for layers in grids:
            per_encoder = []
            for grid in layers:
                _, stacked, width, channels = grid.shape
                split = grid.reshape(batch, self.regions, stacked // self.regions, width, channels)
                tiles = split[:, : self.tiles].flatten(0, 1)
                per_encoder.append(
                    torch.cat([tiles, split[:, self.tiles]]) if self.regions > self.tiles else tiles
                )
            regions.append(per_encoder)
        return regions, batch

    def _assemble(self, tokens: torch.Tensor, batch: int, separator: bool) -> torch.Tensor:
        tiles = tokens[: batch * self.tiles]
        whole = tokens[batch * self.tiles :] if self.regions > self.tiles else None
        return self.tiler.assemble(tiles, whole, self.grid, separator=separator)

    def forward(self, grids: Grids) -> torch.Tensor:
        regions, batch = self._unstack(grids)
        return self._assemble(self.head(regions), batch, separator=True)

    def forward_deepstack(self, grids: Grids) -> tuple[torch.Tensor, list[torch.Tensor]]:
        regions, batch = self._unstack(grids)
        tokens, extras = self.head.forward_deepstack(regions)
        return (
            self._assemble(tokens, batch, separator=True),
            [self._assemble(extra, batch, separator=False) for extra in extras],
        )

    def to_grid(self, tokens: torch.Tensor) -> torch.Tensor:
        """Assembled tokens ``(B, count, D)`` -> the tiles' grids placed side by side,
        ``(B, rows * H, cols * W, D')`` (what a dense head reads; the whole image's tokens and the
        separators are left out: they have no place on the image)."""
        rows, cols = self.grid
        per_region = self.head.output_tokens
        thumbnail = self.tiler.spec.thumbnail
        if thumbnail == "first":
            tokens = tokens[:, per_region:]
        elif thumbnail == "last":
            tokens = tokens[:, :-per_region]
        batch, _, width = tokens.shape
        tiles = tokens.reshape(batch, rows, -1, width)[:, :, : cols * per_region]
        grids = self.head.to_grid(tiles.reshape(batch * rows * cols, per_region, width))
        _, height, grid_width, channels = grids.shape
        placed = grids.reshape(batch, rows, cols, height, grid_width, channels).permute(0, 1, 3, 2, 4, 5)
        return placed.reshape(batch, rows * height, cols * grid_width, channels)

    def layer_weights(self) -> dict[str, list[float]]:
        """The region head's learned layer weights (one head reads every region)."""
        return self.head.layer_weights()

    @property
    def output_tokens(self) -> int:
        return self.tiler.count(self.grid, self.head.output_tokens)

    @property
    def out_dim(self) -> int:
        return self.head.out_dim
