"""A sweep never loses or overwrites a finished result: jobs live in folders named by their config,
resume finds a result wherever it sits in the sweep folder, a folder holding another config's result
is never written into, concurrent runs get folders of their own, and ``fusion-report`` names every
planned job without a result."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from bench_runs import bench_process, job_reports, run_ok
from omegaconf import OmegaConf
from report_records import ENV, three_strategies

from encoder_fusion.benchmarks.cli import report_main
from encoder_fusion.benchmarks.reports.aggregate import aggregate
from encoder_fusion.benchmarks.reports.report import build_report, load_report, write_report
from encoder_fusion.benchmarks.reports.sweep import check_own_folder, finished_result, job_state, planned_jobs
from encoder_fusion.io import write_json

REPO = Path(__file__).resolve().parents[2]
FAST = ["experiment=smoke", "bench.latency.repeats=1", "data.options.num_images=24"]


def sweep(folder: Path, *overrides: str, cache: Path, ok: bool = True) -> subprocess.CompletedProcess:
    command, env = bench_process("-m", *FAST, *overrides, f"hydra.sweep.dir={folder}", cache=cache)
    if ok:
        return run_ok(command, env)
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def contents(folder: Path) -> dict[str, bytes]:
    """Every finished job's report, by file, byte for byte."""
    return {str(p): p.read_bytes() for p in folder.glob("*/report.json")}


def fused_rows(folder: Path) -> list[str]:
    assert report_main([str(folder)]) == 0
    return [s.name for s in load_report(folder / "report.json").strategies if s.role == "fused"]


@pytest.mark.slow
def test_a_second_sweep_with_other_values_keeps_the_first_ones_results(tmp_path):
    folder, cache = tmp_path / "sweep", tmp_path / "cache"
    sweep(folder, "fusion=comm", cache=cache)
    first = contents(folder)
    sweep(folder, "fusion=prismatic,mmvp_interleave", cache=cache)
    assert all(contents(folder)[path] == data for path, data in first.items())
    assert {"fusion=comm", "fusion=prismatic", "fusion=mmvp_interleave"} <= set(job_reports(folder))
    assert sorted(fused_rows(folder)) == [
        "comm [fusion=comm]",
        "mmvp_interleave [fusion=mmvp_interleave]",
        "prismatic [fusion=prismatic]",
    ]
    # the last launch planned two jobs, both have a result; the first launch's job is kept
    report = load_report(folder / "report.json")
    assert report.run["planned"] == 2 and report.run["finished"] == 3 and report.failed_jobs == []


@pytest.mark.slow
def test_reordered_values_rerun_nothing(tmp_path):
    folder, cache = tmp_path / "sweep", tmp_path / "cache"
    sweep(folder, "fusion=comm,prismatic", cache=cache)
    before = contents(folder)
    again = sweep(folder, "fusion=prismatic,comm", cache=cache)
    assert again.stdout.count("Skipping: ") == 2
    assert contents(folder) == before


@pytest.mark.slow
def test_a_folder_holding_another_configs_result_is_never_written_into(tmp_path):
    """With job-numbered folders (a sweep that overrides hydra.sweep.subdir), the second sweep's job 0
    is another config: it is refused, and the result in folder 0 survives byte for byte. A sweep with
    the default folders then finds that result in folder 0 and runs nothing."""
    folder, cache = tmp_path / "sweep", tmp_path / "cache"
    numbered = "hydra.sweep.subdir=${hydra.job.num}"
    sweep(folder, "fusion=comm", numbered, cache=cache)
    kept = (folder / "0" / "report.json").read_bytes()
    refused = sweep(folder, "fusion=prismatic", numbered, cache=cache, ok=False)
    assert refused.returncode == 1
    assert "holds the finished result of another config" in refused.stderr
    assert (folder / "0" / "report.json").read_bytes() == kept
    assert not (folder / "0" / "error.json").exists()
    resumed = sweep(folder, "fusion=comm", cache=cache)
    assert f"Skipping: {folder / '0' / 'report.json'} already holds this config's result" in resumed.stdout
    assert [p.parent.name for p in folder.glob("*/report.json")] == ["0"]


@pytest.mark.slow
def test_runs_started_in_the_same_second_get_folders_of_their_own(tmp_path):
    """The default run folder with the time fixed, as two runs started in one second resolve it."""
    raw = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "config.yaml"), resolve=False)
    same_second = raw["hydra"]["run"]["dir"].replace("${now:%Y-%m-%d}", "day").replace("${now:%H-%M-%S}", "t")
    assert "${run_id:}" in same_second
    command, env = bench_process(
        *FAST, "task.epochs=0", f"hydra.run.dir={tmp_path}/{same_second}", cache=tmp_path / "cache"
    )  # a setting that fails at once: each run writes its error.json into its own folder
    runs = [subprocess.Popen(command, cwd=REPO, env=env, stderr=subprocess.DEVNULL) for _ in range(2)]
    assert [run.wait(timeout=120) for run in runs] == [1, 1]
    folders = sorted((tmp_path / "outputs" / "day").iterdir())
    assert len(folders) == 2 and all((f / "error.json").is_file() for f in folders)


