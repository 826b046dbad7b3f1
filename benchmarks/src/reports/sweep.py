"""Sweep bookkeeping: which earlier result a job reuses, which folder it must not write into, and what
a sweep folder holds for ``fusion-report``.

A job's folder is named after its resolved config (``hydra.sweep.subdir: ${config_hash:}``, the leading
digits of :func:`encoder_fusion.benchmarks.config.schema.config_hash`), so a config always lands in its
own folder: a second sweep into the same ``hydra.sweep.dir`` with other values, or the same values
reordered, finds its finished results where it left them and never writes into another config's folder. A
finished result of the same config anywhere else in the sweep folder (a sweep run with
``hydra.sweep.subdir=${hydra.job.num}``) is reused too, and a folder holding another config's result is
refused rather than written into.

A job folder holds ``report.json`` (the job finished: written last, atomically), ``error.json`` (the
job raised: its error and traceback, config hash and overrides) or neither (the job died, was
cancelled, or is running). ``error.json`` wins: a run whose every strategy failed writes its report
for reading, then fails.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from encoder_fusion.io import check_writable_folder

RESULT_FILE = "report.json"
ERROR_FILE = "error.json"
PLAN_FILE = "multirun.yaml"  # Hydra's record of a sweep: its config and the overrides it expands
HYDRA_OVERRIDES = Path(".hydra") / "overrides.yaml"  # what Hydra records of each job at its start
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
UNFINISHED = "no report.json: the job died, was cancelled or is still running"


def overrides_key(overrides) -> tuple[str, ...]:
    """One job's overrides in a form that compares equal however they were ordered."""
    return tuple(sorted(str(o) for o in overrides))


@dataclass(frozen=True)
class JobState:
    """What one job folder holds.

    Attributes:
        folder: the job folder.
        status: ``finished`` (``report.json``), ``failed`` (``error.json``, or an unreadable result)
            or ``unfinished`` (neither).
        config_hash: the config the record was written for (None when unknown).
        overrides: each override list the folder answers for (its record's, and the one Hydra
            recorded at the start of the job that used it last), as :func:`overrides_key` gives them.
        error: why it has no result (None when finished).
    """

    folder: Path
    status: str
    config_hash: str | None
    overrides: tuple[tuple[str, ...], ...]
    error: str | None


def _json(path: Path) -> dict:
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"holds a JSON {type(data).__name__}, not an object")
    return data


def job_state(folder: str | os.PathLike) -> JobState:
    """Read what ``folder`` holds (see :class:`JobState`); never raises for a damaged file, which
    makes the job ``failed`` with the reason."""
    folder = Path(folder)
    overrides = []
    try:
        recorded = yaml.safe_load((folder / HYDRA_OVERRIDES).read_text(encoding="utf-8"))
        if isinstance(recorded, list):
            overrides.append(overrides_key(recorded))
    except (OSError, yaml.YAMLError):  # no Hydra record (a run outside Hydra): nothing to match by
        pass
    for name, status in ((ERROR_FILE, "failed"), (RESULT_FILE, "finished")):
        path = folder / name
        if not path.is_file():
            continue
        try:
            data = _json(path)
        except (OSError, ValueError) as error:
            return JobState(folder, "failed", None, tuple(overrides), f"unreadable {name}: {error}")
        record = data if status == "failed" else data.get("run") or {}
        if isinstance(record.get("overrides"), list):
            overrides.insert(0, overrides_key(record["overrides"]))
        error = data.get("error", "unknown error") if status == "failed" else None
        return JobState(folder, status, record.get("config_hash"), tuple(dict.fromkeys(overrides)), error)
    return JobState(folder, "unfinished", None, tuple(overrides), UNFINISHED)


def is_job_folder(path: Path) -> bool:
    """Whether ``path`` is a job's folder: a visible folder holding a result, an error or Hydra's record."""
    return (
        path.is_dir()
        and not path.name.startswith(".")
        and any((path / name).exists() for name in (RESULT_FILE, ERROR_FILE, ".hydra"))
    )


