"""One benchmark run: build the pair, extract (or read cached) features, train and evaluate the probes of
every strategy, time every pipeline, write the reports.

The strategies of a run are the CLIP-only and DINOv2-only baselines and the configured fusion (see
:func:`encoder_fusion.benchmarks.config.strategies`). Every setting is checked before any encoder runs or any
image is read (:mod:`encoder_fusion.benchmarks.validate`). A failure in one strategy or one task at run time
is recorded in the report with its error; what every strategy needs (the dataset, the encoders) ends the run,
and so does a run in which every strategy failed, once its report is written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import os
import socket
import time
import traceback
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from encoder_fusion import EncoderGeometry, FusedEncoder, FusionHead
from encoder_fusion.benchmarks.assess import add_delta_intervals, assess
from encoder_fusion.benchmarks.config import (
    Strategy,
    config_hash,
    encoder_specs,
    head_config,
    used_roles,
)
from encoder_fusion.benchmarks.datasets import ImageDataset, load_batch
from encoder_fusion.benchmarks.features import FeatureCache
from encoder_fusion.benchmarks.latency import LatencyOptions, fixed_threads, measure_latency
from encoder_fusion.benchmarks.layer_scan import depth_latency, probe_layers, recommend, scan_encoder
from encoder_fusion.benchmarks.layer_scan import write as write_layer_scan
from encoder_fusion.benchmarks.llm import VlmOptions
from encoder_fusion.benchmarks.planted import planted_grids
from encoder_fusion.benchmarks.records import BASELINE, Report, StrategyRecord
from encoder_fusion.benchmarks.render import random_weights_notice
from encoder_fusion.benchmarks.report import build_report, environment, render_markdown, write_report
from encoder_fusion.benchmarks.tasks import TASKS, FeatureSplit, run_probe
from encoder_fusion.benchmarks.validate import CheckedRun, check_config, check_heads, strategy_heads
from encoder_fusion.containers import plain
from encoder_fusion.encoders import Encoder, build_encoder

log = logging.getLogger(__name__)

HUB_HOST = ("huggingface.co", 443)
HUB_TIMEOUT_S = 3.0


def hub_reachable() -> bool:
    """Whether a TCP connection to huggingface.co opens within a few seconds."""
    try:
        socket.create_connection(HUB_HOST, timeout=HUB_TIMEOUT_S).close()
        return True
    except OSError:
        return False


def configure_hub(mode: str) -> None:
    """Apply ``bench.hub``: ``offline`` (or ``auto`` with the hub out of reach) sets ``HF_HUB_OFFLINE=1``,
    so weight lookups go straight to the local caches instead of waiting on network retries.

    Raises:
        ValueError: an unknown mode.
    """
    if mode not in ("auto", "offline", "online"):
        raise ValueError(f"bench.hub={mode!r} is unknown; accepted: auto, offline, online")
    if mode == "online" or os.environ.get("HF_HUB_OFFLINE"):
        return
    if mode == "offline" or not hub_reachable():
        log.info("model hub %s not used (bench.hub=%s): HF_HUB_OFFLINE=1", HUB_HOST[0], mode)
        os.environ["HF_HUB_OFFLINE"] = "1"


@contextlib.contextmanager
def phase(name: str, seconds: dict[str, float]) -> Iterator[None]:
    """Log a phase of the run and record its wall time (seconds) under ``name``."""
    log.info("%s ...", name)
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[name] = round(time.perf_counter() - start, 2)
        log.info("%s took %.1f s", name, seconds[name])


def init_distributed() -> int | None:
    """Join the process group ``torchrun`` describes (gloo, so CPU processes can shard extraction);
    returns this process's rank, or None when running alone."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist.get_rank()


def error_text(error: BaseException) -> str:
    """``Type: message`` of an exception, as reports show it."""
    return f"{type(error).__name__}: {error}"


@dataclasses.dataclass
class Split:
    """One split's raw batch and its per-role grids (None where extraction failed)."""

    dataset: ImageDataset
    batch: dict
    grids: dict[str, list[torch.Tensor] | None]

    def features(self, roles: tuple[str, ...], task: str) -> FeatureSplit:
        """The probe input of ``task`` for the encoders ``roles``."""
        return FeatureSplit(
            grids=[self.grids[role] for role in roles],
            labels=self.batch["labels"],
            masks=self.batch["masks"],
            boxes=self.batch["boxes"],
            num_classes=self.dataset.class_count(TASKS[task].ANNOTATION),
        )


