"""Layer scan (``fusion-bench experiment=layer_scan``): accuracy by depth for every encoder and task,
from one pass per encoder over the data, and the vision latency to reach each depth.

Each encoder is built hooked at every block and runs once over the train and test images; its grids go to
the feature cache, one tensor per layer. When every task's head reads only the mean token
(classification), the grids are pooled as each batch is extracted, so the features held take ``images x
depth x C`` values instead of ``images x depth x h x w x C`` (at 4 bytes each; ViT-B on 10,000 images:
0.5 GB pooled against 72 GB of grids). Then, for each layer and task, a probe (the configured connector
over that one layer, bilinear alignment, the task head) trains on the train split; its test metric gets a
95 % interval by resampling the test items (:func:`encoder_fusion.benchmarks.reports.stats.metric_ci`).
The latency to reach depth ``i`` is the forward time of the encoder built hooked at ``i`` alone, so the
blocks after it never run, timed round-robin over the depths.

Recommended hooks per encoder: for each task, the best layer and the shallowest layer whose mean lies
within the best layer's interval; the union over tasks, sorted.
"""

from __future__ import annotations

import dataclasses
import logging
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from encoder_fusion import EncoderGeometry, FusionHead
from encoder_fusion.benchmarks.config.checks import CheckedRun, check_heads
from encoder_fusion.benchmarks.config.plan import head_config
from encoder_fusion.benchmarks.config.schema import config_hash
from encoder_fusion.benchmarks.reports.figures import save_whole
from encoder_fusion.benchmarks.reports.render import random_weights_notice, skipped_lines
from encoder_fusion.benchmarks.reports.report import environment
from encoder_fusion.benchmarks.reports.stats import metric_ci, stats
from encoder_fusion.benchmarks.run.prepare import (
    cached_grids,
    decoded_splits,
    image_source,
    job_overrides,
    phase,
)
from encoder_fusion.benchmarks.tasks import TASKS, FeatureSplit, ProbeRecipe, run_probe
from encoder_fusion.benchmarks.timing.options import LatencyOptions
from encoder_fusion.benchmarks.timing.timer import Timer, fixed_threads, random_images, round_robin
from encoder_fusion.containers import plain
from encoder_fusion.encoders import Encoder, EncoderSpec, build_encoder
from encoder_fusion.io import atomic_path, atomic_write, write_json
from encoder_fusion.kernels import finite_checks

log = logging.getLogger(__name__)

FILES = ("layer_scan.json", "layer_scan.md", "layer_scan.png")


def encoder_depth(encoder: Encoder) -> int:
    """The number of blocks (stages, for a convolutional tower) that hooks index.

    Raises:
        ValueError: the adapter does not say (no positive int ``depth``).
    """
    depth = getattr(encoder, "depth", None)
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
        raise ValueError(
            f"layer_scan cannot determine the depth of encoder {encoder.spec.name!r} "
            f"({encoder.spec.source} {encoder.spec.model}): depth={depth!r}; accepted: encoders whose "
            "adapter reports a block count (timm, open_clip and transformers towers)"
        )
    return depth


def hooked_at(spec: EncoderSpec, layers: Sequence[int]) -> EncoderSpec:
    """``spec`` with its hooks moved to ``layers`` (norm and prefix policy kept)."""
    return dataclasses.replace(spec, hooks=dataclasses.replace(spec.hooks, layers=tuple(layers)))


def scan_encoder(spec: EncoderSpec) -> Encoder:
    """The encoder of ``spec`` hooked at every block.

    Raises:
        ValueError: as :func:`encoder_depth`.
    """
    torch.manual_seed(0)
    depth = encoder_depth(build_encoder(hooked_at(spec, [-1])))
    torch.manual_seed(0)
    return build_encoder(hooked_at(spec, range(depth)))


def depth_latency(spec: EncoderSpec, depth: int, options: LatencyOptions) -> list[float]:
    """Median milliseconds of the forward (preprocess included) of ``spec`` pruned after each depth,
    the depths timed round-robin with the batch and repeats of ``options``."""
    device = torch.device(options.device)
    images = random_images(options.batch_sizes[0], options.image_size, options.seed, device)
    calls = {}
    for layer in range(depth):
        torch.manual_seed(0)
        encoder = build_encoder(hooked_at(spec, [layer])).to(device)
        calls[str(layer), "forward"] = lambda e=encoder: e.forward_grids(e.preprocess(images))
    with fixed_threads(options.threads), torch.inference_mode():
        samples = round_robin(Timer(device), calls, warmup=options.warmup, repeats=options.repeats)
    return [stats(samples[str(layer), "forward"])["median"] for layer in range(depth)]


