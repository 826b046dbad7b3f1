"""Timing that says when it cannot be trusted: the round robin goes on until every overhead interval is
within its target, or stops at the cap and marks the timing unstable, which the report's first
lines then say. The timer's noise is the test's own."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import encoder_fusion.benchmarks.timing.measure as measure
from encoder_fusion import FusedEncoder
from encoder_fusion.benchmarks.reports.records import StrategyRecord
from encoder_fusion.benchmarks.reports.render import render_markdown, timing_notice
from encoder_fusion.benchmarks.reports.report import build_report
from encoder_fusion.benchmarks.timing.options import LatencyOptions
from encoder_fusion.benchmarks.timing.stability import coefficient_of_variation, relative_halfwidth
from encoder_fusion.benchmarks.timing.timer import round_robin
from encoder_fusion.encoders import build_encoder
from encoder_fusion.encoders.tiny import tiny_spec

CONNECTOR = {"kind": "mlp", "out_dim": 24}


class NoisyTimer:
    """Runs the call, and reports 10 ms times a log-normal factor of spread ``spread`` instead of
    the time it took."""

    def __init__(self, spread: float, seed: int = 0) -> None:
        self.spread, self.rng = spread, np.random.default_rng(seed)

    def __call__(self, fn) -> float:
        fn()
        return float(10.0 * np.exp(self.spread * self.rng.standard_normal()))


def test_round_robin_goes_on_until_enough_or_the_cap():
    calls = {("a", "x"): lambda: None, ("b", "x"): lambda: None}
    asked = []

    def enough(samples) -> bool:
        asked.append(len(samples["a", "x"]))
        return len(samples["a", "x"]) >= 9

    samples = round_robin(lambda fn: 1.0, calls, warmup=0, repeats=4, enough=enough, max_repeats=20)
    assert asked == [4, 6, 8, 10] and len(samples["b", "x"]) == 10  # 4, then 2 at a time
    capped = round_robin(lambda fn: 1.0, calls, warmup=0, repeats=4, enough=lambda s: False, max_repeats=7)
    assert len(capped["a", "x"]) == 7


def test_the_halfwidth_and_the_coefficient_of_variation_by_hand():
    assert coefficient_of_variation([9.0, 10.0, 11.0]) == pytest.approx(1.0 / 10.0)
    same = [5.0, 6.0, 7.0, 8.0]
    assert relative_halfwidth(same, same, 200, 0) == 0.0  # every paired resample has ratio 1
    doubled = [2 * v for v in same]
    assert relative_halfwidth(doubled, same, 200, 0) == 0.0


@pytest.fixture(scope="module")
def pipelines():
    torch.manual_seed(0)
    clip, dino = build_encoder(tiny_spec("clip")), build_encoder(tiny_spec("dino"))
    return {
        "clip_only": FusedEncoder([clip], connector=CONNECTOR),
        "eagle": FusedEncoder([clip, dino], connector=CONNECTOR),
    }


def measured(pipelines, monkeypatch, spread: float):
    monkeypatch.setattr(measure, "Timer", lambda device: NoisyTimer(spread))
    options = LatencyOptions(
        warmup=0, repeats=4, image_size=64, threads=1, target_halfwidth=0.03, max_repeats=12
    )
    return measure.measure_latency(pipelines, options)


def test_a_quiet_machine_stops_at_the_first_rounds(pipelines, monkeypatch):
    results = measured(pipelines, monkeypatch, spread=0.0)
    reached = results["eagle"].latency.stability["1"]
    assert reached["stable"] and reached["repeats"] == 4 and reached["halfwidth"] == 0.0
    assert results["eagle"].latency.end_to_end["n"] == 4


def test_a_busy_machine_hits_the_cap_and_the_report_says_the_timing_is_unstable(pipelines, monkeypatch):
    results = measured(pipelines, monkeypatch, spread=0.5)
    reached = results["eagle"].latency.stability["1"]
    assert not reached["stable"] and reached["repeats"] == 12 and reached["halfwidth"] > 0.03
    assert reached["cv"] > 0.3
    records = []
    for name, cost in results.items():
        record = StrategyRecord(name=name, role="baseline" if name == "clip_only" else "fused", encoders=[])
        record.add_cost(cost)
        records.append(record)
    report = build_report(records, env={"device": "cpu"})
    notice = timing_notice(report)
    assert notice.startswith("**UNSTABLE TIMING: after 12 rounds (bench.latency.max_repeats)")
    assert f"±{100 * reached['halfwidth']:.1f} % of the ratio (target ±3.0 %)" in notice
    assert f"vary by up to {100 * reached['cv']:.0f} %" in notice
    assert render_markdown(report).startswith(notice)
