"""Every config in conf/ composes through Hydra's compose API and builds what it describes; misspelt
keys, wrong types and unknown names fail at composition, naming the key."""

from __future__ import annotations

import dataclasses
import re
import warnings
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from hydra.plugins.launcher import Launcher
from hydra.utils import get_class
from PIL import Image

from encoder_fusion import EncoderGeometry, FusedEncoder, FusionHead
from encoder_fusion.benchmarks.config.plan import (
    build_datasets,
    encoder_specs,
    head_config,
    latency_options,
    probe_recipe,
    strategies,
)
from encoder_fusion.benchmarks.config.schema import ROLES, config_hash
from encoder_fusion.benchmarks.tasks import TASKS
from encoder_fusion.containers import plain
from encoder_fusion.encoders import build_encoder
from encoder_fusion.encoders.tiny import RECIPES, tiny_spec

CONF = Path(__file__).resolve().parents[2] / "conf"
PLUGIN_LAUNCHERS = ("basic", "joblib", "submitit_local", "submitit_slurm")


def options(group: str) -> list[str]:
    """The option names of a config group folder."""
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def make(*overrides: str, hydra: bool = False):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra)


def test_every_group_has_its_documented_options():
    clips = {"clip_b16", "clip_l14_336", "siglip_b16", "siglip2_b16", "siglip2_so400m16", "pe_core_b16"}
    clips |= {"pe_core_l14", "radio_v3_b", "convnext_b_clip", "tiny_clip", "tiny_siglip2"}
    assert clips <= set(options("encoders/clip"))
    dinos = {f"dinov2_{s}14{r}" for s in "sbl" for r in ("", "_reg4")} | {f"dinov3_{s}16" for s in "sbl"}
    assert dinos | {"tiny_dino_reg", "tiny_dinov3"} <= set(options("encoders/dino"))
    pairs = {"siglip2_b16_dinov3_b16", "siglip2_so400m_dinov3_l16", "pe_core_l14_dinov3_l16"}
    pairs |= {"clip_l14_336_dinov3_l16", "clip_b16_dinov2_s14_reg4", "tiny", "tiny_siglip2_dinov3"}
    assert pairs <= set(options("encoders"))
    assert {
        "penultimate",
        "last3",
        "comm_all",
        "dense_connector_sti",
        "dense_connector_dci",
        "mmfuser",
        "deepstack",
    } <= set(options("hooks"))
    assert {
        "comm",
        "prismatic",
        "eagle",
        "mmvp_interleave",
        "cambrian_like",
        "dense_connector_sti",
        "dense_connector_dci",
        "mmfuser",
        "deepstack",
        "clip_only",
        "dino_only",
    } <= set(options("fusion"))
    assert {"classification", "dense", "localization", "all"} <= set(options("task"))
    assert {"synthetic", "imagefolder", "tinyimagenet", "coco128"} <= set(options("data"))
    assert "smoke" in options("experiment")


def test_the_default_is_the_documented_cpu_job():
    cfg = make()
    specs = encoder_specs(cfg)
    assert (specs["clip"].source, specs["clip"].model, specs["clip"].on_missing) == (
        "open_clip",
        "ViT-B-16",
        "random",
    )
    assert (specs["dino"].model, specs["dino"].on_missing) == ("vit_small_patch14_reg4_dinov2", "random")
    assert plain(cfg.data.name) == "synthetic" and cfg.bench.device == "cpu"
    assert [s.name for s in strategies(cfg)] == ["clip_only", "dino_only", "eagle"]


# words of a model name -> the tiny recipe of its family, first match wins (SigLIP2 before SigLIP)
RECIPE_KINDS = (
    ("siglip2", "siglip2"), ("v2_webli", "siglip2"), ("siglip", "siglip"), ("dinov3", "dinov3"),
    ("dinov2", "dino"), ("pe-core", "pe_core"), ("radio", "radio"), ("convnext", "convnext"),
)  # fmt: skip
# options whose names carry no patch size: the stride of the grid the default hooks (penultimate)
# read; for the ConvNeXt that is stage 2 of 4, a 1/16 grid
STRIDES = {"convnext_b_clip": 16, "radio_v3_b": 16}


