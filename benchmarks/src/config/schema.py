"""The structured config of ``fusion-bench``, registered with Hydra's ConfigStore: a leaf that
imports no other module of the harness.

The schema (:class:`RunConfig`) is the first entry of ``conf/config.yaml``'s defaults, so every group
file and every command-line override is merged into typed dataclasses: a misspelt key or a wrong
type fails at composition, naming the key. Fields naming a strategy of :mod:`encoder_fusion` (the
library below the harness) are Enums built from its registries (``align.kind=bilinaer`` fails listing
the accepted names). Fields naming something of the harness (a task, a dataset, a dtype, a planted
signal) are strings: :mod:`encoder_fusion.benchmarks.config.plan` checks them against the harness's
own registries at start, before any encoder runs, so the schema needs none of them.

Two encoder roles: ``clip`` (the language-aligned encoder: CLIP or SigLIP, and the baseline every
ratio and accuracy change is measured against) and ``dino`` (the self-supervised one).
"""

# The Enums of the fields below are built at import from the library's registries, so a type checker
# sees each as a variable of type Any, not a class; the fields' types are checked by OmegaConf instead.
# pyright: reportInvalidTypeForm=false

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

from encoder_fusion.align import ALIGNERS
from encoder_fusion.combine import LAYER_COMBINES
from encoder_fusion.connector import CONNECTORS
from encoder_fusion.containers import plain
from encoder_fusion.encoders.base import ON_MISSING, SOURCES
from encoder_fusion.hooks import NORMS, PREFIX_POLICIES
from encoder_fusion.merge import ENCODER_MERGES


def choices(name: str, names: tuple[str, ...] | list[str]) -> Any:
    """An Enum whose members are ``names`` (each member's value is its name); typed Any, since its
    members are known only once the registries are read."""
    return Enum(name, {n: n for n in names})


