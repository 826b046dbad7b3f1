"""Intervals and verdicts: paired bootstrap intervals of accuracy changes and latency ratios, the
number of test items a change needs, and the verdict on a fused strategy.

Accuracy: every strategy is scored on the same test items with the same seeds, so a change against
the baseline is paired. A resample draws the test items with replacement, once for both strategies;
each strategy's metric on it is computed from its summed per-item statistics
(:meth:`encoder_fusion.benchmarks.tasks.ProbeTask.item_stats`: correct or not, an IoU, or an image's per-class
cell counts for mIoU, so mIoU is resampled over images), averaged over seeds, and the change is the
difference. The interval is the 2.5th and 97.5th percentiles of the resampled changes.

Latency: the repeats of every call are taken round-robin, so repeat ``r`` of a strategy and of the
baseline ran side by side. A resample draws repeats with replacement, once for both, and takes the
ratio of their medians.

Every resample is drawn from a generator seeded with a fixed seed: the same inputs give the same
interval. :func:`stats` summarises timings (median, p10, p90).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

LEVEL = 0.95
CHUNK = 256  # resamples drawn at once, so the (resamples, items) weight table stays small
VERDICTS = ("gain", "worse", "no detectable gain")


def stats(samples_ms: Sequence[float] | np.ndarray) -> dict:
    """Median, p10 and p90 (linear interpolation) of timings in milliseconds, and their count."""
    values = np.asarray(samples_ms, dtype=np.float64)
    p10, median, p90 = np.percentile(values, [10, 50, 90])
    return {"median": float(median), "p10": float(p10), "p90": float(p90), "n": int(values.size)}


def percentiles(values: np.ndarray) -> list[float]:
    """The 95 % interval of ``values``: their 2.5th and 97.5th percentiles."""
    lo, hi = np.percentile(values, [50 * (1 - LEVEL), 50 * (1 + LEVEL)])
    return [float(lo), float(hi)]


def _resample_counts(rng: np.random.Generator, items: int, resamples: int) -> np.ndarray:
    """``(resamples, items)`` counts: how often each item is drawn in each resample."""
    return rng.multinomial(items, np.full(items, 1.0 / items), size=resamples).astype(np.float64)


def resampled_metric(
    stats: torch.Tensor | Sequence[torch.Tensor],
    metric: Callable[[torch.Tensor], torch.Tensor],
    resamples: int,
    seed: int,
) -> np.ndarray:
    """The seed-averaged metric on each of ``resamples`` resamples of the items.

    Args:
        stats: float64 ``(seeds, items, d)`` per-item statistics, or a list of them with one item
            count (paired strategies: the same resamples serve every entry).
        metric: summed statistics ``(..., d) -> (...)``.

    Returns:
        ``(entries, resamples)`` (one row per entry of ``stats`` when it is a list).
    """
    entries = [stats] if isinstance(stats, torch.Tensor) else list(stats)
    items = {int(s.shape[1]) for s in entries}
    if len(items) != 1:
        raise ValueError(f"paired statistics must share one item count, got {sorted(items)}")
    (count,) = items
    rng = np.random.default_rng(seed)
    out = [[] for _ in entries]
    for start in range(0, resamples, CHUNK):
        weights = torch.from_numpy(_resample_counts(rng, count, min(CHUNK, resamples - start)))
        for row, entry in zip(out, entries):
            sums = torch.einsum("rn,snd->rsd", weights, entry.double())
            row.append(metric(sums).mean(dim=1).numpy())
    return np.stack([np.concatenate(row) for row in out])


def paired_delta_ci(
    strategy: torch.Tensor,
    baseline: torch.Tensor,
    metric: Callable[[torch.Tensor], torch.Tensor],
    resamples: int,
    seed: int = 0,
) -> list[float]:
    """95 % interval of (strategy's metric - baseline's) over paired resamples of the test items.

    Args:
        strategy, baseline: float64 ``(seeds, items, d)`` statistics of the same items and seeds.
    """
    if strategy.shape[:2] != baseline.shape[:2]:
        raise ValueError(
            "paired statistics must share seeds and items, got "
            f"{tuple(strategy.shape)} and {tuple(baseline.shape)}"
        )
    ours, theirs = resampled_metric([strategy, baseline], metric, resamples, seed)
    return percentiles(ours - theirs)


def metric_ci(
    stats: torch.Tensor, metric: Callable[[torch.Tensor], torch.Tensor], resamples: int, seed: int = 0
) -> list[float]:
    """95 % interval of one strategy's seed-averaged metric over resamples of its test items."""
    return percentiles(resampled_metric(stats, metric, resamples, seed)[0])


def ratio_ci(
    samples: Sequence[float], baseline: Sequence[float], resamples: int, seed: int = 0
) -> list[float]:
    """95 % interval of median(samples) / median(baseline) over paired resamples of the repeats
    (repeat ``r`` of both ran in the same round)."""
    ours, theirs = np.asarray(samples, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    if ours.shape != theirs.shape or ours.ndim != 1 or not ours.size:
        raise ValueError(
            f"paired repeats must be two equal-length lists, got {ours.shape} and {theirs.shape}"
        )
    rng = np.random.default_rng(seed)
    index = rng.integers(0, ours.size, size=(resamples, ours.size))
    return percentiles(np.median(ours[index], axis=1) / np.median(theirs[index], axis=1))


def needed_items(items: int, interval: Sequence[float], min_detectable: float) -> int | None:
    """How many test items would make the interval's half-width ``min_detectable`` (a half-width
    shrinks as one over the square root of the item count), or None when it already is at most that."""
    half = (interval[1] - interval[0]) / 2
    if half <= min_detectable:
        return None
    return math.ceil(items * (half / min_detectable) ** 2)


def verdict(intervals: Mapping[str, Sequence[float] | None]) -> str:
    """``gain`` when some task's interval lies above 0 and none lies below 0; ``worse`` when some task's
    lies below 0 and none above; ``no detectable gain`` otherwise (tasks without an interval are left
    out)."""
    known = [ci for ci in intervals.values() if ci is not None]
    above = any(lo > 0 for lo, _ in known)
    below = any(hi < 0 for _, hi in known)
    if above and not below:
        return "gain"
    if below and not above:
        return "worse"
    return "no detectable gain"
