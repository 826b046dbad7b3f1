"""Intervals and verdicts: the paired bootstrap on hand-built cases, mIoU resampled over images, ratio
intervals from paired repeats, the items a change needs, and each verdict rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from encoder_fusion.benchmarks.config.plan import ASSESS_KEYS, keyed
from encoder_fusion.benchmarks.reports.records import RatioRecord, StrategyRecord, TaskAccuracy, VlmRecord
from encoder_fusion.benchmarks.reports.stats import (
    metric_ci,
    needed_items,
    paired_delta_ci,
    ratio_ci,
    verdict,
)
from encoder_fusion.benchmarks.reports.verdicts import AssessOptions, assess, per_cost_step
from encoder_fusion.benchmarks.tasks import TASKS
from encoder_fusion.benchmarks.tasks.dense import confusion_matrix, segmentation_scores

MEAN = TASKS["classification"].metric_from_sums


def correct_items(correct: list[bool]) -> torch.Tensor:
    """Classification item statistics (one seed): [correct, 1] per item."""
    value = torch.tensor(correct, dtype=torch.float64)
    return torch.stack([value, torch.ones_like(value)], dim=1)[None]


@pytest.mark.parametrize(("k", "n"), [(1, 100), (3, 50), (20, 100), (37, 61)])
def test_two_prediction_sets_differing_on_k_of_n_items(k, n):
    """The strategy is right everywhere, the baseline wrong on exactly k items: the change is k/n."""
    ours = correct_items([True] * n)
    theirs = correct_items([False] * k + [True] * (n - k))
    low, high = paired_delta_ci(ours, theirs, MEAN, resamples=2000, seed=0)
    assert low <= k / n <= high
    assert low >= 0  # no resample can make the strategy worse
    # by hand: a resample's change is Binomial(n, k/n)/n; its 2.5th percentile is 0 only when the
    # chance of drawing none of the k items is over 2.5 %
    assert (low > 0) == ((1 - k / n) ** n < 0.025)
    if k >= 20:
        assert low > 0


def test_paired_interval_is_the_bootstrap_of_item_differences():
    """An independent computation: resample the per-item differences (averaged over seeds) with the same
    generator and take the percentiles of their means."""
    generator = torch.Generator().manual_seed(5)
    ours = (torch.rand(3, 73, generator=generator) > 0.3).double()
    theirs = (torch.rand(3, 73, generator=generator) > 0.5).double()
    stack = lambda v: torch.stack([v, torch.ones_like(v)], dim=2)
    interval = paired_delta_ci(stack(ours), stack(theirs), MEAN, resamples=500, seed=9)
    rng = np.random.default_rng(9)
    counts = rng.multinomial(73, np.full(73, 1 / 73), size=256)
    counts = np.concatenate([counts, rng.multinomial(73, np.full(73, 1 / 73), size=244)])
    differences = (ours - theirs).mean(0).numpy()
    resampled = counts @ differences / 73
    np.testing.assert_allclose(interval, np.percentile(resampled, [2.5, 97.5]), rtol=1e-12)


def test_miou_from_summed_item_stats_is_the_confusion_matrix_miou_on_any_resample():
    task = TASKS["dense"]
    generator = torch.Generator().manual_seed(1)
    outputs = torch.randn(9, 3, 5, 4, generator=generator)  # 9 images, a 3x5 grid, 4 classes
    targets = torch.randint(-1, 4, (9, 3, 5), generator=generator)
    stats = task.item_stats(outputs, targets, 4)
    assert stats.shape == (9, 12) and stats.dtype == torch.float64
    for rows in (list(range(9)), [0, 0, 3, 8, 8, 8], [4]):
        expected = segmentation_scores(confusion_matrix(outputs[rows].argmax(-1), targets[rows], 4))["miou"]
        assert task.metric_from_sums(stats[rows].sum(0)).item() == pytest.approx(expected, abs=1e-12)
    low, high = metric_ci(stats[None], task.metric_from_sums, resamples=300)
    assert 0 <= low <= task.metric_from_sums(stats.sum(0)).item() <= high <= 1


def test_ratio_interval_from_paired_repeats():
    rng = np.random.default_rng(3)
    baseline = 100 + rng.normal(0, 20, 40)  # a noisy machine: both calls of a round share its slowdown
    assert ratio_ci(1.5 * baseline, baseline, resamples=400) == pytest.approx([1.5, 1.5])
    noisy = 1.5 * baseline + rng.normal(0, 5, 40)
    low, high = ratio_ci(noisy, baseline, resamples=1000)
    assert low < 1.5 < high and high - low < 0.2
    with pytest.raises(ValueError, match="paired repeats must be two equal-length lists"):
        ratio_ci([1.0, 2.0], [1.0], resamples=100)


def test_needed_items_scale_with_the_square_of_the_half_width():
    assert needed_items(100, [-0.04, 0.06], 0.01) == 2500  # half-width 5 pp -> (5/1)^2 x 100
    assert needed_items(100, [0.02, 0.03], 0.01) is None


@pytest.mark.parametrize(
    ("intervals", "expected"),
    [
        ({"a": [0.01, 0.05], "b": [-0.02, 0.03]}, "gain"),
        ({"a": [0.01, 0.05], "b": [-0.04, -0.01]}, "no detectable gain"),  # a gain and a loss
        ({"a": [-0.05, -0.01], "b": [-0.02, 0.03]}, "worse"),
        ({"a": [-0.01, 0.02], "b": [-0.02, 0.0]}, "no detectable gain"),
        ({"a": [0.0, 0.02]}, "no detectable gain"),  # a bound at 0 is not above it
        ({"a": None, "b": [0.02, 0.04]}, "gain"),  # a task without an interval is left out
        ({}, "no detectable gain"),
    ],
)
def test_each_verdict_rule(intervals, expected):
    assert verdict(intervals) == expected


def test_assess_sets_verdict_tradeoff_and_budget():
    record = StrategyRecord(
        name="eagle",
        role="fused",
        encoders=["clip", "dino"],
        accuracy={
            "classification": TaskAccuracy("classification", delta=0.03, delta_ci=[0.01, 0.05]),
            "dense": TaskAccuracy("dense", delta=-0.01),
        },
        ratios=RatioRecord("clip_only", 1.4, [1.3, 1.5], {"1": 1.4}, {"1": [1.3, 1.5]}, ""),
    )
    record.vlm = VlmRecord(
        llm="tiny",
        hidden_size=32,
        visual_tokens=16,
        prompt_tokens=4,
        decode_tokens=2,
        prefill={},
        ttft={},
        decode_tokens_per_s=None,
        prefill_gflops=0.0,
        llm_share=0.5,
        ratios={"ttft": 1.05, "vision": 1.4},
    )
    assess(record, AssessOptions(max_overhead=1.1))
    assert record.verdict == "gain"
    tradeoff = record.tradeoff
    assert tradeoff["pp_per_10pct_ttft"]["classification"] == pytest.approx(6.0)  # 3 pp for +5 %
    assert tradeoff["pp_per_10pct_vision"]["classification"] == pytest.approx(0.75)  # 3 pp for +40 %
    assert tradeoff["pp_per_10pct_ttft"]["dense"] == pytest.approx(-2.0)
    assert tradeoff["fits_budget"] is True and tradeoff["max_overhead"] == 1.1
    assess(record, AssessOptions(max_overhead=1.01))
    assert record.tradeoff["fits_budget"] is False
    assert per_cost_step(0.02, 0.9) is None and per_cost_step(None, 1.2) is None


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("ci_resamples", 99, r"bench.ci_resamples=99 must be an int >= 100"),
        ("min_detectable_pp", 0, r"bench.min_detectable_pp=0 must be a number > 0"),
        ("min_detectable_pp", -1.5, r"bench.min_detectable_pp=-1.5 must be a number > 0"),
        ("max_overhead", 1.0, r"bench.max_overhead=1.0 must be null or a ratio > 1"),
        ("max_overhead", 0.5, r"bench.max_overhead=0.5 must be null or a ratio > 1"),
    ],
)
def test_bad_interval_settings_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=message), keyed(ASSESS_KEYS):  # named as the config keys
        AssessOptions(**{field: value})
