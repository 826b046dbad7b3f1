"""Every setting of a run checked before any encoder runs or any image is read.

A bad value must end a run within seconds, naming the key, the value and what is accepted, not after
feature extraction or as the only rows of a report. :func:`check_config` checks the settings alone:
keys the schema does not have however they were added (``+task.epoch=3``), the names the schema
leaves as strings, every builder of :mod:`encoder_fusion.benchmarks.config.plan` (the probes' recipe,
the feature cache, the planted signal, the timing and judging options), the language model's memory,
and the data: both datasets built (file lists and annotations read, no image decoded), both
splits non-empty, and every task's annotation present in both splits with at least two classes. Once
the encoders are built (none has run), :func:`check_heads` checks what needs their geometry: the
load size against each encoder's patch, and the fusion head of every strategy (alignment grids,
merges, connector widths), each built once and discarded.

The builders raise the errors; this module only decides that they all run first, and returns what
they built (:class:`CheckedRun`) so that nothing is built or checked twice.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch

from encoder_fusion import EncoderGeometry, EncoderSpec, FusionHead
from encoder_fusion.benchmarks.config.plan import (
    Strategy,
    assess_options,
    build_datasets,
    check_fits,
    check_names,
    encoder_specs,
    feature_cache,
    keyed,
    latency_options,
    plant_options,
    probe_recipe,
    strategies,
    tiling_spec,
    vlm_options,
    vlm_probe_options,
)
from encoder_fusion.benchmarks.config.schema import RunConfig
from encoder_fusion.benchmarks.datasets import ImageDataset
from encoder_fusion.benchmarks.features.cache import CACHE_ENV, FeatureCache
from encoder_fusion.benchmarks.features.planted import PlantOptions
from encoder_fusion.benchmarks.options import is_int
from encoder_fusion.benchmarks.reports.verdicts import AssessOptions
from encoder_fusion.benchmarks.tasks import TASKS, ProbeRecipe
from encoder_fusion.benchmarks.tasks.correspondence import WarpOptions
from encoder_fusion.benchmarks.tasks.knn import check_k
from encoder_fusion.benchmarks.tasks.probe import MAX_SEED
from encoder_fusion.benchmarks.tasks.vlm import (
    TEMPLATE_ANNOTATIONS,
    VlmProbeOptions,
    answer_phrases,
    label_mask_classes,
)
from encoder_fusion.benchmarks.tasks.vlm_lora import linear_layer_names
from encoder_fusion.benchmarks.tasks.vlm_text import text_coder
from encoder_fusion.benchmarks.timing.llm import LlmSpec, VlmOptions, meta_model
from encoder_fusion.benchmarks.timing.llm_weights import check_checkpoint, load_tokenizer
from encoder_fusion.benchmarks.timing.options import DTYPES, LatencyOptions
from encoder_fusion.containers import plain
from encoder_fusion.encoders import Encoder
from encoder_fusion.io import check_writable_folder
from encoder_fusion.kernels import kernel_choice
from encoder_fusion.memory import check_fits as check_memory
from encoder_fusion.tiling import AUTO, TilingSpec


@dataclass
class CheckedRun:
    """What :func:`check_config` built: the run uses these instead of building them again."""

    strategies: list[Strategy]
    encoders: dict[str, EncoderSpec]
    latency: LatencyOptions
    vlm: VlmOptions
    judging: AssessOptions
    probe: ProbeRecipe
    plants: PlantOptions
    cache: FeatureCache
    train: ImageDataset
    test: ImageDataset
    vlm_probe: VlmProbeOptions | None = None  # the VLM probe's questions, when task.names holds vlm
    knn_k: int = 10  # the k-NN probe's neighbours per vote
    warp: WarpOptions = dataclasses.field(default_factory=WarpOptions)  # the correspondence probe's
    tiling: TilingSpec | None = None  # how the timed pipelines tile each image (None: whole)


def schema_of(hint: Any) -> type | None:
    """The dataclass a field's type names (``X`` or ``X | None``), or None (a value, or a free dict)."""
    found = [arg for arg in (hint, *typing.get_args(hint)) if isinstance(arg, type)]
    return next((arg for arg in found if dataclasses.is_dataclass(arg)), None)


