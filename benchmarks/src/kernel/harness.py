"""What the kernel tools share: the arguments that name problems (``--case``, ``--batch``,
``--dtype``, ``--pass``, ``--out``), the problems themselves (encoders' hooked layers fused to one
grid, as tensors), timing, and the reports they write (JSON and markdown, each atomically).

Built-in cases come from real encoder pairs (every source a (B, h, w, C) grid, ``bilinear``
alignment):

* ``clip-L14-336+dinov2-L14``: CLIP ViT-L/14-336 and DINOv2 ViT-L/14 at 336 px, 24x24 grids,
  1024 channels, 3 layers each, target 24x24 (alignment is the identity);
* ``clip-B16+dinov2-B14``: CLIP ViT-B/16 at 224 (14x14) and DINOv2 ViT-B/14 at 224 (16x16),
  768 channels, 3 layers each, target 16x16.

Bytes that must move: ``fwd`` reads every source and parameter once and writes the output once;
``fwdbwd`` adds the backward pass, which reads every source again and the output gradient once and
writes every source and parameter gradient once.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import platform
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from encoder_fusion.io import atomic_write
from encoder_fusion.kernels import reference
from encoder_fusion.kernels.grid_fuse_args import GridFuseArgs

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PASSES = ("fwd", "fwdbwd")
COPY_BYTES = {"cuda": 1 << 30, "cpu": 1 << 27}


@dataclass(frozen=True)
class EncoderShape:
    """One encoder's hooked layers: grid (h, w), channels, number of layers."""

    height: int
    width: int
    channels: int
    layers: int


@dataclass(frozen=True)
class BenchCase:
    """Encoders fused to one target grid; each encoder is one output group."""

    name: str
    encoders: tuple[EncoderShape, ...]
    out_hw: tuple[int, int]


CASES = {
    case.name: case
    for case in (
        BenchCase(
            "clip-L14-336+dinov2-L14",
            (EncoderShape(24, 24, 1024, 3), EncoderShape(24, 24, 1024, 3)),
            (24, 24),
        ),
        BenchCase(
            "clip-B16+dinov2-B14", (EncoderShape(14, 14, 768, 3), EncoderShape(16, 16, 768, 3)), (16, 16)
        ),
    )
}
_CASE_SPEC = re.compile(r"^(?P<name>[\w.+-]+)=(?P<encoders>[\dx*+]+)->(?P<h>\d+)x(?P<w>\d+)$")
_ENCODER_SPEC = re.compile(r"^(\d+)x(\d+)x(\d+)\*(\d+)$")


def parse_case(spec: str) -> BenchCase:
    """``NAME=HxWxC*L+HxWxC*L->HxW`` (one ``HxWxC*L`` per encoder) as a :class:`BenchCase`.

    Raises:
        ValueError: a spec that does not have this form or has a zero size.
    """
    match = _CASE_SPEC.match(spec)
    parts = match["encoders"].split("+") if match else []
    encoders = [m for m in map(_ENCODER_SPEC.match, parts) if m is not None]
    if match is None or len(encoders) != len(parts):
        raise ValueError(f"--case {spec!r} must look like NAME=HxWxC*L+HxWxC*L->HxW, e.g. tiny=2x2x8*2->2x2")
    case = BenchCase(
        match["name"],
        tuple(EncoderShape(*(int(v) for v in m.groups())) for m in encoders),
        (int(match["h"]), int(match["w"])),
    )
    if min(case.out_hw) == 0 or any(0 in asdict(e).values() for e in case.encoders):
        raise ValueError(f"--case {spec!r} has a zero size; every size must be positive")
    return case


@dataclass(frozen=True)
class Problem:
    """The arguments of one benchmark call (every tensor requires grad, every list is given)."""

    args: GridFuseArgs
    leaves: list[torch.Tensor]  # every input tensor: sources, layer weights, LayerNorm affines

    @functools.cached_property
    def keywords(self) -> dict[str, object]:
        """The arguments after ``sources`` and ``out_hw``, by their public names."""
        return {field.name: getattr(self.args, field.name) for field in fields(self.args) if field.kw_only}

    def call(self, fn: Callable[..., torch.Tensor]) -> torch.Tensor:
        """``fn`` (a ``grid_fuse`` face) on this problem."""
        return fn(self.args.sources, self.args.out_hw, **self.keywords)