def build_encoders(cfg: Any) -> dict[str, Encoder]:
    """role -> built encoder; each seeded with ``cfg.seed`` so random weights (and their cache
    entries) are the same in every run of one seed."""
    encoders = {}
    for role, spec in encoder_specs(cfg).items():
        torch.manual_seed(cfg.seed)
        encoders[role] = build_encoder(spec)
    return encoders


def image_source(dataset: ImageDataset, load_size: int, cache: FeatureCache) -> dict:
    """What a split's pixels depend on, for the feature cache key: the dataset's identity, the
    contents of its image files (see :mod:`encoder_fusion.benchmarks.fingerprint`) and the load size."""
    return {
        **dataset.identity(),
        "contents": cache.files.digest(dataset.image_paths()),
        "load_size": load_size,
    }


def cached_grids(
    cache: FeatureCache, encoder: Encoder, source: Mapping, batch: dict, *, pool: bool = False
) -> list[torch.Tensor]:
    """``encoder``'s grids of every image of ``batch`` (a split's :func:`load_batch`), from the cache
    or extracted now."""
    images = batch["images"]
    return cache.grids(encoder, source, list(range(len(images))), lambda idx: images[list(idx)], pool=pool)


def load_splits(cfg: Any, encoders: Mapping[str, Encoder], checked: CheckedRun) -> tuple[dict, dict]:
    """Load the train / test batches and every role's grids (cached).

    Returns:
        ``(splits, role_errors)``: ``{"train": Split, "test": Split}`` and role -> the error that
        stopped its extraction.
    """
    load_size, cache = cfg.data.image_size, checked.cache
    plants = plain(cfg.plant)
    splits, role_errors = {}, {}
    for number, (which, dataset) in enumerate((("train", checked.train), ("test", checked.test))):
        batch = load_batch(dataset, range(len(dataset)), load_size)
        source = image_source(dataset, load_size, cache)
        grids: dict[str, list[torch.Tensor] | None] = {}
        for offset, (role, encoder) in enumerate(encoders.items()):
            if role in role_errors:
                grids[role] = None
                continue
            try:
                if plants.get(role) is not None:
                    grids[role] = planted_grids(
                        plants[role],
                        batch,
                        grid=encoder.grid_size(),
                        width=encoder.width,
                        layers=len(encoder.layer_indices),
                        num_classes=dataset.num_classes,
                        noise=plants["noise"],
                        seed=cfg.seed + offset,
                        noise_seed=cfg.seed + 100 * (number + 1) + offset,
                    )
                    continue
                grids[role] = cached_grids(cache, encoder, source, batch)
            except Exception as error:  # recorded against every strategy using this encoder
                role_errors[role] = f"feature extraction ({which}): {error_text(error)}"
                log.error("feature extraction of %s failed:\n%s", role, traceback.format_exc())
                grids[role] = None
        splits[which] = Split(dataset, batch, grids)
    return splits, role_errors


def head_factory(strategy: Strategy, encoders: Mapping[str, Encoder]):
    """A ``make_head()`` for :func:`run_probe`: a fresh :class:`FusionHead` for the strategy's encoders."""
    geometries = [EncoderGeometry.of(encoders[role]) for role in strategy.encoders]
    return lambda: FusionHead(geometries, **strategy.head)


