"""Console scripts: ``fusion-bench`` (a Hydra main over ``conf/``) and ``fusion-report SWEEP_DIR``.

``torchrun --nproc-per-node N -m encoder_fusion.benchmarks.cli [overrides]`` shards the feature extraction
over N processes (add ``bench.extract_only=true`` to only fill the cache before a sweep).

``fusion-bench`` runs one benchmark, or a sweep with ``-m``; each job writes ``report.json`` (its
finished marker) or, when it fails, ``error.json`` into its folder. A job whose config (its
``run.config_hash``) already has a finished result, in its folder or anywhere in the sweep folder, is
skipped, so re-running an interrupted sweep with the same ``hydra.sweep.dir`` only runs what is missing
(see :mod:`encoder_fusion.benchmarks.reports.sweep`). A job that fails, a bad setting included, exits
non-zero with one line saying why (Hydra prints the whole trace with ``HYDRA_FULL_ERROR=1``;
``error.json`` keeps it).
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

import hydra
from hydra.errors import CompactHydraException
from omegaconf import DictConfig

from encoder_fusion.benchmarks.config.schema import conf_dir, config_hash  # importing it registers the schema
from encoder_fusion.benchmarks.reports.aggregate import aggregate
from encoder_fusion.benchmarks.reports.curves import CURVES_FILE
from encoder_fusion.benchmarks.reports.sweep import ERROR_FILE, check_own_folder, finished_result
from encoder_fusion.benchmarks.run import run_benchmark
from encoder_fusion.benchmarks.run.prepare import error_text, job_overrides, output_dir
from encoder_fusion.io import write_json

CONF_DIR = str(conf_dir())


class JobFailed(CompactHydraException):
    """A failed ``fusion-bench`` job: Hydra prints its one-line message, without a trace, and exits 1."""


def sweep_folder() -> Path | None:
    """The sweep folder of this Hydra job (None outside a sweep)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return Path(HydraConfig.get().sweep.dir)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def bench_main(cfg: DictConfig) -> str:
    """``fusion-bench``: run the composed benchmark; returns the path of its ``report.json`` ('' when
    only features were extracted).

    Raises:
        JobFailed: the run failed; its error (and traceback) is in ``error.json`` in the job folder, so
            ``fusion-report`` lists it. A folder holding another config's result is refused without
            writing anything into it.
    """
    out, digest = output_dir(cfg, None), config_hash(cfg)
    done = finished_result(digest, out, sweep_folder())
    if done is not None:
        print(f"Skipping: {done} already holds this config's result (config_hash {digest[:12]})")
        return str(done)
    try:
        check_own_folder(out, digest)
    except ValueError as error:
        raise JobFailed(f"fusion-bench: {error}") from None
    try:
        path = run_benchmark(cfg, out)
    except Exception as error:
        write_json(
            out / ERROR_FILE,
            {
                "error": error_text(error),
                "traceback": traceback.format_exc(),
                "config_hash": digest,
                "overrides": job_overrides(),
            },
        )
        # one line, whatever the library wrote: the whole message and trace are in error.json
        line = " ".join(error_text(error).split())
        raise JobFailed(f"fusion-bench: {line} (traceback: {out / ERROR_FILE})") from error
    if path is None:  # features only (bench.extract_only, or a torchrun rank other than 0)
        return ""
    (out / ERROR_FILE).unlink(missing_ok=True)
    return str(path)


def report_main(argv: list[str] | None = None) -> int:
    """``fusion-report SWEEP_DIR [--out DIR]``: aggregate a sweep's jobs into one report."""
    parser = argparse.ArgumentParser(
        prog="fusion-report",
        description="Aggregate every job of a fusion-bench sweep into report.json, report.md and pareto.png.",
    )
    parser.add_argument("sweep_dir", type=Path, help="the sweep folder (multirun/<date>/<time>)")
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: SWEEP_DIR)")
    parser.add_argument(
        "--curve",
        action="append",
        default=[],
        metavar="KEY",
        help="a swept key to draw cost curves against (repeatable; default: every swept numeric key)",
    )
    args = parser.parse_args(argv)
    try:
        path = aggregate(args.sweep_dir, args.out, args.curve)
    except (FileNotFoundError, ValueError) as error:
        print(f"fusion-report: {error}", file=sys.stderr)
        return 2
    print((path.parent / "report.md").read_text(encoding="utf-8"))
    print(f"Report: {path.resolve()}")
    if (path.parent / CURVES_FILE).is_file():
        print(f"Cost curves: {(path.parent / CURVES_FILE).resolve()} (curves_<key>.png beside it)")
    return 0


# python -m encoder_fusion.benchmarks.cli ..., or torchrun ... -m encoder_fusion.benchmarks.cli ...
if __name__ == "__main__":
    bench_main()
