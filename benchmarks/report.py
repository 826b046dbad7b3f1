"""Benchmark reports: ``report.json``, ``report.md`` and ``pareto.png``, for one run or a whole sweep.

The schema is :mod:`benchmarks.records` (a :class:`~benchmarks.records.Report` of
:class:`~benchmarks.records.StrategyRecord` rows, each with its :class:`~benchmarks.records.VlmRecord`).
This module builds a report from the records of a run (filling the accuracy changes against the
CLIP-only baseline), renders it as markdown and as the Pareto figure, writes the three files and
aggregates the jobs of a sweep. When any encoder ran on random weights the first line of
``report.md`` says so. Every file is written atomically (temporary file + rename), so a reader never
sees half a report.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import platform
import sys
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch

from benchmarks.records import Report, StrategyRecord

BASELINE = "clip_only"
REPORT_FILES = ("report.json", "report.md", "pareto.png")
ERROR_FILE = "error.json"


# -- files ------------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder (same suffix, so writers infer the format); when
    the block succeeds it is renamed onto ``path``, and it never outlives the block."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:12]}.tmp{path.suffix}")
    try:
        yield temp
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder, fsync, then rename.

    Returns:
        The path written.
    """
    mode = "wb" if isinstance(data, bytes) else "w"
    with (
        atomic_path(path) as temp,
        open(temp, mode, **({} if isinstance(data, bytes) else {"encoding": "utf-8"})) as handle,
    ):
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    return Path(path)


def write_json(path: str | os.PathLike, data: object) -> Path:
    """Write ``data`` as indented JSON, atomically."""
    return atomic_write(path, json.dumps(data, indent=2, default=str) + "\n")


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


def random_encoders(strategies: Sequence[StrategyRecord]) -> list[str]:
    """The encoders that ran on random weights in any strategy, sorted."""
    return sorted({name for s in strategies for name, state in s.weights.items() if state == "random"})


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


# -- markdown ---------------------------------------------------------------------------------------
def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def _signed_pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:+.1f}"


def _ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}x"


def _timing(stats: Mapping | None) -> str:
    return "—" if not stats else f"{stats['median']:.2f} ({stats['p10']:.2f}–{stats['p90']:.2f})"


def random_notice(report: Report) -> str:
    """The line that opens every report of a run with random encoder weights ('' when none)."""
    names = report.random_encoders or random_encoders(report.strategies)
    if not names:
        return ""
    return (
        f"**RANDOM WEIGHTS: encoder(s) {', '.join(names)} ran on random weights (no pretrained "
        "checkpoint was found offline); the accuracies below test the pipeline, not the encoders.**"
    )


def accuracy_cell(result: Mapping | None) -> str:
    """``mean ± std`` in percent, or the error marker."""
    if result is None:
        return "—"
    if result.get("mean") is None:
        return "error"
    return f"{_pct(result['mean'])} ± {_pct(result.get('std') or 0.0)}"


def projected_presets(report: Report) -> list[str]:
    """The presets any row has a projected TTFT for, in first-seen order."""
    return list(dict.fromkeys(p for s in report.strategies if s.vlm is not None for p in s.vlm.projected))


def language_model_lines(report: Report) -> list[str]:
    """The lines that name the language model(s) and say what the two ratios mean."""
    vlms = [s.vlm for s in report.strategies if s.vlm is not None]
    if not vlms:
        return [
            "Language model: none (llm=none): overhead = the vision pipeline's end-to-end time / "
            f"{report.baseline}'s, measured in the same run.  "
        ]
    first = vlms[0]
    lines = [
        f"Language model: {', '.join(report.llms)} (random weights; latency does not depend on their "
        f"values) · {first.prompt_tokens} prompt tokens after the visual ones · {first.decode_tokens} "
        "decode steps  ",
        "overhead = time to first token (raw images in, first token's logits out: vision, connector "
        f"and the language model's prefill) / {report.baseline}'s with the same language model, "
        "measured in the same run; vision overhead = the vision pipeline alone / "
        f"{report.baseline}'s.  ",
    ]
    presets = projected_presets(report)
    if presets:
        lines.append(
            f"Projected (not measured): the overhead with {', '.join(presets)} in place of the language "
            "model run here, from the prefill FLOP rate measured here.  "
        )
    return lines


