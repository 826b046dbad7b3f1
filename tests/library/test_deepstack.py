"""DeepStack: extra token sets of chosen hooked layers, each through a connector of its own, against
the formula written out in float64; FusedEncoder.forward_deepstack; what the probes see; bad input."""

import re

import pytest
import torch
import torch.nn.functional as F

import encoder_fusion.model
from encoder_fusion import EncoderGeometry, FusedEncoder, FusionHead
from encoder_fusion.benchmarks.tasks.probe import ProbeModel
from encoder_fusion.encoders import build_encoder
from encoder_fusion.encoders.tiny import tiny_spec

EPS = 1e-6
# hooks as written: CLIP's three blocks with negative indices, DINOv2's two with positive ones
GEOMETRIES = [
    EncoderGeometry("clip", 8, (4, 6), 3, (-9, -5, -1)),
    EncoderGeometry("dino", 6, (2, 3), 2, (3, 11)),
]
CONNECTOR = {"kind": "mlp", "depth": 2, "out_dim": 7}


def random_grids(batch=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [
        [
            torch.randn(batch, *g.grid, g.width, generator=generator, dtype=torch.float64) * 2 + 1
            for _ in range(g.num_layers)
        ]
        for g in GEOMETRIES
    ]


def perturb(module, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype) * 0.3)


def layer_norm(x):
    mean = x.mean(dim=-1, keepdim=True)
    return (x - mean) / torch.sqrt(((x - mean) ** 2).mean(dim=-1, keepdim=True) + EPS)


def mlp(connector, x):
    """LLaVA's mlp2x_gelu, written out."""
    first, second = connector.layers[0], connector.layers[2]
    return F.gelu(x @ first.weight.T + first.bias) @ second.weight.T + second.bias


def head_with(deepstack_layers, **kwargs):
    options = {"grid": (3, 5), "layer_merge": "last", "connector": CONNECTOR, **kwargs}
    return FusionHead(GEOMETRIES, deepstack_layers=deepstack_layers, **options)


# -- the extra sets -----------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", [True, False], ids=["normalized", "raw"])
@pytest.mark.parametrize("align", ["bilinear", "area"])
def test_extra_sets_are_each_layer_aligned_normalised_and_projected(align, normalize):
    head = head_with({"dino": [3], "clip": [-5, -9]}, align=align, normalize=normalize).double()
    perturb(head)
    grids = random_grids()
    tokens, extras = head.forward_deepstack(grids)
    torch.testing.assert_close(tokens, head(grids))
    # encoders in the head's order, each encoder's entries in the order given
    assert head.deepstack.entries == [(0, 1), (0, 0), (1, 0)]
    assert [tuple(e.shape) for e in extras] == [(2, 15, 7)] * 3
    extra = {"align_corners": False} if align == "bilinear" else {}
    for (encoder, layer), connector, got in zip(head.deepstack.entries, head.deepstack.connectors, extras):
        x = grids[encoder][layer].permute(0, 3, 1, 2)
        aligned = F.interpolate(x, size=(3, 5), mode=align, **extra).permute(0, 2, 3, 1).reshape(2, 15, -1)
        torch.testing.assert_close(got, mlp(connector, layer_norm(aligned) if normalize else aligned))


def test_without_deepstack_layers_there_are_no_extra_sets():
    head = head_with(None).double()
    _, extras = head.forward_deepstack(random_grids())
    assert extras == [] and head.deepstack.entries == [] and not list(head.deepstack.parameters())
    assert head_with({}).deepstack.entries == []


def test_every_extra_connector_trains():
    head = head_with({"clip": [-9, -1], "dino": [11]}).double()
    tokens, extras = head.forward_deepstack(random_grids())
    assert len(head.deepstack.connectors) == 3
    (sum(extras, tokens) * torch.randn_like(tokens)).sum().backward()
    for name, parameter in head.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_extra_sets_go_with_every_merge_of_one_token_per_cell():
    for encoder_merge in ("channel_concat", "add", "gated_add", "cross_attention"):
        merge_dim = None if encoder_merge == "channel_concat" else 10
        head = head_with({"clip": [-5]}, encoder_merge=encoder_merge, merge_dim=merge_dim)
        tokens, (extra,) = head.forward_deepstack([[g.float() for g in ls] for ls in random_grids()])
        assert extra.shape == tokens.shape == (2, 15, 7)


def test_the_probes_see_the_main_tokens_plus_the_sum_of_the_extra_sets():
    head = head_with({"clip": [-9, -5]}).double()
    grids = random_grids()
    tokens, extras = head.forward_deepstack(grids)
    probe = ProbeModel(head, torch.nn.Identity(), "tokens")
    torch.testing.assert_close(probe(grids), tokens + extras[0] + extras[1])
    grid = ProbeModel(head, torch.nn.Identity(), "grid")(grids)
    torch.testing.assert_close(grid, (tokens + extras[0] + extras[1]).reshape(2, 3, 5, 7))


# -- FusedEncoder ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_encoders():
    torch.manual_seed(3)
    clip = build_encoder(tiny_spec("clip", layers=(1, 2, -1), image_size=(64, 48)))
    dino = build_encoder(tiny_spec("dino_reg", "dino", layers=(-1,), image_size=(112, 84)))
    return [clip, dino]


@pytest.fixture(scope="module")
def images():
    return torch.rand(2, 3, 70, 90, generator=torch.Generator().manual_seed(4))


DEEPSTACK = {
    "grid": (4, 3),
    "layer_merge": "last",
    "connector": {"kind": "linear", "out_dim": 16},
    "deepstack_layers": {"clip": [2, 1]},
}


