"""A run's report: ``report.json``, ``report.md`` and ``pareto.png`` (a sweep's aggregate is
:mod:`encoder_fusion.benchmarks.reports.aggregate`).

The schema is :mod:`encoder_fusion.benchmarks.reports.records` (a
:class:`~encoder_fusion.benchmarks.reports.records.Report` of
:class:`~encoder_fusion.benchmarks.reports.records.StrategyRecord` rows, each with its
:class:`~encoder_fusion.benchmarks.reports.records.VlmRecord`). This module builds a report from the
records of a run (filling the accuracy changes against the CLIP-only baseline), renders it as markdown
and as the Pareto figure and writes the three files. When any encoder ran on random weights the first
line of ``report.md`` says so. Every file is written atomically (temporary file + rename), so a reader
never sees half a report.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from encoder_fusion.benchmarks.config.schema import BASELINE
from encoder_fusion.benchmarks.reports.figures import plot_pareto
from encoder_fusion.benchmarks.reports.records import Report, StrategyRecord
from encoder_fusion.benchmarks.reports.render import random_encoders, render_markdown
from encoder_fusion.io import atomic_write, write_json

REPORT_FILES = ("report.json", "report.md", "pareto.png")


# -- files ------------------------------------------------------------------------------------------
def load_report(path: str | os.PathLike) -> Report:
    """Read a ``report.json``.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: not JSON, a ``schema_version`` this code does not read, or fields the schema does
            not have.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no report at {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise ValueError(f"report {path} is not valid JSON: {error}") from error
    return Report.from_dict(data, where=f"report {path}")


# -- building ---------------------------------------------------------------------------------------
def device_name(device: str | torch.device) -> str:
    """A readable name of ``device``: the GPU's name, or the CPU model and its thread count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def now_and_command(command: str | None = None) -> dict:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command if command is not None else " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }


def environment(device: str | torch.device = "cpu", command: str | None = None) -> dict:
    """Where and when a benchmark ran: device, torch and python versions, date, command line
    (default: this process's ``sys.argv``)."""
    return {
        "device": device_name(device),
        "device_type": torch.device(device).type,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        **now_and_command(command),
    }


def add_accuracy_deltas(strategies: Sequence[StrategyRecord], baseline: str = BASELINE) -> None:
    """Set ``accuracy[task].delta`` (mean minus the baseline's mean) on every record, in place;
    None where either side has no result."""
    reference = next((s for s in strategies if s.name == baseline), None)
    for record in strategies:
        for task, result in record.accuracy.items():
            base = reference.accuracy.get(task) if reference is not None else None
            usable = base is not None and base.mean is not None and result.mean is not None
            result.delta = result.mean - base.mean if usable else None  # type: ignore[operator]  # both checked


def build_report(
    strategies: Sequence[StrategyRecord],
    *,
    run: Mapping | None = None,
    env: Mapping | None = None,
    tasks: Sequence[str] = (),
    baseline: str = BASELINE,
    deltas: bool = True,
    **extra: Any,
) -> Report:
    """Assemble a report from strategy records; fills accuracy deltas.

    Args:
        strategies: one record per strategy, the baseline among them.
        run: the resolved configuration of the run.
        env: :func:`environment` output (taken now when None).
        tasks: the task names, in column order (default: every task any record has).
        baseline: the name of the record that deltas and ratios are against.
        deltas: compute the accuracy deltas against ``baseline``; False keeps the records' own (a
            sweep's rows keep those measured within their job).
        extra: more top-level fields (``jobs``, ``failed_jobs`` for a sweep).

    Raises:
        ValueError: two records with one name.
    """
    strategies = list(strategies)
    names = [s.name for s in strategies]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ValueError(f"report strategies must have distinct names; repeated: {duplicated}")
    if deltas:
        add_accuracy_deltas(strategies, baseline)
    task_names = list(tasks) or list(dict.fromkeys(t for s in strategies for t in s.accuracy))
    return Report(
        environment=dict(env) if env is not None else environment(),
        baseline=baseline,
        tasks=task_names,
        run=dict(run or {}),
        strategies=strategies,
        weights_random=bool(random_encoders(strategies)),
        random_encoders=random_encoders(strategies),
        llms=sorted({s.vlm.llm for s in strategies if s.vlm is not None}),
        **extra,
    )


def write_report(report: Report, out_dir: str | os.PathLike) -> Path:
    """Write ``report.json``, ``report.md`` and ``pareto.png`` into ``out_dir`` (each atomically).

    Returns:
        The path of ``report.json``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot_pareto(report, out / "pareto.png")
    atomic_write(out / "report.md", render_markdown(report))
    # the JSON last: its presence marks a finished job for aggregate() and resumed sweeps
    return write_json(out / "report.json", report.to_dict())
