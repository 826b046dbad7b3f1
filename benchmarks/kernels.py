"""Benchmark of ``grid_fuse``: the Triton kernel against the eager reference and ``torch.compile`` of
it, side by side in one run.

    python -m benchmarks.kernels --batch 1 8 32 128 --dtype bf16 fp32 --pass fwd fwdbwd \\
        --out benchmarks/results/grid_fuse.json

Shapes come from real encoder pairs (every source a (B, h, w, C) grid, ``bilinear`` alignment):

* ``clip-L14-336+dinov2-L14``: CLIP ViT-L/14-336 and DINOv2 ViT-L/14 at 336 px, 24x24 grids,
  1024 channels, 3 layers each, target 24x24 (alignment is the identity);
* ``clip-B16+dinov2-B14``: CLIP ViT-B/16 at 224 (14x14) and DINOv2 ViT-B/14 at 224 (16x16),
  768 channels, 3 layers each, target 16x16.

For every case, batch size, dtype and pass the table gives the median time (``triton.testing.do_bench``
on CUDA; on the CPU a ``time.perf_counter`` median, timing only the reference and its compiled form),
the bytes that must move, the achieved GB/s and its share of the device-to-device copy bandwidth
measured in the same run (a large ``Tensor.copy_``), and speed-ups as ratios of medians against the
eager reference and against ``torch.compile(reference)``.

``torch.compile`` is honest per problem: every (case, batch, dtype) gets a fresh compiled function
after ``torch._dynamo.reset()``, so dynamo's recompile limit can never turn the "compile" column into
eager; the ``graphs`` column counts the graphs dynamo compiled for that problem and pass (0 would mean
the compiled column ran eager; it then reads ``EAGER?``). On CUDA the ``host ms`` column is the pure
host time of one call (Python, dispatch, launches), measured while the GPU is held busy by
``torch.cuda._sleep`` so no call waits for the device; where it is close to the median the call is
host-bound and the median measures the host, not the kernels.

Bytes that must move: ``fwd`` reads every source and parameter once and writes the output once;
``fwdbwd`` adds the backward pass, which reads every source again and the output gradient once and
writes every source and parameter gradient once. ``fwd`` runs under ``torch.no_grad`` (inference);
``fwdbwd`` differentiates sources, layer weights and LayerNorm affines.

Writes ``--out PATH`` as JSON and ``PATH`` with suffix ``.md`` as a markdown table (atomically).
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from benchmarks.io import atomic_write
from kernels import reference

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PASSES = ("fwd", "fwdbwd")
COPY_BYTES = {"cuda": 1 << 30, "cpu": 1 << 27}


@dataclass(frozen=True)
class Encoder:
    """One encoder's hooked layers: grid (h, w), channels, number of layers."""

    height: int
    width: int
    channels: int
    layers: int


@dataclass(frozen=True)
class BenchCase:
    """Encoders fused to one target grid; each encoder is one output group."""

    name: str
    encoders: tuple[Encoder, ...]
    out_hw: tuple[int, int]


