"""Cost curves of a sweep: where fusion stops paying, as the swept setting grows.

For every swept key whose values are numbers, each strategy's TTFT overhead, vision overhead, visual
tokens and accuracy changes are drawn against the key's value, with their 95 % intervals, one line
per strategy (and per value of the other swept keys). Keys that are not numbers themselves are
read as the number they stand for: ``llm`` as the preset's parameters (billions), ``tiling`` as the
tiles per image (whole image included), a one-element list (``bench.latency.batch_sizes=[4]``) as
its element. With ``bench.max_overhead`` set, each line marks the first value at which its TTFT
overhead's lower bound passes the budget. A point whose timing was unstable (see
:mod:`encoder_fusion.benchmarks.timing.stability`) is drawn hollow and flagged in the JSON.

Written beside the aggregate: ``curves.json`` and one ``curves_<key>.png`` per key.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from encoder_fusion.benchmarks.reports.figures import _error_bar, save_whole
from encoder_fusion.benchmarks.reports.records import Report
from encoder_fusion.io import atomic_path, write_json

CURVES_FILE = "curves.json"


def overrides_of(report: Report) -> dict[str, str]:
    """A job's command-line overrides as ``key -> value`` text (``+``/``~`` prefixes dropped)."""
    found = {}
    for override in report.run.get("overrides") or []:
        key, _, value = str(override).partition("=")
        found[key.lstrip("+~")] = value
    return found


def swept_keys(reports: Mapping[str, Report]) -> dict[str, dict[str, str]]:
    """Key -> job -> value, for the keys whose value differs between the jobs."""
    values: dict[str, dict[str, str]] = {}
    for job, report in reports.items():
        for key, value in overrides_of(report).items():
            values.setdefault(key, {})[job] = value
    return {key: jobs for key, jobs in values.items() if len(set(jobs.values())) > 1}


def numeric_value(key: str, text: str, report: Report) -> float | None:
    """The number a swept value stands for (see the module docstring); None when it is not one."""
    if key == "llm":
        from encoder_fusion.benchmarks.config.plan import llm_spec
        from encoder_fusion.benchmarks.timing.llm import parameter_count

        spec = llm_spec(report.run.get("llm") or {"name": "none"})
        return None if spec is None else parameter_count(spec) / 1e9
    if key == "tiling":
        tiling = report.run.get("tiling") or {}
        grid = tiling.get("grid")
        if grid is None:
            return 1.0
        if grid == "auto":
            return None
        return float(grid[0] * grid[1] + (tiling.get("thumbnail") != "none"))
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return None
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def axis_label(key: str) -> str:
    """The x-axis label of ``key``: what its number stands for."""
    return {"llm": "language model parameters (B)", "tiling": "tiles per image (whole image included)"}.get(
        key, key
    )


def plottable(reports: Mapping[str, Report]) -> tuple[dict[str, dict[str, float]], dict[str, list[str]]]:
    """``(key -> job -> number, key -> the values that are not numbers)`` of the swept keys."""
    numbers, refused = {}, {}
    for key, jobs in swept_keys(reports).items():
        read = {job: numeric_value(key, text, reports[job]) for job, text in jobs.items()}
        if all(value is not None for value in read.values()):
            numbers[key] = {job: float(value) for job, value in read.items() if value is not None}
        else:
            refused[key] = sorted({jobs[job] for job, value in read.items() if value is None})
    return numbers, refused


def curves(reports: Mapping[str, Report], keys: Sequence[str] | None = None) -> dict[str, Any]:
    """The curves' data: ``{"keys": {key: {"label", "lines": [...]}}, "not_plottable": {key: values}}``.

    Each line: ``strategy``, ``fixed`` (the other swept keys' values), ``points`` sorted by ``x``
    (``job``, ``x``, ``ttft_overhead`` and ``ttft_ci``, ``vision_overhead`` and ``vision_ci``,
    ``visual_tokens``, ``deltas``: task -> ``{"delta", "ci"}``, ``unstable``) and
    ``crosses_budget_at`` (None without a budget or when it is never passed).

    Raises:
        ValueError: a key of ``keys`` that was not swept, or whose values are not numbers (the
            plottable keys listed).
    """
    numbers, refused = plottable(reports)
    swept = swept_keys(reports)
    for key in keys or []:
        if key not in numbers:
            why = f"its values {refused[key]} are not numbers" if key in refused else "it was not swept"
            raise ValueError(
                f"fusion-report --curve {key}: {why}; accepted: "
                + (", ".join(sorted(numbers)) or "none (no swept key of this sweep has numeric values)")
            )
    budget = next((r.run.get("bench", {}).get("max_overhead") for r in reports.values()), None)
    baseline = next((r.baseline for r in reports.values()), None)
    data: dict[str, Any] = {
        "keys": {},
        "not_plottable": refused,
        "max_overhead": budget,
        "baseline": baseline,
    }
    for key in keys or sorted(numbers):
        lines: dict[tuple, dict] = {}
        for job, x in numbers[key].items():
            report = reports[job]
            fixed = {other: swept[other].get(job) for other in swept if other != key}
            unstable = any(
                not reached.get("stable", True)
                for record in report.strategies
                if record.latency
                for reached in (record.latency.stability or {}).values()
            )
            for record in report.strategies:
                line = lines.setdefault(
                    (record.name, json.dumps(fixed, sort_keys=True)),
                    {"strategy": record.name, "fixed": fixed, "points": []},
                )
                line["points"].append(
                    {
                        "job": job,
                        "x": x,
                        "ttft_overhead": record.overhead(),
                        "ttft_ci": record.overhead_ci(),
                        "vision_overhead": record.vision_overhead(),
                        "vision_ci": record.vision_overhead_ci(),
                        "visual_tokens": record.tokens,
                        "deltas": {
                            task: {"delta": result.delta, "ci": result.delta_ci}
                            for task, result in record.accuracy.items()
                        },
                        "unstable": unstable,
                    }
                )
        for line in lines.values():
            line["points"].sort(key=lambda point: point["x"])
            line["crosses_budget_at"] = crossing(line["points"], budget)
        data["keys"][key] = {"label": axis_label(key), "lines": list(lines.values())}
    return data


