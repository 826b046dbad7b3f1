"""Benchmark of ``grid_fuse``: the Triton kernel against the eager reference and ``torch.compile`` of
it, side by side in one run.

    python -m encoder_fusion.benchmarks.kernel.bench --batch 1 8 32 128 --dtype bf16 fp32 --pass fwd fwdbwd \\
        --out benchmarks/results/grid_fuse.json

The cases are those of :mod:`encoder_fusion.benchmarks.kernel.harness`. For every case, batch size, dtype and
pass the table gives the median time (``triton.testing.do_bench`` on CUDA; on the CPU a
``time.perf_counter`` median, timing only the reference and its compiled form), the bytes that must
move, the achieved GB/s and its share of the device-to-device copy bandwidth measured in the same
run (a large ``Tensor.copy_``), and speed-ups as ratios of medians against the eager reference and
against ``torch.compile(reference)``.

``torch.compile`` is honest per problem: every (case, batch, dtype) gets a fresh compiled function
after ``torch._dynamo.reset()``, so dynamo's recompile limit can never turn the "compile" column into
eager; the ``graphs`` column counts the graphs dynamo compiled for that problem and pass (0 would mean
the compiled column ran eager; it then reads ``EAGER?``). On CUDA the ``host ms`` column is the pure
host time of one call (Python, dispatch, launches), measured while the GPU is held busy by
``torch.cuda._sleep`` so no call waits for the device; where it is close to the median the call is
host-bound and the median measures the host, not the kernels.

The bytes that must move are counted as :func:`encoder_fusion.benchmarks.kernel.harness.bytes_moved` says.
``fwd`` runs under ``torch.no_grad`` (inference); ``fwdbwd`` differentiates sources, layer weights and
LayerNorm affines.

Writes ``--out PATH`` as JSON and ``PATH`` with suffix ``.md`` as a markdown table (atomically).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from functools import partial

import torch

from encoder_fusion.benchmarks.kernel import harness
from encoder_fusion.kernels import reference
from encoder_fusion.kernels.grid_fuse_triton import triton_grid_fuse

MODULE = "encoder_fusion.benchmarks.kernel.bench"


def implementations(device: torch.device, compile_backend: str) -> dict[str, Callable[..., torch.Tensor]]:
    """What is timed: Triton (CUDA only), the eager reference and a FRESH torch.compile of the
    reference (dynamo is reset first: one compiled function per problem, never past its recompile
    limit, which would silently fall back to eager)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    impls: dict[str, Callable[..., torch.Tensor]] = {}
    if device.type == "cuda":
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


def measure(swept: harness.SweepProblem, compile_backend: str) -> None:
    """Time every implementation on one problem of the sweep, in every pass: a row each."""
    impls = implementations(swept.spec.device, compile_backend)
    expected = swept.expected.float()
    with torch.no_grad():
        outputs = {impl: swept.problem.call(fn).float() for impl, fn in impls.items()}
    errors = {impl: (out - expected).abs().max().item() for impl, out in outputs.items()}
    no_grad_graphs = compiled_graphs()  # the check above compiled the no-grad forward
    for pass_name in swept.spec.passes:
        graphs_before = compiled_graphs()
        steps = {impl: swept.step(fn, pass_name) for impl, fn in impls.items()}
        times = {impl: swept.median_ms(step) for impl, step in steps.items()}
        graphs = compiled_graphs() - graphs_before
        if pass_name == "fwd":
            graphs += no_grad_graphs
        hosts = {impl: host_ms(step, swept.spec.device) for impl, step in steps.items()}
        for impl, ms in times.items():
            swept.add_row(
                pass_name,
                ms,
                impl=impl,
                host_ms=hosts[impl],
                speedup_vs_eager=times["eager"] / ms,
                speedup_vs_compile=times["compile"] / ms,
                max_abs_err_vs_eager=errors[impl],
                compile_graphs=graphs if impl == "compile" else None,
            )


def markdown(report: dict) -> str:
    """The report as a markdown table with a header naming device, date, command and copy bandwidth."""
    lines = [
        "# grid_fuse benchmark",
        "",
        *harness.header_lines(report),
        f"- torch.compile backend: {report['compile_backend']}",
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


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[harness.BenchCase]]:
    """The benchmark's command line and the cases it names."""
    parser = harness.tool_parser(MODULE, __doc__)
    harness.add_shape_arguments(parser, batches=[1, 8, 32, 128])
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
    return args, harness.parsed_shapes(parser, args)


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the benchmark from command-line arguments; print the table; return the report."""
    args, cases = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    batches, dtypes = args.batch, args.dtype
    if args.quick:
        batches, dtypes = [min(batches)], dtypes[:1]
    if device.type != "cuda":
        print("no GPU found: timing the eager reference and torch.compile(reference) on the CPU only")
    spec = harness.SweepSpec(cases, batches, dtypes, args.passes, device, args.quick)
    backend = args.compile_backend
    timed = partial(measure, compile_backend=backend)
    return harness.run_sweep(MODULE, argv, spec, args.out, timed, markdown, compile_backend=backend)


if __name__ == "__main__":
    main()
