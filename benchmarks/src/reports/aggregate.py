"""A sweep's aggregate: every job's report read back, one table of all their rows, the jobs planned
but without a result listed (see :mod:`encoder_fusion.benchmarks.reports.sweep` for the folders)."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path

from encoder_fusion.benchmarks.reports.records import Report, StrategyRecord
from encoder_fusion.benchmarks.reports.report import build_report, load_report, now_and_command, write_report
from encoder_fusion.benchmarks.reports.sweep import (
    ERROR_FILE,
    PLAN_FILE,
    job_folders,
    job_state,
    planned_jobs,
)


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
    covered = {o for state in states for o in state.overrides}
    never_started = [job for job in plan or [] if job not in covered]
    # a job killed as it started leaves a folder without Hydra's record of its overrides: it is one
    # of the planned jobs no folder names, so it is told with them rather than counted twice
    anonymous = [s.folder.name for s in states if s.status == "unfinished" and not s.overrides]
    absorbed = set(anonymous) if 0 < len(anonymous) <= len(never_started) else set()
    for state in states:
        # a job of a config finished elsewhere (a resumed sweep) is not a failure
        if state.status == "finished" or state.config_hash in finished_hashes - {None}:
            continue
        if state.status == "unfinished" and finished_overrides.intersection(state.overrides):
            continue
        if state.folder.name not in absorbed:
            failed.append({"job": state.folder.name, "error": state.error})
    not_started = "planned by the sweep, never started (no job folder)"
    if absorbed:
        not_started = (
            "planned by the sweep; never started, or killed as it started in one of the job folders "
            f"{', '.join(sorted(absorbed))}, which hold no record of their overrides"
        )
    failed += [{"job": ",".join(job), "error": not_started} for job in never_started]
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
        env={**(first.environment if first else {}), **now_and_command()},
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
