"""Semantic segmentation on the fused grid: a per-token linear head, mIoU and pixel accuracy.

Masks arrive at image resolution and are brought to the fused grid first: each grid cell takes the
most frequent class among its labelled pixels (ties: the lowest class id), and is ignored (-1) when
it covers no labelled pixel. Masks smaller than the grid are upsampled by nearest neighbour instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from encoder_fusion.benchmarks.tasks.base import ClassIdTask, FeatureSplit, register_task

IGNORE_INDEX = -1
CHUNK = 64  # samples per bincount, so the (chunk, H, W, K) count table stays small


def masks_to_grid(masks: torch.Tensor, grid_hw: tuple[int, int], num_classes: int) -> torch.Tensor:
    """Resize long ``(N, H_img, W_img)`` masks (-1 = ignore) to ``(N, H, W)`` by majority vote.

    Pixel row ``y`` belongs to cell row ``y * H // H_img`` (columns likewise), so every pixel counts
    in exactly one cell; cells with no labelled pixel get -1.
    """
    height, width = grid_hw
    n, mask_h, mask_w = masks.shape
    if mask_h < height or mask_w < width:
        return F.interpolate(masks[:, None].double(), size=grid_hw, mode="nearest")[:, 0].long()
    rows = torch.arange(mask_h, device=masks.device) * height // mask_h
    cols = torch.arange(mask_w, device=masks.device) * width // mask_w
    cell = (rows[:, None] * width + cols[None, :]).expand(min(n, CHUNK), -1, -1)
    out = []
    for chunk in masks.split(CHUNK):
        c = chunk.shape[0]
        sample = torch.arange(c, device=masks.device)[:, None, None]
        labelled = chunk >= 0
        flat = ((sample * height * width + cell[:c]) * num_classes + chunk.clamp(min=0))[labelled]
        counts = torch.bincount(flat, minlength=c * height * width * num_classes)
        counts = counts.view(c, height, width, num_classes)
        majority = counts.argmax(dim=-1)
        majority[counts.sum(dim=-1) == 0] = IGNORE_INDEX
        out.append(majority)
    return torch.cat(out)


def confusion_matrix(predicted: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(K, K)`` counts ``[target, predicted]`` over the entries whose target is not -1."""
    keep = target >= 0
    flat = target[keep] * num_classes + predicted[keep]
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


def segmentation_scores(confusion: torch.Tensor) -> dict[str, float]:
    """mIoU over the classes present in target or prediction, and pixel accuracy."""
    confusion = confusion.double()
    intersection = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - intersection
    present = union > 0
    total = confusion.sum()
    return {
        "miou": (intersection[present] / union[present]).mean().item() if present.any() else 0.0,
        "pixel_accuracy": (intersection.sum() / total).item() if total > 0 else 0.0,
    }


class TokenClassifier(nn.Module):
    """LayerNorm and a linear layer on every cell: ``(B, H, W, D) -> (B, H, W, K)``."""

    def __init__(self, width: int, num_classes: int) -> None:
        super().__init__()
        self.norm, self.linear = nn.LayerNorm(width), nn.Linear(width, num_classes)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(grid))


@register_task
class DenseTask(ClassIdTask):
    """Per-cell classes on the fused grid; main metric mIoU, ``pixel_accuracy`` beside it."""

    NAME = "dense"
    METRIC = "miou"
    TARGET = "masks"
    ANNOTATION = "mask"
    INPUT = "grid"

    def targets(self, split: FeatureSplit, grid_hw: tuple[int, int]) -> torch.Tensor:
        if split.masks is None:  # run_probe checks every split first; a direct call may not have
            raise ValueError(f"the {self.NAME} probe needs FeatureSplit.{self.TARGET}, got None")
        return masks_to_grid(split.masks, grid_hw, split.num_classes)

    def valid(self, targets: torch.Tensor) -> torch.Tensor:
        return (targets >= 0).flatten(1).any(dim=1)

    def build_head(self, width: int, grid_hw: tuple[int, int], num_classes: int) -> nn.Module:
        return TokenClassifier(width, num_classes)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs.permute(0, 3, 1, 2), targets, ignore_index=IGNORE_INDEX)

    def scores(self, outputs: torch.Tensor, targets: torch.Tensor, num_classes: int) -> dict[str, float]:
        return segmentation_scores(confusion_matrix(outputs.argmax(dim=-1), targets, num_classes))

    def item_stats(self, outputs: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
        """Per image ``[intersection (K), predicted (K), target (K)]`` cell counts over its labelled
        cells: a confusion matrix's diagonal, column and row sums, image by image."""
        predicted = outputs.argmax(dim=-1).flatten(1)
        targets = targets.flatten(1)
        labelled = targets >= 0
        count = lambda ids, where: F.one_hot(ids.clamp(min=0), num_classes).mul(where[..., None]).sum(1)
        return torch.cat(
            [
                count(targets, labelled & (predicted == targets)),
                count(predicted, labelled),
                count(targets, labelled),
            ],
            dim=1,
        ).double()

    def metric_from_sums(self, sums: torch.Tensor) -> torch.Tensor:
        """mIoU over the classes present in target or prediction (as :func:`segmentation_scores`)."""
        intersection, predicted, target = sums.unflatten(-1, (3, -1)).unbind(-2)
        union = predicted + target - intersection
        present = union > 0
        iou = torch.where(present, intersection / union.clamp(min=1), 0.0)
        return torch.where(present.any(-1), iou.sum(-1) / present.sum(-1).clamp(min=1), 0.0)

    def baseline(self, train_targets: torch.Tensor, test_targets: torch.Tensor, num_classes: int) -> dict:
        majority = torch.bincount(train_targets[train_targets >= 0], minlength=num_classes).argmax()
        constant = torch.full_like(test_targets, int(majority))
        return segmentation_scores(confusion_matrix(constant, test_targets, num_classes))