def tiny_recipe_kind(spec) -> str:
    model = spec.model.lower()
    return next((kind for word, kind in RECIPE_KINDS if word in model), "clip")


@pytest.mark.parametrize("role", ROLES)
def test_every_single_encoder_builds_its_real_architecture(role):
    """Each single with the source's tiny width and depth (so a ViT-L costs nothing), everything else
    as configured: the library, the model name, the pretrained tag, the input size and patch grid."""
    for name in options(f"encoders/{role}"):
        spec = encoder_specs(make(f"encoders/{role}={name}"))[role]
        kind = tiny_recipe_kind(spec)
        shrunk = {**RECIPES[spec.source, kind].model_kwargs, **(spec.model_kwargs or {})}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # random weights, offline: warned by design
            encoder = build_encoder(dataclasses.replace(spec, model_kwargs=shrunk))
        assert encoder.spec.name == role and encoder.image_size == spec.image_size
        # the patch the option's name promises (clip_l14_336: 14); tiny ones as their recipe
        named = re.search(r"[bsl](\d\d)", name)
        patch = int(named.group(1)) if named else STRIDES.get(name, 14 if kind == "dino" else 16)
        assert encoder.patch_size == patch
        assert encoder.grid_size() == (spec.image_size[0] // patch, spec.image_size[1] // patch)


def test_tiny_singles_are_the_tiny_spec_recipes():
    specs = encoder_specs(make("encoders=tiny"))
    for role, kind in (("clip", "clip"), ("dino", "dino_reg")):
        expected = tiny_spec(kind, role, layers=(-2,))
        assert dataclasses.replace(specs[role], weights=expected.weights) == expected


def test_every_pair_composes_a_clip_and_a_dino():
    for pair in options("encoders"):
        specs = encoder_specs(make(f"encoders={pair}"))
        assert specs["clip"].name == "clip" and specs["dino"].name == "dino"
        dino, clip = specs["dino"].model, specs["clip"].model
        assert any(f in dino for f in ("dinov2", "dinov3")) and not any(
            f in clip for f in ("dinov2", "dinov3")
        )


@pytest.mark.parametrize("hooks", options("hooks"))
def test_every_hooks_preset_resolves_on_a_12_block_encoder(hooks):
    cfg = make(f"hooks={hooks}")
    for role, spec in encoder_specs(cfg).items():
        resolved = spec.hooks.resolve(12, role)
        assert len(resolved) == len(cfg.hooks[role].layers) and max(resolved) <= 11


def head_for(cfg, roles, grids):
    """A FusionHead of ``roles`` over tiny geometries with as many layers as the hooks name."""
    geometries = [
        EncoderGeometry(role, 32 + 8 * i, grid, len(cfg.hooks[role].layers), tuple(cfg.hooks[role].layers))
        for i, (role, grid) in enumerate(zip(roles, grids))
    ]
    return geometries, FusionHead(geometries, **head_config(cfg, roles))


@pytest.mark.parametrize(
    ("group", "name"),
    [("fusion", f) for f in options("fusion")]
    + [("align", a) for a in options("align")]
    + [("connector", c) for c in options("connector")],
)
def test_every_strategy_option_builds_a_head_that_runs(group, name):
    cfg = make("experiment=smoke", f"{group}={name}")
    for strategy in strategies(cfg):
        grids = [(4, 4), (4, 4)][: len(strategy.encoders)]
        geometries, head = head_for(cfg, strategy.encoders, grids)
        inputs = [[torch.randn(2, *g.grid, g.width) for _ in range(g.num_layers)] for g in geometries]
        tokens = head(inputs)
        assert tokens.shape == (2, head.output_tokens, cfg.connector.out_dim)
        assert torch.isfinite(tokens).all()


def test_fusion_presets_bring_their_papers_choices_and_the_command_line_wins():
    assert list(make("fusion=comm").hooks.clip.layers) == list(range(-12, 0))
    assert list(make("fusion=comm", "hooks=last3").hooks.clip.layers) == [-3, -2, -1]
    assert plain(make("fusion=prismatic").connector.kind) == "fused_gelu_mlp"
    comm = make("fusion=comm", "connector.out_dim=96")
    assert comm.fusion.merge_dim == 96  # merges needing one width project to the connector's
    assert [s.name for s in strategies(make("fusion=clip_only"))] == ["clip_only", "dino_only"]


def fused_head(*overrides):
    return strategies(make(*overrides))[-1].head


def test_presets_named_after_papers_compute_what_the_papers_compute():
    # Prismatic and Eagle concatenate raw block outputs; so do Dense Connector and MMFuser's inputs
    for preset in ("prismatic", "eagle", "dense_connector_sti", "dense_connector_dci", "mmfuser"):
        assert fused_head(f"fusion={preset}")["normalize"] is False, preset
    assert fused_head("fusion=comm")["normalize"] is True  # COMM layer-normalises each layer
    sti = make("fusion=dense_connector_sti")
    assert list(sti.hooks.clip.layers) == [3, 7, -2]
    assert fused_head("fusion=dense_connector_sti")["layer_merge"] == {"kind": "sparse_token", "stride": 8}
    dci = make("fusion=dense_connector_dci")
    assert list(dci.hooks.dino.layers) == list(range(-12, -1))
    assert fused_head("fusion=dense_connector_dci")["layer_merge"] == {
        "kind": "dense_channel",
        "layer_groups": 2,
    }
    assert list(make("fusion=mmfuser").hooks.clip.layers) == [-10, -8, -6, -4, -2]
    deepstack = make("fusion=deepstack")
    assert list(deepstack.hooks.clip.layers) == [-9, -5, -2, -1]
    head = fused_head("fusion=deepstack")
    assert head["deepstack_layers"] == {"clip": [-9, -5, -2]} and head["layer_merge"] == {"kind": "last"}
    # a baseline keeps its own encoder's DeepStack layers, and only those
    baselines = {s.name: s.head["deepstack_layers"] for s in strategies(deepstack)[:2]}
    assert baselines == {"clip_only": {"clip": [-9, -5, -2]}, "dino_only": {}}


def test_eagle_with_an_identity_connector_is_the_concat_of_the_hooked_outputs():
    """Grids that already match (the smoke encoders' 4x4): Eagle's tokens are each encoder's own
    penultimate block output, raw, side by side in channels."""
    cfg = make("experiment=smoke", "fusion=eagle")
    encoders = {role: build_encoder(spec) for role, spec in encoder_specs(cfg).items()}
    assert encoders["clip"].grid_size() == encoders["dino"].grid_size() == (4, 4)
    model = FusedEncoder(
        [encoders["clip"], encoders["dino"]],
        **{**fused_head("experiment=smoke", "fusion=eagle"), "connector": None},
    )
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    hooked = [e.forward_grids(e.preprocess(images)) for e in encoders.values()]
    assert [len(layers) for layers in hooked] == [1, 1]
    expected = torch.cat([layers[0] for layers in hooked], dim=-1).reshape(2, 16, -1)
    assert torch.equal(model(images), expected)


@pytest.mark.parametrize("task", options("task"))
def test_every_task_option_names_registered_probes(task):
    cfg = make(f"task={task}")
    names = plain(cfg.task.names)
    assert names and set(names) <= set(TASKS)
    recipe = probe_recipe(cfg)
    assert recipe.seeds == (0, 1) and recipe.device == "cpu"


def write_imagefolder(root: Path) -> Path:
    for label, colour in (("red", (220, 30, 30)), ("blue", (30, 30, 220))):
        (root / label).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (20 + i, 18), colour).save(root / label / f"{i}.png")
    return root


