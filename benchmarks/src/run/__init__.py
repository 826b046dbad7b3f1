"""The run stage: preparing a run (:mod:`.prepare`) and one module per mode, each of equal weight:
:mod:`.compare` (the strategies against CLIP-only) and :mod:`.layer_scan` (accuracy by depth)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from encoder_fusion.benchmarks.config.checks import check_config
from encoder_fusion.benchmarks.run.compare import run_compare
from encoder_fusion.benchmarks.run.layer_scan import run_layer_scan
from encoder_fusion.benchmarks.run.prepare import configure_hub, output_dir
from encoder_fusion.benchmarks.timing.timer import fixed_threads
from encoder_fusion.containers import plain
from encoder_fusion.io import check_writable_folder

MODES = {"compare": run_compare, "layer_scan": run_layer_scan}


def run_benchmark(
    cfg: Any, out_dir: str | os.PathLike | None = None, *, command: str | None = None
) -> Path | None:
    """Run one benchmark described by a composed config (see ``conf/``) and write its reports.

    Under ``torchrun`` every process extracts a slice of the features; rank 0 alone then runs the
    probes and the latency and writes the reports. With ``bench.extract_only`` every process stops
    once the features are cached.

    Args:
        cfg: a composed :class:`encoder_fusion.benchmarks.config.schema.RunConfig` (an OmegaConf node).
        out_dir: where the reports go (default: ``bench.out_dir``, else the Hydra run folder).
        command: the command line to stamp into the report (default: this process's).

    Returns:
        The path of ``report.json``; None when no report was written (``extract_only``, or a rank
        other than 0).

    Every setting is checked first (:mod:`encoder_fusion.benchmarks.config.checks`), before any encoder
    runs or any image is read; then the encoders are built and everything that needs their geometry is
    checked.

    Raises:
        ValueError, FileNotFoundError: a bad setting (named with its value and what is accepted), or a
            dataset or encoder error that leaves nothing to measure.
        RuntimeError: every strategy failed, or the reference strategy did (the errors are in the
            report written first).
    """
    checked = check_config(cfg)
    out = output_dir(cfg, out_dir)
    check_writable_folder(out, "the output folder (bench.out_dir, hydra.run.dir, or out_dir)")
    configure_hub(plain(cfg.bench.hub))
    with fixed_threads(cfg.bench.threads):
        return MODES[plain(cfg.bench.mode)](cfg, checked, out, command)
