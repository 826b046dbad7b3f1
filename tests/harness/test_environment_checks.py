"""Every output and cache location and every environment setting is checked when a run starts, before
any image is read or any encoder runs: each fault names the setting or variable that chose it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from bench_runs import smoke_config

import encoder_fusion.benchmarks.run.compare
from encoder_fusion.benchmarks.run import run_benchmark


@pytest.fixture
def a_file(tmp_path) -> Path:
    path = tmp_path / "a_file"
    path.write_text("not a folder")
    return path


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("bogus", r"FUSION_KERNEL='bogus' is unknown; accepted: auto, reference, triton"),
        (
            "triton",
            r"FUSION_KERNEL=triton runs the Triton kernels, which need a CUDA device or, on the CPU, ",
        ),
    ],
)
def test_the_kernel_choice_is_checked_at_start(value, message, monkeypatch, tmp_path, nothing_runs):
    monkeypatch.setenv("FUSION_KERNEL", value)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=message):
        run_benchmark(smoke_config(f"bench.cache_dir={tmp_path / 'cache'}"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_triton_under_the_interpreter_is_accepted(monkeypatch, tmp_path):
    monkeypatch.setenv("FUSION_KERNEL", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert encoder_fusion.kernels.kernel_choice(["cpu"]) == "triton"


@pytest.mark.parametrize(
    ("where", "message"),
    [
        (
            "cache_dir",
            r"bench\.cache_dir={file} is a file; accepted: a folder, or a path where one can be made",
        ),
        (
            "cache_dir_under",
            r"bench\.cache_dir={file}/features lies under the file {file}; accepted: a folder",
        ),
        ("env", r"FUSION_CACHE={file}/features lies under the file {file}; accepted"),
        (
            "home",
            r"the default feature cache \(bench\.cache_dir and FUSION_CACHE unset\)=.* lies under the file",
        ),
        ("out_dir", r"the output folder \(bench\.out_dir, hydra\.run\.dir, or out_dir\)={file} is a file"),
    ],
)
def test_a_location_that_cannot_be_written_is_refused_at_start(
    where, message, a_file, monkeypatch, tmp_path, nothing_runs
):
    monkeypatch.delenv("FUSION_CACHE", raising=False)
    overrides, out = [], tmp_path / "run"
    if where == "cache_dir":
        overrides.append(f"bench.cache_dir={a_file}")
    elif where == "cache_dir_under":
        overrides.append(f"bench.cache_dir={a_file / 'features'}")
    elif where == "env":
        monkeypatch.setenv("FUSION_CACHE", str(a_file / "features"))
    elif where == "home":
        monkeypatch.setenv("HOME", str(a_file))  # the default cache lies under ~
    else:
        overrides.append(f"bench.cache_dir={tmp_path / 'cache'}")
        out = a_file
    with pytest.raises(ValueError, match=message.format(file=a_file)):
        run_benchmark(smoke_config(*overrides), out)
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize(("key", "multirun"), [("hydra.run.dir", []), ("hydra.sweep.dir", ["-m"])])
def test_the_command_line_names_a_bad_hydra_folder_in_one_line(key, multirun, a_file, tmp_path):
    # Hydra makes these folders before the job starts: a file there is one error line, exit 1
    code = "from encoder_fusion.benchmarks.cli import bench_main; bench_main()"
    overrides = ["experiment=smoke", f"bench.cache_dir={tmp_path / 'c'}", f"{key}={a_file}"]
    result = subprocess.run(
        [sys.executable, "-c", code, *multirun, *overrides],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 1, result.stderr
    assert f"fusion-bench: {key}={a_file} is a file; accepted: a folder" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "c").exists()