@pytest.mark.parametrize("data", options("data"))
def test_every_data_option_builds_its_dataset(data, tmp_path, request):
    # Tiny-ImageNet has 200 classes: two images each leave one per class for the test split
    limit = 400 if data == "tinyimagenet" else 12
    overrides = ["experiment=smoke", f"data={data}", f"data.limit={limit}"]
    if data == "imagefolder":
        overrides.append(f"data.root={write_imagefolder(tmp_path / 'folder')}")
    elif data != "synthetic":
        overrides.append(f"data.root={request.getfixturevalue('datasets_root')}")
    cfg = make(*overrides)
    train, test = build_datasets(cfg)
    assert train.name == data and len(train) + len(test) <= limit and len(test) >= 1


@pytest.mark.parametrize("bench", options("bench"))
def test_every_bench_option_gives_latency_options(bench):
    cfg = make(f"bench={bench}")
    if cfg.bench.device.startswith("cuda") and not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"device='cuda' but CUDA is not available"):
            latency_options(cfg)
        return
    options_ = latency_options(cfg)
    assert options_.batch_sizes == tuple(cfg.bench.latency.batch_sizes)
    assert options_.image_size == cfg.data.image_size


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_builds_its_encoders_and_strategies(experiment):
    cfg = make(f"experiment={experiment}")
    for role, spec in encoder_specs(cfg).items():
        encoder = build_encoder(spec)
        assert encoder.spec.name == role
    assert len(strategies(cfg)) == 3
    latency_options(cfg)


