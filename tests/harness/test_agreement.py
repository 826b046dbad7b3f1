"""How far a cheap probe ranks strategies like the VLM probe: Spearman and Kendall against hand-worked
values, and the agreement rows of a run from constructed per-item results."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from encoder_fusion.benchmarks.reports.agreement import (
    agreement_sentence,
    agreement_verdict,
    kendall,
    probe_agreement,
    spearman,
)
from encoder_fusion.benchmarks.reports.records import StrategyRecord, TaskAccuracy


def test_rank_correlations_equal_hand_worked_values():
    a, b = np.array([1.0, 2, 3, 4]), np.array([1.0, 3, 2, 4])
    assert spearman(a, b) == pytest.approx(1 - 6 * 2 / (4 * 15))  # one swap: sum of d^2 = 2
    assert kendall(a, b) == pytest.approx((5 - 1) / 6)  # 5 concordant pairs, 1 discordant
    tied, rising = np.array([1.0, 1, 2]), np.array([1.0, 2, 3])
    assert spearman(tied, rising) == pytest.approx(1.5 / np.sqrt(1.5 * 2))  # mid-ranks 1.5, 1.5, 3
    assert kendall(tied, rising) == pytest.approx(2 / np.sqrt(2 * 3))  # tau-b
    assert spearman(-a, a) == pytest.approx(-1) and kendall(-a, a) == pytest.approx(-1)
    assert np.isnan(spearman(np.ones(3), rising)) and np.isnan(kendall(np.ones(3), rising))


def items_for(accuracy: float, n: int, seed: int) -> torch.Tensor:
    """(1, n, 2) per-item [correct, asked] with about ``accuracy`` of the items right."""
    generator = torch.Generator().manual_seed(seed)
    correct = (torch.rand(n, generator=generator) < accuracy).double()
    return torch.stack([correct, torch.ones(n, dtype=torch.float64)], dim=1)[None]


def constructed_run(vlm: list[float], cheap: dict[str, list[float]], n: int = 400):
    """Five strategies (clip_only first), each probe's per-item results near the given accuracies."""
    names = ["clip_only", "a", "b", "c", "d"]
    records, items = {}, {}
    for index, name in enumerate(names):
        record = StrategyRecord(name=name, role="baseline" if index == 0 else "fused", encoders=["clip"])
        for offset, (task, accuracies) in enumerate({"vlm": vlm, **cheap}.items()):
            stats = items_for(accuracies[index], n, seed=10 * index + offset)
            items[name, task] = stats
            record.accuracy[task] = TaskAccuracy(task, metric="accuracy", mean=float(stats[0, :, 0].mean()))
        records[name] = record
    for record in records.values():
        for task, result in record.accuracy.items():
            result.delta = result.mean - records["clip_only"].accuracy[task].mean
    metric = lambda sums: sums[..., 0] / sums[..., 1]
    return records, items, {task: metric for task in ["vlm", *cheap]}


def test_agreement_rows_follow_the_constructed_rankings():
    vlm = [0.30, 0.40, 0.50, 0.60, 0.70]
    records, items, metrics = constructed_run(
        vlm,
        {"knn": [0.2, 0.3, 0.4, 0.5, 0.6], "classification": [0.7, 0.6, 0.5, 0.4, 0.3], "flat": [0.5] * 5},
    )
    rows = {row["probe"]: row for row in probe_agreement(records, items, metrics, "clip_only", 300, seed=1)}
    assert set(rows) == {"knn", "classification", "flat"}
    knn, reversed_, flat = rows["knn"], rows["classification"], rows["flat"]
    assert knn["spearman"] == pytest.approx(1.0) and knn["kendall"] == pytest.approx(1.0)
    assert knn["spearman_ci"][0] > 0 and knn["verdict"] == "agrees"
    assert reversed_["spearman"] == pytest.approx(-1.0) and reversed_["verdict"] == "disagrees"
    assert flat["verdict"] == "inconclusive" and flat["spearman_ci"][0] < 0 < flat["spearman_ci"][1]
    assert knn["strategies"] == ["clip_only", "a", "b", "c", "d"]
    assert set(knn) == {"probe", "spearman", "spearman_ci", "kendall", "kendall_ci", "strategies", "verdict"}
    sentence = agreement_sentence(list(rows.values()))
    assert (
        sentence.startswith("knn ranked the 5 strategies like the vlm probe")
        and "classification, flat" in sentence
    )


def test_no_rows_without_the_vlm_probe_or_with_too_few_strategies():
    records, items, metrics = constructed_run([0.3, 0.4, 0.5, 0.6, 0.7], {"knn": [0.2, 0.3, 0.4, 0.5, 0.6]})
    without_vlm = {key: value for key, value in items.items() if key[1] != "vlm"}
    assert probe_agreement(records, without_vlm, metrics, "clip_only", 100) == []
    two = {name: records[name] for name in ("clip_only", "a")}
    assert probe_agreement(two, items, metrics, "clip_only", 100) == []
    assert agreement_verdict(None) == "inconclusive"