# -- the bookkeeping, on hand-made folders -----------------------------------------------------------
def finished_job(folder: Path, config_hash: str, overrides: list[str]) -> Path:
    report = build_report(
        three_strategies(), run={"config_hash": config_hash, "overrides": overrides}, env=ENV
    )
    return write_report(report, folder)


def hydra_record(folder: Path, overrides: list[str]) -> None:
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))


def test_job_state_reads_what_a_folder_holds(tmp_path):
    done = finished_job(tmp_path / "done", "a" * 64, ["fusion=comm"]).parent
    assert job_state(done).status == "finished" and job_state(done).config_hash == "a" * 64
    # a run whose every strategy failed writes its report, then error.json: it is failed
    write_json(done / "error.json", {"error": "RuntimeError: every strategy failed", "config_hash": "a" * 64})
    assert job_state(done).status == "failed" and "every strategy failed" in job_state(done).error
    hydra_record(tmp_path / "running", ["fusion=eagle"])
    running = job_state(tmp_path / "running")
    assert running.status == "unfinished" and running.overrides == (("fusion=eagle",),)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "report.json").write_text("{trunc")
    assert job_state(tmp_path / "broken").status == "failed"
    assert "unreadable report.json" in job_state(tmp_path / "broken").error


def test_resume_finds_a_result_anywhere_and_refuses_a_foreign_folder(tmp_path):
    sweep_dir = tmp_path / "sweep"
    found = finished_job(sweep_dir / "7", "a" * 64, ["fusion=comm"])
    assert finished_result("a" * 64, sweep_dir / "new", sweep_dir) == found
    assert finished_result("a" * 64, sweep_dir / "new") is None  # outside a sweep: its own folder only
    assert finished_result("b" * 64, sweep_dir / "new", sweep_dir) is None
    check_own_folder(sweep_dir / "7", "a" * 64)  # its own config: fine
    check_own_folder(sweep_dir / "new", "b" * 64)  # empty: fine
    with pytest.raises(
        ValueError, match=r"holds the finished result of another config \(config_hash aaaaaaaaaaaa"
    ):
        check_own_folder(sweep_dir / "7", "b" * 64)
    write_json(sweep_dir / "8" / "error.json", {"error": "ValueError: x", "config_hash": "c" * 64})
    with pytest.raises(ValueError, match="holds the failed result of another config"):
        check_own_folder(sweep_dir / "8", "b" * 64)


def write_plan(sweep_dir: Path, task: list[str], params: dict | None = None) -> None:
    sweep_dir.mkdir(parents=True, exist_ok=True)
    plan = {
        "hydra": {
            "sweeper": {
                "_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
                "max_batch_size": None,
                "params": params,
            },
            "overrides": {"hydra": [f"hydra.sweep.dir={sweep_dir}"], "task": task},
        }
    }
    (sweep_dir / "multirun.yaml").write_text(yaml.safe_dump(plan))


def test_planned_jobs_are_hydras_expansion_of_the_sweep(tmp_path):
    write_plan(tmp_path, ["experiment=smoke", "fusion=comm,prismatic", "seed=0,1"], {"hooks": "last,last3"})
    jobs = planned_jobs(tmp_path)
    assert len(jobs) == 8
    assert jobs[0] == tuple(sorted(["hooks=last", "experiment=smoke", "fusion=comm", "seed=0"]))
    assert planned_jobs(tmp_path / "nowhere") is None


def test_the_aggregate_names_every_planned_job_without_a_result(tmp_path):
    sweep_dir = tmp_path / "sweep"
    plan = ["experiment=smoke", "fusion=comm,prismatic,eagle,mmvp_interleave"]
    write_plan(sweep_dir, plan)
    finished_job(sweep_dir / "aaa", "a" * 64, ["experiment=smoke", "fusion=comm"])
    # the same config finished twice (resumed into another folder): counted once
    finished_job(sweep_dir / "again", "a" * 64, ["experiment=smoke", "fusion=comm"])
    write_json(
        sweep_dir / "bbb" / "error.json",
        {
            "error": "ValueError: bad",
            "config_hash": "b" * 64,
            "overrides": ["experiment=smoke", "fusion=prismatic"],
        },
    )
    hydra_record(sweep_dir / "ccc", ["experiment=smoke", "fusion=eagle"])  # killed mid-run
    report = load_report(aggregate(sweep_dir))
    assert report.run["planned"] == 4 and report.run["finished"] == 1
    assert [(j["job"], j["error"]) for j in report.failed_jobs] == [
        ("bbb", "ValueError: bad"),
        ("ccc", "no report.json: the job died, was cancelled or is still running"),
        ("experiment=smoke,fusion=mmvp_interleave", "planned by the sweep, never started (no job folder)"),
    ]
    text = (sweep_dir / "report.md").read_text()
    assert "Sweep: 1 job(s) with a result, **3 without** (see Errors); its last launch planned 4." in text
    assert "- job experiment=smoke,fusion=mmvp_interleave: planned by the sweep, never started" in text


