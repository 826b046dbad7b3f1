"""Benchmark reports: ``report.json``, ``report.md`` and ``pareto.png``, for one run or a whole sweep.

The schema is :mod:`encoder_fusion.benchmarks.records` (a :class:`~encoder_fusion.benchmarks.records.Report`
of :class:`~encoder_fusion.benchmarks.records.StrategyRecord` rows, each with its
:class:`~encoder_fusion.benchmarks.records.VlmRecord`). This module builds a report from the records of a run
(filling the accuracy changes against the CLIP-only baseline), renders it as markdown and as the Pareto
figure, writes the three files and aggregates the jobs of a sweep. When any encoder ran on random weights the
first line of ``report.md`` says so. Every file is written atomically (temporary file + rename), so a reader
never sees half a report.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from encoder_fusion.benchmarks.records import BASELINE, Report, StrategyRecord
from encoder_fusion.benchmarks.render import plot_pareto, random_encoders, render_markdown
from encoder_fusion.benchmarks.sweep import ERROR_FILE, PLAN_FILE, job_folders, job_state, planned_jobs
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


def _now_and_command(command: str | None = None) -> dict:
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
        **_now_and_command(command),
    }


def add_accuracy_deltas(strategies: Sequence[StrategyRecord], baseline: str = BASELINE) -> None:
    """Set ``accuracy[task]["delta"]`` (mean minus the baseline's mean) on every record, in place;
    None where either side has no result."""
    reference = next((s for s in strategies if s.name == baseline), None)
    for record in strategies:
        for task, result in record.accuracy.items():
            base = reference.accuracy.get(task) if reference is not None else None
            usable = base is not None and base.get("mean") is not None and result.get("mean") is not None
            result["delta"] = result["mean"] - base["mean"] if usable else None


def build_report(
    strategies: Sequence[StrategyRecord],
    *,
    run: Mapping | None = None,
    env: Mapping | None = None,
    tasks: Sequence[str] = (),
    baseline: str = BASELINE,
    deltas: bool = True,
    **extra: object,
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


# -- sweeps -----------------------------------------------------------------------------------------
def job_labels(reports: Mapping[str, Report]) -> dict[str, str]:
    """How each job's rows are named in the aggregate: the overrides in which it differs from the other
    jobs (those shared by every job say nothing), else its folder name."""
    overrides = {job: list(r.run.get("overrides") or []) for job, r in reports.items()}
    shared = set.intersection(*(set(o) for o in overrides.values())) if overrides else set()
    return {job: ",".join(o for o in given if o not in shared) or job for job, given in overrides.items()}


def aggregate(sweep_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> Path:
    """Gather every job of a sweep into one report in the format of a single run.

    Each finished config contributes its fused strategies, named after the overrides that set its job
    apart, and its baselines, once per distinct baseline configuration (labelled by job only where one
    baseline name has several configurations); ratios and deltas stay those measured within each job.
    A config finished in two folders (a resumed sweep) counts once. ``failed_jobs`` lists every job
    without a result: folders with an ``error.json`` (the job raised) or with neither file (it died,
    was cancelled, or is running), and the jobs the last sweep planned (its ``multirun.yaml``) that
    never got a folder; ``run`` says how many were planned and how many have a result.

    Args:
        sweep_dir: the multirun folder (``multirun/<date>/<time>`` or ``hydra.sweep.dir``).
        out_dir: where to write the aggregate (default: ``sweep_dir``).

    Returns:
        The path of the aggregated ``report.json``.

    Raises:
        FileNotFoundError: ``sweep_dir`` does not exist.
        ValueError: no job folder and no sweep plan in ``sweep_dir``.
    """
    sweep = Path(sweep_dir)
    if not sweep.is_dir():
        raise FileNotFoundError(f"sweep folder {sweep} does not exist")
    plan = planned_jobs(sweep)
    states = [job_state(folder) for folder in job_folders(sweep)]
    if not states and not plan:
        raise ValueError(
            f"sweep folder {sweep} holds no job folder (one with report.json, {ERROR_FILE} or .hydra/) "
            f"and no {PLAN_FILE}"
        )
    order = {job: index for index, job in enumerate(plan or [])}
    states.sort(
        key=lambda state: min((order.get(o, len(order)) for o in state.overrides), default=len(order))
    )
    reports: dict[str, Report] = {}
    finished_hashes, finished_overrides, failed = set(), set(), []
    for state in states:
        if state.status != "finished" or (state.config_hash and state.config_hash in finished_hashes):
            continue
        try:
            reports[state.folder.name] = load_report(state.folder / "report.json")
        except ValueError as error:
            failed.append({"job": state.folder.name, "error": f"unreadable result: {error}"})
            continue
        finished_hashes.add(state.config_hash)
        finished_overrides.update(state.overrides)
    for state in states:
        # a job of a config finished elsewhere (a resumed sweep) is not a failure
        if state.status == "finished" or state.config_hash in finished_hashes - {None}:
            continue
        if state.status == "unfinished" and finished_overrides.intersection(state.overrides):
            continue
        failed.append({"job": state.folder.name, "error": state.error})
    covered = {o for state in states for o in state.overrides}
    never_started = [job for job in plan or [] if job not in covered]
    failed += [
        {"job": ",".join(job), "error": "planned by the sweep, never started (no job folder)"}
        for job in never_started
    ]
    labels = job_labels(reports)
    baseline_configs: dict[str, set[str]] = {}
    for report in reports.values():
        for record in report.strategies:
            if record.is_baseline:
                baseline_configs.setdefault(record.name, set()).add(_config_key(record))
    strategies, kept = [], set()
    for job, report in reports.items():
        for record in report.strategies:
            record = dataclasses.replace(record, job=job)
            if record.is_baseline:
                key = (record.name, _config_key(record))
                if key in kept:
                    continue
                kept.add(key)
                if len(baseline_configs[record.name]) == 1:
                    strategies.append(record)
                    continue
            strategies.append(dataclasses.replace(record, name=f"{record.name} [{labels[job]}]"))
    tasks = list(dict.fromkeys(t for r in reports.values() for t in r.tasks))
    first = next(iter(reports.values()), None)
    merged = build_report(
        strategies,
        run={
            "sweep_dir": str(sweep),
            "jobs": len(reports) + len(failed),
            "planned": None if plan is None else len(plan),
            "finished": len(reports),
        },
        # the jobs' device (the aggregating machine may be a login node); this command and date
        env={**(first.environment if first else {}), **_now_and_command()},
        tasks=tasks,
        deltas=False,
        jobs=[
            {"job": job, "label": labels[job], "report": str(sweep / job / "report.json")} for job in reports
        ],
        failed_jobs=failed,
    )
    return write_report(merged, out_dir or sweep)


def _config_key(record: StrategyRecord) -> str:
    return json.dumps(record.config, sort_keys=True, default=str)
