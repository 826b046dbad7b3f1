"""Host time of one ``triton_grid_fuse`` call with the GPU taken out: what Python, the input checks,
the plan, autograd and Triton's launcher cost before a kernel reaches the GPU.

    python -m benchmarks.kernel_host --out benchmarks/results/grid_fuse_host_cpu.json

Every kernel launch is compiled once for sm_90 and then returns where it would launch
(``benchmarks.kernel_registers.compile_only``), so the numbers hold no GPU time at all. Per case
and dtype, each row is the median over many calls of one way of calling, all in one run:

* ``inference``: under ``torch.no_grad``, a call signature seen before (checked plan reused);
* ``inference, plan rebuilt``: the same with the plan cache emptied before every call, i.e. the
  input checks and the plan on every call;
* ``autograd forward``: inputs that require grad (an autograd node is recorded);
* ``forward + backward``: ``torch.autograd.grad`` of the output for every input.

``x inference`` is each median over the first row's. On a GPU machine the launches themselves add
to this (see the ``host ms`` column of ``benchmarks.kernels``); at small batch the sum is what a
call costs. Run it with ``TRITON_INTERPRET`` unset.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import torch

from benchmarks.kernel_registers import compile_only
from benchmarks.kernels import (
    DTYPES,
    add_shape_arguments,
    device_name,
    make_problem,
    make_step,
    parsed_shapes,
    save_report,
)

WAYS = ("inference", "inference, plan rebuilt", "autograd forward", "forward + backward")


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


def steps(case, dtype: torch.dtype) -> dict[str, Callable[[], object]]:
    """One no-argument callable per way of calling (see the module docstring)."""
    gf = importlib.import_module("kernels.grid_fuse")
    problem = make_problem(case, 1, dtype, torch.device("cpu"))  # every tensor requires grad
    grad_out = torch.ones_like(problem.call(gf.triton_grid_fuse))
    inference = make_step(gf.triton_grid_fuse, problem, "fwd", grad_out)  # under no_grad

    def rebuilt():
        gf._PLAN_CACHE.clear()
        return inference()

    return {
        "inference": inference,
        "inference, plan rebuilt": rebuilt,
        "autograd forward": lambda: problem.call(gf.triton_grid_fuse),
        "forward + backward": make_step(gf.triton_grid_fuse, problem, "fwdbwd", grad_out),
    }


def run(cases: Sequence, dtypes: Sequence[str], calls: int) -> dict:
    """Time every way of calling on every case and dtype; return the report dict."""
    rows = []
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
    return {
        "machine": device_name(torch.device("cpu")),
        "command": "python -m benchmarks.kernel_host " + " ".join(sys.argv[1:]),
        "torch": torch.__version__,
        "calls": calls,
        "rows": rows,
    }


def markdown(report: dict) -> str:
    """The report as a markdown table."""
    lines = [
        "# grid_fuse host time per call (launches stubbed: no GPU time)",
        "",
        f"- machine: {report['machine']}; torch {report['torch']}",
        f"- command: `{report['command']}`",
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
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.kernel_host", description=__doc__.split("\n")[0]
    )
    add_shape_arguments(parser, batches=None, passes=False)
    parser.add_argument("--calls", type=int, default=200, help="calls timed per way (default 200)")
    args = parser.parse_args(argv)
    cases = parsed_shapes(parser, args)
    if args.calls < 1:
        parser.error(f"--calls must be at least 1, got {args.calls}")
    report = run(cases, args.dtype, args.calls)
    save_report(args.out, report, markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
