"""Helpers shared by the end-to-end tests: the fusion-bench command line, run from the repository, and
the checks of the sweep folders and reports it writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from encoder_fusion.benchmarks.reports.report import load_report

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
BENCH = "from encoder_fusion.benchmarks.cli import bench_main; bench_main()"


def smoke_config(*overrides: str):
    """The composed config of ``experiment=smoke`` with ``overrides``, as ``fusion-bench`` composes it."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=["experiment=smoke", *overrides])


def bench_process(*args: str, cache: Path) -> tuple[list[str], dict]:
    """The fusion-bench command line (through its Hydra main) and an environment caching in ``cache``."""
    return [sys.executable, "-c", BENCH, *args], {
        **os.environ,
        "FUSION_CACHE": str(cache),
        "HF_HUB_OFFLINE": "1",
    }


def run_ok(command: list[str], env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``command`` in the repository; it must succeed."""
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def job_reports(sweep: Path) -> dict[str, Path]:
    """The ``report.json`` of each finished job of a sweep (its folders are named by config hash), by
    each override that only that job has (``fusion=comm``)."""
    found: dict[str, list[Path]] = {}
    for path in sweep.glob("*/report.json"):
        for override in json.loads(path.read_text())["run"]["overrides"]:
            found.setdefault(override, []).append(path)
    return {override: paths[0] for override, paths in found.items() if len(paths) == 1}


def check_report(path: Path, tasks: list[str], fused: str) -> dict:
    """The report's files and the fields every record must carry; returns the report."""
    report = load_report(path)
    folder = path.parent
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(("report", "pareto"))) == [
        "pareto.png",
        "report.json",
        "report.md",
    ]
    assert (folder / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert report.weights_random is True and report.tasks == tasks
    assert report.environment["torch"] and report.environment["device_type"] == "cpu"
    names = [s.name for s in report.strategies]
    assert names == ["clip_only", "dino_only", fused]
    baseline = report.strategies[0]
    for record in report.strategies:
        assert set(record.weights.values()) == {"random"}
        assert set(record.accuracy) == set(tasks)
        assert record.latency.end_to_end["median"] > 0
        assert record.tokens > 0 and record.params.trainable > 0
        # the language model's stage: TTFT and its ratio to the baseline's, measured in the same run
        vlm = record.vlm
        assert vlm.llm == "tiny" and vlm.visual_tokens == record.tokens and record.out_dim == vlm.hidden_size
        assert vlm.ratios["ttft"] == pytest.approx(vlm.ttft["median"] / baseline.vlm.ttft["median"])
        assert vlm.ratios["vision"] == pytest.approx(record.ratios.end_to_end)
        assert record.overhead() == vlm.ratios["ttft"]
    assert baseline.ratios.end_to_end == 1.0 and baseline.vlm.ratios["ttft"] == 1.0
    text = (folder / "report.md").read_text()
    assert text.splitlines()[0].startswith("**RANDOM WEIGHTS: encoder(s) clip, dino")
    lines = text.splitlines()
    assert any(line.startswith("Language model: tiny") for line in lines[:12])
    assert any(line.startswith(f"- **{fused}: ") for line in lines[:8])  # the verdict comes first
    main_table = text.split("\n## ")[0]  # later sections (the probes' agreement) hold tables of their own
    assert sum(line.startswith("| ") for line in main_table.splitlines()) == 1 + 3
    return report