@pytest.mark.parametrize("launcher", sorted({*PLUGIN_LAUNCHERS, *options("hydra/launcher")}))
def test_every_launcher_composes_and_instantiates(launcher):
    cfg = make(f"hydra/launcher={launcher}", hydra=True)
    params = plain(cfg.hydra.launcher)
    launcher_class = get_class(params.pop("_target_"))
    # built directly: Hydra's instantiate policy refuses its own BasicLauncher from a config
    assert isinstance(launcher_class(**params), Launcher)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("fusion.layer_merge.kindd=last", r"Could not override 'fusion.layer_merge.kindd'"),
        ("task.epochs=abc", r"Error merging override task.epochs=abc"),
        ("align.kind=bilinaer", r"Error merging override align.kind=bilinaer"),
        ("encoders/clip=clip_b61", r"Could not find 'encoders/clip/clip_b61'"),
        ("fusion=commm", r"Could not find 'fusion/commm'"),
        ("fusion.normalize=maybe", r"Error merging override fusion.normalize=maybe"),
        ("fusion.deepstack_layers.sam=[1]", r"Could not override 'fusion.deepstack_layers.sam'"),
        ("fusion.deepstack_layers.clip=[a]", r"Error merging override fusion.deepstack_layers.clip=\[a\]"),
    ],
)
def test_mistakes_fail_at_composition_naming_the_key(override, message):
    with pytest.raises(ConfigCompositionException, match=message) as caught:
        make(override)
    if override.startswith("align.kind"):
        cause = str(caught.value.__cause__)
        assert "expected one of [bilinear, bicubic, nearest, area, pixel_unshuffle, learned]" in cause
        assert "full_key: align.kind" in cause


def test_a_misspelt_key_in_a_group_file_fails_too(tmp_path):
    import shutil

    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    (conf / "connector" / "typo.yaml").write_text("kind: mlp\nout_dimm: 64\n")
    with (
        initialize_config_dir(config_dir=str(conf), version_base="1.3"),
        pytest.raises(ConfigCompositionException, match="connector/typo") as caught,
    ):
        compose("config", overrides=["connector=typo"])
    assert "Key 'out_dimm' not in 'ConnectorConfig'" in str(caught.value)


def test_config_hash_ignores_where_results_go_but_not_what_they_are():
    base = make("experiment=smoke")
    assert config_hash(base) == config_hash(make("experiment=smoke", "bench.out_dir=/elsewhere"))
    assert config_hash(base) == config_hash(make("experiment=smoke", "bench.cache_dir=/cache"))
    assert config_hash(base) != config_hash(make("experiment=smoke", "hooks=last3"))
    assert config_hash(base) != config_hash(make("experiment=smoke", "seed=1"))