def job_folders(sweep: Path) -> list[Path]:
    """The job folders of a sweep folder, by name (numbers in numeric order)."""
    if not sweep.is_dir():
        return []
    found = [p for p in sweep.iterdir() if is_job_folder(p)]
    return sorted(found, key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name))


def finished_result(config_hash: str, out: Path, sweep: Path | None = None) -> Path | None:
    """The ``report.json`` of a finished job of this config: in ``out``, else in any job folder of
    ``sweep``; None when there is none."""
    for folder in [out, *job_folders(sweep)] if sweep is not None else [out]:
        state = job_state(folder)
        if state.status == "finished" and state.config_hash == config_hash:
            return folder / RESULT_FILE
    return None


def check_own_folder(out: Path, config_hash: str) -> None:
    """Refuse to run into a folder that holds another config's record.

    Raises:
        ValueError: ``out`` holds ``report.json`` or ``error.json`` of another (or an unknown) config;
            the message names the folder and the way out.
    """
    state = job_state(out)
    if state.status == "unfinished" or state.config_hash == config_hash:
        return
    raise ValueError(
        f"output folder {out} holds the {state.status} result of another config (config_hash "
        f"{(state.config_hash or 'unknown')[:12]}, this run's {config_hash[:12]}); it is never written "
        "into. Accepted: a folder of its own (hydra.run.dir, bench.out_dir; in a sweep the default "
        "hydra.sweep.subdir=${config_hash:})"
    )


def check_aggregate_out(out: Path, sweep: Path) -> None:
    """Refuse an aggregate's output folder that holds anything but an earlier aggregate of ``sweep``:
    a job's result or record, another sweep's aggregate, or a ``report.json`` that cannot be read.

    Raises:
        ValueError: naming the folder, what it holds, and what is accepted.
    """
    check_writable_folder(out, "--out")
    accepted = f"accepted: the sweep folder {sweep}, or a folder of its own"
    if (out / ERROR_FILE).exists() or (out / ".hydra").exists():
        raise ValueError(f"--out {out} is a job's folder (it holds {ERROR_FILE} or .hydra/); {accepted}")
    result = out / RESULT_FILE
    if not result.exists():
        return
    try:
        run = _json(result).get("run") or {}
    except (OSError, ValueError) as error:
        raise ValueError(
            f"--out {out} holds a {RESULT_FILE} that cannot be read ({error}); {accepted}"
        ) from None
    of_sweep = run.get("sweep_dir")
    if of_sweep is None or Path(of_sweep).resolve() != sweep.resolve():
        what = f"the aggregate of sweep {of_sweep}" if of_sweep else "a job's result"
        raise ValueError(f"--out {out} holds {what}, which is never overwritten; {accepted}")


def planned_jobs(sweep: Path) -> list[tuple[str, ...]] | None:
    """The override lists of the jobs that the last sweep into ``sweep`` planned, in its order, as
    :func:`overrides_key` gives them: Hydra's own expansion of the sweep recorded in
    ``multirun.yaml``. None without a ``multirun.yaml`` or for a sweeper other than Hydra's basic one.

    Raises:
        ValueError: a ``multirun.yaml`` that does not parse.
    """
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    path = sweep / PLAN_FILE
    if not path.is_file():
        return None
    try:
        hydra = yaml.safe_load(path.read_text(encoding="utf-8"))["hydra"]
        sweeper, task = hydra["sweeper"], hydra["overrides"]["task"]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as error:
        raise ValueError(f"sweep plan {path} cannot be read: {error!r}") from None
    if sweeper.get("_target_") != BASIC_SWEEPER:
        return None
    arguments = [f"{key}={value}" for key, value in (sweeper.get("params") or {}).items()] + list(task)
    batches = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(arguments), None)
    return [overrides_key(job) for job in batches[0]]
