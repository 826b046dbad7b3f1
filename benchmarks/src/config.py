"""Structured configs of ``fusion-bench``, registered with Hydra's ConfigStore, and the builders that
turn a composed config into the objects a run needs.

The schema (:class:`RunConfig`) is the first entry of ``conf/config.yaml``'s defaults, so every group
file and every command-line override is merged into typed dataclasses: a misspelt key or a wrong
type fails at composition, naming the key. Strategy, dataset, task and enum-like fields are Enums
built from the registries of :mod:`fusion` and :mod:`benchmarks` (``align.kind=bilinaer`` fails
listing the accepted names), so a name a registry gains is accepted here too.

Two encoder roles: ``clip`` (the language-aligned encoder: CLIP or SigLIP, and the baseline every
ratio and accuracy change is measured against) and ``dino`` (the self-supervised one).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from encoder_fusion import EncoderSpec
from encoder_fusion.align import ALIGNERS
from encoder_fusion.benchmarks.assess import AssessOptions
from encoder_fusion.benchmarks.datasets import DATASETS, ImageDataset, build_train_test
from encoder_fusion.benchmarks.features import STORAGE_DTYPES
from encoder_fusion.benchmarks.latency import DTYPES, LatencyOptions
from encoder_fusion.benchmarks.llm import FAMILIES, LlmSpec, VlmOptions
from encoder_fusion.benchmarks.planted import PLANTS
from encoder_fusion.benchmarks.records import BASELINE
from encoder_fusion.benchmarks.tasks import TASKS
from encoder_fusion.benchmarks.tasks.probe import check_recipe
from encoder_fusion.combine import LAYER_COMBINES
from encoder_fusion.connector import CONNECTORS
from encoder_fusion.containers import plain
from encoder_fusion.encoders.base import ON_MISSING, SOURCES
from encoder_fusion.hooks import NORMS, PREFIX_POLICIES
from encoder_fusion.merge import ENCODER_MERGES


def choices(name: str, names: tuple[str, ...] | list[str]) -> type[Enum]:
    """An Enum whose members are ``names`` (each member's value is its name)."""
    return Enum(name, {n: n for n in names})


ROLES = ("clip", "dino")
# an encoder that is only ever a baseline: one distilled encoder (C-RADIO) against the fused pair
BASELINE_ONLY_ROLES = ("radio",)
BASELINES = {"clip": BASELINE, "dino": "dino_only", "radio": "radio_only"}
Baseline = choices("Baseline", tuple(BASELINES.values()))
Role = choices("Role", ROLES)
Source = choices("Source", SOURCES)
OnMissing = choices("OnMissing", ON_MISSING)
Norm = choices("Norm", NORMS)
Prefix = choices("Prefix", PREFIX_POLICIES)
AlignKind = choices("AlignKind", ALIGNERS.names())
LayerMergeKind = choices("LayerMergeKind", LAYER_COMBINES.names())
EncoderMergeKind = choices("EncoderMergeKind", ENCODER_MERGES.names())
ConnectorKind = choices("ConnectorKind", CONNECTORS.names())
TaskName = choices("TaskName", sorted(TASKS))
DatasetName = choices("DatasetName", sorted(DATASETS))
LatencyDtype = choices("LatencyDtype", tuple(DTYPES))
CacheDtype = choices("CacheDtype", tuple(STORAGE_DTYPES))
HubMode = choices("HubMode", ("auto", "offline", "online"))
LlmFamily = choices("LlmFamily", tuple(FAMILIES))
Plant = choices("Plant", PLANTS)
BenchMode = choices("BenchMode", ("compare", "layer_scan"))
NO_LLM = "none"


@dataclass
class HookConfig:
    """One encoder's hooked layers (:class:`encoder_fusion.HookSpec`)."""

    layers: list[int] = field(default_factory=lambda: [-2])
    norm: Norm = Norm.pre
    prefix: Prefix = Prefix.drop


@dataclass
class HooksConfig:
    """The hooks of every role (group ``hooks``)."""

    clip: HookConfig = field(default_factory=HookConfig)
    dino: HookConfig = field(default_factory=HookConfig)
    radio: HookConfig = field(default_factory=HookConfig)


@dataclass
class EncoderConfig:
    """One encoder (:class:`encoder_fusion.EncoderSpec` without its hooks, which come from
    ``hooks.<role>``)."""

    name: str = MISSING
    source: Source = MISSING
    model: str = MISSING
    weights: str | None = None
    image_size: int | None = None
    on_missing: OnMissing = OnMissing.random
    model_kwargs: dict[str, Any] | None = None


@dataclass
class EncodersConfig:
    """The pair (group ``encoders``; the singles are its subgroups ``encoders/clip``, ``encoders/dino``)
    and, for the ``radio_only`` baseline, one distilled encoder (``encoders/radio``, null by default)."""

    clip: EncoderConfig = MISSING
    dino: EncoderConfig = MISSING
    radio: EncoderConfig | None = None


@dataclass
class AlignConfig:
    """Alignment onto the target grid (group ``align``); ``grid`` None takes the first encoder's."""

    kind: AlignKind = AlignKind.bilinear
    grid: list[int] | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class LayerMergeConfig:
    kind: LayerMergeKind = LayerMergeKind.weighted_ln
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class EncoderMergeConfig:
    kind: EncoderMergeKind = EncoderMergeKind.channel_concat
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class DeepStackConfig:
    """Per role, some of its hooked layers (as ``hooks.<role>.layers`` writes them), each an extra
    DeepStack token set (:mod:`encoder_fusion.deepstack`); empty lists for none."""

    clip: list[int] = field(default_factory=list)
    dino: list[int] = field(default_factory=list)


@dataclass
class FusionConfig:
    """A fusion strategy (group ``fusion``): which roles it merges and how. ``normalize``: layer-
    normalise each hooked layer (false: raw block outputs). ``baselines``: the single-encoder rows
    measured beside it; ``clip_only`` is the reference of every ratio and change, and ``radio_only``
    needs ``encoders/radio``."""

    name: str = MISSING
    encoders: list[Role] = field(default_factory=lambda: [Role.clip, Role.dino])
    layer_merge: LayerMergeConfig = field(default_factory=LayerMergeConfig)
    encoder_merge: EncoderMergeConfig = field(default_factory=EncoderMergeConfig)
    merge_dim: int | None = None
    normalize: bool = True
    deepstack_layers: DeepStackConfig = field(default_factory=DeepStackConfig)
    baselines: list[Baseline] = field(default_factory=lambda: [Baseline.clip_only, Baseline.dino_only])


@dataclass
class ConnectorConfig:
    """The projector to the language model's width (group ``connector``); ``out_dim`` follows
    ``llm.hidden_size`` unless set."""

    kind: ConnectorKind = ConnectorKind.mlp
    out_dim: int | None = "${llm.hidden_size}"
    final_norm: bool = False
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class TaskConfig:
    """Which probes run and their training recipe (group ``task``)."""

    names: list[TaskName] = field(default_factory=lambda: [TaskName.classification])
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    epochs: int = 10
    lr: float = 3e-3
    batch_size: int = 32
    weight_decay: float = 0.01


@dataclass
class DataConfig:
    """The dataset (group ``data``); ``root`` None reads ``$FUSION_DATA``; ``image_size`` is the square
    size images are loaded at (each encoder then applies its own preprocessing); ``require`` keeps only
    images carrying these annotations (``label``, ``mask``, ``box``)."""

    name: DatasetName = DatasetName.synthetic
    root: str | None = None
    limit: int | None = None
    test_fraction: float = 0.25
    image_size: int = 224
    require: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class LatencyConfig:
    """:class:`encoder_fusion.benchmarks.latency.LatencyOptions` (device and image size come from ``bench`` /
    ``data``)."""

    batch_sizes: list[int] = field(default_factory=lambda: [1])
    warmup: int = 2
    repeats: int = 10
    dtype: LatencyDtype = LatencyDtype.fp32
    compile: bool = False
    streams: bool = False


@dataclass
class LlmConfig:
    """The language model the visual tokens feed (group ``llm``): a decoder-only architecture built
    with random weights from these numbers (:class:`encoder_fusion.benchmarks.llm.LlmSpec`). ``name: none``
    measures the vision pipeline alone; its ``hidden_size`` is only the width the connector emits, and its
    other fields are null."""

    name: str = NO_LLM
    family: LlmFamily | None = None
    hidden_size: int | None = None
    num_layers: int | None = None
    num_heads: int | None = None
    num_kv_heads: int | None = None
    intermediate_size: int | None = None
    vocab_size: int | None = None
    tie_embeddings: bool | None = None


@dataclass
class BenchConfig:
    """Where and how a run executes (group ``bench``).

    ``hub``: ``auto`` goes offline (``HF_HUB_OFFLINE=1``) when huggingface.co cannot be reached, so
    a machine without hub access does not wait on retries; ``offline`` always; ``online`` never.
    ``mode``: ``compare`` (the strategies against CLIP-only) or ``layer_scan`` (accuracy by depth,
    ``experiment=layer_scan``). ``extract_only``: fill the feature cache and stop (under
    ``torchrun``, sharded over the processes), so that a sweep after it runs no encoder.
    ``prompt_tokens``, ``decode_tokens``: the text tokens after the visual ones in the prefill, and the
    greedy steps timed after it. ``project_llms``: ``llm`` presets too big to run here, whose time to
    first token is projected from the prefill rate measured with ``llm``.
    ``ci_resamples``: bootstrap resamples of every interval; ``min_detectable_pp``: the smallest
    accuracy change worth detecting (the report says when the test split is too small for it);
    ``max_overhead``: a TTFT budget against CLIP-only (null: none).
    """

    mode: BenchMode = BenchMode.compare
    device: str = "cpu"
    threads: int | None = None
    cache_dir: str | None = None
    cache_dtype: CacheDtype = CacheDtype.float32
    extract_batch_size: int = 32
    progress: bool = True
    hub: HubMode = HubMode.auto
    out_dir: str | None = None
    extract_only: bool = False
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    prompt_tokens: int = 32
    decode_tokens: int = 16
    project_llms: list[str] = field(default_factory=lambda: ["qwen2_5_7b", "llama3_8b"])
    ci_resamples: int = 2000
    min_detectable_pp: float = 1.0
    max_overhead: float | None = None


@dataclass
class PlantConfig:
    """Planted-signal features in place of an encoder's (``experiment=planted``; see
    :mod:`encoder_fusion.benchmarks.planted`): ``clip`` and ``dino`` each null (the encoder's own features),
    ``class`` or ``location``; ``noise`` is the std of the noise added per channel."""

    clip: Plant | None = None
    dino: Plant | None = None
    noise: float = 0.5


@dataclass
class RunConfig:
    """The whole configuration of one ``fusion-bench`` run."""

    encoders: EncodersConfig = MISSING
    hooks: HooksConfig = field(default_factory=HooksConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    fusion: FusionConfig = MISSING
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    llm: LlmConfig = field(default_factory=LlmConfig)
    plant: PlantConfig = field(default_factory=PlantConfig)
    seed: int = 0


SCHEMA_NAME = "run_schema"
# hex digits of config_hash that name a sweep job's folder: 48 bits, no collision in any real sweep
FOLDER_HASH_DIGITS = 12


def job_folder_name(*, _root_: Any) -> str:
    """Resolver ``${config_hash:}`` (``hydra.sweep.subdir``): the leading digits of the job's
    :func:`config_hash`, so a config always lands in its own folder of a sweep, whatever the order
    of the values or the sweep it comes from."""
    task = OmegaConf.masked_copy(_root_, [key for key in _root_ if key != "hydra"])
    return config_hash(task)[:FOLDER_HASH_DIGITS]


def run_id() -> str:
    """Resolver ``${run_id:}`` (``hydra.run.dir``, ``hydra.sweep.dir``): this process's id, so two runs
    started in the same second never share a folder; under ``torchrun`` the launcher's, so that all
    ranks of one run share it. Cached, so a sweep's jobs resolve their sweep's value."""
    return str(os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else os.getpid())


def register_configs() -> None:
    """Register :class:`RunConfig` as ``run_schema`` (the first default of ``conf/config.yaml``) and the
    resolvers that ``conf/config.yaml`` names its output folders with."""
    ConfigStore.instance().store(name=SCHEMA_NAME, node=RunConfig)
    OmegaConf.register_new_resolver("config_hash", job_folder_name, replace=True)
    OmegaConf.register_new_resolver("run_id", run_id, use_cache=True, replace=True)


register_configs()


# -- builders ---------------------------------------------------------------------------------------
def conf_dir() -> Path:
    """The Hydra config folder: the copy a wheel ships inside this package
    (``encoder_fusion/benchmarks/conf``), else ``conf/`` of the checkout (an editable install, whose
    package lives in ``benchmarks/src``)."""
    here = Path(__file__).resolve().parent
    shipped = here / "conf"
    return shipped if shipped.is_dir() else here.parents[1] / "conf"


def llm_presets() -> list[str]:
    """The names of the ``llm`` presets (``conf/llm/*.yaml``)."""
    return sorted(p.stem for p in (conf_dir() / "llm").glob("*.yaml"))


def llm_spec(node: Any) -> LlmSpec | None:
    """The :class:`LlmSpec` of an ``llm`` config node; None for ``none``.

    Raises:
        ValueError: a field missing or out of range (the message names it).
    """
    data = plain(node)
    if data["name"] == NO_LLM:
        return None
    missing = [key for key, value in data.items() if value is None]
    if missing:
        raise ValueError(f"llm={data['name']!r} leaves {missing} unset; only llm=none may leave fields null")
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
    node = OmegaConf.merge(OmegaConf.structured(LlmConfig), preset)
    return llm_spec(node)


def with_options(node: Any) -> dict:
    """``{"kind": k, **options}`` from a ``{kind, options}`` node: the form the fusion registries take."""
    data = plain(node)
    return {"kind": data["kind"], **data.get("options", {})}


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
        ValueError: as :class:`LatencyOptions`.
    """
    latency = plain(cfg.bench.latency)
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
    )


def assess_options(cfg: Any) -> AssessOptions:
    """:class:`AssessOptions` from ``bench`` and ``seed``.

    Raises:
        ValueError: as :class:`AssessOptions`.
    """
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
    return VlmOptions(
        llm=spec,
        prompt_tokens=cfg.bench.prompt_tokens,
        decode_tokens=cfg.bench.decode_tokens,
        project=tuple(llm_preset(name, "bench.project_llms entry") for name in plain(cfg.bench.project_llms)),
    )


def probe_settings(cfg: Any) -> dict:
    """Keyword arguments of :func:`encoder_fusion.benchmarks.tasks.run_probe` from ``task`` and
    ``bench.device``.

    Raises:
        ValueError: a recipe value out of range (the message names its ``task.`` key).
    """
    task = plain(cfg.task)
    recipe = {key: task[key] for key in ("seeds", "epochs", "lr", "batch_size", "weight_decay")}
    check_recipe(**recipe, where="task.")
    return {**recipe, "device": cfg.bench.device}


def build_datasets(cfg: Any) -> tuple[ImageDataset, ImageDataset]:
    """The train and test datasets that ``cfg.data`` and ``cfg.seed`` describe (file lists and
    annotations read; no image decoded).

    Raises:
        ValueError, FileNotFoundError: as :func:`encoder_fusion.benchmarks.datasets.build_train_test`.
    """
    data = plain(cfg.data)
    return build_train_test(
        data["name"],
        data["root"],
        limit=data["limit"],
        test_fraction=data["test_fraction"],
        seed=cfg.seed,
        require=data["require"],
        **data["options"],
    )


# keys that say where or how loudly a run happens, not what it computes
NOT_HASHED = (("bench", "out_dir"), ("bench", "progress"), ("bench", "cache_dir"), ("bench", "extract_only"))


def config_hash(cfg: Any) -> str:
    """A sha256 of the resolved config without its output and cache locations: two jobs with the same
    hash compute the same result (a resumed sweep skips a job whose hash already has a report)."""
    data = plain(cfg)
    data = {key: value for key, value in data.items() if key != "hydra"}
    for section, key in NOT_HASHED:
        data.get(section, {}).pop(key, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
