"""The compare mode: the strategies of a run (the single-encoder baselines and the configured fusion,
see :func:`encoder_fusion.benchmarks.config.plan.strategies`) trained, evaluated and timed side by
side, their report written.

A failure in one strategy or one task is recorded in the report with its error; what every strategy
needs (the dataset, the encoders) ends the run, and so does a run in which every strategy failed,
once its report is written.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from encoder_fusion import EncoderGeometry, FusedEncoder, FusionHead
from encoder_fusion.benchmarks.config.checks import CheckedRun, check_heads, strategy_heads
from encoder_fusion.benchmarks.config.plan import Strategy, used_roles
from encoder_fusion.benchmarks.config.schema import BASELINE, config_hash
from encoder_fusion.benchmarks.datasets import ImageDataset
from encoder_fusion.benchmarks.features.planted import PlantOptions, planted_grids
from encoder_fusion.benchmarks.features.tiles import TiledHead
from encoder_fusion.benchmarks.reports.agreement import probe_agreement
from encoder_fusion.benchmarks.reports.items import write_items
from encoder_fusion.benchmarks.reports.records import Report, StrategyRecord, TaskAccuracy
from encoder_fusion.benchmarks.reports.render import render_markdown
from encoder_fusion.benchmarks.reports.report import build_report, environment, write_report
from encoder_fusion.benchmarks.reports.verdicts import add_delta_intervals, assess
from encoder_fusion.benchmarks.run.prepare import (
    build_encoders,
    cached_grids,
    decoded_splits,
    error_text,
    image_source,
    init_distributed,
    job_overrides,
    phase,
    tiled_grids,
)
from encoder_fusion.benchmarks.tasks import TASKS, FeatureSplit, ProbeTask, run_probe
from encoder_fusion.benchmarks.tasks.correspondence import run_correspondence, warp_grid, warp_images
from encoder_fusion.benchmarks.tasks.knn import KnnTask
from encoder_fusion.benchmarks.tasks.vlm import VlmContext, VlmTask
from encoder_fusion.benchmarks.timing.llm import VlmOptions, build_language_model
from encoder_fusion.benchmarks.timing.llm_weights import load_tokenizer
from encoder_fusion.benchmarks.timing.measure import measure_latency
from encoder_fusion.benchmarks.timing.options import LatencyOptions
from encoder_fusion.containers import plain
from encoder_fusion.encoders import Encoder
from encoder_fusion.kernels import finite_checks
from encoder_fusion.tiling import TilingSpec, grid_of

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Split:
    """One split's raw batch and its per-role grids (None where extraction failed)."""

    dataset: ImageDataset
    batch: dict
    grids: dict[str, list[torch.Tensor] | None]
    # the grids of the images warped by the correspondence probe's warp (test split, when it runs)
    warped: dict[str, list[torch.Tensor] | None] = dataclasses.field(default_factory=dict)
    # with tiling: (role, grid) -> the stacked region grids (see run.prepare.tiled_grids)
    tiled: dict[tuple[str, tuple[int, int]], list[torch.Tensor]] = dataclasses.field(default_factory=dict)
    # the images left out as unusable (data.on_bad_image=skip): {"file", "error"} each
    skipped: list[dict[str, str]] = dataclasses.field(default_factory=list)

    def features(
        self, roles: tuple[str, ...], task: str, grid: tuple[int, int] | None = None
    ) -> FeatureSplit:
        """The probe input of ``task`` for the encoders ``roles`` (each of which has grids): whole
        images, or with ``grid`` their tiles' stacked region grids."""
        if grid is None:
            grids = [self.grids[role] for role in roles]
        else:
            grids = [self.tiled.get((role, grid)) for role in roles]
        lost = [role for role, grid in zip(roles, grids) if grid is None]
        if lost:  # the callers skip a strategy whose encoder failed, so this is a caller's mistake
            raise ValueError(f"no features of encoder role(s) {lost}: their extraction failed")
        return FeatureSplit(
            grids=[grid for grid in grids if grid is not None],
            labels=self.batch["labels"],
            masks=self.batch["masks"],
            boxes=self.batch["boxes"],
            num_classes=self.dataset.class_count(TASKS[task].ANNOTATION),
        )


