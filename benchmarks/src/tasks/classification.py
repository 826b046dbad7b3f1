"""Image classification: mean-pooled fused tokens, a linear classifier, top-1 accuracy."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from encoder_fusion.benchmarks.tasks.base import ClassIdTask, MeanOfItemsTask, register_task


def top1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows whose arg-max logit is the label."""
    return (logits.argmax(dim=-1) == labels).double().mean().item()


class PooledClassifier(nn.Module):
    """LayerNorm of the mean token, then a linear layer: ``(B, N, D) -> (B, K)``."""

    def __init__(self, width: int, num_classes: int) -> None:
        super().__init__()
        self.norm, self.linear = nn.LayerNorm(width), nn.Linear(width, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(tokens.mean(dim=1)))


@register_task
class ClassificationTask(ClassIdTask, MeanOfItemsTask):
    """One class per image; the main metric is top-1 accuracy; samples labelled -1 are skipped."""

    NAME = "classification"
    METRIC = "top1"
    TARGET = "labels"
    ANNOTATION = "label"
    POOLED = True

    def valid(self, targets: torch.Tensor) -> torch.Tensor:
        return targets >= 0

    def build_head(self, width: int, grid_hw: tuple[int, int], num_classes: int) -> nn.Module:
        return PooledClassifier(width, num_classes)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs, targets)

    def scores(self, outputs: torch.Tensor, targets: torch.Tensor, num_classes: int) -> dict[str, float]:
        return {"top1": top1(outputs, targets)}

    def item_value(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return outputs.argmax(dim=-1) == targets

    def baseline(self, train_targets: torch.Tensor, test_targets: torch.Tensor, num_classes: int) -> dict:
        majority = torch.bincount(train_targets, minlength=num_classes).argmax()
        return {"top1": (test_targets == majority).double().mean().item()}
