"""The 2026 pairing end to end: tiny SigLIP2 and DINOv3 architectures swept against each other by
``fusion-bench -m`` through its Hydra main, in CI time."""

from __future__ import annotations

import pytest
from test_bench_e2e import bench_process, check_report, job_reports, run_ok

from benchmarks.cli import report_main
from benchmarks.report import load_report

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
