"""k-NN classification on the mean fused token: no training, a cheap proxy (SAIL finds k-NN quality
predicts alignment better than linear separability).

The fusion head is the strategy's at initialisation (seeded per seed): alignment, layer combine and
merge as configured, its connector a random projection. Each test image's mean token votes among
its ``k`` nearest train images by cosine similarity; ties go to the class of the larger summed
similarity. Top-1 accuracy, per item, like the classification probe.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from encoder_fusion.benchmarks.options import OptionError, is_int
from encoder_fusion.benchmarks.tasks.base import register_task
from encoder_fusion.benchmarks.tasks.classification import ClassificationTask


def check_k(k: int) -> int:
    """``k`` as an int >= 1.

    Raises:
        OptionError: naming ``k``.
    """
    if not is_int(k) or k < 1:
        raise OptionError("{k} must be an int >= 1", {"k": k})
    return int(k)


def knn_votes(
    queries: torch.Tensor, bank: torch.Tensor, labels: torch.Tensor, k: int, num_classes: int
) -> torch.Tensor:
    """(Q, num_classes) votes of each query's ``k`` most cosine-similar bank rows: the count of each
    class among them, plus the sum of their ``(1 + similarity) / 2`` over ``k + 1`` (in [0, 1): it
    only breaks ties, towards the more similar class)."""
    similarity = F.normalize(queries.float(), dim=-1) @ F.normalize(bank.float(), dim=-1).T
    nearest, index = similarity.topk(min(k, bank.shape[0]), dim=1)
    picked = F.one_hot(labels[index], num_classes).float()  # (Q, k, classes)
    closeness = (1 + nearest.unsqueeze(-1)) / 2
    return picked.sum(1) + (picked * closeness).sum(1) / (k + 1)


class KnnHead(nn.Module):
    """Votes of the mean token among the remembered train images' mean tokens."""

    def __init__(self, k: int, num_classes: int) -> None:
        super().__init__()
        self.k, self.num_classes = k, num_classes
        self.register_buffer("bank", torch.zeros(0), persistent=False)
        self.register_buffer("labels", torch.zeros(0, dtype=torch.long), persistent=False)

    def remember(self, tokens: torch.Tensor, labels: torch.Tensor) -> None:
        """Keep the train images' mean tokens ``tokens`` (N, T, D) and their ``labels``."""
        self.bank, self.labels = tokens.mean(1), labels

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return knn_votes(tokens.mean(1), self.bank, self.labels, self.k, self.num_classes)


@register_task
class KnnTask(ClassificationTask):
    """k-NN top-1 accuracy on the mean fused token (see the module docstring); needs no training."""

    NAME = "knn"
    TRAINS: ClassVar[bool] = False

    def __init__(self, k: int = 10) -> None:
        self.k = check_k(k)

    def build_head(self, width: int, grid_hw: tuple[int, int], num_classes: int) -> nn.Module:
        return KnnHead(self.k, num_classes)