def strategy_record(
    strategy: Strategy, encoders: Mapping[str, Encoder], plants: Mapping[str, str | None]
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
            encoders[role].spec.name: "planted" if plants.get(role) else encoders[role].weights_loaded
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
    for strategy in checked.strategies:
        record = records[strategy.name]
        missing = [role_errors[r] for r in strategy.encoders if r in role_errors]
        if missing:
            for error in missing:
                record.add_error("features", error)
            continue
        make_head = head_factory(strategy, encoders)
        for task in plain(cfg.task.names):
            try:
                train = splits["train"].features(strategy.encoders, task)
                test = splits["test"].features(strategy.encoders, task)
                started = time.perf_counter()
                result = run_probe(task, make_head, train, test, **checked.probe)
                items[strategy.name, task] = torch.tensor(result.pop("item_stats"), dtype=torch.float64)
                record.accuracy[task] = result
                log.info(
                    "probe %s / %s: %s %.3f in %.1f s",
                    strategy.name,
                    task,
                    result["metric"],
                    result["mean"],
                    time.perf_counter() - started,
                )
            except Exception as error:  # one task's failure must not lose the others
                log.error("probe %s / %s failed:\n%s", strategy.name, task, traceback.format_exc())
                record.accuracy[task] = {"task": task, "mean": None, "std": None}
                record.add_error(f"probe:{task}", error_text(error))
    return items


def run_latency(
    plan: list[Strategy],
    records: dict[str, StrategyRecord],
    encoders,
    options: LatencyOptions,
    vlm: VlmOptions,
) -> None:
    """Time every strategy that builds, all in one run (with the language-model stage of ``vlm``);
    results and errors go into ``records``."""
    pipelines = {}
    for strategy in plan:
        try:
            pipelines[strategy.name] = FusedEncoder(
                [encoders[role] for role in strategy.encoders], **strategy.head
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
    for name, result in results.items():
        for field, value in result.items():
            setattr(records[name], field, value)


def output_dir(cfg: Any, out_dir: str | os.PathLike | None) -> Path:
    """``out_dir``, else ``bench.out_dir``, else the Hydra run folder, else ``outputs/<date>/<time>``."""
    chosen = out_dir or cfg.bench.out_dir
    if chosen is None:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            chosen = HydraConfig.get().runtime.output_dir
        else:
            chosen = Path("outputs") / datetime.datetime.now().strftime("%Y-%m-%d/%H-%M-%S")
    return Path(chosen)


def job_overrides() -> list[str]:
    """The command-line overrides of this Hydra job (empty outside Hydra)."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def run_benchmark(
    cfg: Any, out_dir: str | os.PathLike | None = None, *, command: str | None = None
) -> Path | None:
    """Run one benchmark described by a composed config (see ``conf/``) and write its reports.

    Under ``torchrun`` every process extracts a slice of the features; rank 0 alone then runs the
    probes and the latency and writes the reports. With ``bench.extract_only`` every process stops
    once the features are cached.

    Args:
        cfg: a composed :class:`encoder_fusion.benchmarks.config.RunConfig` (an OmegaConf node).
        out_dir: where the reports go (default: ``bench.out_dir``, else the Hydra run folder).
        command: the command line to stamp into the report (default: this process's).

    Returns:
        The path of ``report.json``; None when no report was written (``extract_only``, or a rank
        other than 0).

    Every setting is checked first (:mod:`encoder_fusion.benchmarks.validate`), before any encoder runs or any
    image is read; then the encoders are built and everything that needs their geometry is checked.

    Raises:
        ValueError, FileNotFoundError: a bad setting (named with its value and what is accepted), or a
            dataset or encoder error that leaves nothing to measure.
        RuntimeError: every strategy failed (their errors are in the report written first).
    """
    checked = check_config(cfg)
    configure_hub(plain(cfg.bench.hub))
    with fixed_threads(cfg.bench.threads):
        return _run(cfg, checked, out_dir, command)


def layer_geometry(encoder: Encoder, layer: int) -> EncoderGeometry:
    """The geometry of one layer of an encoder read alone (its own width and grid: a ConvNeXt's
    stages differ in both)."""
    info = encoder.layers[layer]
    height, width = encoder.image_size
    return EncoderGeometry(
        encoder.spec.name, info.channels, (height // info.reduction, width // info.reduction), 1
    )


def run_layer_scan(cfg: Any, checked: CheckedRun, out: Path, command: str | None) -> Path:
    """``experiment=layer_scan`` (see :mod:`encoder_fusion.benchmarks.layer_scan`): every encoder hooked at
    every block, one pass over the data each, a probe per layer and task, latency by depth.

    Returns:
        The path of ``layer_scan.json``.
    """
    tasks = plain(cfg.task.names)
    pooled = all(TASKS[task].POOLED for task in tasks)
    seconds: dict[str, float] = {}
    with phase("encoders", seconds):
        encoders = {role: scan_encoder(spec) for role, spec in encoder_specs(cfg).items()}
    # one layer at a time, bilinear to the encoder's own grid: what each block carries alone
    heads = {
        role: {
            **head_config(cfg, (role,)),
            "grid": None,
            "align": {"kind": "bilinear"},
            "layer_merge": {"kind": "last"},
        }
        for role in encoders
    }
    check_heads(
        cfg,
        encoders.values(),
        (
            (f"the layer-scan head of {e.spec.name!r} layer {layer}", [layer_geometry(e, layer)], heads[role])
            for role, e in encoders.items()
            for layer in range(e.depth)
        ),
    )
    datasets = {"train": checked.train, "test": checked.test}
    batches = {which: load_batch(d, range(len(d)), cfg.data.image_size) for which, d in datasets.items()}
    sources = {which: image_source(d, cfg.data.image_size, checked.cache) for which, d in datasets.items()}
    num_classes = {task: checked.train.class_count(TASKS[task].ANNOTATION) for task in TASKS}
    scan: dict[str, Any] = {
        "environment": environment(cfg.bench.device, command),
        "run": {**plain(cfg), "overrides": job_overrides(), "config_hash": config_hash(cfg)},
        "weights": {e.spec.name: e.weights_loaded for e in encoders.values()},
        "pooled": pooled,
        "feature_bytes": 0,
        "encoders": {},
        "errors": [],
        "phase_seconds": seconds,
    }
    for role, encoder in encoders.items():
        name = encoder.spec.name
        with phase(f"layer scan of {name}", seconds):
            grids = {
                which: cached_grids(checked.cache, encoder, sources[which], batches[which], pool=pooled)
                for which in datasets
            }
            scan["feature_bytes"] += sum(g.numel() * g.element_size() for gs in grids.values() for g in gs)
            rows, errors = probe_layers(
                encoder,
                grids,
                batches,
                num_classes,
                heads[role],
                checked.probe,
                tasks,
                checked.judging.ci_resamples,
            )
            latency = depth_latency(encoder.spec, encoder.depth, checked.latency)
        for row, milliseconds in zip(rows, latency):
            row["latency_ms"] = milliseconds
        scan["encoders"][name] = {
            "depth": encoder.depth,
            "layers": rows,
            "recommended": recommend(rows, tasks),
        }
        scan["errors"] += errors
    random = sorted(n for n, state in scan["weights"].items() if state == "random")
    path = write_layer_scan(scan, out, random_weights_notice(random), "RANDOM WEIGHTS - " if random else "")
    print((out / "layer_scan.md").read_text(encoding="utf-8"))
    print(f"Layer scan: {path.resolve()}  (layer_scan.md, layer_scan.png beside it)")
    return path


def _run(
    cfg: Any, checked: CheckedRun, out_dir: str | os.PathLike | None, command: str | None
) -> Path | None:
    out = output_dir(cfg, out_dir)
    if plain(cfg.bench.mode) == "layer_scan":
        return run_layer_scan(cfg, checked, out, command)
    seconds: dict[str, float] = {}
    with phase("encoders", seconds):
        encoders = build_encoders(cfg)
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
    records = {s.name: strategy_record(s, encoders, plain(cfg.plant)) for s in checked.strategies}
    with phase("probes", seconds):
        items = run_probes(cfg, checked, records, encoders, splits, role_errors)
        add_delta_intervals(records, items, BASELINE, checked.judging)
    with phase("latency", seconds):
        run_latency(checked.strategies, records, encoders, checked.latency, checked.vlm)
    run = {
        **plain(cfg),
        "overrides": job_overrides(),
        "config_hash": config_hash(cfg),
        "data_sizes": {which: len(split.dataset) for which, split in splits.items()},
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
    path = write_report(report, out)
    print(render_markdown(report))
    print(f"Report: {path.resolve()}  (report.md, pareto.png beside it)")
    check_some_strategy_succeeded(report, out)
    return path


def check_some_strategy_succeeded(report: Report, out: Path) -> None:
    """A run in which every strategy recorded an error answers nothing: it fails, once its report
    (which lists the errors) is written.

    Raises:
        RuntimeError: naming the report and the first strategy's first error.
    """
    if all(record.errors for record in report.strategies):
        record = report.strategies[0]
        first = record.errors[0]
        raise RuntimeError(
            f"every strategy failed (their errors: {out / 'report.md'}); first: {record.name} / "
            f"{first['where']}: {first['error']}"
        )
