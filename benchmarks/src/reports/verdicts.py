"""What a run's numbers say about each fused strategy: the paired interval of every accuracy change,
whether the test split can detect the smallest change worth having, the verdict, and the accuracy
bought per unit of extra cost (see :mod:`encoder_fusion.benchmarks.reports.stats` for how intervals
are drawn).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from encoder_fusion.benchmarks.options import OptionError, check_resamples
from encoder_fusion.benchmarks.reports.records import StrategyRecord
from encoder_fusion.benchmarks.reports.stats import needed_items, paired_delta_ci, verdict

# the cost step the trade-off is quoted per: +10 % of the baseline's time
COST_STEP = 0.10


@dataclass(frozen=True)
class AssessOptions:
    """How to judge: bootstrap resamples of every interval, the smallest change worth detecting
    (percentage points), a cost budget against the baseline (null: none) and the seed.

    Raises:
        ValueError: naming the field, the value and what is accepted.
    """

    ci_resamples: int = 2000
    min_detectable_pp: float = 1.0
    max_overhead: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        check_resamples(self.ci_resamples)
        value = self.min_detectable_pp
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise OptionError(
                "{min_detectable_pp} must be a number > 0 (percentage points)", {"min_detectable_pp": value}
            )
        budget = self.max_overhead
        if budget is not None and (
            isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 1
        ):
            raise OptionError(
                "{max_overhead} must be null or a ratio > 1 (1.2: at most 20 % more time than the baseline)",
                {"max_overhead": budget},
            )


def add_delta_intervals(
    records: Mapping[str, StrategyRecord],
    items: Mapping[tuple[str, str], torch.Tensor],
    metrics: Mapping[str, Callable[[torch.Tensor], torch.Tensor]],
    baseline: str,
    options: AssessOptions,
) -> None:
    """Set ``delta_ci`` (the paired 95 % interval of the change against ``baseline``, in the units of
    ``delta``) and ``detection`` on every task result that has item statistics, in place.
    ``items`` maps ``(strategy, task)`` to its per-item statistics, and ``metrics`` maps each task to
    the metric of their sum (the task's ``metric_from_sums``).

    ``detection`` is ``{"min_detectable", "half_width", "needed_items"}``: the smallest change worth
    detecting (``bench.min_detectable_pp`` as a fraction), the interval's half-width, and the test
    items it would take to narrow it to that change (None when the split already suffices).
    """
    minimum = options.min_detectable_pp / 100
    for name, record in records.items():
        for task, result in record.accuracy.items():
            ours, theirs = items.get((name, task)), items.get((baseline, task))
            if ours is None or theirs is None:
                continue
            interval = paired_delta_ci(ours, theirs, metrics[task], options.ci_resamples, options.seed)
            result.delta_ci = interval
            result.detection = {
                "min_detectable": minimum,
                "half_width": (interval[1] - interval[0]) / 2,
                "needed_items": needed_items(ours.shape[1], interval, minimum),
            }


def per_cost_step(delta: float | None, overhead: float | None) -> float | None:
    """Percentage points of accuracy per +10 % of cost; None when either is unknown or the strategy
    costs no more than the baseline."""
    if delta is None or overhead is None or overhead <= 1:
        return None
    return 100 * delta / ((overhead - 1) / COST_STEP)


def assess(record: StrategyRecord, options: AssessOptions) -> None:
    """Set ``verdict`` and ``tradeoff`` on a fused strategy's record, in place (see
    :func:`encoder_fusion.benchmarks.reports.stats.verdict`): per task, pp per +10 % of time to first
    token and of vision time, and, with ``bench.max_overhead``, whether the overhead fits it."""
    intervals = {task: result.delta_ci for task, result in record.accuracy.items()}
    record.verdict = verdict(intervals)
    overhead, vision = record.overhead(), record.vision_overhead()
    record.tradeoff = {
        "pp_per_10pct_ttft": {t: per_cost_step(r.delta, overhead) for t, r in record.accuracy.items()},
        "pp_per_10pct_vision": {t: per_cost_step(r.delta, vision) for t, r in record.accuracy.items()},
        "max_overhead": options.max_overhead,
        "fits_budget": None
        if options.max_overhead is None or overhead is None
        else overhead <= options.max_overhead,
    }
