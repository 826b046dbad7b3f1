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
import contextlib
import fcntl
import logging
import os
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hydra
from hydra.errors import CompactHydraException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from encoder_fusion.benchmarks.config.schema import conf_dir, config_hash  # importing it registers the schema
from encoder_fusion.benchmarks.reports.aggregate import aggregate
from encoder_fusion.benchmarks.reports.curves import CURVES_FILE
from encoder_fusion.benchmarks.reports.report import load_report
from encoder_fusion.benchmarks.reports.sweep import ERROR_FILE, check_own_folder, finished_result
from encoder_fusion.benchmarks.run import run_benchmark
from encoder_fusion.benchmarks.run.prepare import error_text, job_overrides, output_dir
from encoder_fusion.io import check_writable_folder, write_json

log = logging.getLogger(__name__)
CONF_DIR = str(conf_dir())
LOCK_FILE = ".fusion-bench.lock"  # held while a job writes its folder


class JobFailed(CompactHydraException):
    """A failed ``fusion-bench`` job: Hydra prints its one-line message, without a trace, and exits 1."""


def sweep_folder() -> Path | None:
    """The sweep folder of this Hydra job (None outside a sweep)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return Path(HydraConfig.get().sweep.dir)


class FolderCheck(Callback):
    """Checks the folder Hydra is about to create (``hydra.run.dir``, or ``hydra.sweep.dir`` with
    ``-m``) before Hydra makes it, so that a file or read-only place there is one error line, not
    Hydra's traceback. Hydra only warns about a callback's exceptions, so this one exits itself."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.check(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.check(config.hydra.sweep.dir, "hydra.sweep.dir")

    @staticmethod
    def check(folder: str, key: str) -> None:
        try:
            check_writable_folder(Path(folder), key)
        except ValueError as error:
            print(f"fusion-bench: {error} (the working directory is {Path.cwd()})", file=sys.stderr)
            raise SystemExit(1) from None


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
    try:
        check_writable_folder(out, "the output folder (hydra.run.dir, bench.out_dir)")
        with job_lock(out):
            return run_job(cfg, out, digest)
    except (ValueError, OSError) as error:  # a folder refused, or the lock held
        raise JobFailed(f"fusion-bench: {' '.join(str(error).split())}") from None


@contextlib.contextmanager
def job_lock(out: Path) -> Iterator[None]:
    """Hold ``out``'s job lock while a job writes it, so that two launches of one job cannot both
    finish it: the second is refused at once, naming the lock. Under ``torchrun`` rank 0 holds it.

    Raises:
        ValueError: another process holds the lock.
    """
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun's other ranks extract features, write no result
        yield
        return
    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOCK_FILE, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(
                f"another fusion-bench process is running this job in {out} (it holds {out / LOCK_FILE}); "
                "accepted: wait for it (its result is then reused), or another output folder"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def run_job(cfg: DictConfig, out: Path, digest: str) -> str:
    """One job under its lock: skipped when its config already has a result, refused in a folder
    holding another config's, else run; a failure is kept in ``error.json``."""
    done = finished_result(digest, out, sweep_folder())
    if done is not None:
        print(f"Skipping: {done} already holds this config's result (config_hash {digest[:12]})")
        return str(done)
    check_own_folder(out, digest)
    try:
        path = run_benchmark(cfg, out)
    except Exception as error:
        # after report.json come only prints and the checks that fail a run without answers
        # (RuntimeError): a print to a closed stdout must not turn the finished job into a failed one
        if finished_result(digest, out) is not None and not isinstance(error, RuntimeError):
            log.warning("the job finished (%s), then: %s", out / "report.json", error_text(error))
            return str(out / "report.json")
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
    """``fusion-report SWEEP_DIR [--out DIR]``: aggregate a sweep's jobs into one report. Exits 2 on a
    bad argument (nothing written), 1 when no job has a result (the aggregate lists why), else 0."""
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
    run = load_report(path).run
    if not run.get("finished"):  # an aggregate of no result answers nothing
        print(
            f"fusion-report: no job of {args.sweep_dir} has a readable result ({run.get('jobs')} job(s) "
            f"without one, listed in {path.parent / 'report.md'})",
            file=sys.stderr,
        )
        return 1
    return 0


# python -m encoder_fusion.benchmarks.cli ..., or torchrun ... -m encoder_fusion.benchmarks.cli ...
if __name__ == "__main__":
    bench_main()
