"""Box regression from the fused grid: one box per image, mean IoU.

The head scores every cell, takes the soft-argmax of the scores as the box centre (plus a small
learned offset) and regresses width and height from the score-weighted mean feature, so the box is
read from where the tokens are rather than from a flattened grid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import generalized_box_iou_loss

from encoder_fusion.benchmarks.tasks.base import FeatureSplit, MeanOfItemsTask, register_task


def box_iou_pairs(boxes: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    """IoU of each xyxy box with the box in the same row: ``(N, 4), (N, 4) -> (N,)``; 0 for empty unions."""
    top_left = torch.maximum(boxes[:, :2], others[:, :2])
    bottom_right = torch.minimum(boxes[:, 2:], others[:, 2:])
    intersection = (bottom_right - top_left).clamp(min=0).prod(dim=1)
    area = lambda b: (b[:, 2:] - b[:, :2]).clamp(min=0).prod(dim=1)
    union = area(boxes) + area(others) - intersection
    return torch.where(union > 0, intersection / union.clamp(min=torch.finfo(union.dtype).tiny), 0.0)


def box_scores(predicted: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Mean IoU, and the fraction of boxes with IoU >= 0.5."""
    iou = box_iou_pairs(predicted.double(), target.double())
    return {"mean_iou": iou.mean().item(), "iou@0.5": (iou >= 0.5).double().mean().item()}


class SoftArgmaxBoxHead(nn.Module):
    """``(B, H, W, D) -> (B, 4)`` normalised xyxy boxes."""

    def __init__(self, width: int, grid_hw: tuple[int, int]) -> None:
        super().__init__()
        height, grid_w = grid_hw
        ys = (torch.arange(height) + 0.5) / height
        xs = (torch.arange(grid_w) + 0.5) / grid_w
        centres = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1).reshape(-1, 2)
        self.register_buffer("centres", centres, persistent=False)  # (H*W, 2) as (x, y)
        self.norm = nn.LayerNorm(width)
        self.score = nn.Linear(width, 1)
        self.offset = nn.Linear(width, 2)
        self.size = nn.Linear(width, 2)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        tokens = self.norm(grid.flatten(1, 2))  # (B, H*W, D)
        weights = self.score(tokens).softmax(dim=1)  # (B, H*W, 1)
        pooled = (weights * tokens).sum(dim=1)
        centre = (weights * self.centres).sum(dim=1) + 0.25 * torch.tanh(self.offset(pooled))
        half = 0.5 * torch.sigmoid(self.size(pooled))
        return torch.cat([centre - half, centre + half], dim=-1).clamp(0.0, 1.0)


@register_task
class LocalizationTask(MeanOfItemsTask):
    """One box per image (NaN rows skipped); main metric mean IoU, ``iou@0.5`` beside it."""

    NAME = "localization"
    METRIC = "mean_iou"
    TARGET = "boxes"
    ANNOTATION = "box"
    INPUT = "grid"

    def check(self, split: FeatureSplit, which: str) -> None:
        super().check(split, which)
        boxes = split.boxes
        assert boxes is not None  # the check above raises ValueError for a split without boxes
        missing = boxes.isnan()
        partial = bool((missing.any(dim=1) & ~missing.all(dim=1)).any())
        known = boxes[~missing.any(dim=1)]
        in_range = bool(((known >= 0) & (known <= 1)).all())
        ordered = bool((known[:, 2:] >= known[:, :2]).all())
        if partial or not (in_range and ordered):
            raise ValueError(
                f"{which} FeatureSplit.boxes must be normalised xyxy rows in [0, 1] with x1 >= x0, y1 >= y0 "
                "(or all-NaN rows for no box)"
            )

    def valid(self, targets: torch.Tensor) -> torch.Tensor:
        return ~targets.isnan().any(dim=1)

    def build_head(self, width: int, grid_hw: tuple[int, int], num_classes: int) -> nn.Module:
        return SoftArgmaxBoxHead(width, grid_hw)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        targets = targets.to(outputs.dtype)
        return F.l1_loss(outputs, targets) + generalized_box_iou_loss(outputs, targets, reduction="mean")

    def scores(self, outputs: torch.Tensor, targets: torch.Tensor, num_classes: int) -> dict[str, float]:
        return box_scores(outputs, targets)

    def item_value(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return box_iou_pairs(outputs.double(), targets.double())

    def baseline(self, train_targets: torch.Tensor, test_targets: torch.Tensor, num_classes: int) -> dict:
        return box_scores(train_targets.mean(dim=0).expand_as(test_targets), test_targets)