def unknown_key(data: Mapping, schema: type, prefix: str = "") -> tuple[str, Any, list[str]] | None:
    """The first key of ``data`` that ``schema`` (a dataclass) does not have, recursing into nested
    schemas: ``(dotted key, its value, the keys accepted there)``; None when there is none. Free
    dicts (``options``, ``model_kwargs``) are left to the code that reads them."""
    hints = typing.get_type_hints(schema)
    for key, value in data.items():
        if key not in hints:
            return f"{prefix}{key}", value, list(hints)
        inner = schema_of(hints[key])
        if inner is not None and isinstance(value, Mapping):
            found = unknown_key(value, inner, f"{prefix}{key}.")
            if found is not None:
                return found
    return None


def check_keys(cfg: Any) -> None:
    """Refuse a key the schema does not have. Hydra checks plain overrides against the schema, but
    lets ``+key=value`` and ``++key=value`` add any key.

    Raises:
        ValueError: naming the key, its value and the keys accepted beside it.
    """
    data = {key: value for key, value in plain(cfg).items() if key != "hydra"}
    found = unknown_key(data, RunConfig)
    if found is not None:
        key, value, accepted = found
        section = key.rpartition(".")[0] or "the top level"
        raise ValueError(f"{key}={value!r} is not a setting; accepted under {section}: {', '.join(accepted)}")


def check_splits(cfg: Any, train: ImageDataset, test: ImageDataset, tasks: Sequence[str]) -> None:
    """Both splits hold images, and each task's annotation is on some image of each split, with at
    least two classes where the task classifies.

    Raises:
        ValueError: naming the data settings or the task, and what would be accepted.
    """
    name = train.name
    if not len(train) or not len(test):
        data = plain(cfg.data)
        raise ValueError(
            f"data={name} gives {len(train)} train and {len(test)} test images (data.limit={data['limit']}, "
            f"data.test_fraction={data['test_fraction']}, data.options={data['options']}); accepted: "
            "settings that leave at least one image in each split"
        )

    def annotated(task: str) -> bool:
        needed = TASKS[task].ANNOTATION
        return all(any(split.has(r, needed) for r in split.records) for split in (train, test))

    usable = [task for task in TASKS if annotated(task) and train.class_count(TASKS[task].ANNOTATION) != 1]
    for task in tasks:
        needed = TASKS[task].ANNOTATION
        if not annotated(task):
            raise ValueError(
                f"task.names={list(tasks)}: {task} needs a {needed} on each image it reads, and no image "
                f"of a data={name} split has one; accepted for this data: {usable}"
            )
        if train.class_count(needed) == 1:
            names = (train.classes if needed == "label" else train.mask_classes) or []
            raise ValueError(
                f"task.names={list(tasks)}: {task} needs at least 2 {needed} classes, and data={name} "
                f"({train.root}) has 1 ({', '.join(names)}); accepted: data with 2 or more {needed} classes"
            )


