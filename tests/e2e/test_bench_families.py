"""The 2026 pairing end to end: tiny SigLIP2 and DINOv3 architectures swept against each other by
``fusion-bench -m`` through its Hydra main, in CI time."""

from __future__ import annotations

import pytest
from bench_runs import bench_process, check_report, job_reports, run_ok

from encoder_fusion.benchmarks.cli import report_main
from encoder_fusion.benchmarks.reports.report import load_report

pytestmark = pytest.mark.slow


def test_smoke_sweep_of_tiny_siglip2_against_tiny_dinov3(tmp_path):
    sweep = tmp_path / "sweep"
    command, env = bench_process(
        "-m", "experiment=smoke", "encoders=tiny_siglip2_dinov3", "fusion=eagle,comm",
        f"hydra.sweep.dir={sweep}", cache=tmp_path / "cache",
    )  # fmt: skip
    run_ok(command, env)
    for fused in ("eagle", "comm"):
        report = check_report(job_reports(sweep)[f"fusion={fused}"], ["classification"], fused)
        models = {
            role: spec["model"] for s in report.strategies for role, spec in s.config["encoders"].items()
        }
        assert models == {
            "clip": "vit_base_patch16_siglip_256.v2_webli",
            "dino": "vit_small_patch16_dinov3.lvd1689m",
        }
        assert all(not s.errors for s in report.strategies)
    assert report_main([str(sweep)]) == 0
    names = {s.name for s in load_report(sweep / "report.json").strategies}
    assert {"eagle [fusion=eagle]", "comm [fusion=comm]"} <= names


def test_one_distilled_encoder_against_fusing_two(tmp_path):
    """fusion.baselines lists radio_only: a C-RADIO row beside the CLIP-only and DINOv2-only ones,
    probed and timed against CLIP-only in the same run as the fused pair."""
    from bench_runs import CONF
    from hydra import compose, initialize_config_dir

    from encoder_fusion.benchmarks.run import run_benchmark

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                "experiment=smoke",
                "encoders/radio=tiny_radio",
                "fusion.baselines=[clip_only,dino_only,radio_only]",
                f"bench.cache_dir={tmp_path / 'cache'}",
            ],
        )
    report = load_report(run_benchmark(cfg, tmp_path / "run"))
    assert [s.name for s in report.strategies] == ["clip_only", "dino_only", "radio_only", "eagle"]
    radio = report.record("radio_only")
    assert radio.role == "baseline" and radio.encoders == ["radio"] and not radio.errors
    assert radio.config["encoders"]["radio"]["model"] == "naflexvit_base_patch16_radio_v3.c_radio"
    assert radio.accuracy["classification"].delta_ci is not None
    assert radio.vlm.ratios["ttft"] == pytest.approx(
        radio.vlm.ttft["median"] / report.strategies[0].vlm.ttft["median"]
    )
    assert "| radio_only | radio |" in (tmp_path / "run" / "report.md").read_text()