def render_markdown(report: Report) -> str:
    """The report as markdown: the random-weights notice first (when any), the language model, then
    one table with a row per strategy (accuracy ± std and change against CLIP-only per task, visual
    tokens, TTFT and its overhead, the vision-only overhead, the language model's share of TTFT,
    decode speed, projected overheads, peak memory, parameters, GFLOPs), then any errors."""
    lines = []
    notice = random_notice(report)
    if notice:
        lines += [notice, ""]
    env, strategies = report.environment, report.strategies
    first_latency = next((s.latency for s in strategies if s.latency), {})
    with_llm = any(s.vlm is not None for s in strategies)
    presets = projected_presets(report)
    lines += [
        "# encoder-fusion benchmark",
        "",
        *language_model_lines(report),
        f"Device: {env.get('device')} · torch {env.get('torch')} · {env.get('date')}  ",
        f"Command: `{env.get('command')}`  ",
        f"Latency: batch {first_latency.get('batch_size', '—')}, {first_latency.get('dtype', '—')}, "
        f"compile {'on' if first_latency.get('compile') else 'off'}; median (p10–p90) in ms.",
        "",
    ]
    tasks = report.tasks
    metrics = {
        t: next((s.accuracy[t].get("metric") for s in strategies if t in s.accuracy), "") for t in tasks
    }
    header = ["strategy", "encoders", "weights"]
    for task in tasks:
        header += [f"{task} {metrics[task]} (%)", "Δ vs CLIP (pp)"]
    header += ["visual tokens"]
    if with_llm:
        header += ["TTFT ms", "overhead", "vision overhead", "LLM share of TTFT", "decode tok/s"]
        header += [f"overhead with {p} (projected)" for p in presets]
    header += ["vision ms"] + ([] if with_llm else ["overhead"])
    header += ["peak mem MB", "params trainable / total", "GFLOPs/img"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for record in strategies:
        name = f"**{record.name}**" if record.role == "fused" else record.name
        weights = ", ".join(f"{k}: {v}" for k, v in record.weights.items()) or "—"
        row = [name, " + ".join(record.encoders) or "—", weights]
        for task in tasks:
            result = record.accuracy.get(task)
            row += [accuracy_cell(result), _signed_pct((result or {}).get("delta"))]
        row.append("—" if record.tokens is None else str(record.tokens))
        vlm = record.vlm
        if with_llm:
            rate = vlm.decode_tokens_per_s if vlm else None
            row += [
                _timing(vlm.ttft if vlm else None),
                _ratio(record.overhead() if vlm else None),
                _ratio(record.vision_overhead()),
                "—" if vlm is None else f"{100 * vlm.llm_share:.0f} %",
                "—" if not rate else f"{rate['median']:.1f}",
            ]
            row += [_ratio(((vlm.projected if vlm else {}).get(p) or {}).get("ratio")) for p in presets]
        row.append(_timing((record.latency or {}).get("end_to_end")))
        if not with_llm:
            row.append(_ratio(record.overhead()))
        peak = (record.memory or {}).get("peak_mb")
        row.append(f"{peak:.0f}" if peak is not None else "—")
        params = record.params
        row.append(f"{params['trainable'] / 1e6:.2f}M / {params['total'] / 1e6:.2f}M" if params else "—")
        row.append(f"{record.gflops:.3g}" if record.gflops is not None else "—")
        lines.append("| " + " | ".join(row) + " |")
    memory_kinds = sorted({(s.memory or {}).get("kind", "") for s in strategies} - {""})
    if memory_kinds:
        scope = "the whole VLM's first token" if with_llm else "the vision pipeline"
        lines += ["", f"Peak memory ({scope}): {'; '.join(memory_kinds)}."]
    errors = [(s.name, e) for s in strategies for e in s.errors]
    if errors or report.failed_jobs:
        lines += ["", "## Errors", ""]
        lines += [f"- {name} / {e['where']}: {e['error']}" for name, e in errors]
        lines += [f"- job {job['job']}: {job['error']}" for job in report.failed_jobs]
    return "\n".join(lines) + "\n"


# -- plot -------------------------------------------------------------------------------------------
def pareto_figure(report: Report):
    """The Pareto figure: per task, accuracy change against the baseline (pp) over the cost overhead
    (x baseline), one labelled point per strategy (squares: baselines, circles: fused strategies).
    With a language model the filled marker is the time-to-first-token overhead and a hollow marker,
    joined to it by a dotted line, the vision-only overhead of the same strategy.

    Returns:
        A :class:`matplotlib.figure.Figure` on its own Agg canvas, outside pyplot: drawing it changes
        neither the process's matplotlib backend nor pyplot's figures (a notebook keeps showing its
        own), and nothing needs closing.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tasks = report.tasks or ["(no task)"]
    with_llm = any(s.vlm is not None for s in report.strategies)
    # constrained layout sizes the margins to the text, so no title or label is clipped
    figure = Figure(figsize=(5.5 * len(tasks), 4.8), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(tasks), squeeze=False)
    for axis, task in zip(axes[0], tasks):
        for record in report.strategies:
            overhead, vision = record.overhead(), record.vision_overhead()
            delta = (record.accuracy.get(task) or {}).get("delta")
            if overhead is None or delta is None:
                continue
            color = "black" if record.is_baseline else "tab:blue"
            marker = "s" if record.is_baseline else "o"
            axis.scatter(overhead, 100 * delta, marker=marker, s=70, color=color, zorder=3, label=record.name)
            if with_llm and vision is not None:
                axis.scatter(
                    vision, 100 * delta, marker=marker, s=70, facecolors="none", edgecolors=color, zorder=3
                )
                axis.plot([vision, overhead], [100 * delta] * 2, linestyle=":", color=color, linewidth=1)
            axis.annotate(record.name, (overhead, 100 * delta), textcoords="offset points", xytext=(6, 4))
        axis.axhline(0.0, color="grey", linewidth=0.8)
        axis.axvline(1.0, color="grey", linewidth=0.8)
        cost = "time-to-first-token overhead" if with_llm else "latency overhead"
        axis.set_xlabel(f"{cost} (x {report.baseline})" + ("; hollow: vision only" if with_llm else ""))
        axis.set_ylabel(f"{task}: accuracy change vs {report.baseline} (pp)")
        axis.set_title(task)
        axis.grid(alpha=0.3)
    cost = f"TTFT overhead ({', '.join(report.llms)})" if with_llm else "latency overhead"
    title = f"accuracy gain vs {cost}"
    if report.weights_random:
        title = "RANDOM WEIGHTS - " + title
    figure.suptitle(title)
    return figure


def plot_pareto(report: Report, path: str | os.PathLike) -> Path:
    """Save :func:`pareto_figure` as a PNG at ``path``, atomically."""
    figure = pareto_figure(report)
    with atomic_path(path) as temp:
        figure.savefig(temp, dpi=110)
    return Path(path)


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

    Each job folder holding a ``report.json`` contributes its fused strategies, named after the
    overrides that set the job apart, and its baselines, once per distinct baseline configuration
    (labelled by job only where one baseline name has several configurations); ratios and deltas stay
    those measured within each job. Folders with an ``error.json`` (a job that raised), and job folders
    with neither file (a job that died or is running), are listed under ``failed_jobs``.

    Args:
        sweep_dir: the multirun folder (``multirun/<date>/<time>`` or ``hydra.sweep.dir``).
        out_dir: where to write the aggregate (default: ``sweep_dir``).

    Returns:
        The path of the aggregated ``report.json``.

    Raises:
        FileNotFoundError: ``sweep_dir`` does not exist.
        ValueError: no job folder in ``sweep_dir``.
    """
    sweep = Path(sweep_dir)
    if not sweep.is_dir():
        raise FileNotFoundError(f"sweep folder {sweep} does not exist")
    job_dirs = sorted(
        (p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(".") and _is_job_dir(p)),
        key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name),
    )
    if not job_dirs:
        raise ValueError(
            f"sweep folder {sweep} holds no job folder (one with report.json, {ERROR_FILE} or .hydra/)"
        )
    reports: dict[str, Report] = {}
    failed = []
    for job_dir in job_dirs:
        try:
            if (job_dir / "report.json").is_file():
                reports[job_dir.name] = load_report(job_dir / "report.json")
            elif (job_dir / ERROR_FILE).is_file():
                error = json.loads((job_dir / ERROR_FILE).read_text(encoding="utf-8"))
                failed.append({"job": job_dir.name, "error": error.get("error", "unknown")})
            else:
                failed.append(
                    {"job": job_dir.name, "error": "no report.json: the job died or is still running"}
                )
        except ValueError as error:
            failed.append({"job": job_dir.name, "error": f"unreadable result: {error}"})
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
        run={"sweep_dir": str(sweep), "jobs": len(job_dirs)},
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


def _is_job_dir(path: Path) -> bool:
    return any((path / name).exists() for name in ("report.json", ERROR_FILE, ".hydra"))
