"""Can a cheap probe stand in for the VLM probe? The rank agreement of their deltas over strategies.

For every probe that ran beside ``vlm`` on at least :data:`MIN_STRATEGIES` strategies: Spearman's
rho and Kendall's tau-b between the probe's deltas (each strategy's metric minus the baseline's) and
the ``vlm`` deltas, with 95 % bootstrap intervals over test items (each task's items resampled
paired across strategies, the two tasks independently), and a verdict: ``agrees`` when the
Spearman interval lies above 0, ``disagrees`` when below, ``inconclusive`` otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from encoder_fusion.benchmarks.reports.records import StrategyRecord
from encoder_fusion.benchmarks.reports.stats import percentiles, resampled_metric

REFERENCE = "vlm"
MIN_STRATEGIES = 3


def ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n of ``values`` with ties given their mean rank."""
    order = np.argsort(values, kind="stable")
    ranked = np.empty(len(values))
    ranked[order] = np.arange(1, len(values) + 1)
    for value in np.unique(values):
        tied = values == value
        ranked[tied] = ranked[tied].mean()
    return ranked


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho (Pearson's r of the tie-averaged ranks); NaN when either side is constant."""
    x, y = ranks(a) - (len(a) + 1) / 2, ranks(b) - (len(b) + 1) / 2
    x, y = x - x.mean(), y - y.mean()
    scale = np.sqrt((x**2).sum() * (y**2).sum())
    return float((x * y).sum() / scale) if scale > 0 else float("nan")


def kendall(a: np.ndarray, b: np.ndarray) -> float:
    """Kendall's tau-b; NaN when either side is constant."""
    i, j = np.triu_indices(len(a), k=1)
    da, db = np.sign(a[i] - a[j]), np.sign(b[i] - b[j])
    scale = np.sqrt((da != 0).sum() * (db != 0).sum())
    return float((da * db).sum() / scale) if scale > 0 else float("nan")


def _interval(values: Sequence[float]) -> list[float] | None:
    finite = np.asarray([v for v in values if np.isfinite(v)])
    return percentiles(finite) if len(finite) else None


def _number(value: float) -> float | None:
    return None if not np.isfinite(value) else value


def probe_agreement(
    records: Mapping[str, StrategyRecord],
    items: Mapping[tuple[str, str], torch.Tensor],
    metrics: Mapping[str, Callable[[torch.Tensor], torch.Tensor]],
    baseline: str | Mapping[str, str],
    resamples: int,
    seed: int = 0,
) -> list[dict]:
    """One row per cheap probe: ``probe``, ``spearman``, ``spearman_ci``, ``kendall``, ``kendall_ci``,
    ``strategies`` (the strategies ranked, baselines included) and ``verdict``; empty without a
    ``vlm`` probe or with fewer than :data:`MIN_STRATEGIES` strategies that ran both.

    ``baseline``: the strategy every delta is against, or each strategy's own (a sweep's jobs may
    each have a baseline of their own; their items must be the same test items)."""
    rows = []
    reference = baseline if isinstance(baseline, Mapping) else {name: baseline for name in records}
    probes = list(dict.fromkeys(task for name, task in items if task != REFERENCE))
    for probe in probes:
        ran = {
            name
            for name in records
            if (name, probe) in items
            and (name, REFERENCE) in items
            and records[name].accuracy[probe].delta is not None
        }
        names = [name for name in records if name in ran and reference.get(name) in ran]
        if len(names) < MIN_STRATEGIES:
            continue
        point = {
            task: np.array([records[name].accuracy[task].delta for name in names], dtype=float)
            for task in (probe, REFERENCE)
        }
        resampled = {}
        for offset, task in enumerate((probe, REFERENCE)):
            values = resampled_metric(
                [items[name, task] for name in names], metrics[task], resamples, seed + offset
            )
            resampled[task] = values - values[[names.index(reference[name]) for name in names]]
        per_resample = [
            (spearman(resampled[probe][:, r], resampled[REFERENCE][:, r]),
             kendall(resampled[probe][:, r], resampled[REFERENCE][:, r]))
            for r in range(resamples)
        ]  # fmt: skip
        rho_ci = _interval([rho for rho, _ in per_resample])
        rows.append(
            {
                "probe": probe,
                "spearman": _number(spearman(point[probe], point[REFERENCE])),
                "spearman_ci": rho_ci,
                "kendall": _number(kendall(point[probe], point[REFERENCE])),
                "kendall_ci": _interval([tau for _, tau in per_resample]),
                "strategies": names,
                "verdict": agreement_verdict(rho_ci),
            }
        )
    return rows


def agreement_verdict(interval: list[float] | None) -> str:
    """``agrees`` (interval above 0), ``disagrees`` (below 0) or ``inconclusive``."""
    if interval is None:
        return "inconclusive"
    if interval[0] > 0:
        return "agrees"
    if interval[1] < 0:
        return "disagrees"
    return "inconclusive"


def agreement_sentence(rows: Sequence[dict]) -> str:
    """One sentence: which probes ranked the strategies like the VLM probe did."""
    if not rows:
        return ""
    agree = [row["probe"] for row in rows if row["verdict"] == "agrees"]
    others = [row["probe"] for row in rows if row["verdict"] != "agrees"]
    count = len(rows[0]["strategies"])
    said = f"ranked the {count} strategies like the vlm probe (Spearman interval above 0)" if agree else ""
    if agree and others:
        return f"{', '.join(agree)} {said}; {', '.join(others)} did not, or not detectably."
    if agree:
        return f"{', '.join(agree)} {said}."
    return (
        f"No cheap probe ranked the {count} strategies detectably like the vlm probe ({', '.join(others)})."
    )
