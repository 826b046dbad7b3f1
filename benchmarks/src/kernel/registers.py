"""Registers, spills and occupancy of the Triton ``grid_fuse`` kernels, compiled for an NVIDIA GPU
on any machine (no GPU needed).

    python -m encoder_fusion.benchmarks.kernel.registers --arch 90 --dtype bf16 fp32 \\
        --out benchmarks/results/grid_fuse_registers_sm90.json

Each kernel that a forward (with and without the statistics a backward needs) and a backward call
launch is compiled, not launched, for ``sm_<arch>`` through a compile-only Triton driver, and the
PTX goes through the ``ptxas`` that ships with Triton (``-v``). Per kernel the table gives warps,
registers per thread, spill bytes, how many programs fit on one multiprocessor (registers, warps
and blocks; the limits of sm_80 to sm_90) and, for the forward and backward rows kernels, how many
bytes of source tiles those programs have requested at once: ``programs x tile bytes``, twice that
with prefetching. That last column is a model, not a measurement: it says why a tiling may or may
not keep enough bytes in flight to reach the copy bandwidth; ``encoder_fusion.benchmarks.kernel.tiles``
measures.

Run it with ``TRITON_INTERPRET`` unset (interpreted kernels cannot be compiled).
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import torch
from triton.backends.driver import DriverBase
from triton.compiler.compiler import CompiledKernel

from encoder_fusion.benchmarks.kernel.harness import (
    DTYPES,
    BenchCase,
    add_shape_arguments,
    command_line,
    make_problem,
    parsed_shapes,
    save_report,
    tool_parser,
)
from encoder_fusion.kernels.grid_fuse_jit import INTERPRETED
from encoder_fusion.kernels.grid_fuse_plan import Tiles, default_tiles
from encoder_fusion.kernels.grid_fuse_triton import grid_fuse_backward, grid_fuse_forward
from encoder_fusion.kernels.launch import LaunchHook, hooked_launches

MODULE = "encoder_fusion.benchmarks.kernel.registers"

# Per multiprocessor, sm_80 to sm_90: 64K 32-bit registers, 64 resident warps, 32 resident blocks.
REGISTERS_PER_SM = 65536
WARPS_PER_SM = 64
BLOCKS_PER_SM = 32
SM_COUNT = 132  # H100 SXM: sizes the backward grids the way the host code does on that GPU


@dataclass(frozen=True)
class KernelInfo:
    """One compiled kernel variant and what ptxas reports for it."""

    case: str
    dtype: str
    kernel: str
    variant: str
    num_warps: int
    block_t: int | None
    block_c: int | None
    prefetch: bool | None
    registers: int
    spill_bytes: int
    programs_per_sm: int
    tile_kb_in_flight_per_sm: float | None


class _CompileOnlyDriver(DriverBase):
    """The part of Triton's driver interface that compiling needs, for a GPU that is not there."""

    def __init__(self, arch: int) -> None:
        from triton.backends.compiler import GPUTarget

        super().__init__()
        self.target = GPUTarget("cuda", arch, 32)

    @classmethod
    def is_active(cls) -> bool:
        return True

    def map_python_to_cpp_type(self, ty: str) -> str:
        raise NotImplementedError("compile-only driver: kernels are compiled, never launched")

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self):
        return self.target

    def set_current_device(self, device: int) -> None:
        pass

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cuda

    def get_benchmarker(self):
        return None


def _ptxas_path(arch: int) -> str:
    """The ptxas Triton itself uses for ``sm_<arch>`` (the one matching the PTX version it emits)."""
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(arch).path