def test_a_job_killed_as_it_started_is_not_counted_twice(tmp_path):
    """Killed between creating its folder and Hydra writing its overrides, a job leaves a folder that
    names no planned job: it is one of the planned jobs without a folder, and counted with them."""
    sweep_dir = tmp_path / "sweep"
    write_plan(sweep_dir, ["experiment=smoke", "fusion=comm,prismatic,eagle"])
    finished_job(sweep_dir / "aaa", "a" * 64, ["experiment=smoke", "fusion=comm"])
    (sweep_dir / "98540fedb2d6" / ".hydra").mkdir(parents=True)  # no overrides.yaml yet
    report = load_report(aggregate(sweep_dir))
    assert report.run["planned"] == 3 and report.run["finished"] == 1
    assert [j["job"] for j in report.failed_jobs] == [
        "experiment=smoke,fusion=prismatic",
        "experiment=smoke,fusion=eagle",
    ]
    assert all(
        "killed as it started in one of the job folders 98540fedb2d6" in j["error"]
        for j in report.failed_jobs
    )
    assert "Sweep: 1 job(s) with a result, **2 without**" in (sweep_dir / "report.md").read_text()


def test_a_resumed_jobs_own_folder_is_not_a_failure(tmp_path):
    """A job skipped because its result sits in another folder leaves only Hydra's record behind."""
    sweep_dir = tmp_path / "sweep"
    write_plan(sweep_dir, ["fusion=comm"])
    finished_job(sweep_dir / "0", "a" * 64, ["fusion=comm"])
    hydra_record(sweep_dir / "aaaaaaaaaaaa", ["fusion=comm"])
    report = load_report(aggregate(sweep_dir))
    assert report.failed_jobs == [] and report.run["finished"] == 1
    assert json.loads((sweep_dir / "report.json").read_text())["run"]["planned"] == 1


def test_fusion_report_on_a_folder_without_jobs_fails_clearly(tmp_path, capsys):
    assert report_main([str(tmp_path)]) == 2
    assert "holds no job folder (one with report.json, error.json or .hydra/) and no multirun.yaml" in (
        capsys.readouterr().err
    )


def test_the_aggregate_ranks_every_strategy_of_the_sweep_against_the_vlm_probe(tmp_path):
    """Each job keeps its per-item results beside its report; the aggregate pairs them over the same
    test items, so the cheap probes' agreement with the vlm probe covers every job's strategy, with
    the rank correlation of the deltas themselves as its point value."""
    import numpy as np

    from encoder_fusion.benchmarks.reports.agreement import kendall, spearman
    from encoder_fusion.benchmarks.reports.items import ITEMS_FILE, read_items

    folder, cache = tmp_path / "sweep", tmp_path / "cache"
    sweep(folder, "fusion=comm,prismatic", "task.names=[vlm,knn]", cache=cache)
    jobs = job_reports(folder)
    items = read_items(jobs["fusion=comm"].parent)
    assert {("comm", "vlm"), ("clip_only", "knn")} <= set(items)
    assert items["comm", "vlm"].shape[:2] == (1, 6)  # one seed, 6 test images (24 at 25 %)
    assert report_main([str(folder)]) == 0
    report = load_report(folder / "report.json")
    (row,) = report.probe_agreement
    assert row["probe"] == "knn"
    # every row of both jobs, each delta against its own job's baseline (the fusion preset sets the
    # baselines' hooks too, so each job has its own)
    assert row["strategies"] == [s.name for s in report.strategies] and len(row["strategies"]) == 6
    deltas = {
        task: np.array([report.record(name).accuracy[task].delta for name in row["strategies"]])
        for task in ("knn", "vlm")
    }
    expected = spearman(deltas["knn"], deltas["vlm"])
    assert row["spearman"] == (pytest.approx(expected) if np.isfinite(expected) else None)
    tau = kendall(deltas["knn"], deltas["vlm"])
    assert row["kendall"] == (pytest.approx(tau) if np.isfinite(tau) else None)
    # a job whose items cannot be read (or an older run without them) leaves the ranking to the others
    (jobs["fusion=prismatic"].parent / ITEMS_FILE).write_bytes(b"not safetensors")
    assert report_main([str(folder)]) == 0
    ranked = load_report(folder / "report.json").probe_agreement[0]["strategies"]
    assert ranked == [name for name in row["strategies"] if "fusion=comm" in name]
