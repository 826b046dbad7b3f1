"""fusion-bench end to end with tiny real architectures: through the Hydra main in a subprocess, and
through compose + run_benchmark on the built-in and the real datasets."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from bench_runs import BENCH, bench_process, check_report, job_reports, run_ok, smoke_config

import encoder_fusion.benchmarks.features.cache as features
from encoder_fusion.benchmarks.cli import report_main
from encoder_fusion.benchmarks.reports.report import load_report
from encoder_fusion.benchmarks.run import run_benchmark

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "conf"

pytestmark = pytest.mark.slow


def check_layer_weights(record, tasks: list[str]) -> None:
    """A weighted_ln strategy's results carry, per task, one softmax weight per hooked layer of each of
    its encoders, summing to 1, the mean of the per-seed weights; a strategy learning none carries none."""
    weighted = record.config["head"]["layer_merge"]["kind"] == "weighted_ln"
    hooked = {spec["name"]: len(spec["hooks"]["layers"]) for spec in record.config["encoders"].values()}
    for task in tasks:
        extra = record.accuracy[task].extra
        if not weighted:
            assert "layer_weights" not in extra, (record.name, task)
            continue
        learned, per_seed = extra["layer_weights"], extra["layer_weights_per_seed"]
        assert {name: len(w) for name, w in learned.items()} == hooked, (record.name, task)
        for name, weights in learned.items():
            assert sum(weights) == pytest.approx(1.0, abs=1e-6)
            seeds = torch.tensor(per_seed[name], dtype=torch.float64)
            assert len(seeds) == len(record.accuracy[task].seeds)
            torch.testing.assert_close(torch.tensor(weights, dtype=torch.float64), seeds.mean(0))


def test_fusion_bench_smoke_through_the_hydra_main(tmp_path):
    command, env = bench_process(
        "experiment=smoke", "task=all", f"hydra.run.dir={tmp_path / 'run'}", cache=tmp_path / "cache"
    )
    result = run_ok(command, env)
    assert f"Report: {tmp_path / 'run' / 'report.json'}" in result.stdout
    assert "| **eagle** | clip + dino |" in result.stdout  # the table is printed too
    report = check_report(
        tmp_path / "run" / "report.json", ["classification", "dense", "localization"], "eagle"
    )
    for record in report.strategies:
        assert not record.errors
        for task, metric in (("classification", "top1"), ("dense", "miou"), ("localization", "mean_iou")):
            result_ = record.accuracy[task]
            assert result_.metric == metric and 0.0 <= result_.mean <= 1.0
        check_layer_weights(record, ["classification", "dense", "localization"])
    # eagle and its baselines take the last hooked layer: no strategy learns layer weights
    assert not any("layer_weights" in s.accuracy["dense"].extra for s in report.strategies)
    assert report.run["overrides"] == ["experiment=smoke", "task=all"]  # Hydra's own are not the job's
    assert list((tmp_path / "cache").iterdir()), "features were cached under $FUSION_CACHE"


def test_a_second_strategy_on_the_same_data_extracts_nothing(tmp_path, monkeypatch):
    extractions = []
    original = features.FeatureCache._extract

    def counted(self, encoder, indices, load_images, *args, **kwargs):
        extractions.append(encoder.spec.name)
        return original(self, encoder, indices, load_images, *args, **kwargs)

    monkeypatch.setattr(features.FeatureCache, "_extract", counted)
    cache = f"bench.cache_dir={tmp_path / 'cache'}"
    run_benchmark(smoke_config(cache, "fusion=eagle"), tmp_path / "a")
    assert sorted(extractions) == ["clip", "clip", "dino", "dino"]  # train and test of each encoder
    extractions.clear()
    path = run_benchmark(smoke_config(cache, "fusion=mmvp_interleave"), tmp_path / "b")
    assert extractions == []
    check_report(path, ["classification"], "mmvp_interleave")


def test_a_failing_strategy_is_recorded_not_lost(tmp_path, monkeypatch):
    """A failure that no setting predicts (here the fused strategy's probe) is recorded against its
    strategy; the other strategies keep their results and the run succeeds."""
    import encoder_fusion.benchmarks.run.compare

    original = encoder_fusion.benchmarks.run.compare.run_probe

    def failing_when_fused(task, make_head, train, test, recipe=None):
        if len(train.grids) == 2:
            raise RuntimeError("probe diverged")
        return original(task, make_head, train, test, recipe)

    monkeypatch.setattr(encoder_fusion.benchmarks.run.compare, "run_probe", failing_when_fused)
    report = load_report(run_benchmark(smoke_config(f"bench.cache_dir={tmp_path / 'cache'}"), tmp_path))
    clip, dino, fused = report.strategies
    assert fused.errors == [{"where": "probe:classification", "error": "RuntimeError: probe diverged"}]
    assert fused.accuracy["classification"].mean is None and fused.latency is not None
    assert not clip.errors and not dino.errors and clip.accuracy["classification"].mean is not None
    text = (tmp_path / "report.md").read_text()
    assert "- eagle / probe:classification: RuntimeError: probe diverged" in text


def test_a_run_whose_every_strategy_failed_fails_after_writing_its_report(tmp_path, monkeypatch):
    import encoder_fusion.benchmarks.run.compare

    def failing(*args, **kwargs):
        raise RuntimeError("probe diverged")

    monkeypatch.setattr(encoder_fusion.benchmarks.run.compare, "run_probe", failing)
    with pytest.raises(RuntimeError, match=r"every strategy failed .*first: clip_only / probe:classif"):
        run_benchmark(smoke_config(f"bench.cache_dir={tmp_path / 'cache'}"), tmp_path)
    report = load_report(tmp_path / "report.json")
    assert all(s.errors for s in report.strategies)
    # through the Hydra main: exit 1, one line, error.json beside the report for fusion-report
    failing_main = (
        "import encoder_fusion.benchmarks.run.compare as run\n"
        "def failing(*args, **kwargs): raise RuntimeError('probe diverged')\n"
        "run.run_probe = failing\n" + BENCH
    )
    run_dir = f"hydra.run.dir={tmp_path / 'cli'}"
    command, env = bench_process("experiment=smoke", run_dir, cache=tmp_path / "cache")
    result = subprocess.run(
        [sys.executable, "-c", failing_main, *command[3:]], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert result.returncode == 1
    assert "fusion-bench: RuntimeError: every strategy failed" in result.stderr
    assert (tmp_path / "cli" / "report.json").is_file()
    assert "every strategy failed" in json.loads((tmp_path / "cli" / "error.json").read_text())["error"]


def test_real_datasets_with_tiny_models(tmp_path, datasets_root):
    coco = run_benchmark(
        smoke_config(
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
    assert report.run["data_sizes"] == {"train": 12, "test": 12}
    for record in report.strategies:
        assert not record.errors, record.errors
        assert record.accuracy["dense"].metric == "miou"
        check_layer_weights(record, ["classification", "dense", "localization"])
    assert all("layer_weights" in s.accuracy["dense"].extra for s in report.strategies)
    # Tiny-ImageNet has no masks: the probes it can feed
    tiny = run_benchmark(
        smoke_config(
            "data=tinyimagenet",
            f"data.root={datasets_root}",
            "data.limit=400",
            "task.names=[classification,localization]",
            f"bench.cache_dir={tmp_path / 'cache'}",
        ),
        tmp_path / "tiny",
    )
    report = load_report(tiny)
    assert report.run["data_sizes"] == {"train": 200, "test": 200}
    for record in report.strategies:
        assert not record.errors, record.errors
        assert 0.0 <= record.accuracy["classification"].mean <= 1.0
        assert 0.0 <= record.accuracy["localization"].mean <= 1.0
    assert report.tasks == ["classification", "localization"]


def test_a_sweep_killed_midway_resumes_and_aggregates(tmp_path):
    sweep = tmp_path / "sweep"
    command, env = bench_process(
        "-m",
        "experiment=smoke",
        "fusion=comm,prismatic,mmvp_interleave",
        f"hydra.sweep.dir={sweep}",
        cache=tmp_path / "cache",
    )
    first = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not list(sweep.glob("*/report.json")):
            assert first.poll() is None and time.monotonic() < deadline, "job 0 never finished"
            time.sleep(0.1)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    (done,) = sweep.glob("*/report.json")  # the sweep was interrupted midway
    finished = done.read_bytes()
    # fusion-report on the interrupted sweep names the two planned jobs that never ran
    assert report_main([str(sweep)]) == 0
    partial = load_report(sweep / "report.json")
    assert partial.run["planned"] == 3 and partial.run["finished"] == 1
    assert len(partial.failed_jobs) == 2
    assert "Sweep: 1 job(s) with a result, **2 without**" in (sweep / "report.md").read_text()

    second = run_ok(command, env)
    assert f"Skipping: {done} already holds this config's result" in second.stdout
    assert done.read_bytes() == finished  # not run again
    assert len(list(sweep.glob("*/report.json"))) == 3

    assert report_main([str(sweep)]) == 0
    report = load_report(sweep / "report.json")
    fused = [s.name for s in report.strategies if s.role == "fused"]
    assert fused == [
        "comm [fusion=comm]",
        "prismatic [fusion=prismatic]",
        "mmvp_interleave [fusion=mmvp_interleave]",
    ]
    # each preset brings its own hooks or projector, so each job has its own pair of baselines
    baselines = [s.name for s in report.strategies if s.role == "baseline"]
    assert sorted(baselines) == sorted(
        f"{b} [fusion={f}]"
        for b in ("clip_only", "dino_only")
        for f in ("comm", "prismatic", "mmvp_interleave")
    )
    assert report.failed_jobs == []
    assert (sweep / "report.md").read_text().startswith("**RANDOM WEIGHTS")
    # schema 2 round-trips through fusion-report: each row keeps the TTFT measured in its own job
    for record in report.strategies:
        job = load_report(sweep / record.job / "report.json")
        (own,) = [s for s in job.strategies if record.name.startswith(s.name)]
        assert record.vlm == own.vlm and record.vlm.llm == "tiny"


def test_a_smoke_sweep_over_the_newer_multilayer_presets(tmp_path):
    """Dense Connector (both integrations), MMFuser and DeepStack, each with its baselines, through
    the Hydra main: every strategy trains its probe and is timed, none records an error."""
    sweep = tmp_path / "sweep"
    presets = ["dense_connector_sti", "dense_connector_dci", "mmfuser", "deepstack"]
    command, env = bench_process(
        "-m",
        "experiment=smoke",
        f"fusion={','.join(presets)}",
        f"hydra.sweep.dir={sweep}",
        cache=tmp_path / "cache",
    )
    run_ok(command, env)
    # the smoke encoders' 4x4 grids: sparse_token adds 16 // 8 = 2 pooled tokens for each of 2 layers
    tokens = {"dense_connector_sti": 16 + 2 * 2, "dense_connector_dci": 16, "mmfuser": 16, "deepstack": 16}
    reports = job_reports(sweep)
    for preset in presets:
        report = check_report(reports[f"fusion={preset}"], ["classification"], preset)
        for record in report.strategies:
            assert not record.errors, (preset, record.errors)
        fused = report.strategies[-1]
        assert fused.tokens == tokens[preset]
        assert fused.config["head"]["normalize"] is (preset == "deepstack")
        # the language model takes the DeepStack sets: their projectors are a timed stage
        assert ("deepstack" in fused.latency.stages) is (preset == "deepstack")
    # the CLIP-only baseline keeps CLIP's DeepStack layers: it differs only in the second encoder
    layers = [
        s.config["head"]["deepstack_layers"] for s in load_report(reports["fusion=deepstack"]).strategies
    ]
    assert layers == [{"clip": [-9, -5, -2]}, {}, {"clip": [-9, -5, -2]}]


def test_parallel_jobs_on_submitit_local_share_one_cache(tmp_path):
    sweep = tmp_path / "sweep"
    command, env = bench_process(
        "-m",
        "hydra/launcher=submitit_local",
        "experiment=smoke",
        "fusion=eagle,mmvp_interleave",
        f"hydra.sweep.dir={sweep}",
        cache=tmp_path / "cache",
    )
    run_ok(command, env, timeout=400)
    reports = job_reports(sweep)
    for fused in ("eagle", "mmvp_interleave"):
        check_report(reports[f"fusion={fused}"], ["classification"], fused)
    # both jobs read the same encoders on the same data: one entry per encoder and split, each whole
    entries = sorted(p for p in (tmp_path / "cache").iterdir() if p.is_dir())
    assert len(entries) == 4
    for entry in entries:
        manifest = json.loads((entry / "manifest.json").read_text())
        for shard in manifest["shards"]:
            assert features.file_sha256(entry / shard["file"]) == shard["sha256"]
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]


def read_entries(cache: Path) -> dict[str, list]:
    from safetensors.torch import load_file

    return {
        entry.name: [load_file(shard) for shard in sorted(entry.glob("shard-*.safetensors"))]
        for entry in sorted(p for p in cache.iterdir() if p.is_dir())
    }


def test_two_process_extraction_equals_one_process(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    common = ["experiment=smoke", "task=all", "bench.extract_only=true"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    torchrun += ["-m", "encoder_fusion.benchmarks.cli"]
    module = [sys.executable, "-m", "encoder_fusion.benchmarks.cli"]
    two = run_ok(
        [*torchrun, *common, f"bench.cache_dir={tmp_path / 'two'}", f"hydra.run.dir={tmp_path / 'r2'}"], env
    )
    assert "(rank 0)" in two.stdout and "(rank 1)" in two.stdout
    run_ok([*module, *common, f"bench.cache_dir={tmp_path / 'one'}", f"hydra.run.dir={tmp_path / 'r1'}"], env)
    sharded, single = read_entries(tmp_path / "two"), read_entries(tmp_path / "one")
    assert list(sharded) == list(single) and len(single) == 4
    for name, shards in single.items():
        for mine, theirs in zip(shards, sharded[name], strict=True):
            assert mine.keys() == theirs.keys()
            for layer in mine:
                torch.testing.assert_close(theirs[layer], mine[layer], rtol=1e-5, atol=1e-5)
    assert not list((tmp_path / "two").glob(".*staging*"))


def test_planted_experiment_finds_the_planted_gain(tmp_path):
    """CLIP's role carries only the class, DINOv2's only the location: fusing them must gain where
    location is needed, with intervals above zero, and the verdict must be gain."""
    path = run_benchmark(
        smoke_config("experiment=planted", f"bench.cache_dir={tmp_path / 'cache'}"), tmp_path
    )
    report = load_report(path)
    clip, dino, fused = report.strategies
    assert {s.name: s.weights for s in report.strategies}["eagle"] == {"clip": "planted", "dino": "planted"}
    for task in ("dense", "localization"):
        assert fused.accuracy[task].delta_ci[0] > 0, (task, fused.accuracy[task])
    assert fused.verdict == "gain"
    # neither baseline has both: CLIP-only names but cannot place, DINOv2-only places but cannot name
    assert clip.accuracy["classification"].mean > 0.9 and dino.accuracy["classification"].delta_ci[1] < 0
    assert dino.accuracy["localization"].delta_ci[0] > 0
    assert fused.accuracy["dense"].mean > max(clip.accuracy["dense"].mean, dino.accuracy["dense"].mean)
    assert (tmp_path / "report.md").read_text().startswith("**PLANTED SIGNAL")


def test_the_vlm_probe_finds_a_planted_class_signal(tmp_path):
    """With the class planted in the DINOv2 role only, the stage-1 VLM probe's class question is
    answered by every strategy that has that role (intervals above zero against CLIP-only, which has
    only the location) and the fused strategy's verdict is gain; with the roles swapped, a strategy
    without the class finds no gain."""
    overrides = [
        "experiment=planted", "task=vlm", "~task.vlm.templates.where", "~task.vlm.templates.size",
        "task.lr=3e-2", "bench.latency.repeats=2", f"bench.cache_dir={tmp_path / 'cache'}",
    ]  # fmt: skip
    cfg = smoke_config(*overrides, "plant.clip=location", "plant.dino=class")
    report = load_report(run_benchmark(cfg, tmp_path / "dino_class"))
    clip, dino, fused = report.strategies
    assert clip.accuracy["vlm"].mean < 0.5  # chance among four options, give or take
    for record in (dino, fused):
        assert record.accuracy["vlm"].delta_ci[0] > 0, record.accuracy["vlm"]
    assert fused.verdict == "gain"
    # the roles swapped: now DINOv2-only lacks the class, and finds no gain (it loses what CLIP has)
    cfg = smoke_config(*overrides, "plant.clip=class", "plant.dino=location")
    report = load_report(run_benchmark(cfg, tmp_path / "clip_class"))
    clip, dino, fused = report.strategies
    assert dino.accuracy["vlm"].delta_ci[1] < 0, dino.accuracy["vlm"]
    assert fused.accuracy["vlm"].delta_ci[0] <= 0, fused.accuracy["vlm"]  # CLIP-only has the class too