def check_config(cfg: Any) -> CheckedRun:
    """Check every setting of ``cfg`` that needs no built encoder (see the module docstring).

    Raises:
        ValueError, FileNotFoundError: the first bad setting, named with its value and what is accepted.
    """
    check_keys(cfg)
    check_names(cfg)
    if not is_int(cfg.seed) or not 0 <= cfg.seed <= MAX_SEED:
        raise ValueError(f"seed={cfg.seed!r} must be an int in [0, {MAX_SEED}] (2**63 - 1)")
    plan, encoders = strategies(cfg), encoder_specs(cfg)
    latency, vlm, judging = latency_options(cfg), vlm_options(cfg), assess_options(cfg)
    compares = plain(cfg.bench.mode) == "compare"
    if vlm.llm is not None and vlm.llm.weights is not None:
        check_checkpoint(vlm.llm)
    if compares and vlm.llm is not None and not cfg.bench.extract_only:
        check_fits(vlm.llm, DTYPES[latency.dtype] or torch.float32, torch.device(latency.device))
    probe, plants, cache = probe_recipe(cfg), plant_options(cfg), feature_cache(cfg)
    check_environment(cfg, cache, [probe.device, latency.device, cache.device])
    train, test = build_datasets(cfg)
    check_splits(cfg, train, test, plain(cfg.task.names))
    check_image_memory(cfg.data.image_size, train, test)
    vlm_probe = vlm_probe_options(cfg, vlm.llm)
    if vlm_probe is not None and vlm.llm is not None:
        check_vlm_probe(vlm_probe, vlm.llm, train, test)
    knn_k = check_knn(cfg, train)
    with keyed(
        {f.name: f"task.correspondence.{f.name}" for f in dataclasses.fields(WarpOptions)}
        | {"warp": "task.correspondence"}
    ):
        warp = WarpOptions(**plain(cfg.task.correspondence))
    tiling = tiling_spec(cfg)
    if tiling is not None:
        check_tiled_run(cfg, plants)
    return CheckedRun(
        plan,
        encoders,
        latency,
        vlm,
        judging,
        probe,
        plants,
        cache,
        train,
        test,
        vlm_probe,
        knn_k,
        warp,
        tiling,
    )


def check_image_memory(size: int, train: ImageDataset, test: ImageDataset) -> None:
    """The splits are decoded whole at ``data.image_size``: uint8 pixels, and a long class per pixel
    where the data has masks. Refuse a size whose batches the machine cannot hold.

    Raises:
        ValueError: naming ``data.image_size``, the estimate and the free memory.
    """
    images = len(train) + len(test)
    masks = any(split.has(r, "mask") for split in (train, test) for r in split.records)
    check_memory(
        f"data.image_size={size} ({images} images decoded at {size}x{size}"
        f"{', with their masks' if masks else ''})",
        images * size * size * (3 + (8 if masks else 0)),
        "a data.image_size the machine can hold (224 to 1024 are usual), or fewer images (data.limit)",
    )


def check_environment(cfg: Any, cache: FeatureCache, devices: Sequence[Any]) -> None:
    """What the environment decides, before any image is read: ``FUSION_KERNEL`` can run on the run's
    devices, and the feature cache's folder can be written (named by the setting that chose it).

    Raises:
        ValueError: naming the environment variable or setting, and what is accepted.
    """
    kernel_choice(devices)
    if cfg.bench.cache_dir:
        source = "bench.cache_dir"
    elif os.environ.get(CACHE_ENV):
        source = CACHE_ENV
    else:
        source = f"the default feature cache (bench.cache_dir and {CACHE_ENV} unset)"
    check_writable_folder(cache.root, source)


def check_tiled_run(cfg: Any, plants: PlantOptions) -> None:
    """What a tiled run cannot measure is refused: the probes read every image's tiles, and no tile has
    a planted signal (it is planted per whole image), a warped twin (the correspondence probe warps the
    whole image) or a layer scan (which reads whole images).

    Raises:
        ValueError: naming the setting and what is accepted.
    """
    accepted = "accepted: tiling=none, or"
    mode = plain(cfg.bench.mode)
    if mode != "compare":
        raise ValueError(f"tiling applies to bench.mode=compare, got bench.mode={mode}; {accepted} that mode")
    if "correspondence" in plain(cfg.task.names):
        raise ValueError(
            f"task.names={plain(cfg.task.names)}: the correspondence probe warps whole images, which "
            f"tiling cuts; {accepted} task.names without correspondence"
        )
    planted = [f"plant.{role}={plants.of(role)}" for role in ("clip", "dino") if plants.of(role) is not None]
    if planted:
        raise ValueError(
            f"{', '.join(planted)} plants a signal per whole image, which tiling cuts into regions; "
            f"{accepted} plant.clip=null and plant.dino=null"
        )


def check_knn(cfg: Any, train: ImageDataset) -> int:
    """``task.knn.k``: an int >= 1, and, when the k-NN probe runs, no more than the train images.

    Raises:
        ValueError: naming ``task.knn.k``, the value and what is accepted.
    """
    with keyed({"k": "task.knn.k"}):
        k = check_k(cfg.task.knn.k)
    if "knn" in plain(cfg.task.names) and k > len(train):
        raise ValueError(
            f"task.knn.k={k} is larger than the {len(train)} train images of data={train.name}; accepted: "
            f"k <= {len(train)}"
        )
    return k