def recommend(layers: Sequence[Mapping], tasks: Sequence[str]) -> list[int]:
    """For each task, the best layer and the shallowest whose mean lies within the best's interval;
    their union, sorted."""
    chosen = set()
    for task in tasks:
        scored = [(row["layer"], row["tasks"][task]) for row in layers if row["tasks"].get(task)]
        if not scored:
            continue
        best_layer, best = max(scored, key=lambda pair: pair[1]["mean"])
        chosen.add(best_layer)
        chosen.add(min(layer for layer, result in scored if result["mean"] >= best["ci"][0]))
    return sorted(chosen)


def probe_layers(
    encoder: Encoder,
    grids: Mapping[str, list[torch.Tensor]],
    batches: Mapping[str, dict],
    num_classes: Mapping[str, int],
    head: Mapping,
    recipe: ProbeRecipe,
    tasks: Sequence[str],
    resamples: int,
) -> tuple[list[dict], list[dict]]:
    """Per layer, each task's test metric and interval; returns ``(layers, errors)``."""
    rows, errors = [], []
    for layer in range(len(grids["train"])):
        # a layer's own grid and width: a convolutional tower's stages differ in both
        _, height, width, channels = grids["train"][layer].shape
        geometry = EncoderGeometry(encoder.spec.name, channels, (height, width), 1)
        row: dict[str, Any] = {"layer": layer, "tasks": {}}
        for task in tasks:
            train, test = (
                FeatureSplit(
                    grids=[[grids[which][layer]]],
                    labels=batches[which]["labels"],
                    masks=batches[which]["masks"],
                    boxes=batches[which]["boxes"],
                    num_classes=num_classes[task],
                )
                for which in ("train", "test")
            )
            try:
                make_head = lambda g=geometry: FusionHead([g], **head)
                result = run_probe(task, make_head, train, test, recipe)
            except Exception as error:  # one task's failure must not lose the others
                log.error(
                    "layer scan %s / %d / %s failed:\n%s",
                    encoder.spec.name,
                    layer,
                    task,
                    traceback.format_exc(),
                )
                errors.append(
                    {
                        "where": f"{encoder.spec.name}:{layer}:{task}",
                        "error": f"{type(error).__name__}: {error}",
                    }
                )
                continue
            assert result.item_stats is not None  # run_probe always measures them
            interval = metric_ci(result.item_stats, TASKS[task].metric_from_sums, resamples)
            row["tasks"][task] = {"metric": result.metric, "mean": result.mean, "ci": interval}
        rows.append(row)
    return rows, errors