def load_splits(cfg: Any, encoders: Mapping[str, Encoder], checked: CheckedRun) -> tuple[dict, dict]:
    """Load the train / test batches and every role's grids (cached).

    Returns:
        ``(splits, role_errors)``: ``{"train": Split, "test": Split}`` and role -> the error that
        stopped its extraction.
    """
    load_size, cache, plants = cfg.data.image_size, checked.cache, checked.plants
    splits, role_errors = {}, {}
    tile_grids: dict[str, set[tuple[int, int]]] = {}  # role -> the grids its strategies cut images by
    for strategy in checked.strategies:
        grid = strategy_grid(strategy, encoders, checked.tiling, load_size)
        if grid is not None:
            for role in strategy.encoders:
                tile_grids.setdefault(role, set()).add(grid)
    # both splits decoded before either is extracted: a bad image in the test split stops the run
    # before any encoder ran, not after the train split's extraction
    loaded = decoded_splits(cfg.data, checked.train, checked.test)
    for number, (which, (dataset, batch, _)) in enumerate(loaded.items()):
        source = image_source(dataset, load_size, cache)
        grids: dict[str, list[torch.Tensor] | None] = {}
        warped: dict[str, list[torch.Tensor] | None] = {}
        tiled: dict[tuple[str, tuple[int, int]], list[torch.Tensor]] = {}
        for offset, (role, encoder) in enumerate(encoders.items()):
            if role in role_errors:
                grids[role] = None
                continue
            try:
                plant = plants.of(role)
                if plant is not None:
                    planted = grids[role] = planted_grids(
                        plant,
                        batch,
                        grid=encoder.grid_size(),
                        width=encoder.width,
                        layers=len(encoder.layer_indices),
                        num_classes=dataset.num_classes,
                        noise=plants.noise,
                        seed=cfg.seed + offset,
                        noise_seed=cfg.seed + 100 * (number + 1) + offset,
                    )
                    warped[role] = [warp_grid(grid, checked.warp.theta()) for grid in planted]
                    continue
                grids[role] = cached_grids(cache, encoder, source, batch)
                for grid in tile_grids.get(role, ()):
                    assert checked.tiling is not None  # tile_grids is empty without it
                    tiled[role, grid] = tiled_grids(cache, encoder, source, batch, checked.tiling, grid)
                if which == "test" and "correspondence" in plain(cfg.task.names):
                    theta = checked.warp.theta()
                    moved = {"images": warp_images(batch["images"], theta)}
                    warped[role] = cached_grids(cache, encoder, {**source, **checked.warp.key()}, moved)
            except Exception as error:  # recorded against every strategy using this encoder
                role_errors[role] = f"feature extraction ({which}): {error_text(error)}"
                log.error("feature extraction of %s failed:\n%s", role, traceback.format_exc())
                grids[role] = None
        splits[which] = Split(dataset, batch, grids, warped, tiled, skipped=loaded[which][2])
    return splits, role_errors


def strategy_grid(
    strategy: Strategy, encoders: Mapping[str, Encoder], tiling: TilingSpec | None, size: int
) -> tuple[int, int] | None:
    """The grid ``strategy``'s tiled model cuts a ``size``-pixel square image into (its
    :attr:`FusedEncoder.tile_size` decides an ``"auto"`` grid); None without tiling."""
    if tiling is None:
        return None
    tile = max(max(encoders[role].image_size) for role in strategy.encoders)
    return grid_of(tiling, size, size, tile)


def head_factory(
    strategy: Strategy,
    encoders: Mapping[str, Encoder],
    tiling: TilingSpec | None = None,
    grid: tuple[int, int] | None = None,
):
    """A ``make_head()`` for :func:`run_probe`: a fresh :class:`FusionHead` for the strategy's encoders,
    reading the regions of images cut by ``grid`` (:class:`TiledHead`) when ``tiling`` is given."""
    geometries = [EncoderGeometry.of(encoders[role]) for role in strategy.encoders]
    if tiling is None or grid is None:
        return lambda: FusionHead(geometries, **strategy.head)
    return lambda: TiledHead(FusionHead(geometries, **strategy.head), tiling, grid)


def record_result(
    record: StrategyRecord, items: dict, name: str, task: str, result: TaskAccuracy, started: float
) -> None:
    """Keep a probe's result on the record and its per-item statistics in ``items``; log it."""
    assert result.item_stats is not None  # every probe measures them
    items[name, task] = result.item_stats
    record.accuracy[task] = result
    log.info(
        "probe %s / %s: %s %.3f in %.1f s",
        name,
        task,
        result.metric,
        result.mean,
        time.perf_counter() - started,
    )


def vlm_language_model(checked: CheckedRun, seed: int):
    """The VLM probe's language model and its tokenizer: the ``llm`` preset with random weights and
    no tokenizer, or its checkpoint's (``llm.weights``); frozen, float32, on the probes' device."""
    assert checked.vlm.llm is not None  # check_config refuses task=vlm without one
    device = torch.device(checked.probe.device)
    model = build_language_model(checked.vlm.llm, device, torch.float32, seed)
    return model, load_tokenizer(checked.vlm.llm)


