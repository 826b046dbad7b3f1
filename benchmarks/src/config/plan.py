"""From a composed config to the objects a run needs: the one place that knows the config keys.

Each lower module takes its own options type and names its fields by their own names
(:class:`encoder_fusion.benchmarks.options.OptionError`); every builder here maps those fields to the
config keys they come from (``repeats`` -> ``bench.latency.repeats``), so a bad value is reported by
the key a user typed. The names the schema leaves as strings (tasks, datasets, dtypes, plants) are
checked here against the harness's registries.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import OmegaConf

from encoder_fusion import EncoderSpec
from encoder_fusion.benchmarks.config.schema import (
    BASELINE_ONLY_ROLES,
    BASELINES,
    NO_LLM,
    ROLES,
    LlmConfig,
    conf_dir,
)
from encoder_fusion.benchmarks.datasets import DATASETS, ON_BAD_IMAGE, ImageDataset, build_train_test
from encoder_fusion.benchmarks.features.cache import STORAGE_DTYPES, FeatureCache, extraction_device
from encoder_fusion.benchmarks.features.fingerprint import CONTENT_KEYS
from encoder_fusion.benchmarks.features.planted import PLANTS, PlantOptions
from encoder_fusion.benchmarks.options import OptionError
from encoder_fusion.benchmarks.reports.verdicts import AssessOptions
from encoder_fusion.benchmarks.tasks import TASKS, ProbeRecipe
from encoder_fusion.benchmarks.tasks.vlm import VlmProbeOptions
from encoder_fusion.benchmarks.tasks.vlm_lora import LoraOptions
from encoder_fusion.benchmarks.timing.llm import LlmSpec, VlmOptions, memory_needs
from encoder_fusion.benchmarks.timing.options import DTYPES, LatencyOptions
from encoder_fusion.containers import plain
from encoder_fusion.tiling import TilingSpec

# options field -> the config key it comes from, per options type
LATENCY_KEYS = {
    **{
        f: f"bench.latency.{f}"
        for f in (
            "batch_sizes",
            "warmup",
            "repeats",
            "dtype",
            "compile",
            "streams",
            "target_halfwidth",
            "max_repeats",
        )
    },
    "threads": "bench.threads",
    "device": "bench.device",
    "image_size": "data.image_size",
    "ci_resamples": "bench.ci_resamples",
}
ASSESS_KEYS = {f: f"bench.{f}" for f in ("ci_resamples", "min_detectable_pp", "max_overhead")}
VLM_KEYS = {"prompt_tokens": "bench.prompt_tokens", "decode_tokens": "bench.decode_tokens"}
LLM_KEYS = {f.name: f"llm.{f.name}" for f in dataclasses.fields(LlmSpec)}
RECIPE_KEYS = {f.name: f"task.{f.name}" for f in dataclasses.fields(ProbeRecipe)} | {"device": "bench.device"}
CACHE_KEYS = {
    "dtype": "bench.cache_dtype",
    "batch_size": "bench.extract_batch_size",
    "content_key": "bench.content_key",
}
PLANT_KEYS = {"noise": "plant.noise"}
# the share of free memory a language model's weights may take; the rest is for activations, the KV
# cache and the vision encoders
MEMORY_HEADROOM = 0.85


@contextlib.contextmanager
def keyed(keys: Mapping[str, str]) -> Iterator[None]:
    """Report an :class:`OptionError` raised inside by the config keys of its fields."""
    try:
        yield
    except OptionError as error:
        raise error.keyed(keys) from None


def check_names(cfg: Any) -> None:
    """The names the schema leaves as strings, each against the registry that defines it.

    Raises:
        ValueError: naming the key, the value and the accepted names.
    """
    named = [
        ("data.name", cfg.data.name, DATASETS),
        ("bench.cache_dtype", cfg.bench.cache_dtype, STORAGE_DTYPES),
        ("bench.content_key", cfg.bench.content_key, CONTENT_KEYS),
        ("data.on_bad_image", cfg.data.on_bad_image, ON_BAD_IMAGE),
        ("bench.latency.dtype", cfg.bench.latency.dtype, DTYPES),
        *(
            (f"plant.{role}", cfg.plant[role], PLANTS)
            for role in ("clip", "dino")
            if cfg.plant[role] is not None
        ),
        *(("task.names", name, TASKS) for name in plain(cfg.task.names)),
    ]
    for key, value, accepted in named:
        if value not in accepted:
            raise ValueError(f"{key}={value!r} is unknown; accepted: {', '.join(sorted(accepted))}")
    if not cfg.task.names:
        raise ValueError(f"task.names=[] names no probe; accepted: one or more of {', '.join(TASKS)}")


def llm_presets() -> list[str]:
    """The names of the ``llm`` presets (``conf/llm/*.yaml``)."""
    return sorted(p.stem for p in (conf_dir() / "llm").glob("*.yaml"))


def llm_spec(node: Any) -> LlmSpec | None:
    """The :class:`LlmSpec` of an ``llm`` config node; None for ``none``.

    Raises:
        ValueError: a field missing or out of range (the message names its key).
    """
    data = plain(node)
    if data["name"] == NO_LLM:
        return None
    missing = [key for key, value in data.items() if value is None and key != "weights"]
    if missing:
        raise ValueError(f"llm={data['name']!r} leaves {missing} unset; only llm=none may leave fields null")
    with keyed(LLM_KEYS):
        return LlmSpec(**data)


def llm_preset(name: str, what: str = "llm preset") -> LlmSpec:
    """The :class:`LlmSpec` of the preset ``conf/llm/<name>.yaml``.

    Raises:
        ValueError: ``name`` is not a preset with a language model; the message names ``what`` and
            lists the accepted ones.
    """
    presets = [p for p in llm_presets() if p != NO_LLM]
    if name not in presets:
        raise ValueError(f"{what} {name!r} is not a language-model preset; accepted: {', '.join(presets)}")
    preset = OmegaConf.load(conf_dir() / "llm" / f"{name}.yaml")
    spec = llm_spec(OmegaConf.merge(OmegaConf.structured(LlmConfig), preset))
    assert spec is not None  # the presets with a model were picked above
    return spec


def check_fits(spec: LlmSpec, dtype: torch.dtype, device: torch.device) -> None:
    """Refuse, before building it, a language model whose weights cannot fit in ``device``'s free
    memory.

    Raises:
        ValueError: the estimate (parameters x bytes), the memory available, and the way out.
    """
    params, width, free = memory_needs(spec, dtype, device)
    needed = params * width
    if needed > MEMORY_HEADROOM * free:
        raise ValueError(
            f"llm={spec.name} does not fit: {params / 1e9:.2f}B parameters x {width} bytes ({dtype}) = "
            f"{needed / 2**30:.1f} GiB of weights, but {free / 2**30:.1f} GiB of {device.type} memory is "
            f"available ({MEMORY_HEADROOM:.0%} of it may hold weights). Run a smaller llm (e.g. "
            f"llm=qwen2_5_0_5b) and list {spec.name} in bench.project_llms to project its time to "
            "first token from the prefill rate measured here."
        )


def with_options(node: Any) -> dict:
    """``{"kind": k, **options}`` from a ``{kind, options}`` node: the form the fusion registries take."""
    data = plain(node)
    return {"kind": data["kind"], **data.get("options", {})}


def used_roles(cfg: Any) -> tuple[str, ...]:
    """The pair's roles, then each baseline-only role that ``fusion.baselines`` lists.

    Raises:
        ValueError: ``radio_only`` listed without ``encoders/radio``.
    """
    listed = plain(cfg.fusion.baselines)
    extra = tuple(role for role in BASELINE_ONLY_ROLES if BASELINES[role] in listed)
    for role in extra:
        if cfg.encoders[role] is None:
            raise ValueError(
                f"fusion.baselines lists {BASELINES[role]} but encoders.{role} is not set; accepted: "
                f"choose one, e.g. encoders/{role}=radio_v3_b"
            )
    return ROLES + extra


def encoder_specs(cfg: Any) -> dict[str, EncoderSpec]:
    """role -> :class:`EncoderSpec` from ``encoders.<role>`` and ``hooks.<role>``, for the roles the
    run uses: the pair, and ``radio`` when ``fusion.baselines`` lists ``radio_only``.

    Raises:
        ValueError: a field the spec rejects (the message names it), or ``radio_only`` without
            ``encoders/radio``.
    """
    return {
        role: EncoderSpec.from_any({**plain(cfg.encoders[role]), "hooks": plain(cfg.hooks[role])})
        for role in used_roles(cfg)
    }


@dataclass(frozen=True)
class Strategy:
    """One row of a report: a name, whether it is a baseline, the roles it fuses, its head config."""

    name: str
    role: str
    encoders: tuple[str, ...]
    head: dict

    def key(self) -> str:
        """A short digest of the strategy's config (baselines of different sweep jobs compare by it)."""
        text = json.dumps([self.encoders, self.head], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def head_config(cfg: Any, roles: tuple[str, ...]) -> dict:
    """The :class:`encoder_fusion.FusionHead` keyword arguments (less geometries) of ``cfg`` for ``roles``.

    A single encoder keeps the alignment, layer combine, normalisation, its DeepStack layers and the
    connector of the fused strategy, with a plain channel concat (the identity for one encoder) and no
    ``merge_dim``: the baseline differs from the fused strategy only in the second encoder.
    """
    single = len(roles) == 1
    grid = plain(cfg.align.grid)
    deepstack = plain(cfg.fusion.deepstack_layers)
    return {
        "grid": None if grid is None else list(grid),
        "align": with_options(cfg.align),
        "layer_merge": with_options(cfg.fusion.layer_merge),
        "encoder_merge": {"kind": "channel_concat"} if single else with_options(cfg.fusion.encoder_merge),
        "connector": {
            **with_options(cfg.connector),
            "out_dim": connector_out_dim(cfg),
            "final_norm": cfg.connector.final_norm,
        },
        "merge_dim": None if single else cfg.fusion.merge_dim,
        "normalize": cfg.fusion.normalize,
        "deepstack_layers": {cfg.encoders[r].name: deepstack[r] for r in roles if deepstack.get(r)},
    }


def connector_out_dim(cfg: Any) -> int | None:
    """``connector.out_dim`` (by default ``llm.hidden_size``: the width the language model's
    embeddings have).

    Raises:
        ValueError: an ``out_dim`` set to a width the language model cannot take.
    """
    spec = llm_spec(cfg.llm)
    out_dim = cfg.connector.out_dim
    if spec is not None and out_dim != spec.hidden_size:
        raise ValueError(
            f"connector.out_dim={out_dim} cannot feed llm={spec.name} (hidden size {spec.hidden_size}); "
            f"accepted: {spec.hidden_size} (the default, ${{llm.hidden_size}}), or llm=none"
        )
    return out_dim


def strategies(cfg: Any) -> list[Strategy]:
    """The strategies of a run: the baselines of ``fusion.baselines`` (CLIP-only first), then
    ``cfg.fusion`` unless it is itself a single-encoder strategy (then the baselines are the whole run).

    Raises:
        ValueError: ``fusion.encoders`` empty or naming a role twice; ``fusion.baselines`` without
            ``clip_only`` or naming one twice.
    """
    roles = tuple(plain(cfg.fusion.encoders))
    if not roles or len(set(roles)) != len(roles):
        raise ValueError(f"fusion.encoders={list(roles)} must name each of {list(ROLES)} at most once")
    listed = plain(cfg.fusion.baselines)
    if BASELINES["clip"] not in listed or len(set(listed)) != len(listed):
        raise ValueError(
            f"fusion.baselines={listed} must list clip_only (the reference of every ratio and change) "
            f"and each baseline at most once; accepted: {', '.join(BASELINES.values())}"
        )
    by_name = {name: role for role, name in BASELINES.items()}
    ordered = sorted(listed, key=lambda name: name != BASELINES["clip"])  # CLIP-only first
    used_roles(cfg)  # radio_only needs its encoder
    runs = [
        Strategy(name, "baseline", (by_name[name],), head_config(cfg, (by_name[name],))) for name in ordered
    ]
    if len(roles) > 1:
        runs.append(Strategy(cfg.fusion.name, "fused", roles, head_config(cfg, roles)))
    names = [s.name for s in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"fusion.name={cfg.fusion.name!r} collides with a baseline name {names}")
    return runs


def latency_options(cfg: Any) -> LatencyOptions:
    """:class:`LatencyOptions` from ``bench.latency``, ``bench.device``, ``bench.threads`` and the
    load size ``data.image_size``.

    Raises:
        ValueError: as :class:`LatencyOptions`, naming the config key.
    """
    latency = plain(cfg.bench.latency)
    with keyed(LATENCY_KEYS):
        return LatencyOptions(
            batch_sizes=tuple(latency["batch_sizes"]),
            warmup=latency["warmup"],
            repeats=latency["repeats"],
            dtype=latency["dtype"],
            compile=latency["compile"],
            streams=latency["streams"],
            threads=cfg.bench.threads,
            device=cfg.bench.device,
            image_size=cfg.data.image_size,
            seed=cfg.seed,
            ci_resamples=cfg.bench.ci_resamples,
            target_halfwidth=latency["target_halfwidth"],
            max_repeats=latency["max_repeats"],
        )


def assess_options(cfg: Any) -> AssessOptions:
    """:class:`AssessOptions` from ``bench`` and ``seed``.

    Raises:
        ValueError: as :class:`AssessOptions`, naming the config key.
    """
    with keyed(ASSESS_KEYS):
        return AssessOptions(
            ci_resamples=cfg.bench.ci_resamples,
            min_detectable_pp=cfg.bench.min_detectable_pp,
            max_overhead=cfg.bench.max_overhead,
            seed=cfg.seed,
        )


def vlm_options(cfg: Any) -> VlmOptions:
    """:class:`VlmOptions` from ``llm`` and ``bench`` (prompt and decode tokens, projections).

    Raises:
        ValueError: as :class:`VlmOptions`, a ``bench.project_llms`` entry that is not a preset, or
            more DeepStack token sets than the language model has layers.
    """
    spec = llm_spec(cfg.llm)
    sets = sum(len(layers) for layers in plain(cfg.fusion.deepstack_layers).values())
    if spec is not None and sets > spec.num_layers:
        raise ValueError(
            f"fusion.deepstack_layers={plain(cfg.fusion.deepstack_layers)} gives {sets} DeepStack token "
            f"sets, one per decoder layer, but llm={spec.name} has {spec.num_layers} layers; accepted: "
            f"at most {spec.num_layers} sets"
        )
    project = tuple(llm_preset(name, "bench.project_llms entry") for name in plain(cfg.bench.project_llms))
    with keyed(VLM_KEYS):
        return VlmOptions(
            llm=spec,
            prompt_tokens=cfg.bench.prompt_tokens,
            decode_tokens=cfg.bench.decode_tokens,
            project=project,
        )


# LoRA's own fields (rank, alpha, ...) are named under task.vlm.lora
VLM_PROBE_KEYS = {field: f"task.vlm.{field}" for field in ("templates", "options", "generate", "lora")} | {
    f.name: f"task.vlm.lora.{f.name}" for f in dataclasses.fields(LoraOptions)
}


def vlm_probe_options(cfg: Any, llm: LlmSpec | None) -> VlmProbeOptions | None:
    """The VLM probe's questions when ``task.names`` holds ``vlm`` (else None).

    Raises:
        ValueError: ``vlm`` without a language model (``llm=none``), or bad ``task.vlm`` values.
    """
    if "vlm" not in plain(cfg.task.names):
        return None
    if llm is None:
        raise ValueError(
            f"task.names={plain(cfg.task.names)} holds vlm, which trains the fusion head against a language "
            "model, but llm=none; accepted: an llm preset (tiny, qwen2_5_0_5b, ...)"
        )
    with keyed(VLM_PROBE_KEYS):
        return VlmProbeOptions(**plain(cfg.task.vlm))


def tiling_spec(cfg: Any) -> TilingSpec | None:
    """The ``tiling`` group's :class:`TilingSpec`; None for ``tiling=none`` (a null grid).

    Raises:
        ValueError: a bad tiling field, named as its ``tiling.`` key.
    """
    tiling = plain(cfg.tiling)
    if tiling["grid"] is None:
        return None
    try:
        return TilingSpec.from_any(tiling)
    except ValueError as error:
        raise ValueError(str(error).replace("tiling ", "tiling.", 1)) from None


def probe_recipe(cfg: Any) -> ProbeRecipe:
    """The probes' :class:`ProbeRecipe` from ``task`` and ``bench.device``.

    Raises:
        ValueError: a recipe value out of range (the message names its ``task.`` key).
    """
    task = plain(cfg.task)
    fields = [f.name for f in dataclasses.fields(ProbeRecipe) if f.name != "device"]
    with keyed(RECIPE_KEYS):
        return ProbeRecipe(**{key: task[key] for key in fields}, device=cfg.bench.device)


def feature_cache(cfg: Any) -> FeatureCache:
    """The feature cache ``bench`` describes (its folder made on first write, not here).

    Raises:
        ValueError: a bad ``bench.cache_dtype`` or ``bench.extract_batch_size``.
    """
    with keyed(CACHE_KEYS):
        return FeatureCache(
            cfg.bench.cache_dir,
            dtype=cfg.bench.cache_dtype,
            content_key=cfg.bench.content_key,
            batch_size=cfg.bench.extract_batch_size,
            device=extraction_device(cfg.bench.device),
            progress=cfg.bench.progress,
        )


def plant_options(cfg: Any) -> PlantOptions:
    """What ``plant`` plants in place of each role's features.

    Raises:
        ValueError: a bad ``plant.noise``.
    """
    with keyed(PLANT_KEYS):
        return PlantOptions(clip=cfg.plant.clip, dino=cfg.plant.dino, noise=cfg.plant.noise)


def build_datasets(cfg: Any) -> tuple[ImageDataset, ImageDataset]:
    """The train and test datasets that ``cfg.data`` and ``cfg.seed`` describe (file lists and
    annotations read; no image decoded).

    Raises:
        ValueError, FileNotFoundError: as :func:`encoder_fusion.benchmarks.datasets.build_train_test`.
    """
    data = plain(cfg.data)
    if data["root"] is not None and not DATASETS[data["name"]].NEEDS_ROOT:
        readers = sorted(name for name, dataset in DATASETS.items() if dataset.NEEDS_ROOT)
        raise ValueError(
            f"data.root={data['root']} is not read by data={data['name']}, which makes its own images; "
            f"accepted: select the data that reads it ({', '.join(f'data={r}' for r in readers)}), or "
            "leave data.root unset"
        )
    return build_train_test(
        data["name"],
        data["root"],
        limit=data["limit"],
        test_fraction=data["test_fraction"],
        seed=cfg.seed,
        require=data["require"],
        **data["options"],
    )