def make_problem(case: BenchCase, batch: int, dtype: torch.dtype, device: torch.device) -> Problem:
    """Random sources and parameters for ``case``, ``bilinear``; all of them require grad."""
    generator = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype).requires_grad_()

    sources, groups, widths = [], [], []
    for group, encoder in enumerate(case.encoders):
        for _ in range(encoder.layers):
            sources.append(rand(batch, encoder.height, encoder.width, encoder.channels))
            groups.append(group)
            widths.append(encoder.channels)
    layer_weights = torch.full((len(sources),), 1.0 / 3, device=device, dtype=dtype).requires_grad_()
    ln_weight, ln_bias = [rand(c) for c in widths], [rand(c) for c in widths]
    args = GridFuseArgs(
        sources, case.out_hw, groups=groups, layer_weights=layer_weights, ln_weight=ln_weight, ln_bias=ln_bias
    )
    return Problem(args, [*sources, layer_weights, *ln_weight, *ln_bias])


def _nbytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def bytes_moved(problem: Problem, out_bytes: int, pass_name: str) -> int:
    """The bytes a pass must move at least: see the module docstring."""
    inputs = _nbytes(problem.leaves)
    forward = inputs + out_bytes
    # backward: read sources and parameters again, read grad_out, write one gradient per input
    return forward if pass_name == "fwd" else forward + 2 * inputs + out_bytes


def make_step(
    fn: Callable[..., torch.Tensor], problem: Problem, pass_name: str, grad_out: torch.Tensor
) -> Callable[[], object]:
    """A no-argument callable running one forward (no grad) or forward + backward of ``fn``."""
    if pass_name == "fwd":

        def forward() -> torch.Tensor:
            with torch.no_grad():
                return problem.call(fn)

        return forward
    leaves = problem.leaves

    def forward_backward() -> tuple[torch.Tensor, ...]:
        return torch.autograd.grad(problem.call(fn), leaves, grad_out)

    return forward_backward


def median_ms(step: Callable[[], object], device: torch.device, quick: bool) -> float:
    """Median time of ``step`` in milliseconds: do_bench on CUDA, perf_counter on the CPU."""
    if device.type == "cuda":
        import triton.testing

        ms = triton.testing.do_bench(step, warmup=25, rep=100, return_mode="median")
        assert isinstance(ms, float), ms  # one number for return_mode="median"
        return ms
    for _ in range(1 if quick else 3):
        step()
    times = []
    for _ in range(3 if quick else 10):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def copy_bandwidth_gbps(device: torch.device, quick: bool) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second, in GB/s)."""
    size = COPY_BYTES[device.type] // (8 if quick else 1)
    src = torch.empty(size, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    return 2 * size / (median_ms(lambda: dst.copy_(src), device, quick) * 1e6)


@dataclass(frozen=True)
class SweepSpec:
    """What a sweep covers: every case, batch size and dtype (by name), each pass, on one device;
    ``quick``: fewer repeats."""

    cases: Sequence[BenchCase]
    batches: Sequence[int]
    dtypes: Sequence[str]
    passes: Sequence[str]
    device: torch.device
    quick: bool = False


@dataclass(frozen=True)
class SweepProblem:
    """One problem of a sweep (:func:`run_sweep`): its case, batch and dtype, the tensors, the eager
    reference's output (no grad) and a random output gradient; its rows go into the report."""

    spec: SweepSpec
    case: BenchCase
    batch: int
    dtype: str
    problem: Problem
    expected: torch.Tensor
    grad_out: torch.Tensor
    copy_gbps: float
    rows: list[dict]

    def step(self, fn: Callable[..., torch.Tensor], pass_name: str) -> Callable[[], object]:
        """:func:`make_step` of ``fn`` on this problem."""
        return make_step(fn, self.problem, pass_name, self.grad_out)

    def median_ms(self, step: Callable[[], object]) -> float:
        """:func:`median_ms` of ``step`` on the sweep's device."""
        return median_ms(step, self.spec.device, self.spec.quick)

    def add_row(self, pass_name: str, ms: float | None, **fields: object) -> None:
        """A row of the report for ``pass_name``: what names the problem, then for a time ``ms``
        (None: nothing was timed) the median, the bytes moved, GB/s and its share of the copy
        bandwidth, then ``fields``."""
        row: dict[str, object] = {"case": self.case.name, "batch": self.batch, "dtype": self.dtype}
        row["pass"] = pass_name
        if ms is not None:
            moved = bytes_moved(self.problem, self.expected.numel() * self.expected.element_size(), pass_name)
            gbps = moved / (ms * 1e6)
            row.update(median_ms=ms, bytes=moved, gbps=gbps, copy_share=gbps / self.copy_gbps)
        self.rows.append({**row, **fields})