def vlm_probe(
    strategy: Strategy,
    encoders: Mapping[str, Encoder],
    language_model,
    checked: CheckedRun,
    data: ImageDataset,
) -> ProbeTask:
    """The VLM probe bound to ``strategy``'s transformers VLM around the frozen ``language_model``
    (``(model, tokenizer)`` of :func:`vlm_language_model`; the VLM built as a user builds it, the
    probe training a fusion head of its own and feeding its tokens)."""
    from encoder_fusion.hf import build_vlm

    assert checked.vlm.llm is not None and checked.vlm_probe is not None  # checked at start
    model, tokenizer = language_model
    fused = FusedEncoder(
        [encoders[role] for role in strategy.encoders], **strategy.head, tiling=checked.tiling
    )
    vlm = build_vlm(fused, model, image_token_id=checked.vlm.llm.vocab_size - 1)
    vlm.requires_grad_(False)
    context = VlmContext(vlm, checked.vlm_probe, list(data.classes), list(data.mask_classes or []), tokenizer)
    return VlmTask(context)


def strategy_record(
    strategy: Strategy, encoders: Mapping[str, Encoder], plants: PlantOptions
) -> StrategyRecord:
    """The report record of a strategy before results: name, role, encoders, config, weights
    (``planted`` for an encoder whose features the harness planted)."""
    used = [encoders[role] for role in strategy.encoders]
    return StrategyRecord(
        name=strategy.name,
        role=strategy.role,
        encoders=[e.spec.name for e in used],
        config={
            "key": strategy.key(),
            "encoders": {role: plain_spec(encoders[role]) for role in strategy.encoders},
            "head": strategy.head,
        },
        weights={
            encoders[role].spec.name: "planted" if plants.of(role) else encoders[role].weights_loaded
            for role in strategy.encoders
        },
    )


def plain_spec(encoder: Encoder) -> dict:
    """An encoder's spec as JSON-ready fields."""
    spec = dataclasses.asdict(encoder.spec)
    spec["image_size"] = list(encoder.image_size)
    spec["hooks"]["layers"] = list(spec["hooks"]["layers"])
    return spec


def run_probes(
    cfg: Any, checked: CheckedRun, records: dict[str, StrategyRecord], encoders, splits, role_errors
) -> dict[tuple[str, str], torch.Tensor]:
    """Every task of ``cfg.task.names`` for every strategy; results and errors go into ``records``.

    Returns:
        (strategy, task) -> the per-item statistics of its test items per seed (for the paired
        intervals; kept out of the report).
    """
    items = {}
    language_model = None
    for strategy in checked.strategies:
        record = records[strategy.name]
        missing = [role_errors[r] for r in strategy.encoders if r in role_errors]
        if missing:
            for error in missing:
                record.add_error("features", error)
            continue
        grid = strategy_grid(strategy, encoders, checked.tiling, cfg.data.image_size)
        make_head = head_factory(strategy, encoders, checked.tiling, grid)
        for task in plain(cfg.task.names):
            try:
                train = splits["train"].features(strategy.encoders, task, grid)
                test = splits["test"].features(strategy.encoders, task, grid)
                started = time.perf_counter()
                probe: str | ProbeTask = task
                if task == "correspondence":
                    warped = [splits["test"].warped.get(role) for role in strategy.encoders]
                    if any(grid is None for grid in warped):
                        raise ValueError(f"no warped features of encoder role(s) {list(strategy.encoders)}")
                    result = run_correspondence(
                        make_head,
                        test,
                        [grid for grid in warped if grid is not None],
                        checked.warp,
                        checked.probe.seeds,
                        torch.device(checked.probe.device),
                    )
                    record_result(record, items, strategy.name, task, result, started)
                    continue
                if task == "knn":
                    probe = KnnTask(checked.knn_k)
                if task == "vlm":
                    if language_model is None:  # one frozen language model serves every strategy
                        language_model = vlm_language_model(checked, cfg.seed)
                    probe = vlm_probe(strategy, encoders, language_model, checked, splits["train"].dataset)
                result = run_probe(probe, make_head, train, test, checked.probe)
                record_result(record, items, strategy.name, task, result, started)
            except Exception as error:  # one task's failure must not lose the others
                log.error("probe %s / %s failed:\n%s", strategy.name, task, traceback.format_exc())
                record.accuracy[task] = TaskAccuracy(task)
                record.add_error(f"probe:{task}", error_text(error))
    return items


