"""Zero-shot correspondence: a label-free cheap probe of fine spatial detail.

Each test image is warped by a known transform (``task.correspondence.warp``: rotation, scale,
shift, horizontal flip), both go through the encoders and the strategy's fusion head at
initialisation, and every fused token of the warped image is matched to its most cosine-similar
token of the original. A match is right when the matched cell's centre lies within ``threshold``
grid cells of where the warp says the token came from: PCK (percentage of correct keypoints), the
score that "Law of Vision Representation in MLLMs" (Yang et al.) fits VLM accuracy with, here on
every fused token instead of annotated keypoints. Tokens the warp brings in from outside the
original image are left out. No labels are read, so it runs on any image folder.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from encoder_fusion.benchmarks.options import OptionError, check_positive
from encoder_fusion.benchmarks.reports.records import TaskAccuracy
from encoder_fusion.benchmarks.tasks.base import FeatureSplit, Grids, MeanOfItemsTask, register_task
from encoder_fusion.benchmarks.tasks.probe import seed_summary


@dataclasses.dataclass(frozen=True)
class WarpOptions:
    """A known geometric warp (``task.correspondence``) and the PCK threshold.

    Args:
        rotate: degrees, counter-clockwise.
        scale: > 0; below 1 zooms in (a crop resized to the whole image).
        shift: (x, y) in halves of the image side (normalised coordinates, -1..1 across).
        flip: mirror left-right.
        threshold: the PCK radius in grid cells (> 0).

    Raises:
        OptionError: naming the field, the value and what is accepted; a warp that leaves no
            overlap between the two images.
    """

    rotate: float = 10.0
    scale: float = 0.8
    shift: tuple[float, float] = (0.1, 0.0)
    flip: bool = False
    threshold: float = 1.0

    def __post_init__(self) -> None:
        check_positive("scale", self.scale)
        check_positive("threshold", self.threshold)
        shift = tuple(self.shift)
        if len(shift) != 2 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in shift):
            raise OptionError("{shift} must be two finite numbers (x, y)", {"shift": list(shift)})
        object.__setattr__(self, "shift", (float(shift[0]), float(shift[1])))
        if not isinstance(self.rotate, (int, float)) or not math.isfinite(self.rotate):
            raise OptionError("{rotate} must be a finite number of degrees", {"rotate": self.rotate})
        if not isinstance(self.flip, bool):
            raise OptionError("{flip} must be true or false", {"flip": self.flip})
        if not bool(inside(self.theta(), (32, 32)).any()):
            raise OptionError(
                "{warp} leaves no overlap between an image and its warp; accepted: a smaller rotate, "
                "a scale nearer 1, a shift within (-2, 2)",
                {"warp": dataclasses.asdict(self)},
            )

    def theta(self) -> torch.Tensor:
        """(2, 3): the warped image's normalised point p samples the original at ``theta @ [p, 1]``
        (``F.affine_grid`` semantics)."""
        angle = math.radians(self.rotate)
        cos, sin = math.cos(angle) * self.scale, math.sin(angle) * self.scale
        mirror = -1.0 if self.flip else 1.0
        return torch.tensor(
            [[cos * mirror, -sin, self.shift[0]], [sin * mirror, cos, self.shift[1]]], dtype=torch.float64
        )

    def key(self) -> dict:
        """What the warped pixels depend on, for the feature cache key."""
        return {"warp": dataclasses.asdict(self) | {"threshold": None}}


def cell_centres(grid_hw: tuple[int, int]) -> torch.Tensor:
    """(H * W, 2) normalised (x, y) centres of the cells of a grid, row-major."""
    height, width = grid_hw
    ys = (torch.arange(height, dtype=torch.float64) + 0.5) / height * 2 - 1
    xs = (torch.arange(width, dtype=torch.float64) + 0.5) / width * 2 - 1
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([x.flatten(), y.flatten()], dim=1)


def source_points(theta: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    """(H * W, 2): where in the original each warped cell centre came from (normalised x, y)."""
    centres = cell_centres(grid_hw)
    return centres @ theta[:, :2].T + theta[:, 2]


def inside(theta: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    """(H * W,) bools: the warped cell's source lies inside the original image."""
    return (source_points(theta, grid_hw).abs() <= 1).all(1)


