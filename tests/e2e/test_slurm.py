"""The scale-out path on a real SLURM scheduler: sweeps submitted with ``hydra/launcher=slurm_cpu``
through ``sbatch``, aggregated, resumed after a job is cancelled with ``scancel``, and a job that fails
inside SLURM reported by ``fusion-report``.

They need a running cluster (``SLURM_CONF`` pointing at it, or a system-wide one): ``.ci/run`` starts a
single-node one with ``tests/slurm/cluster.sh`` when it runs as root; elsewhere they are skipped,
saying why.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest
from bench_runs import bench_process, job_reports, run_ok

from encoder_fusion.benchmarks.cli import report_main
from encoder_fusion.benchmarks.reports.report import load_report
from encoder_fusion.benchmarks.reports.sweep import UNFINISHED

REPO = Path(__file__).resolve().parents[2]
# one CPU and 2 GB per job: the CI machine's node has two CPUs, so two jobs run at once
SLURM = ["hydra/launcher=slurm_cpu", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2"]
FAST = ["experiment=smoke", "bench.latency.repeats=1", "data.options.num_images=24"]


def missing_cluster() -> str | None:
    """Why no SLURM cluster can take jobs here, or None when one can."""
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return "SLURM's client is not installed (tests/slurm/cluster.sh install, as root)"
    try:
        found = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer within 10 s: no SLURM controller is reachable"
    states = found.stdout.split()
    if found.returncode or not {"idle", "mixed", "allocated", "completing", "planned"} & set(states):
        why = (found.stderr.strip().splitlines() or [f"node states {states}"])[-1]
        return (
            f"no SLURM node is up ({why}); start one with tests/slurm/cluster.sh start DIR and "
            "export SLURM_CONF=DIR/slurm.conf"
        )
    return None


MISSING = missing_cluster()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.cluster,
    pytest.mark.skipif(MISSING is not None, reason=str(MISSING)),
]


def sweep_command(folder: Path, cache: Path, *overrides: str) -> tuple[list[str], dict]:
    return bench_process("-m", *SLURM, *FAST, *overrides, f"hydra.sweep.dir={folder}", cache=cache)


def queue() -> list[tuple[str, str]]:
    """This cluster's jobs: (id, state)."""
    lines = subprocess.run(["squeue", "-h", "-o", "%i %T"], capture_output=True, text=True, check=True).stdout
    return [tuple(line.split()) for line in lines.splitlines()]


def wait_for(condition, what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}; queue: {queue()}"
        time.sleep(0.2)


def test_a_three_job_sweep_runs_through_sbatch_and_is_aggregated(tmp_path):
    folder = tmp_path / "sweep"
    command, env = sweep_command(folder, tmp_path / "cache", "fusion=comm,prismatic,mmvp_interleave")
    run_ok(command, env, timeout=400)
    assert list(folder.glob(".submitit/*/*.out")), "the jobs ran through sbatch (submitit's logs)"
    assert report_main([str(folder)]) == 0
    report = load_report(folder / "report.json")
    assert sorted(s.name for s in report.strategies if s.role == "fused") == [
        "comm [fusion=comm]",
        "mmvp_interleave [fusion=mmvp_interleave]",
        "prismatic [fusion=prismatic]",
    ]
    assert report.failed_jobs == [] and report.run["planned"] == report.run["finished"] == 3


def started(folder: Path, override: str) -> bool:
    """Whether the job of ``override`` has started: Hydra recorded it in its folder."""
    return any(override in p.read_text() for p in folder.glob("*/.hydra/overrides.yaml"))


def test_a_job_cancelled_mid_sweep_is_rerun_and_the_finished_ones_kept(tmp_path):
    folder, cache = tmp_path / "sweep", tmp_path / "cache"
    # one job at a time; the second trains long enough to be cancelled mid-run
    command, env = sweep_command(folder, cache, "hydra.launcher.array_parallelism=1", "task.epochs=2,2000,3")
    launcher = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_for(lambda: started(folder, "task.epochs=2000"), "the second job to start")
        (second,) = [i for i, s in queue() if i.endswith("_1") and s == "RUNNING"]
        subprocess.run(["scancel", second], check=True)
        wait_for(lambda: not queue(), "the other jobs to finish")
    finally:
        # without SLURM accounting (sacct) submitit cannot see that a job was cancelled and would wait
        # for it; a user stops the launcher the same way
        launcher.terminate()
        launcher.wait(timeout=60)
    finished = {path: path.read_bytes() for path in folder.glob("*/report.json")}
    assert set(job_reports(folder)) >= {"task.epochs=2", "task.epochs=3"} and len(finished) == 2
    assert report_main([str(folder)]) == 0
    assert [j["error"] for j in load_report(folder / "report.json").failed_jobs] == [UNFINISHED]

    run_ok(command, env, timeout=400)
    assert all(path.read_bytes() == data for path, data in finished.items()), "a finished job ran again"
    skipped = [log for log in folder.glob(".submitit/*/*.out") if "Skipping: " in log.read_text()]
    assert len(skipped) == 2  # the resumed sweep's first and last jobs found their results
    assert set(job_reports(folder)) >= {"task.epochs=2", "task.epochs=2000", "task.epochs=3"}
    assert report_main([str(folder)]) == 0
    assert load_report(folder / "report.json").failed_jobs == []


def test_a_job_failing_inside_slurm_surfaces_in_fusion_report(tmp_path):
    folder = tmp_path / "sweep"
    command, env = sweep_command(folder, tmp_path / "cache", "task.epochs=1,0")
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 1
    assert "task.epochs=0 must be a positive, finite int" in result.stderr
    assert report_main([str(folder)]) == 0
    report = load_report(folder / "report.json")
    assert report.run["finished"] == 1
    (failed,) = report.failed_jobs
    assert failed["error"] == "OptionError: task.epochs=0 must be a positive, finite int"
    assert "task.epochs=0 must be a positive, finite int" in (folder / "report.md").read_text()
