"""A sweep's aggregate: every job's report read back, one table of all their rows, the jobs planned
but without a result listed (see :mod:`encoder_fusion.benchmarks.reports.sweep` for the folders)."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch

from encoder_fusion.benchmarks.reports.agreement import probe_agreement
from encoder_fusion.benchmarks.reports.curves import curves, write_curves
from encoder_fusion.benchmarks.reports.items import pairing_key, read_items
from encoder_fusion.benchmarks.reports.records import Report, StrategyRecord
from encoder_fusion.benchmarks.reports.report import build_report, load_report, now_and_command, write_report
from encoder_fusion.benchmarks.reports.sweep import (
    ERROR_FILE,
    PLAN_FILE,
    check_aggregate_out,
    job_folders,
    job_state,
    planned_jobs,
)
from encoder_fusion.benchmarks.tasks import TASKS


def job_labels(reports: Mapping[str, Report]) -> dict[str, str]:
    """How each job's rows are named in the aggregate: the overrides in which it differs from the other
    jobs (those shared by every job say nothing), else its folder name."""
    overrides = {job: list(r.run.get("overrides") or []) for job, r in reports.items()}
    shared = set.intersection(*(set(o) for o in overrides.values())) if overrides else set()
    return {job: ",".join(o for o in given if o not in shared) or job for job, given in overrides.items()}


def aggregate(
    sweep_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None, curve_keys: Sequence[str] = ()
) -> Path:
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
        curve_keys: the swept keys to draw cost curves against (default: every swept key with
            numeric values; see :mod:`encoder_fusion.benchmarks.reports.curves`).

    Returns:
        The path of the aggregated ``report.json``.

    Raises:
        FileNotFoundError: ``sweep_dir`` does not exist.
        ValueError: no job folder and no sweep plan in ``sweep_dir``; a curve key that was not
            swept or whose values are not numbers; an ``out_dir`` that cannot be written or that
            holds anything but an earlier aggregate of this sweep (before anything is written).
    """
    sweep = Path(sweep_dir)
    if not sweep.is_dir():
        raise FileNotFoundError(f"sweep folder {sweep} does not exist")
    out = Path(out_dir) if out_dir is not None else sweep
    check_aggregate_out(out, sweep)
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
    curves(reports, curve_keys)  # a key that cannot be drawn fails here, before anything is written
    labels = job_labels(reports)
    baseline_configs: dict[str, set[str]] = {}
    for report in reports.values():
        for record in report.strategies:
            if record.is_baseline:
                baseline_configs.setdefault(record.name, set()).add(_config_key(record))
    strategies, kept = [], {}  # kept: (name, config) of a baseline row -> its aggregated name
    items: dict[tuple[str, str], torch.Tensor] = {}  # (aggregated name, task) -> per-item statistics
    references: dict[str, str] = {}  # aggregated name -> the aggregated name its delta is against
    pairing = pairing_key(next(iter(reports.values())).run) if reports else ""
    for job, report in reports.items():
        # items pair across jobs only when they are the same test items
        job_items = read_items(sweep / job) if pairing_key(report.run) == pairing else {}
        names = {}  # the job's row name -> its aggregated name
        for record in report.strategies:
            record = dataclasses.replace(record, job=job)
            key = (record.name, _config_key(record))
            if record.is_baseline and key in kept:
                names[record.name] = kept[key]
                continue
            renamed = record
            if not record.is_baseline or len(baseline_configs[record.name]) > 1:
                renamed = dataclasses.replace(record, name=f"{record.name} [{labels[job]}]")
            if record.is_baseline:
                kept[key] = renamed.name
            names[record.name] = renamed.name
            strategies.append(renamed)
            items.update({(renamed.name, t): v for (n, t), v in job_items.items() if n == record.name})
        for aggregated in names.values():
            references.setdefault(aggregated, names.get(report.baseline, aggregated))
    tasks = list(dict.fromkeys(t for r in reports.values() for t in r.tasks))
    first = next(iter(reports.values()), None)
    merged = build_report(
        strategies,
        run={
            "sweep_dir": str(sweep),
            "jobs": len(reports) + len(failed),
            "planned": None if plan is None else len(plan),
            "finished": len(reports),
            "skipped_images": skipped_images(reports.values()),
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
    merged.probe_agreement = sweep_agreement(merged, items, references, first)
    path = write_report(merged, out)
    write_curves(out, reports, curve_keys)
    return path


def skipped_images(reports: Iterable[Report]) -> dict[str, list[dict]]:
    """The images the jobs left out as unusable (``data.on_bad_image=skip``), per split, each file
    once (jobs over the same data skip the same files)."""
    merged: dict[str, dict[str, dict]] = {}
    for report in reports:
        for which, items in (report.run.get("skipped_images") or {}).items():
            split = merged.setdefault(which, {})
            for item in items:
                split.setdefault(item["file"], item)
    return {which: list(items.values()) for which, items in merged.items()}


def sweep_agreement(
    merged: Report,
    items: dict[tuple[str, str], torch.Tensor],
    references: dict[str, str],
    first: Report | None,
) -> list:
    """The cheap probes' rank agreement with the vlm probe over every strategy of the sweep whose job
    read the same test items as the first, each delta against its own job's baseline, with the
    jobs' bootstrap settings; [] when fewer than three such strategies ran vlm and a cheap probe."""
    if first is None or not items:
        return []
    shapes = {task: v.shape for (name, task), v in items.items() if name == references.get(name)}
    paired = {key: v for key, v in items.items() if shapes.get(key[1]) == v.shape}
    bench = first.run.get("bench") or {}
    return probe_agreement(
        {record.name: record for record in merged.strategies},
        paired,
        {task: TASKS[task].metric_from_sums for task in shapes},
        references,
        int(bench.get("ci_resamples") or 1000),
        int(first.run.get("seed") or 0),
    )


def _config_key(record: StrategyRecord) -> str:
    return json.dumps(record.config, sort_keys=True, default=str)