def _ptxas(ptx: str, arch: int) -> tuple[int, int]:
    """(registers per thread, spill store + load bytes) from Triton's ptxas.

    Raises:
        RuntimeError: ptxas rejected the PTX or reported no register count (its output attached).
    """
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as source:
        source.write(ptx)
        source.flush()
        result = subprocess.run(
            [_ptxas_path(arch), f"-arch=sm_{arch}a" if arch >= 90 else f"-arch=sm_{arch}", "-v",
             source.name, "-o", os.devnull],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
    registers = re.search(r"Used (\d+) registers", result.stderr)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", result.stderr)
    if result.returncode != 0 or registers is None:
        raise RuntimeError(f"ptxas -v failed (exit {result.returncode}):\n{result.stderr}")
    return int(registers.group(1)), sum(map(int, spills.groups())) if spills else 0


def programs_per_sm(registers: int, num_warps: int) -> int:
    """Resident programs per multiprocessor for a kernel of this many registers and warps
    (registers are allocated per warp in units of 256, i.e. 8 per thread)."""
    per_warp = -(-registers // 8) * 8 * 32
    return min(WARPS_PER_SM // num_warps, BLOCKS_PER_SM, REGISTERS_PER_SM // (per_warp * num_warps))


def parse_tiles(spec: str) -> Tiles:
    """``BLOCK_T,WARPS,PREFETCH,BACKWARD_BLOCK_T,BACKWARD_WARPS,ROWS_PER_SM`` (PREFETCH 0 or 1) as
    a :class:`encoder_fusion.kernels.grid_fuse_plan.Tiles`.

    Raises:
        ValueError: a spec of another form, or values ``Tiles`` does not accept.
    """
    parts = spec.split(",")
    if len(parts) != 6 or not all(p.isdigit() for p in parts) or parts[2] not in ("0", "1"):
        raise ValueError(f"--tiles {spec!r} must be six integers like 2,4,1,1,4,4 (the third 0 or 1)")
    t, w, prefetch, bt, bw, per_sm = (int(p) for p in parts)
    return Tiles(t, w, bool(prefetch), bt, bw, per_sm)


@contextlib.contextmanager
def compile_only(arch: int = 90) -> Iterator[list[tuple[str, dict, CompiledKernel]]]:
    """Inside: every grid_fuse kernel launch compiles (once) for ``sm_<arch>`` and returns without
    launching, CPU tensors pass the host checks, and the backward grids are sized for an H100 (all
    through :class:`encoder_fusion.kernels.launch.LaunchHook`). Yields the list of ``(kernel name,
    launch keyword arguments, compiled kernel)`` of each launch.

    Raises:
        RuntimeError: the kernels are interpreted (``TRITON_INTERPRET`` was set at import).
    """
    if INTERPRETED:
        raise RuntimeError("TRITON_INTERPRET is set: interpreted kernels cannot be compiled; unset it")
    from triton.runtime import driver

    launches: list[tuple[str, dict, CompiledKernel]] = []

    def compile_launch(kernel, grid: tuple[int, ...], args: tuple, kwargs: dict) -> None:
        compiled = kernel.run(*args, grid=grid, warmup=True, **kwargs)
        launches.append((kernel.__name__, kwargs, compiled))

    driver.set_active(_CompileOnlyDriver(arch))  # stays: without a GPU there is no driver to restore
    with hooked_launches(LaunchHook(compile_launch, SM_COUNT)):
        yield launches


def compile_case(case: BenchCase, dtype_name: str, arch: int, tiles: Tiles | None = None) -> list[KernelInfo]:
    """Compile every kernel a forward and backward of ``case`` launches with ``tiles``
    (:func:`encoder_fusion.kernels.grid_fuse_plan.default_tiles` if None); one row per variant."""
    dtype = DTYPES[dtype_name]
    with compile_only(arch) as compiled:
        args = make_problem(case, 1, dtype, torch.device("cpu")).args
        variants = []
        grid_fuse_forward(args, tiles=tiles)
        variants.append("inference")
        out, mean, rstd = grid_fuse_forward(args, save_stats=True, tiles=tiles)
        variants.append("training")
        grid_fuse_backward(torch.ones_like(out), args, mean, rstd, tiles=tiles)
        variants += ["training"] * (len(compiled) - len(variants))
    channels = max(encoder.channels for encoder in case.encoders)
    tiles = tiles or default_tiles(channels)
    rows = []
    for (name, kwargs, kernel), variant in zip(compiled, variants):
        registers, spills = _ptxas(kernel.asm["ptx"], arch)
        warps = kernel.metadata.num_warps
        fit = programs_per_sm(registers, warps)
        block_t, block_c = kwargs.get("BLOCK_T"), kwargs.get("BLOCK_C")
        prefetch = kwargs.get("PREFETCH")
        in_flight = None
        if block_t is not None and block_c is not None:
            # the backward grid holds at most rows_per_sm programs a multiprocessor
            resident = min(fit, tiles.rows_per_sm) if "rows" in name else fit
            tile_bytes = block_t * min(block_c, channels) * dtype.itemsize
            in_flight = resident * tile_bytes * (2 if prefetch else 1) / 1024
        rows.append(
            KernelInfo(
                case.name,
                dtype_name,
                name.removeprefix("_grid_fuse_").removesuffix("_kernel"),
                variant,
                warps,
                block_t,
                block_c,
                prefetch,
                registers,
                spills,
                fit,
                in_flight,
            )
        )
    return rows


def toolchain(arch: int) -> str:
    """Triton's version and the release line of the ptxas it uses for ``sm_<arch>``."""
    import triton

    release = subprocess.run([_ptxas_path(arch), "--version"], capture_output=True, text=True, check=True)
    return f"triton {triton.__version__}, ptxas {release.stdout.strip().splitlines()[-1]}"


def markdown(rows: Sequence[KernelInfo], arch: int, command: str) -> str:
    """The rows as a markdown table under a header naming the command and the toolchain."""
    lines = [
        f"# grid_fuse kernels compiled for sm_{arch}",
        "",
        f"- command: `{command}`",
        f"- toolchain: {toolchain(arch)} (no GPU: compiled, never launched)",
        "- programs / SM: resident programs by registers, warps and blocks; tile KB / SM: source "
        "tile bytes those programs request at once (twice with prefetch) - a model, not a timing",
        "",
        "| case | dtype | kernel | variant | warps | BLOCK_T | BLOCK_C | prefetch | registers | spill B "
        "| programs / SM | tile KB / SM |",
        "|---|---|---|---|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        kb = "" if r.tile_kb_in_flight_per_sm is None else f"{r.tile_kb_in_flight_per_sm:.0f}"
        lines.append(
            f"| {r.case} | {r.dtype} | {r.kernel} | {r.variant} | {r.num_warps} | {r.block_t or ''} | "
            f"{r.block_c or ''} | {'' if r.prefetch is None else r.prefetch} | {r.registers} | "
            f"{r.spill_bytes} | {r.programs_per_sm} | {kb} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> list[KernelInfo]:
    """Compile the cases from command-line arguments; print the table; return the rows."""
    parser = tool_parser(MODULE, __doc__)
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (default 90: H100/H200)")
    add_shape_arguments(parser, batches=None, passes=False)
    parser.add_argument(
        "--tiles",
        metavar="T,W,P,BT,BW,R",
        help="compile this tiling instead of the default: block_t, num_warps, prefetch (0/1), "
        "backward_block_t, backward_warps, rows_per_sm",
    )
    args = parser.parse_args(argv)
    try:
        tiles = None if args.tiles is None else parse_tiles(args.tiles)
    except ValueError as error:
        parser.error(str(error))
    if args.arch < 80:
        parser.error(f"--arch {args.arch}: the limits used here hold for sm_80 and newer; give 80 or more")
    cases = parsed_shapes(parser, args)
    command = command_line(MODULE, argv)
    rows: list[KernelInfo] = []
    for case in cases:
        for dtype_name in args.dtype:
            rows += compile_case(case, dtype_name, args.arch, tiles)
            save_report(args.out, [asdict(r) for r in rows], markdown(rows, args.arch, command))
    print(markdown(rows, args.arch, command))
    return rows


if __name__ == "__main__":
    main()
