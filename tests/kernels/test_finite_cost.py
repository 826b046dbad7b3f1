"""The report of what the finite check of grid_fuse sources costs (benchmarks.kernel.finite_cost)."""

from __future__ import annotations

import json

import pytest

from encoder_fusion.benchmarks.kernel import finite_cost


def test_the_cost_report_times_both_calls_side_by_side(tmp_path, capsys):
    out = tmp_path / "finite.json"
    case = "tiny=3x3x40*2+5x4x24*1->4x6"
    finite_cost.main(
        ["--case", case, "--dtype", "fp32", "--batch", "1", "3", "--rounds", "6", "--out", str(out)]
    )
    report = json.loads(out.read_text())
    assert [(r["batch"], r["dtype"]) for r in report["rows"]] == [(1, "fp32"), (3, "fp32")]
    for row in report["rows"]:
        assert row["plain_ms"] > 0 and row["checked_ms"] > 0
        assert row["ratio"] == pytest.approx(row["checked_ms"] / row["plain_ms"])
        low, high = row["ratio_ci"]
        assert low <= high
        # two 3x3x40 sources and one 5x4x24, float32, per image
        assert row["source_gb"] == pytest.approx(row["batch"] * (2 * 9 * 40 + 20 * 24) * 4 / 1e9)
    printed = capsys.readouterr().out
    assert printed == out.with_suffix(".md").read_text()
    assert printed.startswith("# grid_fuse with and without the finite check of its sources")


def test_too_few_rounds_are_refused(capsys):
    with pytest.raises(SystemExit) as caught:
        finite_cost.main(["--rounds", "2"])
    assert caught.value.code == 2
    assert "--rounds must be at least 5, got 2" in capsys.readouterr().err
