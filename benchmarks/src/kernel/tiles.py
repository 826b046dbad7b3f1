"""Sweep of the Triton ``grid_fuse`` tilings: every candidate against the default, in one run.

    python -m encoder_fusion.benchmarks.kernel.tiles --batch 32 128 --dtype bf16 fp32 \\
        --out benchmarks/results/grid_fuse_tiles.json

The tiling (:class:`encoder_fusion.kernels.grid_fuse_plan.Tiles`) decides how many tokens a program takes,
with how many warps, whether the next source's loads are issued before the current one is reduced, and how
many backward rows programs share a multiprocessor.
:func:`encoder_fusion.kernels.grid_fuse_plan.default_tiles` picks one from the channel count; this sweep times
the default and its neighbours, one field changed at a time, on the cases of
:mod:`encoder_fusion.benchmarks.kernel.harness`:

* ``fwd`` (inference, no grad): ``block_t`` halved and doubled, ``num_warps`` halved and doubled,
  ``prefetch`` flipped;
* ``fwdbwd``: the same for ``backward_block_t`` and ``backward_warps``, ``rows_per_sm`` halved and
  doubled, ``prefetch`` flipped (it applies to both passes).

Each row gives the median time (``triton.testing.do_bench``), the achieved GB/s and its share of the
copy bandwidth measured in the same run, the ratio ``default ms / candidate ms`` (above 1: the
candidate is faster) and the largest difference of its forward output from the eager reference.
A candidate that fails (a tiling past the GPU's resources, say) gets a row saying why, and the
sweep goes on.
It needs a GPU to mean anything; on the CPU (with ``TRITON_INTERPRET=1``) it only checks the
plumbing.

Writes ``--out PATH`` as JSON and ``PATH`` with suffix ``.md`` after every problem (atomically), so a
run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from functools import partial

import torch

from encoder_fusion.benchmarks.kernel import harness
from encoder_fusion.kernels.grid_fuse_plan import Tiles, default_tiles
from encoder_fusion.kernels.grid_fuse_triton import triton_grid_fuse

MODULE = "encoder_fusion.benchmarks.kernel.tiles"

# Fields varied per pass (prefetch applies to both kernels, so it is varied in both).
_FIELDS = {
    "fwd": ("block_t", "num_warps", "prefetch"),
    "fwdbwd": ("backward_block_t", "backward_warps", "rows_per_sm", "prefetch"),
}


def candidate_tilings(default: Tiles, pass_name: str) -> list[tuple[str, Tiles]]:
    """``(label, tiles)`` for the default and each neighbour valid for ``pass_name``: one field
    halved or doubled (flipped for ``prefetch``); values outside what ``Tiles`` accepts are skipped."""
    out = [("default", default)]
    for field in _FIELDS[pass_name]:
        value = getattr(default, field)
        values = [not value] if isinstance(value, bool) else [value // 2, value * 2]
        for new in values:
            try:
                tiles = dataclasses.replace(default, **{field: new})
            except ValueError:
                continue  # e.g. half of 1 token, or more warps than a program may have
            if tiles != default:
                out.append((f"{field}={new}", tiles))
    return out


def measure(swept: harness.SweepProblem) -> None:
    """Time every candidate tiling on one problem of the sweep, in every pass: a row each."""
    default = default_tiles(max(encoder.channels for encoder in swept.case.encoders))
    expected = swept.expected.float()
    for pass_name in swept.spec.passes:
        timed = []
        for label, tiles in candidate_tilings(default, pass_name):
            fn = partial(triton_grid_fuse, tiles=tiles)
            try:
                with torch.no_grad():
                    error = (swept.problem.call(fn).float() - expected).abs().max().item()
                ms = swept.median_ms(swept.step(fn, pass_name))
            except Exception as failure:  # e.g. a tiling past the GPU's resources
                if label == "default":
                    raise
                timed.append((label, tiles, None, f"{type(failure).__name__}: {failure}"))
                continue
            timed.append((label, tiles, ms, error))
        default_ms = timed[0][2]
        assert default_ms is not None  # a failing default raised above
        for label, tiles, ms, error in timed:
            fields = {"tiling": label, "tiles": dataclasses.asdict(tiles)}
            if ms is None:  # the candidate failed: keep why, go on with the others
                swept.add_row(pass_name, None, **fields, failed=error)
            else:
                speedup = default_ms / ms
                swept.add_row(pass_name, ms, **fields, speedup_vs_default=speedup, max_abs_err_vs_eager=error)


def markdown(report: dict) -> str:
    """The sweep as a markdown table, one row per (problem, pass, tiling)."""
    lines = [
        "# grid_fuse tiling sweep",
        "",
        *harness.header_lines(report),
        f"- device-to-device copy bandwidth: {report['copy_gbps']:.1f} GB/s",
        "- x default: default median / candidate median, same run (above 1: the candidate is faster)",
        "",
        "| case | batch | dtype | pass | tiling | median ms | GB/s | % of copy | x default | max err |",
        "|---|---:|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        head = f"| {r['case']} | {r['batch']} | {r['dtype']} | {r['pass']} | {r['tiling']} | "
        if "failed" in r:
            lines.append(head + f"failed: {r['failed'][:80]} | | | | |")
            continue
        lines.append(
            head + f"{r['median_ms']:.3f} | {r['gbps']:.1f} | {100 * r['copy_share']:.1f} | "
            f"{r['speedup_vs_default']:.2f} | {r['max_abs_err_vs_eager']:.2e} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[harness.BenchCase]]:
    """The sweep's command line and the cases it names; exits with a message for a bad batch or
    case, or a missing GPU."""
    parser = harness.tool_parser(MODULE, __doc__)
    harness.add_shape_arguments(parser, batches=[32, 128])
    parser.add_argument("--device", default=None, help="cuda, or cpu with TRITON_INTERPRET=1 (default: cuda)")
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a plumbing check on the CPU)")
    args = parser.parse_args(argv)
    cases = harness.parsed_shapes(parser, args)
    if (args.device or "cuda").startswith("cuda") and not torch.cuda.is_available():
        parser.error(
            "no CUDA device: the sweep times the Triton kernels on a GPU "
            "(--device cpu with TRITON_INTERPRET=1 only checks the plumbing)"
        )
    return args, cases


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the sweep from command-line arguments; print the table; return the report."""
    args, cases = parse_args(argv)
    device = torch.device(args.device or "cuda")
    spec = harness.SweepSpec(cases, args.batch, args.dtype, args.passes, device, args.quick)
    return harness.run_sweep(MODULE, argv, spec, args.out, measure, markdown)


if __name__ == "__main__":
    main()
