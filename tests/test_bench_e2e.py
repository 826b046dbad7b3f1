"""fusion-bench end to end with tiny real architectures: through the Hydra main in a subprocess, and
through compose + run_benchmark on the built-in and the real datasets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import benchmarks.features as features
from benchmarks.report import load_report
from benchmarks.run import run_benchmark

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
BENCH = "from benchmarks.cli import bench_main; bench_main()"

pytestmark = pytest.mark.slow


def make(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=["experiment=smoke", *overrides])


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
    assert report["weights_random"] is True and report["tasks"] == tasks
    assert report["environment"]["torch"] and report["environment"]["device_type"] == "cpu"
    names = [s["name"] for s in report["strategies"]]
    assert names == ["clip_only", "dino_only", fused]
    for record in report["strategies"]:
        assert set(record["weights"].values()) == {"random"}
        assert set(record["accuracy"]) == set(tasks)
        assert record["latency"]["end_to_end"]["median"] > 0
        assert record["tokens"] > 0 and record["params"]["trainable"] > 0
    assert report["strategies"][0]["ratios"]["end_to_end"] == 1.0
    text = (folder / "report.md").read_text()
    assert text.splitlines()[0].startswith("**RANDOM WEIGHTS: encoder(s) clip, dino")
    assert sum(line.startswith("| ") for line in text.splitlines()) == 1 + 3
    return report


def test_fusion_bench_smoke_through_the_hydra_main(tmp_path):
    env = {**os.environ, "FUSION_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", BENCH, "experiment=smoke", "task=all", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Report: {tmp_path / 'run' / 'report.json'}" in result.stdout
    assert "| **eagle** | clip + dino |" in result.stdout  # the table is printed too
    report = check_report(
        tmp_path / "run" / "report.json", ["classification", "dense", "localization"], "eagle"
    )
    for record in report["strategies"]:
        assert not record["errors"]
        for task, metric in (("classification", "top1"), ("dense", "miou"), ("localization", "mean_iou")):
            result_ = record["accuracy"][task]
            assert result_["metric"] == metric and 0.0 <= result_["mean"] <= 1.0
    assert report["run"]["overrides"] == ["experiment=smoke", "task=all"]  # Hydra's own are not the job's
    assert list((tmp_path / "cache").iterdir()), "features were cached under $FUSION_CACHE"


def test_a_second_strategy_on_the_same_data_extracts_nothing(tmp_path, monkeypatch):
    extractions = []
    original = features.FeatureCache._extract

    def counted(self, encoder, indices, load_images):
        extractions.append(encoder.spec.name)
        return original(self, encoder, indices, load_images)

    monkeypatch.setattr(features.FeatureCache, "_extract", counted)
    cache = f"bench.cache_dir={tmp_path / 'cache'}"
    run_benchmark(make(cache, "fusion=eagle"), tmp_path / "a")
    assert sorted(extractions) == ["clip", "clip", "dino", "dino"]  # train and test of each encoder
    extractions.clear()
    path = run_benchmark(make(cache, "fusion=mmvp_interleave"), tmp_path / "b")
    assert extractions == []
    check_report(path, ["classification"], "mmvp_interleave")


def test_a_failing_strategy_is_recorded_not_lost(tmp_path):
    # a 3x3 target cannot be pixel-unshuffled from the 4x4 grids: every head fails to build
    path = run_benchmark(
        make(f"bench.cache_dir={tmp_path / 'cache'}", "align=pixel_unshuffle", "align.grid=[3,3]"), tmp_path
    )
    report = load_report(path)
    for record in report["strategies"]:
        wheres = {e["where"] for e in record["errors"]}
        assert {"probe:classification", "latency"} <= wheres
        assert record["accuracy"]["classification"]["mean"] is None
    assert "## Errors" in (tmp_path / "report.md").read_text()


def test_real_datasets_with_tiny_models(tmp_path, datasets_root):
    coco = run_benchmark(
        make(
            "data=coco128",
            f"data.root={datasets_root}",
            "data.limit=24",
            "task=all",
            "fusion=comm",
            f"bench.cache_dir={tmp_path / 'cache'}",
        ),
        tmp_path / "coco",
    )
    report = check_report(coco, ["classification", "dense", "localization"], "comm")
    assert report["run"]["data_sizes"] == {"train": 12, "test": 12}
    for record in report["strategies"]:
        assert not record["errors"], record["errors"]
        assert record["accuracy"]["dense"]["metric"] == "miou"
    tiny = run_benchmark(
        make(
            "data=tinyimagenet",
            f"data.root={datasets_root}",
            "data.limit=400",
            "task=all",
            f"bench.cache_dir={tmp_path / 'cache'}",
        ),
        tmp_path / "tiny",
    )
    report = load_report(tiny)
    assert report["run"]["data_sizes"] == {"train": 200, "test": 200}
    for record in report["strategies"]:
        # Tiny-ImageNet has no masks: the dense probe's error is recorded, the other probes ran
        assert [e["where"] for e in record["errors"]] == ["probe:dense"]
        assert "masks" in record["errors"][0]["error"]
        assert 0.0 <= record["accuracy"]["classification"]["mean"] <= 1.0
        assert 0.0 <= record["accuracy"]["localization"]["mean"] <= 1.0
    assert json.loads((tmp_path / "tiny" / "report.json").read_text())["tasks"] == [
        "classification",
        "dense",
        "localization",
    ]
