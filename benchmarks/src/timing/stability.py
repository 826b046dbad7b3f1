"""When timing is noise: the round robin goes on until the overhead intervals are narrow enough, and
says so when they never get there.

A busy machine (another CPU-heavy job beside the benchmark) spreads every repeat; the paired ratio
of medians still centres on the truth, but its interval widens, and a point read off such a run is
noise. As pyperf warns about unstable benchmarks, the report then says, on its first lines, how wide
the interval got (as a share of the ratio, either side) and the coefficient of variation of the
timed calls (their standard deviation over their mean).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from encoder_fusion.benchmarks.reports.stats import ratio_ci


def relative_halfwidth(
    samples: Sequence[float], baseline: Sequence[float], resamples: int, seed: int
) -> float:
    """Half the 95 % interval of median(samples) / median(baseline), over that ratio."""
    low, high = ratio_ci(samples, baseline, resamples, seed)
    ratio = float(np.median(samples) / np.median(baseline))
    return (high - low) / 2 / ratio


def coefficient_of_variation(samples: Sequence[float]) -> float:
    """Sample standard deviation over the mean."""
    values = np.asarray(samples, dtype=np.float64)
    return float(values.std(ddof=1) / values.mean()) if len(values) > 1 else 0.0


def stability(
    samples: Mapping[tuple[str, str], Sequence[float]],
    names: Sequence[str],
    baseline: str,
    call: str,
    resamples: int,
    seed: int,
) -> dict:
    """``{"call", "repeats", "halfwidth", "cv"}``: the widest relative half-width of any pipeline's
    ``call`` ratio against ``baseline``'s (0.0 with the baseline alone), and the largest
    coefficient of variation of ``call`` among the pipelines."""
    others = [name for name in names if name != baseline]
    widths = [
        relative_halfwidth(samples[name, call], samples[baseline, call], resamples, seed) for name in others
    ]
    return {
        "call": call,
        "repeats": len(samples[baseline, call]),
        "halfwidth": max(widths, default=0.0),
        "cv": max(coefficient_of_variation(samples[name, call]) for name in names),
    }