def test_forward_deepstack_gives_the_tokens_and_one_set_per_entry(tiny_encoders, images):
    model = FusedEncoder(tiny_encoders, **DEEPSTACK).eval()
    tokens, extras = model.forward_deepstack(images)
    torch.testing.assert_close(tokens, model(images))
    assert [tuple(e.shape) for e in extras] == [(2, 12, 16)] * 2
    _, expected = model.head.forward_deepstack(model.extract(images))
    for got, want in zip(extras, expected):
        torch.testing.assert_close(got, want)
    assert FusedEncoder(tiny_encoders, grid=(4, 3)).forward_deepstack(images)[1] == []


def test_deepstack_config_round_trips_and_its_connectors_are_saved(tmp_path, tiny_encoders, images):
    model = FusedEncoder(tiny_encoders, **DEEPSTACK).eval()
    assert model.config["deepstack_layers"] == {"clip": [2, 1]} and model.config["normalize"] is True
    perturb(model.head, seed=5)
    path = model.save_trained(tmp_path / "deepstack.safetensors")
    fresh = FusedEncoder(tiny_encoders, **DEEPSTACK).eval().load_trained(path)
    for got, want in zip(fresh.forward_deepstack(images)[1], model.forward_deepstack(images)[1]):
        assert torch.equal(got, want)
    other = FusedEncoder(tiny_encoders, **{**DEEPSTACK, "deepstack_layers": {"clip": [1]}})
    with pytest.raises(
        ValueError, match=r"deepstack_layers: file \{'clip': \[2, 1\]\}, model \{'clip': \[1\]\}"
    ):
        other.load_trained(path)


# -- bad input ------------------------------------------------------------------------------------

BAD = [
    (
        {"clip": [0]},
        "deepstack_layers['clip'] entry 0 is not among the hooked layers of encoder 'clip'; accepted: "
        "-9, -5, -1 (its HookSpec.layers as written)",
    ),
    (
        {"dino": [-1]},
        "deepstack_layers['dino'] entry -1 is not among the hooked layers of encoder 'dino'; accepted: 3, 11",
    ),
    (
        {"sam": [1]},
        "deepstack_layers names encoder(s) ['sam'] that this model does not have; accepted: clip, dino",
    ),
    ({"clip": [-5, -5]}, "deepstack_layers['clip'] names layer -5 twice: [-5, -5]"),
    ({"clip": -5}, "deepstack_layers['clip'] must be a list of block indices, got -5"),
    ({"clip": [True]}, "deepstack_layers['clip'] entry True is not among the hooked layers"),
    ([-5], "deepstack_layers must map encoder names to lists of hooked block indices, got [-5]"),
]


@pytest.mark.parametrize(("deepstack_layers", "message"), BAD)
def test_bad_deepstack_layers_are_named(deepstack_layers, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        head_with(deepstack_layers)


def test_geometries_without_hooked_indices_cannot_take_deepstack_layers():
    geometries = [EncoderGeometry("clip", 8, (4, 6), 3)]
    with pytest.raises(
        ValueError, match=r"deepstack_layers\['clip'\] needs the hooked block indices of encoder 'clip'"
    ):
        FusionHead(geometries, connector=CONNECTOR, deepstack_layers={"clip": [-1]})
    with pytest.raises(ValueError, match=r"EncoderGeometry.layers of encoder 'clip' must be 3 block indices"):
        EncoderGeometry("clip", 8, (4, 6), 3, (1, 2))


def test_main_tokens_must_be_one_per_cell():
    message = (
        "deepstack_layers adds each extra token set onto the main tokens, one per grid cell (3x5 = 15), "
        "but layer_merge='last' with encoder_merge='interleave' gives 30"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        head_with({"clip": [-5]}, encoder_merge="interleave", merge_dim=10)


def test_extra_connectors_must_reach_the_main_width():
    message = (
        "deepstack_layers['clip'] layer -5: its own connector must project width 8 to the main tokens' "
        "14: connector kind 'identity' keeps the width 8"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        head_with({"clip": [-5]}, connector=None)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"deepstack_layers": {"clip": [0]}}, "deepstack_layers['clip'] entry 0 is not among the hooked"),
        ({"normalize": "yes"}, "normalize must be true or false, got 'yes'"),
        (
            {"layer_merge": {"kind": "dense_channel", "layer_groups": 2}},
            "encoder 'dino': layer_merge='dense_channel' option layer_groups=2 must be an int from 1 to "
            "the number of hooked layers (1)",
        ),
        (
            {"layer_merge": "mmfuser"},
            "encoder 'dino': layer_merge='mmfuser' needs at least 2 hooked layers",
        ),
        (
            {"layer_merge": "sparse_token", "grid": (2, 3)},
            "encoder 'clip': layer_merge='sparse_token' averages every 8 consecutive tokens (option "
            "stride), but the 2x3 grid has only 6",
        ),
    ],
)
def test_fused_encoder_refuses_before_building_any_encoder(monkeypatch, change, message):
    """What the specs decide is checked before an encoder is built (or its weights loaded)."""

    def no_build(spec):
        raise AssertionError(f"encoder {spec.name} was built despite bad input")

    monkeypatch.setattr(encoder_fusion.model, "build_encoder", no_build)
    specs = [tiny_spec("clip", layers=(1, 2, -1)), tiny_spec("dino_reg", "dino", layers=(-1,))]
    with pytest.raises(ValueError, match=re.escape(message)):
        FusedEncoder(specs, **{**DEEPSTACK, **change})