def run_sweep(
    module: str,
    argv: Sequence[str] | None,
    spec: SweepSpec,
    out: Path | None,
    measure: Callable[[SweepProblem], None],
    markdown: Callable[[dict], str],
    **fields: object,
) -> dict:
    """The report of ``measure`` on every problem of ``spec``: :func:`report_header`, ``fields``, the
    copy bandwidth (measured first) and the rows. Written to ``out`` (JSON, and markdown beside it)
    after every problem, so a run cut short keeps every problem it finished; printed as markdown
    at the end."""
    rows: list[dict] = []
    copy_gbps = copy_bandwidth_gbps(spec.device, spec.quick)
    report = {**report_header(module, argv, spec.device), **fields, "copy_gbps": copy_gbps, "rows": rows}
    for case in spec.cases:
        for batch in spec.batches:
            for dtype_name in spec.dtypes:
                problem = make_problem(case, batch, DTYPES[dtype_name], spec.device)
                with torch.no_grad():
                    expected = problem.call(reference.grid_fuse)
                grad_out = torch.randn_like(expected)
                measure(
                    SweepProblem(spec, case, batch, dtype_name, problem, expected, grad_out, copy_gbps, rows)
                )
                save_report(out, report, markdown(report))
    print(markdown(report))
    return report


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's with the threads torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def tool_parser(module: str, doc: str | None) -> argparse.ArgumentParser:
    """The command line of ``python -m module``, described by the first line of its docstring
    ``doc`` (None where docstrings are stripped, ``python -OO``)."""
    return argparse.ArgumentParser(prog=f"python -m {module}", description=(doc or "").split("\n")[0])


def add_shape_arguments(
    parser: argparse.ArgumentParser, *, batches: Sequence[int] | None, passes: bool = True
) -> None:
    """The arguments the kernel tools share: ``--batch`` (when ``batches`` gives its default),
    ``--dtype``, ``--pass`` (when ``passes``), ``--case`` and ``--out``."""
    if batches is not None:
        parser.add_argument("--batch", type=int, nargs="+", default=list(batches))
    parser.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=["bf16", "fp32"])
    if passes:
        parser.add_argument("--pass", dest="passes", nargs="+", choices=PASSES, default=list(PASSES))
    parser.add_argument(
        "--case",
        dest="cases",
        nargs="+",
        metavar="NAME|NAME=HxWxC*L+...->HxW",
        help=f"built-in cases ({', '.join(CASES)}) or a custom spec; default: all built-in cases",
    )
    parser.add_argument("--out", type=Path, help="write the report as JSON here and as markdown beside it")


def parsed_shapes(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[BenchCase]:
    """The cases ``--case`` names (all built-in ones by default); exits through ``parser`` on a
    non-positive ``--batch`` or a malformed case spec."""
    if any(b <= 0 for b in getattr(args, "batch", [1])):
        parser.error(f"--batch sizes must be positive, got {args.batch}")
    try:
        return [CASES[spec] if spec in CASES else parse_case(spec) for spec in args.cases or list(CASES)]
    except ValueError as error:
        parser.error(str(error))


def command_line(module: str, argv: Sequence[str] | None) -> str:
    """The command that runs ``python -m module`` with ``argv`` (the process's arguments if None)."""
    return f"python -m {module} " + shlex.join(sys.argv[1:] if argv is None else argv)


def report_header(module: str, argv: Sequence[str] | None, device: torch.device) -> dict:
    """What every report starts with: the device, the date, the command and torch's version."""
    return {
        "device": device_name(device),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command_line(module, argv),
        "torch": torch.__version__,
    }


def header_lines(report: dict) -> list[str]:
    """:func:`report_header`'s fields as markdown list items."""
    return [
        f"- device: {report['device']}",
        f"- date: {report['date']}",
        f"- command: `{report['command']}`",
        f"- torch: {report['torch']}",
    ]


def save_report(out: Path | None, data: object, table: str) -> None:
    """Write ``data`` as JSON to ``out`` and ``table`` beside it as ``.md``, each atomically."""
    if out is not None:
        atomic_write(out, json.dumps(data, indent=2) + "\n")
        atomic_write(out.with_suffix(".md"), table)