def run_latency(
    plan: list[Strategy],
    records: dict[str, StrategyRecord],
    encoders,
    options: LatencyOptions,
    vlm: VlmOptions,
    tiling: TilingSpec | None = None,
) -> None:
    """Time every strategy that builds, all in one run (with the language-model stage of ``vlm``,
    each image cut into the tiles of ``tiling``); results and errors go into ``records``."""
    pipelines = {}
    for strategy in plan:
        try:
            pipelines[strategy.name] = FusedEncoder(
                [encoders[role] for role in strategy.encoders], **strategy.head, tiling=tiling
            )
        except Exception as error:
            records[strategy.name].add_error("latency", error_text(error))
    if BASELINE not in pipelines:
        for name in pipelines:
            records[name].add_error("latency", f"no {BASELINE} pipeline to measure ratios against")
        return
    try:
        results = measure_latency(pipelines, options, vlm=vlm)
    except Exception as error:
        log.error("latency failed:\n%s", traceback.format_exc())
        for name in pipelines:
            records[name].add_error("latency", error_text(error))
        return
    for name, cost in results.items():
        records[name].add_cost(cost)


def run_compare(cfg: Any, checked: CheckedRun, out: Path, command: str | None) -> Path | None:
    """The compare mode of :func:`encoder_fusion.benchmarks.run.run_benchmark`, once every setting is
    checked: the encoders built and their heads checked, the features extracted (sharded under
    ``torchrun``), then on rank 0 the probes and the latency of every strategy, and the report.

    Returns:
        The path of ``report.json``; None when no report was written (``extract_only``, or a rank
        other than 0).

    Raises:
        RuntimeError: every strategy failed (their errors are in the report written first).
    """
    seconds: dict[str, float] = {}
    with phase("encoders", seconds):
        encoders = build_encoders(checked.encoders, cfg.seed)
    check_heads(cfg, encoders.values(), strategy_heads(checked.strategies, encoders))
    rank = init_distributed()
    checked.cache.progress = cfg.bench.progress and not rank
    with phase("data and features", seconds):
        splits, role_errors = load_splits(cfg, encoders, checked)
    if rank is not None:
        dist.destroy_process_group()
    if cfg.bench.extract_only or rank:
        where = "" if rank is None else f" (rank {rank})"
        print(f"Features cached in {checked.cache.root}{where}; errors: {role_errors or 'none'}")
        return None
    records = {s.name: strategy_record(s, encoders, checked.plants) for s in checked.strategies}
    # every merge's output is checked for NaN and Inf, so a poisoned feature is named by its encoder
    # and layer instead of training a probe on NaN (its cost: README, "Reliability")
    with phase("probes", seconds), finite_checks():
        items = run_probes(cfg, checked, records, encoders, splits, role_errors)
        metrics = {task: TASKS[task].metric_from_sums for task in plain(cfg.task.names)}
        add_delta_intervals(records, items, metrics, BASELINE, checked.judging)
    with phase("latency", seconds):
        run_latency(checked.strategies, records, encoders, checked.latency, checked.vlm, checked.tiling)
    run = {
        **plain(cfg),
        "overrides": job_overrides(),
        "config_hash": config_hash(cfg),
        "data_sizes": {which: len(split.dataset) for which, split in splits.items()},
        "skipped_images": {which: split.skipped for which, split in splits.items()},
        "roles": list(used_roles(cfg)),
        "phase_seconds": seconds,
    }
    report = build_report(
        list(records.values()),
        run=run,
        env=environment(cfg.bench.device, command),
        tasks=plain(cfg.task.names),
    )
    for record in report.strategies:
        if record.role == "fused":
            assess(record, checked.judging)
    report.probe_agreement = probe_agreement(
        {r.name: r for r in report.strategies},
        items,
        metrics,
        BASELINE,
        checked.judging.ci_resamples,
        checked.judging.seed,
    )
    write_items(out, items)  # before report.json, whose presence marks the job finished
    path = write_report(report, out)
    print(render_markdown(report))
    print(f"Report: {path.resolve()}  (report.md, pareto.png beside it)")
    check_some_strategy_succeeded(report, out)
    return path


def check_some_strategy_succeeded(report: Report, out: Path) -> None:
    """A run in which every strategy recorded an error, or in which the reference strategy did (every
    ratio and delta is measured against it), lacks its answers: it fails, once its report (which
    lists the errors) is written.

    Raises:
        RuntimeError: naming the report and the first error of the reference, else of the first
            strategy.
    """
    reference = next((r for r in report.strategies if r.name == BASELINE), None)
    if all(record.errors for record in report.strategies):
        record = report.strategies[0]
        first = record.errors[0]
        raise RuntimeError(
            f"every strategy failed (their errors: {out / 'report.md'}); first: {record.name} / "
            f"{first['where']}: {first['error']}"
        )
    if reference is not None and reference.errors:
        first = reference.errors[0]
        raise RuntimeError(
            f"the reference strategy {BASELINE} failed, so the ratios and deltas it anchors are missing "
            f"(errors: {out / 'report.md'}); first: {first['where']}: {first['error']}"
        )
