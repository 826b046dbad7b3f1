"""The schema of a benchmark report, defined once: :class:`Report`, its :class:`StrategyRecord` rows,
and the typed results they hold: :class:`TaskAccuracy` (a probe's result), :class:`PipelineCost`
(what the timing stage measured of one pipeline: :class:`LatencyRecord`, :class:`RatioRecord`,
:class:`MemoryRecord`, :class:`ParamCounts`) and :class:`VlmRecord` (the whole vision-language
model's cost). A leaf: it imports nothing of the harness.

``report.json`` is ``Report.to_dict()``; :meth:`Report.from_dict` reads one back and refuses what it
cannot read (another ``schema_version``, a row with unknown or missing fields) with a message that
says why. Timing statistics are ``{"median", "p10", "p90", "n"}`` in milliseconds
(:func:`encoder_fusion.benchmarks.reports.stats.stats`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

SCHEMA_VERSION = 2
ROLES = ("baseline", "fused")


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


Record = TypeVar("Record")


def from_fields(cls: type[Record], data: Mapping, where: str) -> Record:
    """A dataclass ``cls`` from a JSON object of its fields, refusing unknown and missing ones."""
    return cls(**_checked_fields(cls, data, where))


@dataclass
class TaskAccuracy:
    """One probe task's result for one strategy (:func:`encoder_fusion.benchmarks.tasks.run_probe`).

    ``mean`` and ``std`` (sample std over seeds, 0.0 with one seed) of the task's ``metric``;
    ``per_seed`` its value per seed; ``extra`` the other metrics as ``{"mean", "std", "per_seed"}``,
    the ``baseline`` metrics of the best constant prediction, ``train_loss`` (last-epoch loss per
    seed) and, for heads that learn layer weights, ``layer_weights`` (mean over seeds) and
    ``layer_weights_per_seed``; ``train_size`` and ``test_size`` count the samples with a target; the
    recipe it trained with. Once the report is built: ``delta`` against the baseline, ``delta_ci`` its
    paired 95 % interval and ``detection`` (see
    :func:`encoder_fusion.benchmarks.reports.verdicts.add_delta_intervals`).
    A task that failed keeps only ``task`` (its error is in the strategy's ``errors``).

    ``item_stats`` (``(seeds, test_size, d)``, :meth:`ProbeTask.item_stats` per seed) feeds the
    paired intervals; it is large, so it stays in memory and out of ``report.json``.
    """

    task: str
    metric: str | None = None
    mean: float | None = None
    std: float | None = None
    per_seed: list[float] | None = None
    seeds: list[int] | None = None
    extra: dict = field(default_factory=dict)
    train_size: int | None = None
    test_size: int | None = None
    epochs: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    weight_decay: float | None = None
    delta: float | None = None
    delta_ci: list[float] | None = None
    detection: dict | None = None
    item_stats: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "item_stats"}

    @classmethod
    def from_dict(cls, data: Mapping) -> TaskAccuracy:
        return from_fields(cls, data, f"accuracy of task {data.get('task', '?')!r}")


@dataclass
class LatencyRecord:
    """The vision pipeline's timings: the settings they were taken with, ``end_to_end`` and
    ``stages`` statistics at ``batch_size`` (the first of ``batch_sizes``), and ``per_batch``: batch
    size -> ``{"stages", "end_to_end", "memory"}`` (and ``"vlm"`` with a language model)."""

    unit: str
    device: str
    dtype: str
    compile: bool
    streams: bool
    threads: int
    batch_sizes: list[int]
    warmup: int
    repeats: int
    image_size: int
    batch_size: int
    end_to_end: dict
    stages: dict
    per_batch: dict
    # batch size -> {call, repeats, halfwidth, cv, target_halfwidth, max_repeats, stable}
    # (encoder_fusion.benchmarks.timing.stability); None in reports from before it
    stability: dict | None = None


@dataclass
class RatioRecord:
    """A pipeline's end-to-end time over the ``baseline``'s, measured side by side: at the first batch
    size (``end_to_end``, its 95 % interval ``end_to_end_ci`` from the paired repeats), per batch size,
    and as a readable ``summary`` (``"fused / clip_only = 1.43x"``)."""

    baseline: str
    end_to_end: float
    end_to_end_ci: list[float] | None
    per_batch: dict
    per_batch_ci: dict
    summary: str


@dataclass
class MemoryRecord:
    """Peak memory over the whole calls (``kind`` says how it was measured), its rise over the level
    before them, and the pipeline's parameters and buffers (``weights_mb``)."""

    kind: str
    peak_mb: float
    delta_mb: float
    weights_mb: float | None = None


@dataclass
class ParamCounts:
    """Parameters, shared tensors counted once; ``trainable`` are those with ``requires_grad``."""

    total: int
    trainable: int


@dataclass
class VlmRecord:
    """What a vision-language-model user waits for, for one pipeline, at the run's first batch size.

    ``prefill``, ``ttft`` (raw images in, first token's logits out, timed as one call) and
    ``decode_tokens_per_s`` (per sequence) are statistics; ``prefill_gflops`` is per image; ``llm_share``
    is the prefill's share of the sum of the stage medians; ``ratios`` hold ``ttft`` (this pipeline's
    TTFT over the baseline's, same language model, same run) and ``vision`` (the vision pipeline alone);
    ``projected`` maps each ``bench.project_llms`` preset to a projection ``{"ttft_ms", "ratio",
    "prefill_ms", "prefill_gflops", "projected": true}``: this pipeline's measured vision time plus the
    preset's prefill FLOPs at the run's measured prefill rate (see
    :func:`encoder_fusion.benchmarks.timing.vlm.vlm_records`); ``per_batch`` holds ``prefill``, ``ttft``
    and ``decode_tokens_per_s`` for every batch size.
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


@dataclass
class PipelineCost:
    """What the timing stage measured of one pipeline
    (:func:`encoder_fusion.benchmarks.timing.measure.measure_latency`): timings, ratios to the baseline,
    memory, output tokens and width, parameters, GFLOPs per image (whole vision pipeline and per stage,
    the language model's prefill included) and the language-model stage (None without one)."""

    latency: LatencyRecord
    ratios: RatioRecord
    memory: MemoryRecord
    tokens: int
    out_dim: int
    params: ParamCounts
    gflops: float
    gflops_stages: dict
    vlm: VlmRecord | None = None


# the typed fields of a strategy row, read back from their JSON objects
TYPED_FIELDS = {
    "latency": LatencyRecord,
    "ratios": RatioRecord,
    "memory": MemoryRecord,
    "params": ParamCounts,
}


@dataclass
class StrategyRecord:
    """One row of a report: a baseline (one encoder) or a fused strategy, its config and results.

    ``accuracy`` maps each task to its :class:`TaskAccuracy`. The cost fields are those of the
    :class:`PipelineCost` the timing stage measured (:meth:`add_cost`): ``latency``, ``ratios``,
    ``memory``, ``tokens``, ``out_dim``, ``params``, ``gflops`` (the vision pipeline's GFLOPs per image),
    ``gflops_stages`` (every stage's, the language model's prefill included) and ``vlm`` (None with
    ``llm=none``). A fused strategy's ``verdict`` is ``gain``, ``worse`` or ``no detectable gain`` and
    its ``tradeoff`` the accuracy bought per +10 % of cost
    (:func:`encoder_fusion.benchmarks.reports.verdicts.assess`). ``errors`` lists ``{"where", "error"}``;
    ``job`` is the sweep job a row of an aggregate came from.
    """

    name: str
    role: str
    encoders: list[str]
    config: dict = field(default_factory=dict)
    weights: dict = field(default_factory=dict)
    accuracy: dict[str, TaskAccuracy] = field(default_factory=dict)
    errors: list = field(default_factory=list)
    latency: LatencyRecord | None = None
    ratios: RatioRecord | None = None
    memory: MemoryRecord | None = None
    tokens: int | None = None
    out_dim: int | None = None
    params: ParamCounts | None = None
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

    def add_cost(self, cost: PipelineCost) -> None:
        """Take the timing stage's measurement of this strategy's pipeline."""
        self.latency, self.ratios, self.memory = cost.latency, cost.ratios, cost.memory
        self.tokens, self.out_dim, self.params = cost.tokens, cost.out_dim, cost.params
        self.gflops, self.gflops_stages, self.vlm = cost.gflops, cost.gflops_stages, cost.vlm

    def overhead(self) -> float | None:
        """The cost ratio a VLM user pays against the baseline: the TTFT ratio with a language model,
        else the vision pipeline's end-to-end ratio."""
        if self.vlm is not None:
            return self.vlm.ratios.get("ttft")
        return self.vision_overhead()

    def vision_overhead(self) -> float | None:
        """The vision pipeline's end-to-end ratio against the baseline."""
        return None if self.ratios is None else self.ratios.end_to_end

    def overhead_ci(self) -> list[float] | None:
        """The 95 % interval of :meth:`overhead`, from the paired repeats."""
        if self.vlm is not None:
            return self.vlm.ratios.get("ttft_ci")
        return self.vision_overhead_ci()

    def vision_overhead_ci(self) -> list[float] | None:
        """The 95 % interval of :meth:`vision_overhead`."""
        return None if self.ratios is None else self.ratios.end_to_end_ci

    def to_dict(self) -> dict:
        data = dataclasses.asdict(dataclasses.replace(self, accuracy={}))  # item statistics stay out
        data["accuracy"] = {task: result.to_dict() for task, result in self.accuracy.items()}
        return data

    @classmethod
    def from_dict(cls, data: Mapping) -> StrategyRecord:
        where = f"strategy {data.get('name', '?')!r}" if isinstance(data, Mapping) else "strategy"
        fields = _checked_fields(cls, data, where)
        fields["accuracy"] = {
            task: TaskAccuracy.from_dict(result) for task, result in (fields.get("accuracy") or {}).items()
        }
        for name, typed in (*TYPED_FIELDS.items(), ("vlm", VlmRecord)):
            if fields.get(name) is not None:
                fields[name] = from_fields(typed, fields[name], f"{where} {name}")
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
    # each cheap probe's rank agreement with the vlm probe (encoder_fusion.benchmarks.reports.agreement)
    probe_agreement: list = field(default_factory=list)
    schema_version: int = SCHEMA_VERSION

    def record(self, name: str) -> StrategyRecord | None:
        """The record named ``name``, or None."""
        return next((s for s in self.strategies if s.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(dataclasses.replace(self, strategies=[]))
        data["strategies"] = [record.to_dict() for record in self.strategies]
        return data

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
