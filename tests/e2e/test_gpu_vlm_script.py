"""benchmarks/gpu_vlm.sh on its CPU path: the sweep over language models runs and is aggregated."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from encoder_fusion.benchmarks.reports.report import load_report

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_gpu_vlm_script_sweeps_language_models_and_aggregates(tmp_path):
    env = {
        **os.environ,
        "LLMS": "tiny,none",
        "HF_HUB_OFFLINE": "1",
        "FUSION_CACHE": str(tmp_path / "cache"),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",  # this python as python3
    }
    cpu = ["experiment=smoke", "bench.device=cpu", "bench.latency.dtype=fp32", "bench.latency.streams=false"]
    done = subprocess.run(
        ["bash", "benchmarks/gpu_vlm.sh", str(tmp_path / "out"), *cpu],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "sweep exit 0" in done.stdout and "report exit 0" in done.stdout
    command = "command: python3 -m encoder_fusion.benchmarks.cli -m bench=gpu llm=tiny,none fusion=eagle"
    assert command in done.stdout
    report = load_report(tmp_path / "out" / "sweep" / "report.json")
    assert report.llms == ["tiny"] and report.failed_jobs == []
    fused = {s.name: s for s in report.strategies if s.role == "fused"}
    assert set(fused) == {"eagle [llm=tiny]", "eagle [llm=none]"}
    assert fused["eagle [llm=tiny]"].vlm.llm == "tiny" and fused["eagle [llm=none]"].vlm is None
