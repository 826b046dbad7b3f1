"""A run with tiling: the timed pipelines read every image as tiles, their visual tokens and the
language model's prefill count them, and the report says by the probes and by the timed pipelines"""

from __future__ import annotations

import pytest
from bench_runs import CONF
from hydra import compose, initialize_config_dir

from encoder_fusion.benchmarks.reports.report import load_report
from encoder_fusion.benchmarks.run import run_benchmark


@pytest.mark.parametrize(("tiling", "tokens"), [("2x2", 4 * 16 + 16), ("anyres_max9", 16 + 16 + 1)])
def test_a_tiled_run_counts_and_times_its_tiles(tmp_path, tiling, tokens):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "config", overrides=["experiment=smoke", f"tiling={tiling}", f"bench.cache_dir={tmp_path}"]
        )
    report = load_report(run_benchmark(cfg, tmp_path / "run"))
    for record in report.strategies:
        assert not record.errors and record.tokens == tokens
        assert record.vlm.visual_tokens == tokens and set(record.latency.stages) == {"vision", "llm.prefill"}
    markdown = (tmp_path / "run" / "report.md").read_text()
    assert "by the probes and by the timed pipelines" in markdown
