"""Cost curves of a sweep: every swept numeric key against each strategy's overheads, visual tokens and
accuracy changes, from hand-built job reports (and one tiny real sweep); where a line crosses the
TTFT budget; unstable points flagged; a key that is not a number refused with the plottable ones."""

from __future__ import annotations

import dataclasses
import json

import pytest
from report_records import ENV, three_strategies

from encoder_fusion.benchmarks.cli import report_main
from encoder_fusion.benchmarks.reports.curves import CURVES_FILE, curves, write_curves
from encoder_fusion.benchmarks.reports.report import build_report


def job(size: int, tiling: str, overhead: float, fusion: str = "comm", unstable: bool = False, budget=None):
    """One job's report: the three hand-built strategies at one image size and tiling, the fused
    one's vision overhead ``overhead`` (interval +-0.05) and accuracy change growing with the size."""
    strategies = three_strategies()
    for record in strategies:
        record.ratios = dataclasses.replace(
            record.ratios, end_to_end_ci=[record.ratios.end_to_end - 0.05, record.ratios.end_to_end + 0.05]
        )
        record.latency.stability = {"4": {"stable": not unstable, "halfwidth": 0.1 if unstable else 0.01}}
    fused = strategies[2]
    fused.ratios = dataclasses.replace(
        fused.ratios, end_to_end=overhead, end_to_end_ci=[overhead - 0.05, overhead + 0.05]
    )
    fused.tokens = 196 * (5 if tiling == "2x2" else 1)
    report = build_report(strategies, run={
        "overrides": [f"data.image_size={size}", f"tiling={tiling}", f"fusion={fusion}"],
        "tiling": {"grid": [2, 2], "thumbnail": "last"} if tiling == "2x2" else {"grid": None},
        "bench": {"max_overhead": budget},
    }, env=ENV)  # fmt: skip
    report.record("comm").accuracy["classification"].delta = size / 10000
    report.record("comm").accuracy["classification"].delta_ci = [size / 10000 - 0.01, size / 10000 + 0.01]
    return report


def test_each_swept_numeric_key_gets_a_line_per_strategy_and_fixed_values():
    reports = {
        f"{size}-{tiling}": job(size, tiling, 1.2 + size / 1000 + (tiling == "2x2"), budget=2.0)
        for size in (224, 336, 448)
        for tiling in ("none", "2x2")
    }
    data = curves(reports)
    assert sorted(data["keys"]) == ["data.image_size", "tiling"] and data["not_plottable"] == {}
    size_lines = data["keys"]["data.image_size"]["lines"]
    comm = [line for line in size_lines if line["strategy"] == "comm"]
    assert [line["fixed"] for line in comm] == [{"tiling": "none"}, {"tiling": "2x2"}]
    points = comm[0]["points"]
    assert [p["x"] for p in points] == [224.0, 336.0, 448.0]
    assert [p["vision_overhead"] for p in points] == pytest.approx([1.424, 1.536, 1.648])
    assert points[0]["ttft_ci"] == pytest.approx([1.374, 1.474])  # no language model: the vision overhead
    assert points[2]["deltas"]["classification"]["delta"] == pytest.approx(0.0448)
    # the 2x2 line: 2.424 [2.374, ...] is over the 2.0 budget from the first size on; the whole-image
    # line never passes it
    assert comm[1]["crosses_budget_at"] == 224.0 and comm[0]["crosses_budget_at"] is None
    tiles = data["keys"]["tiling"]
    assert tiles["label"] == "tiles per image (whole image included)"
    assert [p["x"] for p in tiles["lines"][2]["points"]] == [1.0, 5.0]  # none: 1, 2x2 + whole: 5
    assert [p["visual_tokens"] for p in tiles["lines"][2]["points"]] == [196, 980]


def test_unstable_points_are_flagged_and_figures_and_json_are_written(tmp_path):
    reports = {"a": job(224, "none", 1.3), "b": job(336, "none", 1.4, unstable=True)}
    path = write_curves(tmp_path, reports)
    assert path == tmp_path / CURVES_FILE
    data = json.loads(path.read_text())
    assert [p["unstable"] for p in data["keys"]["data.image_size"]["lines"][0]["points"]] == [False, True]
    assert (tmp_path / "curves_data.image_size.png").stat().st_size > 1000


def test_a_key_whose_values_are_not_numbers_is_refused_naming_the_plottable_ones():
    reports = {"a": job(224, "none", 1.3, fusion="comm"), "b": job(336, "none", 1.4, fusion="eagle")}
    assert curves(reports)["not_plottable"] == {"fusion": ["comm", "eagle"]}
    with pytest.raises(
        ValueError,
        match=r"fusion-report --curve fusion: its values \['comm', 'eagle'\] are not numbers; accepted: "
        r"data.image_size",
    ):
        curves(reports, ["fusion"])
    with pytest.raises(ValueError, match=r"--curve seed: it was not swept; accepted: data.image_size"):
        curves(reports, ["seed"])


def test_a_tiny_sweep_over_image_sizes_draws_its_curves(tmp_path):
    from bench_runs import bench_process, run_ok

    folder = tmp_path / "sweep"
    command, env = bench_process(
        "-m", "experiment=smoke", "bench.latency.repeats=2", "data.options.num_images=24",
        "data.image_size=64,96", f"hydra.sweep.dir={folder}", cache=tmp_path / "cache",
    )  # fmt: skip
    run_ok(command, env)
    assert report_main([str(folder)]) == 0
    data = json.loads((folder / CURVES_FILE).read_text())
    lines = data["keys"]["data.image_size"]["lines"]
    assert {line["strategy"] for line in lines} == {"clip_only", "dino_only", "eagle"}
    assert all([p["x"] for p in line["points"]] == [64.0, 96.0] for line in lines)
    assert (folder / "curves_data.image_size.png").is_file()
    assert report_main([str(folder), "--curve", "fusion"]) == 2  # not swept: refused, exit non-zero