CASES = {
    case.name: case
    for case in (
        BenchCase("clip-L14-336+dinov2-L14", (Encoder(24, 24, 1024, 3), Encoder(24, 24, 1024, 3)), (24, 24)),
        BenchCase("clip-B16+dinov2-B14", (Encoder(14, 14, 768, 3), Encoder(16, 16, 768, 3)), (16, 16)),
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
    encoders = [_ENCODER_SPEC.match(part) for part in match["encoders"].split("+")] if match else [None]
    if match is None or not all(encoders):
        raise ValueError(f"--case {spec!r} must look like NAME=HxWxC*L+HxWxC*L->HxW, e.g. tiny=2x2x8*2->2x2")
    case = BenchCase(
        match["name"],
        tuple(Encoder(*(int(v) for v in m.groups())) for m in encoders),
        (int(match["h"]), int(match["w"])),
    )
    if min(case.out_hw) == 0 or any(0 in asdict(e).values() for e in case.encoders):
        raise ValueError(f"--case {spec!r} has a zero size; every size must be positive")
    return case


@dataclass
class Problem:
    """The tensors of one benchmark call (sources, grouping, parameters, output gradient)."""

    sources: list[torch.Tensor]
    groups: list[int]
    layer_weights: torch.Tensor
    ln_weight: list[torch.Tensor]
    ln_bias: list[torch.Tensor]
    out_hw: tuple[int, int]

    def call(self, fn: Callable[..., torch.Tensor]) -> torch.Tensor:
        return fn(
            self.sources,
            self.out_hw,
            groups=self.groups,
            layer_weights=self.layer_weights,
            ln_weight=self.ln_weight,
            ln_bias=self.ln_bias,
            mode="bilinear",
        )

    def leaves(self) -> list[torch.Tensor]:
        return [*self.sources, self.layer_weights, *self.ln_weight, *self.ln_bias]


def make_problem(case: BenchCase, batch: int, dtype: torch.dtype, device: torch.device) -> Problem:
    """Random sources and parameters for ``case``; all of them require grad."""
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
    return Problem(
        sources, groups, layer_weights, [rand(c) for c in widths], [rand(c) for c in widths], case.out_hw
    )


def _nbytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def bytes_moved(problem: Problem, out_bytes: int, pass_name: str) -> int:
    """The bytes a pass must move at least: see the module docstring."""
    inputs = _nbytes(problem.leaves())
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
    leaves = problem.leaves()

    def forward_backward() -> tuple[torch.Tensor, ...]:
        return torch.autograd.grad(problem.call(fn), leaves, grad_out)

    return forward_backward


def median_ms(step: Callable[[], object], device: torch.device, quick: bool) -> float:
    """Median time of ``step`` in milliseconds: do_bench on CUDA, perf_counter on the CPU."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(step, warmup=25, rep=100, return_mode="median"))
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


def implementations(device: torch.device, compile_backend: str) -> dict[str, Callable[..., torch.Tensor]]:
    """What is timed: Triton (CUDA only), the eager reference and a FRESH torch.compile of the
    reference (dynamo is reset first: one compiled function per problem, never past its recompile
    limit, which would silently fall back to eager)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    impls: dict[str, Callable[..., torch.Tensor]] = {}
    if device.type == "cuda":
        from kernels.grid_fuse import triton_grid_fuse

        impls["triton"] = triton_grid_fuse
    impls["eager"] = reference.grid_fuse
    torch._dynamo.reset()
    counters.clear()
    impls["compile"] = torch.compile(reference.grid_fuse, backend=compile_backend)
    return impls


def compiled_graphs() -> int:
    """Graphs dynamo has compiled since :func:`implementations` last reset it."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


# GPU cycles of ``torch.cuda._sleep`` that keep the device busy while host time is measured
# (about 0.1 s on a 2 GHz GPU: longer than the calls take to issue).
_SLEEP_CYCLES = 200_000_000
_HOST_CALLS = 10


def host_ms(step: Callable[[], object], device: torch.device) -> float | None:
    """Pure host time of one call of ``step`` in milliseconds (CUDA only; None on the CPU): the
    calls are issued while the GPU sleeps, so none of them waits for the device."""
    if device.type != "cuda":
        return None
    step()
    torch.cuda.synchronize(device)
    torch.cuda._sleep(_SLEEP_CYCLES)
    start = time.perf_counter()
    for _ in range(_HOST_CALLS):
        step()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize(device)
    return elapsed / _HOST_CALLS * 1e3


def run(
    cases: Sequence[BenchCase],
    batches: Sequence[int],
    dtypes: Sequence[str],
    passes: Sequence[str],
    device: torch.device,
    quick: bool = False,
    compile_backend: str = "inductor",
    on_progress: Callable[[dict], None] | None = None,
) -> dict:
    """Time every implementation on every case, batch, dtype and pass; return the report dict.

    ``on_progress`` receives the report so far after every (case, batch, dtype), so a run cut short
    keeps every problem it finished.
    """
    copy_gbps = copy_bandwidth_gbps(device, quick)
    rows = []
    report = {
        "device": device_name(device),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.kernels " + shlex.join(sys.argv[1:]),
        "copy_gbps": copy_gbps,
        "torch": torch.__version__,
        "compile_backend": compile_backend,
        "rows": rows,
    }
    for case in cases:
        for batch in batches:
            for dtype_name in dtypes:
                problem = make_problem(case, batch, DTYPES[dtype_name], device)
                impls = implementations(device, compile_backend)
                with torch.no_grad():
                    expected = problem.call(reference.grid_fuse)
                    errors = {
                        impl: (problem.call(fn).float() - expected.float()).abs().max().item()
                        for impl, fn in impls.items()
                    }
                no_grad_graphs = compiled_graphs()  # the check above compiled the no-grad forward
                grad_out = torch.randn_like(expected)
                out_bytes = expected.numel() * expected.element_size()
                for pass_name in passes:
                    moved = bytes_moved(problem, out_bytes, pass_name)
                    graphs_before = compiled_graphs()
                    steps = {impl: make_step(fn, problem, pass_name, grad_out) for impl, fn in impls.items()}
                    times = {impl: median_ms(step, device, quick) for impl, step in steps.items()}
                    graphs = compiled_graphs() - graphs_before
                    if pass_name == "fwd":
                        graphs += no_grad_graphs
                    hosts = {impl: host_ms(step, device) for impl, step in steps.items()}
                    for impl, ms in times.items():
                        gbps = moved / (ms * 1e6)
                        rows.append(
                            {
                                "case": case.name,
                                "batch": batch,
                                "dtype": dtype_name,
                                "pass": pass_name,
                                "impl": impl,
                                "median_ms": ms,
                                "host_ms": hosts[impl],
                                "bytes": moved,
                                "gbps": gbps,
                                "copy_share": gbps / copy_gbps,
                                "speedup_vs_eager": times["eager"] / ms,
                                "speedup_vs_compile": times["compile"] / ms,
                                "max_abs_err_vs_eager": errors[impl],
                                "compile_graphs": graphs if impl == "compile" else None,
                            }
                        )
                if on_progress is not None:
                    on_progress(report)
    return report


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def markdown(report: dict) -> str:
    """The report as a markdown table with a header naming device, date, command and copy bandwidth."""
    lines = [
        "# grid_fuse benchmark",
        "",
        f"- device: {report['device']}",
        f"- date: {report['date']}",
        f"- command: `{report['command']}`",
        f"- torch: {report['torch']}, torch.compile backend: {report['compile_backend']}",
        f"- device-to-device copy bandwidth: {report['copy_gbps']:.1f} GB/s",
        "- compile: a fresh torch.compile per (case, batch, dtype) after torch._dynamo.reset(); "
        "graphs = graphs dynamo compiled for that problem and pass",
        "- host ms: pure host time of one call, issued while the GPU sleeps (CUDA only)",
        "",
        "| case | batch | dtype | pass | impl | median ms | host ms | MB moved | GB/s | % of copy "
        "| x eager | x compile | graphs |",
        "|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        host = "-" if r.get("host_ms") is None else f"{r['host_ms']:.3f}"
        graphs = r.get("compile_graphs")
        graphs_cell = "" if graphs is None else str(graphs) if graphs > 0 else "0 (EAGER?)"
        lines.append(
            f"| {r['case']} | {r['batch']} | {r['dtype']} | {r['pass']} | {r['impl']} | "
            f"{r['median_ms']:.3f} | {host} | {r['bytes'] / 1e6:.1f} | {r['gbps']:.1f} | "
            f"{100 * r['copy_share']:.1f} | "
            f"{r['speedup_vs_eager']:.2f} | {r['speedup_vs_compile']:.2f} | {graphs_cell} |"
        )
    return "\n".join(lines) + "\n"


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


def save_report(out: Path | None, data: object, table: str) -> None:
    """Write ``data`` as JSON to ``out`` and ``table`` beside it as ``.md``, each atomically."""
    if out is not None:
        atomic_write(out, json.dumps(data, indent=2) + "\n")
        atomic_write(out.with_suffix(".md"), table)


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[BenchCase]]:
    """The benchmark's command line and the cases it names."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kernels", description=__doc__.split("\n")[0])
    add_shape_arguments(parser, batches=[1, 8, 32, 128])
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smallest batch and first dtype only, fewer repeats (a smoke run on the CPU)",
    )
    parser.add_argument(
        "--compile-backend",
        default="inductor",
        help="torch.compile backend of the compiled reference (default inductor; 'eager' for smoke runs)",
    )
    args = parser.parse_args(argv)
    return args, parsed_shapes(parser, args)


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the benchmark from command-line arguments; print the table; return the report."""
    args, cases = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    batches, dtypes = args.batch, args.dtype
    if args.quick:
        batches, dtypes = [min(batches)], dtypes[:1]
    if device.type != "cuda":
        print("no GPU found: timing the eager reference and torch.compile(reference) on the CPU only")

    report = run(
        cases,
        batches,
        dtypes,
        args.passes,
        device,
        quick=args.quick,
        compile_backend=args.compile_backend,
        on_progress=lambda report: save_report(args.out, report, markdown(report)),
    )
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