ROLES = ("clip", "dino")
# an encoder that is only ever a baseline: one distilled encoder (C-RADIO) against the fused pair
BASELINE_ONLY_ROLES = ("radio",)
# the strategy every ratio and accuracy change is measured against
BASELINE = "clip_only"
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
HubMode = choices("HubMode", ("auto", "offline", "online"))
BenchMode = choices("BenchMode", ("compare", "layer_scan"))
NO_LLM = "none"
# an OmegaConf interpolation, resolved to an int when the config is read (typed Any, like MISSING)
LLM_WIDTH: Any = "${llm.hidden_size}"


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
    out_dim: int | None = LLM_WIDTH
    final_norm: bool = False
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class LoraConfig:
    """:class:`encoder_fusion.benchmarks.tasks.vlm_lora.LoraOptions` (``task.vlm.lora``)."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class VlmProbeConfig:
    """The stage-1 VLM probe's questions (``task.vlm``): template kind (``class``, ``where``,
    ``size``, ``present``) -> question text, the answer options per question, greedy generation
    with exact match besides the multiple choice, and LoRA on the language model (rank 0: none)."""

    templates: dict[str, str] = field(default_factory=lambda: {"class": "what is in the image ?"})
    options: int = 4
    generate: bool = False
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class KnnProbeConfig:
    """The k-NN probe (``task.knn``): neighbours per vote."""

    k: int = 10


@dataclass
class CorrespondenceProbeConfig:
    """The correspondence probe's warp and PCK threshold (``task.correspondence``; see
    :class:`encoder_fusion.benchmarks.tasks.correspondence.WarpOptions`)."""

    rotate: float = 10.0
    scale: float = 0.8
    shift: list[float] = field(default_factory=lambda: [0.1, 0.0])
    flip: bool = False
    threshold: float = 1.0


@dataclass
class TaskConfig:
    """Which probes run and their training recipe (group ``task``)."""

    names: list[str] = field(default_factory=lambda: ["classification"])
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    epochs: int = 10
    lr: float = 3e-3
    batch_size: int = 32
    weight_decay: float = 0.01
    vlm: VlmProbeConfig = field(default_factory=VlmProbeConfig)
    knn: KnnProbeConfig = field(default_factory=KnnProbeConfig)
    correspondence: CorrespondenceProbeConfig = field(default_factory=CorrespondenceProbeConfig)


@dataclass
class DataConfig:
    """The dataset (group ``data``); ``root`` None reads ``$FUSION_DATA``; ``image_size`` is the square
    size images are loaded at (each encoder then applies its own preprocessing); ``require`` keeps only
    images carrying these annotations (``label``, ``mask``, ``box``); ``on_bad_image``: ``stop`` (an image
    that cannot be decoded stops the run, naming its file) or ``skip`` (it is left out, and the report
    counts and names what was skipped)."""

    name: str = "synthetic"
    root: str | None = None
    limit: int | None = None
    test_fraction: float = 0.25
    image_size: int = 224
    require: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    on_bad_image: str = "stop"


@dataclass
class LatencyConfig:
    """:class:`encoder_fusion.benchmarks.timing.options.LatencyOptions` (device and image size come
    from ``bench`` / ``data``)."""

    batch_sizes: list[int] = field(default_factory=lambda: [1])
    warmup: int = 2
    repeats: int = 10
    dtype: str = "fp32"
    compile: bool = False
    streams: bool = False
    # go on past repeats until every overhead interval is within +-target_halfwidth of its ratio, or
    # until max_repeats rounds (then the report says the timing is unstable); null: stop at repeats
    target_halfwidth: float | None = 0.03
    max_repeats: int = 50


@dataclass
class LlmConfig:
    """The language model the visual tokens feed (group ``llm``): a decoder-only architecture built
    with random weights from these numbers (:class:`encoder_fusion.benchmarks.timing.llm.LlmSpec`).
    ``name: none``
    measures the vision pipeline alone; its ``hidden_size`` is only the width the connector emits, and its
    other fields are null."""

    name: str = NO_LLM
    family: str | None = None
    hidden_size: int | None = None
    num_layers: int | None = None
    num_heads: int | None = None
    num_kv_heads: int | None = None
    intermediate_size: int | None = None
    vocab_size: int | None = None
    tie_embeddings: bool | None = None
    # a checkpoint of this model: a local transformers folder or a hub repo id; null: random weights
    weights: str | None = None


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
    ``max_overhead``: a TTFT budget against CLIP-only (null: none). ``content_key``: how the feature
    cache knows an image file is unchanged: ``full`` hashes every byte on every run, ``quick`` trusts a
    recorded hash while the file's size, modification time and end blocks are unchanged (for datasets
    too big to read twice; see :mod:`encoder_fusion.benchmarks.features.fingerprint`).
    """

    mode: BenchMode = BenchMode.compare
    device: str = "cpu"
    threads: int | None = None
    cache_dir: str | None = None
    cache_dtype: str = "float32"
    content_key: str = "full"
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
    :mod:`encoder_fusion.benchmarks.features.planted`): ``clip`` and ``dino`` each null (the encoder's own
    features),
    ``class`` or ``location``; ``noise`` is the std of the noise added per channel."""

    clip: str | None = None
    dino: str | None = None
    noise: float = 0.5


@dataclass
class TilingConfig:
    """Tiled images (group ``tiling``; :class:`encoder_fusion.tiling.TilingSpec`): ``grid`` null reads
    each image whole (``none``), ``[rows, cols]`` or ``auto`` cuts it into tiles, each through the
    whole pipeline, with the whole image's tokens ``first``, ``last`` or ``none``."""

    grid: Any = None
    thumbnail: str = "last"
    max_tiles: int = 6
    newline: bool = False


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
    tiling: TilingConfig = field(default_factory=TilingConfig)
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


def conf_dir() -> Path:
    """The Hydra config folder: the copy a wheel ships inside this package
    (``encoder_fusion/benchmarks/conf``), else ``conf/`` of the checkout (an editable install, whose
    package lives in ``benchmarks/src``)."""
    here = Path(__file__).resolve().parent
    shipped = here.parent / "conf"
    return shipped if shipped.is_dir() else here.parents[2] / "conf"


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


register_configs()
