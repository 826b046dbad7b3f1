"""High-resolution images read in tiles, as LLaVA-NeXT ("anyres") and InternVL read them.

An image is cut into ``rows x cols`` equal regions; every region goes through the whole fused
pipeline (each encoder's own resize and normalisation, alignment, merge, connector) as an image of
its own, all regions of a batch in one pass. The regions' tokens follow in row-major order, with an
optional learned separator token after each row of tiles (LLaVA-NeXT's ``image_newline``), and the
whole image's tokens (the thumbnail) last, first (LLaVA-NeXT's order) or not at all.

``grid="auto"`` picks, per image, the grid of at most ``max_tiles`` tiles whose aspect ratio is
closest to the image's, as InternVL's ``find_closest_aspect_ratio`` does (on a tie, the larger grid
when the image has more than half its pixels); the tile size that rule compares against is the
largest input side among the encoders. An image whose sides are not multiples of its grid is first
resized to the nearest smaller size that is (at most ``rows - 1`` and ``cols - 1`` pixels), so
that the regions are equal.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

THUMBNAILS = ("first", "last", "none")
AUTO = "auto"


@dataclasses.dataclass(frozen=True)
class TilingSpec:
    """How images are tiled (``FusedEncoder(..., tiling={...})``).

    Args:
        grid: ``[rows, cols]`` (or one int for a square grid), or ``"auto"``.
        thumbnail: where the whole image's tokens go: ``first``, ``last`` or ``none``.
        max_tiles: the most tiles ``"auto"`` may choose (>= 1); unused with a fixed grid.
        newline: a learned separator token after each row of tiles.

    Raises:
        ValueError: naming the field, the value and what is accepted.
    """

    grid: tuple[int, int] | str = (2, 2)
    thumbnail: str = "last"
    max_tiles: int = 6
    newline: bool = False

    def __post_init__(self) -> None:
        grid = self.grid
        if grid != AUTO:
            if isinstance(grid, int) and not isinstance(grid, bool):
                grid = (grid, grid)
            if (
                isinstance(grid, str)
                or not isinstance(grid, Sequence)
                or len(grid) != 2
                or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in grid)
            ):
                raise ValueError(f"tiling grid={self.grid!r} must be [rows, cols] of ints >= 1, or 'auto'")
            object.__setattr__(self, "grid", (int(grid[0]), int(grid[1])))
        if self.thumbnail not in THUMBNAILS:
            raise ValueError(
                f"tiling thumbnail={self.thumbnail!r} is unknown; accepted: {', '.join(THUMBNAILS)}"
            )
        tiles = self.max_tiles
        if isinstance(tiles, bool) or not isinstance(tiles, int) or tiles < 1:
            raise ValueError(f"tiling max_tiles={tiles!r} must be an int >= 1")
        if not isinstance(self.newline, bool):
            raise ValueError(f"tiling newline={self.newline!r} must be true or false")

    @classmethod
    def from_any(cls, value: TilingSpec | Mapping[str, Any]) -> TilingSpec:
        """A spec from itself or a mapping of its fields.

        Raises:
            ValueError: not a mapping, or an unknown field (the accepted ones listed).
        """
        if isinstance(value, TilingSpec):
            return value
        if not isinstance(value, Mapping):
            raise ValueError(f"tiling must be a mapping of {', '.join(FIELDS)}, got {value!r}")
        unknown = sorted(set(value) - set(FIELDS))
        if unknown:
            raise ValueError(f"tiling has unknown field(s) {unknown}; accepted: {', '.join(FIELDS)}")
        fields: dict[str, Any] = {key: (tuple(v) if isinstance(v, list) else v) for key, v in value.items()}
        return cls(**fields)

    def as_dict(self) -> dict[str, Any]:
        """The spec as JSON-ready fields (``grid`` a list, or ``"auto"``)."""
        data = dataclasses.asdict(self)
        data["grid"] = list(self.grid) if self.grid != AUTO else AUTO
        return data


FIELDS = tuple(f.name for f in dataclasses.fields(TilingSpec))


def candidate_grids(max_tiles: int) -> list[tuple[int, int]]:
    """Every ``(rows, cols)`` of at most ``max_tiles`` tiles, fewest tiles first."""
    grids = [(r, c) for r in range(1, max_tiles + 1) for c in range(1, max_tiles + 1) if r * c <= max_tiles]
    return sorted(grids, key=lambda g: (g[0] * g[1], g[1], g[0]))


def choose_grid(height: int, width: int, max_tiles: int, tile: int) -> tuple[int, int]:
    """InternVL's choice: the grid whose ``cols / rows`` is closest to ``width / height``; on a tie,
    the larger grid when the image holds more than half of its ``tile``-sided tiles' pixels."""
    aspect, area = width / height, height * width
    best, best_difference = (1, 1), math.inf
    for rows, cols in candidate_grids(max_tiles):
        difference = abs(aspect - cols / rows)
        if difference < best_difference:
            best, best_difference = (rows, cols), difference
        elif difference == best_difference and area > 0.5 * tile * tile * rows * cols:
            best = (rows, cols)
    return best