def crossing(points: Sequence[Mapping], budget: float | None) -> float | None:
    """The first ``x`` whose TTFT overhead's interval lies wholly above ``budget`` (None without)."""
    if budget is None:
        return None
    for point in points:
        ci = point["ttft_ci"] or [point["ttft_overhead"]] * 2
        if ci[0] is not None and ci[0] > budget:
            return point["x"]
    return None


PANELS = (
    ("ttft_overhead", "ttft_ci", "TTFT overhead (x baseline)"),
    ("vision_overhead", "vision_ci", "vision overhead (x baseline)"),
    ("visual_tokens", None, "visual tokens"),
)


def curve_figure(key: str, entry: Mapping, tasks: Sequence[str], budget: float | None, baseline: str | None):
    """One figure of ``key``: a panel per measure, a line per strategy (the reference ``baseline``,
    1.0x and 0 pp by definition, left out), error bars, hollow markers at unstable points, the
    budget and each line's crossing marked; the legend below the panels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [*PANELS, *((f"delta:{task}", None, f"{task}: accuracy change (pp)") for task in tasks)]
    figure = Figure(figsize=(4.6 * len(panels), 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    from matplotlib import colormaps

    shown = [line for line in entry["lines"] if line["strategy"] != baseline]
    palette = colormaps["tab20"]
    colors = [palette(i % 20) for i in range(len(shown))]
    for index, line in enumerate(shown):
        color = colors[index % len(colors)]
        label = line["strategy"] + "".join(f", {k}={v}" for k, v in line["fixed"].items())
        for axis, (field, ci_field, title) in zip(axes, panels):
            xs, ys, errors, hollow = [], [], [], []
            for point in line["points"]:
                if field.startswith("delta:"):
                    result = point["deltas"].get(field.split(":", 1)[1]) or {}
                    value, ci, scale = result.get("delta"), result.get("ci"), 100.0
                else:
                    value, ci, scale = point[field], point[ci_field] if ci_field else None, 1.0
                if value is None:
                    continue
                xs.append(point["x"])
                ys.append(scale * value)
                errors.append(_error_bar(value, ci, scale) or [[0.0], [0.0]])
                hollow.append(point["unstable"])
            if not xs:
                continue
            below = [e[0][0] for e in errors]
            above = [e[1][0] for e in errors]
            axis.errorbar(xs, ys, yerr=[below, above], color=color, marker="o", capsize=3, label=label)
            unstable = [(x, y) for x, y, h in zip(xs, ys, hollow) if h]
            if unstable:
                axis.scatter(*zip(*unstable), s=90, facecolors="white", edgecolors=color, zorder=4)
            if field == "ttft_overhead" and line["crosses_budget_at"] is not None:
                axis.axvline(line["crosses_budget_at"], color=color, linestyle=":", linewidth=1)
            axis.set_title(title)
            axis.set_xlabel(entry["label"])
            axis.grid(alpha=0.3)
    if budget is not None:
        axes[0].axhline(budget, color="red", linewidth=1, linestyle="--", label=f"budget {budget}x")
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(
        handles, labels, loc="outside lower center", ncols=min(4, max(1, len(labels))), fontsize="small"
    )
    figure.suptitle(f"cost curves against {key} (hollow: unstable timing)")
    return figure


def write_curves(
    out_dir: str | os.PathLike, reports: Mapping[str, Report], keys: Sequence[str] | None = None
) -> Path | None:
    """Write ``curves.json`` and the figures into ``out_dir``; None when no swept key is plottable
    (and none was asked for).

    Raises:
        ValueError: as :func:`curves`.
    """
    data = curves(reports, keys)
    if not data["keys"]:
        return None
    out = Path(out_dir)
    tasks = list(dict.fromkeys(t for r in reports.values() for t in r.tasks))
    for key, entry in data["keys"].items():
        figure = curve_figure(key, entry, tasks, data["max_overhead"], data["baseline"])
        path = out / f"curves_{re.sub(r'[^A-Za-z0-9_.-]', '_', key)}.png"
        with atomic_path(path) as temporary:
            save_whole(figure, temporary, dpi=100)
    return write_json(out / CURVES_FILE, data)
