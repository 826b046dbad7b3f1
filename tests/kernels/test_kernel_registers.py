"""The compile-only register report of the grid_fuse kernels (encoder_fusion.benchmarks.kernel.registers)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from encoder_fusion.benchmarks.kernel.registers import parse_tiles, programs_per_sm

ROOT = Path(__file__).resolve().parents[2]
TINY_CASE = "tiny=3x3x40*2+4x4x40*1->4x4"  # 3x3 and 4x4 grids of 40 channels fused to 4x4


@pytest.mark.parametrize(
    ("registers", "warps", "expected"),
    [
        (96, 4, 5),  # 96 * 32 * 4 = 12288 registers a program: 5 fit in 65536
        (128, 4, 4),
        (129, 4, 3),  # allocated in steps of 8 per thread: 136 * 32 * 4 = 17408
        (255, 8, 1),
        (32, 1, 32),  # the 32-block limit, not registers (64) or warps (64)
        (16, 16, 4),  # the 64-warp limit
    ],
)
def test_programs_per_sm_hand_worked(registers, warps, expected):
    assert programs_per_sm(registers, warps) == expected


def test_report_compiles_every_kernel_for_sm90_without_a_gpu(tmp_path):
    """A tiny case with one resampled and one identity group: forward (inference and training),
    backward rows, gather and parameter kernels all compile for sm_90a and report registers."""
    out = tmp_path / "registers.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "encoder_fusion.benchmarks.kernel.registers", "--case", TINY_CASE]
    command += ["--tiles", "2,2,1,1,2,4"]
    subprocess.run(
        [*command, "--dtype", "bf16", "--out", str(out)], cwd=ROOT, env=env, check=True, timeout=300
    )
    rows = json.loads(out.read_text())
    kernels = [(row["kernel"], row["variant"]) for row in rows]
    assert kernels == [
        ("forward", "inference"),
        ("forward", "training"),
        ("backward_rows", "training"),
        ("backward_gather", "training"),
        ("param_grads", "training"),
    ]
    for row in rows:
        assert 16 <= row["registers"] <= 255 and row["spill_bytes"] == 0
        assert row["programs_per_sm"] == programs_per_sm(row["registers"], row["num_warps"])
    forward = rows[0]
    assert (forward["block_t"], forward["num_warps"], rows[2]["block_t"]) == (2, 2, 1)  # the --tiles
    tile_kb = forward["block_t"] * 40 * 2 / 1024  # tokens x channels x 2 bytes
    assert forward["tile_kb_in_flight_per_sm"] == pytest.approx(forward["programs_per_sm"] * tile_kb * 2)
    assert out.with_suffix(".md").read_text().startswith("# grid_fuse kernels compiled for sm_90")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("2,4,1,1,4", "must be six integers like 2,4,1,1,4,4"),
        ("2,4,yes,1,4,4", "must be six integers"),
        ("2,4,2,1,4,4", "the third 0 or 1"),
        ("3,4,1,1,4,4", r"Tiles.block_t must be one of"),
    ],
)
def test_bad_tiles_spec_is_rejected(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_tiles(spec)


def test_tiles_spec_round_trip():
    tiles = parse_tiles("4,8,0,2,8,2")
    assert (tiles.block_t, tiles.num_warps, tiles.prefetch) == (4, 8, False)
    assert (tiles.backward_block_t, tiles.backward_warps, tiles.rows_per_sm) == (2, 8, 2)


def test_report_refuses_interpreted_kernels():
    """In this process TRITON_INTERPRET=1 (conftest): compiling must be refused with the reason."""
    from encoder_fusion.benchmarks.kernel.harness import CASES
    from encoder_fusion.benchmarks.kernel.registers import compile_case

    with pytest.raises(RuntimeError, match="TRITON_INTERPRET is set"):
        compile_case(CASES["clip-B16+dinov2-B14"], "bf16", 90)


def test_ptxas_rejection_is_reported_with_its_output():
    from encoder_fusion.benchmarks.kernel.registers import _ptxas

    with pytest.raises(RuntimeError, match=r"ptxas -v failed \(exit [1-9]\d*\):\n.*"):
        _ptxas("this is not PTX", 90)


def test_host_time_report_times_every_way_of_calling(tmp_path):
    """encoder_fusion.benchmarks.kernel.host (launches stubbed, in a process without TRITON_INTERPRET): one
    row per way of calling, positive medians, ratios over the inference row of the same case."""
    out = tmp_path / "host.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "encoder_fusion.benchmarks.kernel.host", "--case", TINY_CASE]
    subprocess.run(
        [*command, "--dtype", "fp32", "--calls", "3", "--out", str(out)], cwd=ROOT, env=env, check=True
    )
    rows = json.loads(out.read_text())["rows"]
    assert [row["way"] for row in rows] == [
        "inference",
        "inference, plan rebuilt",
        "autograd forward",
        "forward + backward",
    ]
    assert all(row["median_us"] > 0 for row in rows)
    for row in rows:
        assert row["vs_inference"] == pytest.approx(row["median_us"] / rows[0]["median_us"])
    assert out.with_suffix(".md").read_text().startswith("# grid_fuse host time per call")