def grid_of(spec: TilingSpec, height: int, width: int, tile: int) -> tuple[int, int]:
    """The grid ``spec`` gives an image of ``height`` x ``width``: its fixed one, or, for ``"auto"``,
    :func:`choose_grid`'s against ``tile``-sided tiles."""
    if spec.grid == AUTO:
        return choose_grid(height, width, spec.max_tiles, tile)
    return spec.grid  # type: ignore[return-value]


def token_count(spec: TilingSpec, grid: tuple[int, int], per_image: int) -> int:
    """Tokens of an image ``spec`` tiles by ``grid`` when one region gives ``per_image``: the tiles',
    the thumbnail's unless it is dropped, and one separator per row with ``newline``."""
    rows, cols = grid
    thumbnail = per_image if spec.thumbnail != "none" else 0
    return rows * cols * per_image + thumbnail + (rows if spec.newline else 0)


def cut_tiles(images: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, 3, H, W) images -> (B * rows * cols, 3, H // rows, W // cols) regions, each image's in
    row-major order; images whose sides are not multiples of the grid are first resized (bicubic,
    antialiased) to the nearest smaller size that is."""
    rows, cols = grid
    batch, channels, height, width = images.shape
    tile_h, tile_w = height // rows, width // cols
    if (tile_h * rows, tile_w * cols) != (height, width):
        resized = F.interpolate(
            images.float(),
            size=(tile_h * rows, tile_w * cols),
            mode="bicubic",
            antialias=True,
            align_corners=False,
        )
        images = resized.clamp(0, 255 if images.dtype == torch.uint8 else 1).to(images.dtype)
    tiles = images.reshape(batch, channels, rows, tile_h, cols, tile_w).permute(0, 2, 4, 1, 3, 5)
    return tiles.reshape(batch * rows * cols, channels, tile_h, tile_w)


class Tiler(nn.Module):
    """A :class:`TilingSpec` and its learned separator token (``newline``; width ``width``)."""

    def __init__(self, spec: TilingSpec, width: int) -> None:
        super().__init__()
        self.spec = spec
        # LLaVA-NeXT initialises image_newline with randn / sqrt(hidden); zeros would start every
        # separator equal to padding-like input
        self.newline = nn.Parameter(torch.randn(width) / math.sqrt(width)) if spec.newline else None

    def run(self, fuse, images: torch.Tensor | Sequence[torch.Tensor], tile: int, patches: Mapping[str, int]):
        """Tiled tokens and DeepStack sets of raw ``images`` through ``fuse`` (a batch of raw images ->
        ``(tokens (B, N, D), [set (B, N, D), ...])``).

        A (B, 3, H, W) tensor is one grid and returns ``(tokens (B, count, D), [sets])``; a list of
        (3, H, W) images of any sizes runs each size as one batch and returns lists of (count_i, D)
        per image, in order (for ``"auto"``, each its own grid).

        Raises:
            ValueError: not images, or tiles smaller than an encoder's patch (``patches``: encoder
                name -> patch size).
        """
        if isinstance(images, torch.Tensor):
            if images.ndim != 4:
                raise ValueError(f"tiled images must be (B, 3, H, W), got shape {tuple(images.shape)}")
            return self.run_batch(fuse, images, tile, patches)
        if (
            not isinstance(images, Sequence)
            or not images
            or not all(isinstance(image, torch.Tensor) and image.ndim == 3 for image in images)
        ):
            raise ValueError(
                "tiled images must be a (B, 3, H, W) tensor or a non-empty list of (3, H, W) tensors"
            )
        tokens: list[Any] = [None] * len(images)
        extras: list[list[Any]] = []
        for shape in dict.fromkeys(tuple(image.shape) for image in images):
            picked = [i for i, image in enumerate(images) if tuple(image.shape) == shape]
            batch_tokens, batch_extras = self.run_batch(
                fuse, torch.stack([images[i] for i in picked]), tile, patches
            )
            extras = extras or [[None] * len(images) for _ in batch_extras]
            for row, i in enumerate(picked):
                tokens[i] = batch_tokens[row]
                for k, extra in enumerate(batch_extras):
                    extras[k][i] = extra[row]
        return tokens, extras

    def run_batch(self, fuse, images: torch.Tensor, tile: int, patches: Mapping[str, int]):
        """:meth:`run` for one (B, 3, H, W) batch: one grid."""
        height, width = images.shape[-2:]
        grid = self.grid_for(height, width, tile)
        tile_hw = (height // grid[0], width // grid[1])
        for name, patch in patches.items():
            if min(tile_hw) < patch:
                raise ValueError(
                    f"tiling grid {grid[0]}x{grid[1]} cuts {height}x{width} images into "
                    f"{tile_hw[0]}x{tile_hw[1]} tiles, smaller than one {patch}-pixel patch of encoder "
                    f"{name!r}; accepted: a grid whose tiles are at least {patch} pixels a side"
                )
        tokens, extras = fuse(cut_tiles(images, grid))
        whole, whole_extras = fuse(images) if self.spec.thumbnail != "none" else (None, [None] * len(extras))
        return (
            self.assemble(tokens, whole, grid, separator=True),
            [
                self.assemble(extra, thumb, grid, separator=False)
                for extra, thumb in zip(extras, whole_extras)
            ],
        )

    def grid_for(self, height: int, width: int, tile: int) -> tuple[int, int]:
        """The grid of an image of ``height`` x ``width``: the fixed one, or :func:`choose_grid`'s."""
        return grid_of(self.spec, height, width, tile)

    def count(self, grid: tuple[int, int], per_image: int) -> int:
        """Tokens of an image tiled by ``grid`` when one image gives ``per_image``."""
        return token_count(self.spec, grid, per_image)

    def assemble(
        self, tiles: torch.Tensor, thumbnails: torch.Tensor | None, grid: tuple[int, int], separator: bool
    ) -> torch.Tensor:
        """One image set's tokens: ``tiles`` (B * rows * cols, N, D) and ``thumbnails`` (B, N, D) or
        None -> (B, count, D). ``separator`` False puts zeros where the newline tokens go (the
        DeepStack sets: nothing is added at a separator's position)."""
        rows, cols = grid
        batch = tiles.shape[0] // (rows * cols)
        per_row = tiles.reshape(batch, rows, cols * tiles.shape[1], tiles.shape[2])
        if self.newline is not None:
            token = self.newline if separator else torch.zeros_like(self.newline)
            token = token.to(tiles.dtype).expand(batch, rows, 1, tiles.shape[2])
            per_row = torch.cat([per_row, token], dim=2)
        out = per_row.reshape(batch, -1, tiles.shape[2])
        if thumbnails is None:
            return out
        return torch.cat([thumbnails, out] if self.spec.thumbnail == "first" else [out, thumbnails], dim=1)