def check_vlm_probe(options: VlmProbeOptions, llm: LlmSpec, train: ImageDataset, test: ImageDataset) -> None:
    """Every question's annotations are on some image of each split, ``size`` finds the labels'
    classes among the mask's, the questions and answers fit the language model's vocabulary (or its
    checkpoint's tokenizer), and LoRA's target modules are layers of the language model.

    Raises:
        ValueError, FileNotFoundError: naming the setting, the data, and what is accepted.
    """
    for kind, question in options.templates.items():
        for needed in TEMPLATE_ANNOTATIONS[kind]:
            if not all(any(split.has(r, needed) for r in split.records) for split in (train, test)):
                raise ValueError(
                    f"task.vlm.templates.{kind}={question!r} asks from each image's {needed}, and no "
                    f"image of a data={train.name} split has one; accepted: templates of the annotations "
                    "this data has"
                )
    mask_classes = train.mask_classes or []
    if "size" in options.templates and not bool((label_mask_classes(train.classes, mask_classes) >= 0).any()):
        raise ValueError(
            f"task.vlm.templates.size measures the labelled object's class in the mask, and no class of the "
            f"data={train.name} labels names a mask class; accepted: data whose label and mask classes share "
            "names, or templates without size"
        )
    texts = [*options.templates.values(), *(" " + p for p in answer_phrases(train.classes, mask_classes))]
    text_coder(load_tokenizer(llm), texts, llm.vocab_size - 1)
    if options.lora.enabled:
        linear = linear_layer_names(meta_model(llm))
        unknown = [name for name in options.lora.target_modules if name not in linear]
        if unknown:
            raise ValueError(
                f"task.vlm.lora.target_modules={list(options.lora.target_modules)}: {unknown} are not "
                f"layers of llm={llm.name}; accepted: {', '.join(linear)}"
            )


def check_heads(
    cfg: Any, encoders: Iterable[Encoder], heads: Iterable[tuple[str, list[EncoderGeometry], dict]]
) -> None:
    """Check what needs the built encoders, before any of them runs: raw images of ``data.image_size``
    cover one patch of every encoder, and every fusion head builds.

    Args:
        encoders: the built encoders.
        heads: ``(what, geometries, FusionHead keyword arguments)`` of every head the run trains.

    Raises:
        ValueError: naming the setting, or the head and its error.
    """
    size = cfg.data.image_size
    tiling = tiling_spec(cfg)
    for encoder in encoders:
        if size < encoder.stride:
            raise ValueError(
                f"data.image_size={size} is smaller than one {encoder.stride}-pixel patch of encoder "
                f"{encoder.spec.name!r} ({encoder.spec.model}); accepted: data.image_size >= {encoder.stride}"
            )
        if tiling is not None and tiling.grid != AUTO:
            rows, cols = cast("tuple[int, int]", tiling.grid)
            if size // max(rows, cols) < encoder.stride:
                raise ValueError(
                    f"tiling.grid={[rows, cols]} cuts data.image_size={size} images into "
                    f"{size // rows}x{size // cols} tiles, smaller than one {encoder.stride}-pixel patch of "
                    f"encoder {encoder.spec.name!r}; accepted: data.image_size >= "
                    f"{encoder.stride * max(rows, cols)}, or a smaller grid"
                )
    for what, geometries, head in heads:
        try:
            FusionHead(geometries, **head)
        except (ValueError, TypeError) as error:
            raise ValueError(f"{what} (set by align.*, fusion.*, connector.*): {error}") from error


def strategy_heads(plan: Sequence[Strategy], encoders: Mapping[str, Encoder]):
    """``(what, geometries, head)`` of every strategy of a comparison, for :func:`check_heads`."""
    for strategy in plan:
        geometries = [EncoderGeometry.of(encoders[role]) for role in strategy.encoders]
        yield f"the fusion head of strategy {strategy.name!r}", geometries, strategy.head
