"""Host time of one ``triton_grid_fuse`` call with the GPU taken out: what Python, the input checks,
the plan, autograd and Triton's launcher cost before a kernel reaches the GPU.

    python -m encoder_fusion.benchmarks.kernel.host --out benchmarks/results/grid_fuse_host_cpu.json

Every kernel launch is compiled once for sm_90 and then returns where it would launch
(:func:`encoder_fusion.benchmarks.kernel.registers.compile_only`), so the numbers hold no GPU time at all. Per
case and dtype, each row is the median over many calls of one way of calling, all in one run:

* ``inference``: under ``torch.no_grad``, a call signature seen before (checked plan reused);
* ``inference, plan rebuilt``: the same with the plan cache emptied before every call
  (:func:`encoder_fusion.kernels.grid_fuse_plan.clear_plan_cache`), i.e. the input checks and the plan on
  every call;
* ``autograd forward``: inputs that require grad (an autograd node is recorded);
* ``forward + backward``: ``torch.autograd.grad`` of the output for every input.

``x inference`` is each median over the first row's. On a GPU machine the launches themselves add
to this (see the ``host ms`` column of ``encoder_fusion.benchmarks.kernel.bench``); at small batch the sum is
what a call costs. The tensors here are on the CPU, whose layer weights the value check reads (a CUDA
tensor's it does not). Run it with ``TRITON_INTERPRET`` unset.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch

from encoder_fusion.benchmarks.kernel.harness import (
    DTYPES,
    BenchCase,
    add_shape_arguments,
    header_lines,
    make_problem,
    make_step,
    parsed_shapes,
    report_header,
    save_report,
    tool_parser,
)
from encoder_fusion.benchmarks.kernel.registers import compile_only
from encoder_fusion.kernels.grid_fuse_plan import clear_plan_cache
from encoder_fusion.kernels.grid_fuse_triton import triton_grid_fuse

MODULE = "encoder_fusion.benchmarks.kernel.host"


def median_us(step: Callable[[], object], calls: int) -> float:
    """Median wall time of ``step`` in microseconds, after a few warm-up calls."""
    for _ in range(5):
        step()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e6)
    return statistics.median(times)


def steps(case: BenchCase, dtype: torch.dtype) -> dict[str, Callable[[], object]]:
    """One no-argument callable per way of calling (see the module docstring)."""
    problem = make_problem(case, 1, dtype, torch.device("cpu"))  # every tensor requires grad
    grad_out = torch.ones_like(problem.call(triton_grid_fuse))
    inference = make_step(triton_grid_fuse, problem, "fwd", grad_out)  # under no_grad

    def rebuilt():
        clear_plan_cache()
        return inference()

    return {
        "inference": inference,
        "inference, plan rebuilt": rebuilt,
        "autograd forward": lambda: problem.call(triton_grid_fuse),
        "forward + backward": make_step(triton_grid_fuse, problem, "fwdbwd", grad_out),
    }


def run(report: dict, cases: Sequence[BenchCase], dtypes: Sequence[str], calls: int) -> dict:
    """Time every way of calling on every case and dtype into ``report`` (a
    :func:`~encoder_fusion.benchmarks.kernel.harness.report_header`); return it."""
    rows: list[dict] = []
    report.update(calls=calls, rows=rows)
    with compile_only():
        for case in cases:
            for dtype_name in dtypes:
                timed = {way: median_us(step, calls) for way, step in steps(case, DTYPES[dtype_name]).items()}
                for way, us in timed.items():
                    rows.append(
                        {
                            "case": case.name,
                            "dtype": dtype_name,
                            "way": way,
                            "median_us": us,
                            "vs_inference": us / timed["inference"],
                        }
                    )
    return report


def markdown(report: dict) -> str:
    """The report as a markdown table."""
    lines = [
        "# grid_fuse host time per call (launches stubbed: no GPU time)",
        "",
        *header_lines(report),
        f"- median of {report['calls']} calls each; x inference: over the first row of the case",
        "",
        "| case | dtype | way | median us | x inference |",
        "|---|---|---|---:|---:|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['case']} | {r['dtype']} | {r['way']} | {r['median_us']:.1f} | {r['vs_inference']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> dict:
    """Time the cases from command-line arguments; print the table; return the report."""
    parser = tool_parser(MODULE, __doc__)
    add_shape_arguments(parser, batches=None, passes=False)
    parser.add_argument("--calls", type=int, default=200, help="calls timed per way (default 200)")
    args = parser.parse_args(argv)
    cases = parsed_shapes(parser, args)
    if args.calls < 1:
        parser.error(f"--calls must be at least 1, got {args.calls}")
    report = run(report_header(MODULE, argv, torch.device("cpu")), cases, args.dtype, args.calls)
    save_report(args.out, report, markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