def warp_images(images: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """``images`` (N, C, H, W) warped by ``theta`` (bilinear, zeros outside), in their dtype."""
    grid = F.affine_grid(theta.float().expand(images.shape[0], 2, 3), list(images.shape), align_corners=False)
    warped = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return warped.round().clamp(0, 255).to(images.dtype) if not images.is_floating_point() else warped


def warp_grid(grid: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """A channels-last feature grid (N, h, w, C) warped by ``theta`` like an image (for planted
    features, which have no pixels to warp)."""
    return warp_images(grid.permute(0, 3, 1, 2), theta).permute(0, 2, 3, 1).contiguous()


def pck_items(
    original: torch.Tensor,
    warped: torch.Tensor,
    grid_hw: tuple[int, int],
    theta: torch.Tensor,
    threshold: float,
) -> torch.Tensor:
    """Float64 (N, 2): per image, its correctly matched warped tokens and the tokens with a source
    inside the original (see the module docstring). ``original`` and ``warped``: (N, H * W, D)."""
    height, width = grid_hw
    similarity = F.normalize(warped.float(), dim=-1) @ F.normalize(original.float(), dim=-1).transpose(1, 2)
    matched = similarity.argmax(-1)  # (N, H * W): the original cell each warped token matches
    centres = cell_centres(grid_hw)
    truth = source_points(theta, grid_hw)
    error = centres[matched] - truth  # normalised units; a cell is 2 / width by 2 / height
    cells = torch.stack([error[..., 0] * width / 2, error[..., 1] * height / 2], dim=-1).norm(dim=-1)
    valid = inside(theta, grid_hw)
    correct = ((cells <= threshold) & valid).sum(1)
    return torch.stack([correct.double(), valid.sum().double().expand(len(correct))], dim=1)


@register_task
class CorrespondenceTask(MeanOfItemsTask):
    """PCK of token matches between images and their warps (see the module docstring). Runs through
    :func:`run_correspondence`, not the trained probe loop: nothing trains and it reads no labels."""

    NAME = "correspondence"
    METRIC = "pck"
    TARGET = "grids"
    ANNOTATION = "key"  # every image has one: no annotation is needed
    TRAINS = False

    def metric_from_sums(self, sums: torch.Tensor) -> torch.Tensor:
        return sums[..., 0] / sums[..., 1]


@torch.no_grad()
def run_correspondence(
    make_head: Callable[[], nn.Module],
    test: FeatureSplit,
    warped: Grids,
    warp: WarpOptions,
    seeds: Sequence[int],
    device: torch.device,
    batch_size: int = 32,
) -> TaskAccuracy:
    """PCK of each seed's fusion head at initialisation on ``test`` and its ``warped`` grids.

    Raises:
        ValueError: warped grids whose layout or sample count differs from the test split's.
    """
    layout = lambda grids: [[tuple(g.shape) for g in layers] for layers in grids]
    if layout(warped) != layout(test.grids):
        raise ValueError(f"warped grids {layout(warped)} do not match the test grids {layout(test.grids)}")
    pairs = FeatureSplit([*test.grids, *warped])
    encoders = len(test.grids)
    per_seed, items = [], []
    for seed in seeds:
        with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            # a FusionHead: forward(grids) and to_grid(tokens), which a type checker cannot see on a Module
            fusion = cast(Any, make_head().to(device).eval())
        outputs = []
        for start in range(0, len(test), batch_size):
            index = torch.arange(start, min(start + batch_size, len(test)))
            grids = [
                [g.to(device=device, dtype=torch.float32) for g in layers] for layers in pairs.select(index)
            ]
            # one token per grid cell, whatever the merge (to_grid stacks a sequence concat's tokens)
            original = fusion.to_grid(fusion(grids[:encoders]))
            moved = fusion.to_grid(fusion(grids[encoders:]))
            grid_hw = (original.shape[1], original.shape[2])
            cells = lambda grid: grid.flatten(1, 2).cpu()
            outputs.append(pck_items(cells(original), cells(moved), grid_hw, warp.theta(), warp.threshold))
        stats = torch.cat(outputs)
        items.append(stats)
        per_seed.append(float(stats[:, 0].sum() / stats[:, 1].sum()))
    return TaskAccuracy(
        task=CorrespondenceTask.NAME,
        metric=CorrespondenceTask.METRIC,
        **seed_summary(per_seed),
        seeds=list(seeds),
        extra={"warp": dataclasses.asdict(warp)},
        test_size=len(test),
        item_stats=torch.stack(items),
    )
