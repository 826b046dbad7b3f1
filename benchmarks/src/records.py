"""The schema of a benchmark report, defined once: :class:`Report`, its :class:`StrategyRecord` rows and
their :class:`VlmRecord` (the whole vision-language model's cost).

``report.json`` is ``Report.to_dict()``; :meth:`Report.from_dict` reads one back and refuses what it
cannot read (another ``schema_version``, a row with unknown or missing fields) with a message that
says why. Timing statistics are ``{"median", "p10", "p90", "n"}`` in milliseconds
(:func:`encoder_fusion.benchmarks.latency.stats`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

SCHEMA_VERSION = 2
ROLES = ("baseline", "fused")
# the strategy every ratio and accuracy change is measured against
BASELINE = "clip_only"


def _checked_fields(cls: type, data: Mapping, where: str) -> dict:
    """``data`` as keyword arguments of the dataclass ``cls``, refusing unknown and missing fields."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{where} must be a JSON object, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{where} has unknown fields {unknown}; accepted: {sorted(fields)}")
    required = [
        name
        for name, f in fields.items()
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    missing = [name for name in required if name not in data]
    if missing:
        raise ValueError(f"{where} lacks the fields {missing}")
    return dict(data)


@dataclass
class VlmRecord:
    """What a vision-language-model user waits for, for one pipeline, at the run's first batch size.

    ``prefill``, ``ttft`` (raw images in, first token's logits out, timed as one call) and
    ``decode_tokens_per_s`` (per sequence) are statistics; ``prefill_gflops`` is per image;
    ``llm_share`` is the prefill's share of the sum of the stage medians; ``ratios`` hold ``ttft``
    (this pipeline's TTFT over the baseline's, same language model, same run) and ``vision`` (the
    vision pipeline alone); ``projected`` maps each ``bench.project_llms`` preset to a projection
    ``{"ttft_ms", "ratio", "prefill_ms", "prefill_gflops", "projected": true}``: this pipeline's
    measured vision time plus the preset's prefill FLOPs at the run's measured prefill rate (see
    :func:`encoder_fusion.benchmarks.latency.vlm_records`); ``per_batch`` holds ``prefill``, ``ttft`` and
    ``decode_tokens_per_s`` for every batch size.
    """

    llm: str
    hidden_size: int
    visual_tokens: int
    prompt_tokens: int
    decode_tokens: int
    prefill: dict
    ttft: dict
    decode_tokens_per_s: dict | None
    prefill_gflops: float
    llm_share: float
    ratios: dict = field(default_factory=dict)
    projected: dict = field(default_factory=dict)
    per_batch: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping) -> VlmRecord:
        return cls(**_checked_fields(cls, data, "vlm record"))


@dataclass
class StrategyRecord:
    """One row of a report: a baseline (one encoder) or a fused strategy, its config and results.

    ``accuracy`` maps each task to its probe result (``metric``, ``mean``, ``std``, ``per_seed``,
    ``seeds``, ``extra``; ``delta`` against the baseline once the report is built; see
    :func:`encoder_fusion.benchmarks.tasks.run_probe`). ``latency`` holds the vision pipeline's timings
    (``batch_size``, ``end_to_end``, ``stages``, ``per_batch`` and the settings), ``ratios`` its ratios to the
    baseline (``end_to_end``, ``per_batch``, ``summary``), ``gflops`` the vision pipeline's GFLOPs per
    image and ``gflops_stages`` every stage's (the language model's prefill included); ``vlm`` the
    language-model stage (None with ``llm=none``). A task result also holds ``delta_ci`` (the paired
    95 % interval of ``delta``) and ``detection``
    (:func:`encoder_fusion.benchmarks.assess.add_delta_intervals`); a fused strategy's ``verdict`` is
    ``gain``, ``worse`` or ``no detectable gain`` and its ``tradeoff`` the accuracy bought per +10 % of cost
    (:func:`encoder_fusion.benchmarks.assess.assess`). ``errors`` lists ``{"where", "error"}``; ``job`` is the
    sweep job a row of an aggregate came from.
    """

    name: str
    role: str
    encoders: list[str]
    config: dict = field(default_factory=dict)
    weights: dict = field(default_factory=dict)
    accuracy: dict = field(default_factory=dict)
    errors: list = field(default_factory=list)
    latency: dict | None = None
    ratios: dict | None = None
    memory: dict | None = None
    tokens: int | None = None
    out_dim: int | None = None
    params: dict | None = None
    gflops: float | None = None
    gflops_stages: dict | None = None
    vlm: VlmRecord | None = None
    verdict: str | None = None
    tradeoff: dict | None = None
    job: str | None = None

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"strategy {self.name!r} role={self.role!r}; accepted: {', '.join(ROLES)}")

    @property
    def is_baseline(self) -> bool:
        return self.role == "baseline"

    def add_error(self, where: str, error: str) -> None:
        self.errors.append({"where": where, "error": error})

    def overhead(self) -> float | None:
        """The cost ratio a VLM user pays against the baseline: the TTFT ratio with a language model,
        else the vision pipeline's end-to-end ratio."""
        if self.vlm is not None:
            return self.vlm.ratios.get("ttft")
        return (self.ratios or {}).get("end_to_end")

    def vision_overhead(self) -> float | None:
        """The vision pipeline's end-to-end ratio against the baseline."""
        return (self.ratios or {}).get("end_to_end")

    def overhead_ci(self) -> list[float] | None:
        """The 95 % interval of :meth:`overhead`, from the paired repeats."""
        if self.vlm is not None:
            return self.vlm.ratios.get("ttft_ci")
        return (self.ratios or {}).get("end_to_end_ci")

    def vision_overhead_ci(self) -> list[float] | None:
        """The 95 % interval of :meth:`vision_overhead`."""
        return (self.ratios or {}).get("end_to_end_ci")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> StrategyRecord:
        where = f"strategy {data.get('name', '?')!r}" if isinstance(data, Mapping) else "strategy"
        fields = _checked_fields(cls, data, where)
        if fields.get("vlm") is not None:
            fields["vlm"] = VlmRecord.from_dict(fields["vlm"])
        return cls(**fields)


@dataclass
class Report:
    """A whole report: where and how it ran, the baseline and tasks, and one record per strategy.

    ``jobs`` and ``failed_jobs`` are filled for the aggregate of a sweep.
    """

    environment: dict
    baseline: str
    tasks: list[str]
    run: dict
    strategies: list[StrategyRecord]
    weights_random: bool = False
    random_encoders: list[str] = field(default_factory=list)
    llms: list[str] = field(default_factory=list)
    jobs: list = field(default_factory=list)
    failed_jobs: list = field(default_factory=list)
    schema_version: int = SCHEMA_VERSION

    def record(self, name: str) -> StrategyRecord | None:
        """The record named ``name``, or None."""
        return next((s for s in self.strategies if s.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str = "report") -> Report:
        """Read a report's JSON object.

        Raises:
            ValueError: another ``schema_version`` (version 1 predates the language-model stage), or a
                field this schema does not have or lacks.
        """
        found = data.get("schema_version") if isinstance(data, Mapping) else type(data).__name__
        if found != SCHEMA_VERSION:
            hint = (
                "; version 1 reports predate the language-model (TTFT) stage: rerun the benchmark "
                "to measure it"
                if found == 1
                else ""
            )
            raise ValueError(f"{where} has schema_version={found!r}; accepted: {SCHEMA_VERSION}{hint}")
        fields = _checked_fields(cls, data, where)
        fields["strategies"] = [StrategyRecord.from_dict(s) for s in fields["strategies"]]
        return cls(**fields)
