"""Read-only file systems, for real: each command runs in a private mount namespace in which a folder
is a read-only tmpfs (``unshare -m``, so nothing leaks to the machine). As root a folder's mode bits
are no obstacle, so only a read-only mount shows that the checks at start see what the kernel will
refuse. Skipped where the machine cannot make such a namespace (not root, or no ``unshare``)."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = "from encoder_fusion.benchmarks.cli import bench_main; bench_main()"
REPORT = "import sys; from encoder_fusion.benchmarks.cli import report_main; sys.exit(report_main())"
# mount a read-only tmpfs on $0, then run the command in the same namespace (from the working
# directory's path again, so that a working directory under the mount is the mount)
MOUNT_THEN_RUN = 'mount -t tmpfs -o ro tmpfs "$0" && cd "$PWD" && exec "$@"'


@functools.cache
def can_mount() -> bool:
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return False
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", 'mount -t tmpfs -o ro tmpfs "$0"', "/mnt"], capture_output=True
    )
    return probe.returncode == 0


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not can_mount(), reason="needs root and unshare -m to mount read-only"),
]


def under_read_only(folder: Path, code: str, *args: str, cwd: Path, env: dict | None = None):
    """``python -c code args`` with ``folder`` a read-only mount, ``FUSION_CACHE`` unset unless
    ``env`` sets it."""
    folder.mkdir(parents=True, exist_ok=True)
    command = ["unshare", "-m", "sh", "-c", MOUNT_THEN_RUN, str(folder), sys.executable, "-c", code, *args]
    base = {key: value for key, value in os.environ.items() if key != "FUSION_CACHE"}
    return subprocess.run(
        command,
        cwd=cwd,
        env={**base, "PWD": str(cwd), **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )


def one_line_error(result: subprocess.CompletedProcess, code: int, expected: str) -> None:
    assert result.returncode == code, result.stderr[-2000:]
    assert expected in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("where", ["bench.cache_dir", "FUSION_CACHE", "HOME"])
def test_a_read_only_cache_is_refused_at_start(where, tmp_path):
    ro, env, overrides = tmp_path / "ro", {}, ["experiment=smoke"]
    if where == "bench.cache_dir":
        overrides.append(f"bench.cache_dir={ro / 'cache'}")
        expected = f"bench.cache_dir={ro / 'cache'}: {ro} is not writable (read-only"
    elif where == "FUSION_CACHE":
        env["FUSION_CACHE"] = str(ro / "cache")
        expected = f"FUSION_CACHE={ro / 'cache'}: {ro} is not writable (read-only"
    else:  # the default cache lies under ~
        env["HOME"] = str(ro)
        expected = f"the default feature cache (bench.cache_dir and FUSION_CACHE unset)={ro}"
    result = under_read_only(
        ro, BENCH, *overrides, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, env=env
    )
    one_line_error(result, 1, expected)
    assert f"{ro} is not writable" in result.stderr
    # refused before any image was read: the job's folder holds no features, no report
    assert not list((tmp_path / "run").glob("report.*"))


@pytest.mark.parametrize("working_directory", [False, True])
def test_a_read_only_run_folder_is_one_error_line(working_directory, tmp_path):
    ro = tmp_path / "ro"
    cache = f"bench.cache_dir={tmp_path / 'cache'}"
    if working_directory:  # the default run folder, outputs/..., lies under the working directory
        ro.mkdir()
        result = under_read_only(ro, BENCH, "experiment=smoke", cache, cwd=ro)
        expected = "hydra.run.dir=outputs/"
    else:
        result = under_read_only(
            ro, BENCH, "experiment=smoke", cache, f"hydra.run.dir={ro / 'run'}", cwd=tmp_path
        )
        expected = f"hydra.run.dir={ro / 'run'}: {ro} is not writable (read-only"
    one_line_error(result, 1, expected)
    assert f"{ro} is not writable (read-only" in result.stderr
    assert not (tmp_path / "cache").exists()


def test_fusion_report_refuses_a_read_only_out(tmp_path):
    ro, sweep = tmp_path / "ro", tmp_path / "sweep"
    sweep.mkdir()
    result = under_read_only(ro, REPORT, str(sweep), "--out", str(ro / "aggregate"), cwd=tmp_path)
    one_line_error(result, 2, f"fusion-report: --out={ro / 'aggregate'}: {ro} is not writable (read-only")
    assert list(sweep.iterdir()) == []
