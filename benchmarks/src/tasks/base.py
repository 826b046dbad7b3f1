"""What a probe task is, and the registry of them.

A probe task (classification, dense, localization) says which targets it reads (a field of
:class:`FeatureSplit`), how to prepare them for the fused grid, which head sits on the fused tokens,
its loss and its metrics. :func:`register_task` enters it in :data:`TASKS`; the shared loop that
trains and tests every task alike is :mod:`encoder_fusion.benchmarks.tasks.probe`. A leaf: it imports
nothing of the harness, so that task modules and the loop both build on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, TypeVar

import torch
from torch import nn

Grids = list[list[torch.Tensor]]  # [encoder][layer] -> (N, h, w, C)


@dataclass
class FeatureSplit:
    """Cached features of one split and its targets.

    Attributes:
        grids: ``grids[e][l]`` is the float ``(N, h, w, C)`` grid of layer ``l`` of encoder ``e``,
            sample dimension first, the same N everywhere.
        labels: long ``(N,)`` class ids, -1 for none; or None.
        masks: long ``(N, H, W)`` masks at image resolution, -1 for ignored pixels; or None.
        boxes: float ``(N, 4)`` normalised xyxy boxes, NaN rows for none; or None.
        num_classes: classes of ``labels`` (classification) or of ``masks`` (dense); 0 when unused.

    Raises:
        ValueError: grids that are not a non-empty list of lists of 4-D float tensors with one N,
            or targets whose shape does not fit N.
    """

    grids: Grids
    labels: torch.Tensor | None = None
    masks: torch.Tensor | None = None
    boxes: torch.Tensor | None = None
    num_classes: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.grids, (list, tuple)) or not self.grids:
            raise ValueError("FeatureSplit.grids must be a non-empty list (one entry per encoder)")
        sizes = set()
        for e, layers in enumerate(self.grids):
            if not isinstance(layers, (list, tuple)) or not layers:
                raise ValueError(f"FeatureSplit.grids[{e}] must be a non-empty list of (N, h, w, C) tensors")
            for i, grid in enumerate(layers):
                if not isinstance(grid, torch.Tensor) or grid.ndim != 4 or not grid.is_floating_point():
                    shape = tuple(grid.shape) if isinstance(grid, torch.Tensor) else type(grid).__name__
                    raise ValueError(
                        f"FeatureSplit.grids[{e}][{i}] must be a float (N, h, w, C) tensor, got {shape}"
                    )
                sizes.add(grid.shape[0])
        if len(sizes) != 1 or 0 in sizes:
            raise ValueError(
                f"FeatureSplit.grids must share one non-zero sample count N, got {sorted(sizes)}"
            )
        n = sizes.pop()
        expected = {"labels": (n,), "masks": (n, None, None), "boxes": (n, 4)}
        for field, shape in expected.items():
            value = getattr(self, field)
            if value is None:
                continue
            if (
                not isinstance(value, torch.Tensor)
                or value.ndim != len(shape)
                or any(want is not None and got != want for got, want in zip(value.shape, shape))
            ):
                got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                want = ", ".join("*" if s is None else str(s) for s in shape)
                raise ValueError(f"FeatureSplit.{field} must have shape ({want}) for N={n}, got {got}")
        if (
            not isinstance(self.num_classes, int)
            or isinstance(self.num_classes, bool)
            or self.num_classes < 0
        ):
            raise ValueError(f"FeatureSplit.num_classes must be an int >= 0, got {self.num_classes!r}")

    def __len__(self) -> int:
        return self.grids[0][0].shape[0]

    def select(self, index: torch.Tensor) -> Grids:
        """The grids of the samples ``index``, in the same nesting."""
        return [[grid[index] for grid in layers] for layers in self.grids]


class ProbeTask:
    """What one probe task adds to the shared loop. Subclasses set the class attributes and methods.

    Attributes:
        NAME: registry name. METRIC: the main metric's name. TARGET: the :class:`FeatureSplit`
        field it reads. ANNOTATION: the dataset annotation that field comes from (``label``,
        ``mask``, ``box``; see :mod:`encoder_fusion.benchmarks.datasets`). INPUT: ``"tokens"`` (the head gets
        ``(B, N, D)``) or ``"grid"`` (it gets ``fusion.to_grid(tokens)``, ``(B, H, W, D')``).
    """

    NAME: ClassVar[str]
    METRIC: ClassVar[str]
    TARGET: ClassVar[str]
    ANNOTATION: ClassVar[str]
    INPUT: ClassVar[str] = "tokens"
    # the head reads only the mean token, so a layer scan may cache features pooled
    POOLED: ClassVar[bool] = False
    # False: nothing trains; the head remembers the train split (``head.remember(tokens, targets)``)
    TRAINS: ClassVar[bool] = True

    def check(self, split: FeatureSplit, which: str) -> None:
        """Raise ValueError when ``split`` lacks or has invalid targets for this task."""
        if getattr(split, self.TARGET) is None:
            raise ValueError(f"the {self.NAME} probe needs {which} FeatureSplit.{self.TARGET}, got None")

    def targets(self, split: FeatureSplit, grid_hw: tuple[int, int]) -> torch.Tensor:
        """The per-sample targets in the form the loss and metrics take."""
        return getattr(split, self.TARGET)

    def valid(self, targets: torch.Tensor) -> torch.Tensor:
        """Bool ``(N,)``: samples with something to learn from (others are left out)."""
        raise NotImplementedError

    def build_head(self, width: int, grid_hw: tuple[int, int], num_classes: int) -> nn.Module:
        """The task head on fused features of ``width`` channels on a ``grid_hw`` grid."""
        raise NotImplementedError

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def scores(self, outputs: torch.Tensor, targets: torch.Tensor, num_classes: int) -> dict[str, float]:
        """Metrics over a whole split: the main one under ``METRIC``, others beside it."""
        raise NotImplementedError

    def baseline(
        self, train_targets: torch.Tensor, test_targets: torch.Tensor, num_classes: int
    ) -> dict[str, float]:
        """The metrics of the best constant prediction learnt from the train targets (no features)."""
        raise NotImplementedError

    def item_stats(self, outputs: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
        """Float64 ``(N, d)``: per test item, the additive statistics the main metric is computed from,
        so that the metric of any resample of the items is :meth:`metric_from_sums` of its rows' sum
        (what the paired bootstrap resamples)."""
        raise NotImplementedError

    def metric_from_sums(self, sums: torch.Tensor) -> torch.Tensor:
        """The main metric from summed item statistics ``(..., d) -> (...)``."""
        raise NotImplementedError


class MeanOfItemsTask(ProbeTask):
    """A probe whose main metric is a mean over test items of a per-item value (:meth:`item_value`)."""

    def item_value(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def item_stats(self, outputs: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
        value = self.item_value(outputs, targets).double()
        return torch.stack([value, torch.ones_like(value)], dim=1)

    def metric_from_sums(self, sums: torch.Tensor) -> torch.Tensor:
        return sums[..., 0] / sums[..., 1]


class ClassIdTask(ProbeTask):
    """A probe whose targets are long class ids in ``[0, num_classes)``, -1 where unlabelled."""

    def check(self, split: FeatureSplit, which: str) -> None:
        super().check(split, which)
        if split.num_classes < 2:
            raise ValueError(f"the {self.NAME} probe needs {which} num_classes >= 2, got {split.num_classes}")
        ids = getattr(split, self.TARGET)
        if ids.dtype != torch.long or bool(((ids < -1) | (ids >= split.num_classes)).any()):
            raise ValueError(
                f"{which} FeatureSplit.{self.TARGET} must be long class ids in [0, {split.num_classes}) "
                f"or -1, got dtype {ids.dtype}, range [{int(ids.min())}, {int(ids.max())}]"
            )


TASKS: dict[str, ProbeTask] = {}
T = TypeVar("T", bound=ProbeTask)


def register_task(cls: type[T]) -> type[T]:
    """Class decorator: make ``run_probe(cls.NAME, ...)`` use this task."""
    TASKS[cls.NAME] = cls()
    return cls
