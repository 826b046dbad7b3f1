"""Nothing finished is overwritten and no answer exits zero: fusion-report refuses an --out holding
another run's or job's result, an aggregate of no result exits non-zero, a run whose reference
strategy failed fails, two launches of one job cannot both run it, and a closed stdout does not turn a
finished job into a failed one."""

from __future__ import annotations

import fcntl
import subprocess

import pytest
from bench_runs import REPO, bench_process
from test_sweep import finished_job

from encoder_fusion.benchmarks.cli import LOCK_FILE, report_main
from encoder_fusion.benchmarks.reports.report import load_report
from encoder_fusion.benchmarks.reports.sweep import job_state
from encoder_fusion.io import write_json


def test_fusion_report_never_overwrites_a_jobs_or_another_sweeps_result(tmp_path, capsys):
    sweep, other = tmp_path / "sweep", tmp_path / "other"
    job = finished_job(sweep / "aaa", "a" * 64, ["fusion=comm"])
    finished_job(other / "bbb", "b" * 64, ["fusion=eagle"])
    assert report_main([str(other)]) == 0  # the other sweep's aggregate
    kept = {path: path.read_bytes() for path in (job, other / "report.json")}
    capsys.readouterr()
    for out, message in (
        (sweep / "aaa", "holds a job's result, which is never overwritten"),
        (other, f"holds the aggregate of sweep {other}, which is never overwritten"),
    ):
        assert report_main([str(sweep), "--out", str(out)]) == 2
        assert message in capsys.readouterr().err
    write_json(sweep / "bad" / "error.json", {"error": "ValueError: x", "config_hash": "c" * 64})
    assert report_main([str(sweep), "--out", str(sweep / "bad")]) == 2
    assert "is a job's folder (it holds error.json or .hydra/)" in capsys.readouterr().err
    assert all(path.read_bytes() == data for path, data in kept.items())
    # this sweep's own earlier aggregate is rewritten, and so is a fresh folder
    assert report_main([str(sweep)]) == 0 and report_main([str(sweep)]) == 0
    assert report_main([str(sweep), "--out", str(tmp_path / "fresh")]) == 0


def test_fusion_report_refuses_an_out_that_is_a_file_or_read_only(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    finished_job(sweep / "aaa", "a" * 64, ["fusion=comm"])
    (tmp_path / "file").write_text("x")
    assert report_main([str(sweep), "--out", str(tmp_path / "file")]) == 2
    assert f"--out={tmp_path / 'file'} is a file; accepted: a folder" in capsys.readouterr().err
    assert report_main([str(sweep), "--out", str(tmp_path / "file" / "below")]) == 2
    assert f"lies under the file {tmp_path / 'file'}" in capsys.readouterr().err
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if not (locked / "probe").exists():  # root writes anyway: nothing to check then
            try:
                (locked / "probe").write_text("")
            except PermissionError:
                assert report_main([str(sweep), "--out", str(locked / "out")]) == 2
                assert "is not writable" in capsys.readouterr().err
    finally:
        locked.chmod(0o700)


def test_an_aggregate_of_no_result_exits_non_zero(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    for name in ("aaa", "bbb"):
        (sweep / name).mkdir(parents=True)
        (sweep / name / "report.json").write_text("{corrupt")
    assert report_main([str(sweep)]) == 1
    assert "no job of" in capsys.readouterr().err
    report = load_report(sweep / "report.json")  # written all the same: it lists why
    assert report.run["finished"] == 0 and len(report.failed_jobs) == 2


def test_a_run_whose_reference_failed_exits_non_zero_naming_it(tmp_path, monkeypatch):
    from hydra import compose, initialize_config_dir

    import encoder_fusion.benchmarks.run.compare as compare
    from encoder_fusion.benchmarks.run import run_benchmark

    original = compare.run_probe

    def failing(task, make_head, train, test, recipe=None):
        if make_head().geometries[0].name == "clip" and len(train.grids) == 1:
            raise RuntimeError("cache lost")
        return original(task, make_head, train, test, recipe)

    monkeypatch.setattr(compare, "run_probe", failing)
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=smoke", f"bench.cache_dir={tmp_path / 'cache'}"])
    with pytest.raises(RuntimeError, match=r"the reference strategy clip_only failed.*first: probe:classif"):
        run_benchmark(cfg, tmp_path / "run")
    report = load_report(tmp_path / "run" / "report.json")
    clip, dino, fused = report.strategies
    assert clip.errors and not dino.errors and not fused.errors


def test_a_second_launch_of_a_running_job_is_refused(tmp_path):
    out = tmp_path / "job"
    out.mkdir()
    command, env = bench_process("experiment=smoke", f"hydra.run.dir={out}", cache=tmp_path / "cache")
    with open(out / LOCK_FILE, "a") as held:  # the first launch, still running
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert f"another fusion-bench process is running this job in {out}" in result.stderr
    assert not (out / "report.json").exists() and not (out / "error.json").exists()


def test_a_closed_stdout_leaves_a_finished_job_finished(tmp_path):
    out = tmp_path / "job"
    command, env = bench_process("experiment=smoke", f"hydra.run.dir={out}", cache=tmp_path / "cache")
    # fusion-bench | head -1: the reader goes away after one line
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None and process.stdout.readline()
    process.stdout.close()
    process.wait(timeout=300)
    assert job_state(out).status == "finished"
    assert not (out / "error.json").exists()
    # and a rerun reuses it
    again = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "Skipping:" in again.stdout
