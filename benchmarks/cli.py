"""Console scripts: ``fusion-bench`` (a Hydra main over ``conf/``) and ``fusion-report SWEEP_DIR``.

``torchrun --nproc-per-node N -m benchmarks.cli [overrides]`` shards the feature extraction over N
processes (add ``bench.extract_only=true`` to only fill the cache before a sweep).

``fusion-bench`` runs one benchmark, or a sweep with ``-m``; each job writes ``report.json`` (its
finished marker) or, when it fails, ``error.json`` into its folder. A job whose folder already holds a
report of the same resolved config (``run.config_hash``) is skipped, so re-running an interrupted
sweep with the same ``hydra.sweep.dir`` only runs what is missing.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

import hydra
from omegaconf import DictConfig

import benchmarks.config  # noqa: F401  (registers the structured config schema)
from benchmarks.config import conf_dir, config_hash
from benchmarks.io import write_json
from benchmarks.report import ERROR_FILE, aggregate, load_report

CONF_DIR = str(conf_dir())


def finished_report(out_dir: Path, cfg: DictConfig) -> Path | None:
    """``out_dir/report.json`` when it exists and was written for this very config; else None."""
    path = out_dir / "report.json"
    try:
        report = load_report(path)
    except (FileNotFoundError, ValueError):  # none yet, or unreadable: the job runs (again)
        return None
    return path if report.run.get("config_hash") == config_hash(cfg) else None


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def bench_main(cfg: DictConfig) -> str:
    """``fusion-bench``: run the composed benchmark; returns the path of its ``report.json`` ('' when
    only features were extracted).

    A failure is written to ``error.json`` in the job folder (so ``fusion-report`` lists it) and
    re-raised.
    """
    from benchmarks.run import output_dir, run_benchmark

    out = output_dir(cfg, None)
    done = finished_report(out, cfg)
    if done is not None:
        print(f"Skipping: {done} already holds this config's result (config_hash {config_hash(cfg)[:12]})")
        return str(done)
    try:
        path = run_benchmark(cfg, out)
    except Exception as error:
        write_json(
            out / ERROR_FILE,
            {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()},
        )
        raise
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
    args = parser.parse_args(argv)
    try:
        path = aggregate(args.sweep_dir, args.out)
    except (FileNotFoundError, ValueError) as error:
        print(f"fusion-report: {error}", file=sys.stderr)
        return 2
    print((path.parent / "report.md").read_text(encoding="utf-8"))
    print(f"Report: {path.resolve()}")
    return 0


if __name__ == "__main__":  # python -m benchmarks.cli ..., or torchrun ... -m benchmarks.cli ...
    bench_main()
