"""Hand-built report records, shared by the report and sweep tests."""

from __future__ import annotations

from encoder_fusion.benchmarks.reports.records import (
    LatencyRecord,
    MemoryRecord,
    ParamCounts,
    RatioRecord,
    StrategyRecord,
    TaskAccuracy,
)


def record(name, role, encoders, accuracy, median, ratio, weights="random", errors=()):
    """A strategy record as run.py writes it, with hand-chosen numbers."""
    return StrategyRecord(
        name=name,
        role=role,
        encoders=list(encoders),
        config={"key": name, "head": {"kind": name}},
        weights={e: weights for e in encoders},
        accuracy={
            task: TaskAccuracy(task, metric=metric, mean=mean, std=std, per_seed=[mean])
            for task, (metric, mean, std) in accuracy.items()
        },
        latency=LatencyRecord(
            unit="ms",
            device="cpu",
            dtype="fp32",
            compile=False,
            streams=False,
            threads=2,
            batch_sizes=[4],
            warmup=1,
            repeats=5,
            image_size=224,
            batch_size=4,
            end_to_end={"median": median, "p10": median * 0.9, "p90": median * 1.2, "n": 5},
            stages={},
            per_batch={},
        ),
        ratios=RatioRecord("clip_only", ratio, None, {"4": ratio}, {}, ""),
        memory=MemoryRecord("cpu process RSS", peak_mb=812.4, delta_mb=10.0),
        tokens=196,
        params=ParamCounts(total=93_000_000, trainable=1_250_000),
        gflops=23.4,
        errors=list(errors),
    )


def three_strategies(weights="random"):
    return [
        record(
            "clip_only", "baseline", ["clip"], {"classification": ("top1", 0.625, 0.025)}, 40.0, 1.0, weights
        ),
        record(
            "dino_only", "baseline", ["dino"], {"classification": ("top1", 0.5, 0.05)}, 20.0, 0.5, weights
        ),
        record(
            "comm",
            "fused",
            ["clip", "dino"],
            {"classification": ("top1", 0.7, 0.0)},
            57.2,
            1.43,
            weights,
            errors=[{"where": "probe:dense", "error": "ValueError: no masks"}],
        ),
    ]


ENV = {"device": "test cpu", "torch": "x", "date": "2026-01-01", "command": "fusion-bench fusion=comm"}
