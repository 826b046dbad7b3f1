"""The figures of a report: ``pareto.png`` (accuracy change against the cost a VLM user pays, with
error bars on both axes), saved with the canvas grown to all its text."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from encoder_fusion.benchmarks.reports.records import Report
from encoder_fusion.benchmarks.reports.render import planted_encoders
from encoder_fusion.io import atomic_path


def _error_bar(value: float, interval: Sequence[float] | None, scale: float = 1.0):
    """The ``(2, 1)`` below/above distances of an interval around ``value``, for ``errorbar``; None
    without an interval."""
    if not interval:
        return None
    return [[scale * max(0.0, value - interval[0])], [scale * max(0.0, interval[1] - value)]]


def pareto_figure(report: Report):
    """The Pareto figure: per task, accuracy change against the baseline (pp) over the cost overhead
    (x baseline), one labelled point per strategy (squares: baselines, circles: fused strategies),
    with the 95 % intervals of both as error bars. With a language model the filled marker is the
    time-to-first-token overhead and a hollow marker, joined to it by a dotted line, the vision-only
    overhead of the same strategy.

    Returns:
        A :class:`matplotlib.figure.Figure` on its own Agg canvas, outside pyplot: drawing it changes
        neither the process's matplotlib backend nor pyplot's figures (a notebook keeps showing its
        own), and nothing needs closing.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tasks = report.tasks or ["(no task)"]
    with_llm = any(s.vlm is not None for s in report.strategies)
    # constrained layout spaces the panels; save_whole keeps text that still overflows them
    figure = Figure(figsize=(max(8.0, 5.5 * len(tasks)), 5.0), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(tasks), squeeze=False)
    for axis, task in zip(axes[0], tasks):
        for record in report.strategies:
            overhead, vision = record.overhead(), record.vision_overhead()
            result = record.accuracy.get(task)
            delta = result.delta if result else None
            if overhead is None or delta is None:
                continue
            color = "black" if record.is_baseline else "tab:blue"
            marker = "s" if record.is_baseline else "o"
            axis.errorbar(
                overhead,
                100 * delta,
                xerr=_error_bar(overhead, record.overhead_ci()),
                yerr=_error_bar(delta, result.delta_ci if result else None, scale=100),
                fmt="none",
                ecolor=color,
                elinewidth=1,
                capsize=3,
                zorder=2,
            )
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
    if planted_encoders(report):
        title = "PLANTED SIGNAL - " + title
    elif report.weights_random:
        title = "RANDOM WEIGHTS - " + title
    figure.suptitle(title)
    return figure


def save_whole(figure, path: str | os.PathLike, dpi: int) -> None:
    """Save ``figure`` with its canvas grown to every piece of text on it: a long title, or a label
    placed beside a point near the edge, is never cut off."""
    figure.savefig(path, dpi=dpi, bbox_inches="tight", pad_inches=0.15)


def plot_pareto(report: Report, path: str | os.PathLike) -> Path:
    """Save :func:`pareto_figure` as a PNG at ``path``, atomically."""
    figure = pareto_figure(report)
    with atomic_path(path) as temp:
        save_whole(figure, temp, dpi=110)
    return Path(path)
