"""What the finite check of ``grid_fuse`` costs per call, measured beside the call without it.

    python -m encoder_fusion.benchmarks.kernel.finite_cost --out benchmarks/results/finite_check_cpu.json

The check (:func:`encoder_fusion.kernels.finite_checks`, on in the benchmark's probes) reads the
output once more (one sum, the sources only when it is not finite) and, on an accelerator, waits
for it. Per case,
dtype and batch, the plain call and the checked call run in turn, round after round, so drift hits
both alike; ``x plain`` is the median checked call over the median plain one, with a 95 % interval
over paired resamples of the rounds. The call is the public ``grid_fuse`` under ``torch.no_grad``: the
PyTorch reference on the CPU, the Triton kernels on a GPU.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Sequence

import torch

import encoder_fusion.kernels
from encoder_fusion.benchmarks.kernel.harness import (
    DTYPES,
    add_shape_arguments,
    header_lines,
    make_problem,
    parsed_shapes,
    report_header,
    save_report,
    tool_parser,
)
from encoder_fusion.benchmarks.reports.stats import ratio_ci
from encoder_fusion.benchmarks.timing.timer import Timer, round_robin

MODULE = "encoder_fusion.benchmarks.kernel.finite_cost"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = tool_parser(MODULE, __doc__)
    add_shape_arguments(parser, batches=(1, 8), passes=False)
    parser.add_argument("--rounds", type=int, default=30, help="timed rounds (default 30)")
    args = parser.parse_args(argv)
    args.shapes = parsed_shapes(parser, args)
    if args.rounds < 5:
        parser.error(f"--rounds must be at least 5, got {args.rounds}")
    return args


def measure(problem, device: torch.device, rounds: int) -> dict:
    """The plain and the checked call of ``problem``, timed side by side."""

    def call(checked: bool):
        def run() -> torch.Tensor:
            with torch.no_grad(), encoder_fusion.kernels.finite_checks(checked):
                return problem.call(encoder_fusion.kernels.grid_fuse)

        return run

    samples = round_robin(
        Timer(device), {("plain", ""): call(False), ("checked", ""): call(True)}, warmup=3, repeats=rounds
    )
    plain, checked = samples["plain", ""], samples["checked", ""]
    return {
        "plain_ms": statistics.median(plain),
        "checked_ms": statistics.median(checked),
        "ratio": statistics.median(checked) / statistics.median(plain),
        "ratio_ci": ratio_ci(checked, plain, 2000),
        "source_gb": sum(s.numel() * s.element_size() for s in problem.args.sources) / 1e9,
    }


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for case in args.shapes:
        for dtype in args.dtype:
            for batch in args.batch:
                problem = make_problem(case, batch, DTYPES[dtype], device)
                for tensor in problem.leaves:
                    tensor.requires_grad_(False)
                rows.append(
                    {
                        "case": case.name,
                        "dtype": dtype,
                        "batch": batch,
                        **measure(problem, device, args.rounds),
                    }
                )
    report = {**report_header(MODULE, argv, device), "rounds": args.rounds, "rows": rows}
    lines = [
        "# grid_fuse with and without the finite check of its sources",
        "",
        *header_lines(report),
        f"- median of {args.rounds} rounds, the two calls in turn; x plain: checked / plain, 95 % interval",
        "",
        "| case | dtype | batch | sources MB | plain ms | checked ms | x plain [95 % CI] |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        low, high = row["ratio_ci"]
        lines.append(
            f"| {row['case']} | {row['dtype']} | {row['batch']} | {row['source_gb'] * 1e3:.1f} | "
            f"{row['plain_ms']:.3f} | {row['checked_ms']:.3f} | {row['ratio']:.3f} [{low:.3f}, {high:.3f}] |"
        )
    table = "\n".join(lines) + "\n"
    print(table, end="")
    save_report(args.out, report, table)


if __name__ == "__main__":
    main()