def render_markdown(scan: Mapping, notice: str) -> str:
    """``layer_scan.md``: per encoder, a row per layer (each task's metric and interval, latency) and
    the recommended hooks."""
    lines = [notice, ""] if notice else []
    lines += [
        "# encoder-fusion layer scan",
        "",
        f"Command: `{scan['environment'].get('command')}` · {scan['environment'].get('device')}  ",
        f"Features {'pooled to the mean token' if scan['pooled'] else 'as grids'}: "
        f"{scan['feature_bytes'] / 2**20:.1f} MB held. Metric in %, [95 % interval over test items]; "
        "latency: median ms to reach that depth (the blocks after it pruned).",
        "",
    ]
    for name, encoder in scan["encoders"].items():
        tasks = list(dict.fromkeys(t for row in encoder["layers"] for t in row["tasks"]))
        lines += [f"## {name} ({encoder['depth']} blocks): recommended hooks {encoder['recommended']}", ""]
        header = ["layer", *tasks, "latency ms"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in encoder["layers"]:
            cells = [str(row["layer"])]
            for task in tasks:
                result = row["tasks"].get(task)
                low, high = result["ci"] if result else (0.0, 0.0)
                cells.append(
                    "error"
                    if result is None
                    else f"{100 * result['mean']:.1f} [{100 * low:.1f}, {100 * high:.1f}]"
                )
            cells.append(f"{row['latency_ms']:.2f}")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    skipped = skipped_lines(scan.get("skipped_images"))
    if skipped:
        lines += [*skipped, ""]
    if scan["errors"]:
        lines += ["## Errors", "", *[f"- {e['where']}: {e['error']}" for e in scan["errors"]], ""]
    return "\n".join(lines)


def plot(scan: Mapping, path: Path, title_prefix: str) -> None:
    """``layer_scan.png``: per task, metric and its interval band by depth for every encoder, and the
    latency to reach each depth."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tasks = list(
        dict.fromkeys(t for e in scan["encoders"].values() for row in e["layers"] for t in row["tasks"])
    )
    figure = Figure(figsize=(4.8 * (len(tasks) + 1), 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(tasks) + 1, squeeze=False)[0]
    for index, (name, encoder) in enumerate(scan["encoders"].items()):
        color = f"C{index}"
        for axis, task in zip(axes, tasks):
            rows = [row for row in encoder["layers"] if task in row["tasks"]]
            depth = [row["layer"] for row in rows]
            mean = [100 * row["tasks"][task]["mean"] for row in rows]
            low = [100 * row["tasks"][task]["ci"][0] for row in rows]
            high = [100 * row["tasks"][task]["ci"][1] for row in rows]
            axis.plot(depth, mean, marker="o", color=color, label=name)
            axis.fill_between(depth, low, high, color=color, alpha=0.2)
            axis.set_title(task)
            axis.set_xlabel("block")
            axis.set_ylabel(f"{task} (%)")
        axes[-1].plot(
            [row["layer"] for row in encoder["layers"]],
            [row["latency_ms"] for row in encoder["layers"]],
            marker="o",
            color=color,
            label=name,
        )
    axes[-1].set_title("vision latency to reach the block")
    axes[-1].set_xlabel("block")
    axes[-1].set_ylabel("ms")
    for axis in axes:
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(f"{title_prefix}accuracy by depth (bands: 95 % intervals)")
    with atomic_path(path) as temp:
        save_whole(figure, temp, dpi=100)


def write(scan: Mapping, out: Path, notice: str, title_prefix: str) -> Path:
    """Write the three files into ``out`` (the JSON last); returns the JSON's path."""
    out.mkdir(parents=True, exist_ok=True)
    plot(scan, out / "layer_scan.png", title_prefix)
    atomic_write(out / "layer_scan.md", render_markdown(scan, notice))
    return write_json(out / "layer_scan.json", scan)


def layer_geometry(encoder: Encoder, layer: int) -> EncoderGeometry:
    """The geometry of one layer of an encoder read alone (its own width and grid: a ConvNeXt's
    stages differ in both)."""
    info = encoder.layers[layer]
    height, width = encoder.image_size
    return EncoderGeometry(
        encoder.spec.name, info.channels, (height // info.reduction, width // info.reduction), 1
    )


def run_layer_scan(cfg: Any, checked: CheckedRun, out: Path, command: str | None) -> Path:
    """``experiment=layer_scan`` (see :mod:`encoder_fusion.benchmarks.run.layer_scan`): every encoder
    hooked at every block, one pass over the data each, a probe per layer and task, latency by depth.

    Returns:
        The path of ``layer_scan.json``.
    """
    tasks = plain(cfg.task.names)
    pooled = all(TASKS[task].POOLED for task in tasks)
    seconds: dict[str, float] = {}
    with phase("encoders", seconds):
        encoders = {role: scan_encoder(spec) for role, spec in checked.encoders.items()}
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
    loaded = decoded_splits(cfg.data, checked.train, checked.test)
    datasets = {which: dataset for which, (dataset, _, _) in loaded.items()}
    batches = {which: batch for which, (_, batch, _) in loaded.items()}
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
        "skipped_images": {which: skipped for which, (_, _, skipped) in loaded.items()},
    }
    for role, encoder in encoders.items():
        name = encoder.spec.name
        with phase(f"layer scan of {name}", seconds):
            grids = {
                which: cached_grids(checked.cache, encoder, sources[which], batches[which], pool=pooled)
                for which in datasets
            }
            scan["feature_bytes"] += sum(g.numel() * g.element_size() for gs in grids.values() for g in gs)
            with finite_checks():  # as the compare mode's probes: a NaN feature is named
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
    path = write(scan, out, random_weights_notice(random), "RANDOM WEIGHTS - " if random else "")
    print((out / "layer_scan.md").read_text(encoding="utf-8"))
    print(f"Layer scan: {path.resolve()}  (layer_scan.md, layer_scan.png beside it)")
    return path
