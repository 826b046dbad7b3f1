"""FusionHead and FusedEncoder: the strategy matrix, the grid_fuse route, configs, save / load."""

import dataclasses
import itertools
import json
import re

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import encoder_fusion.kernels
from encoder_fusion import EncoderGeometry, EncoderSpec, FusedEncoder, FusionHead, HookSpec
from encoder_fusion.encoders import Encoder, LayerInfo, LayerTokens, Preprocessing, build_encoder
from encoder_fusion.encoders.tiny import tiny_spec

ALIGNS = ("bilinear", "bicubic", "nearest", "area", "pixel_unshuffle", "learned")
LAYER_MERGES = ("last", "mean", "concat", "weighted_ln")
# the layer merges whose tokens are their grid_fuse output: with channel_concat, one call for all
FUSED_MERGES = (*LAYER_MERGES, "dense_channel")
ENCODER_MERGES = ("channel_concat", "sequence_concat", "interleave", "add", "gated_add", "cross_attention")
CONNECTORS = {
    "identity": None,
    "linear": {"kind": "linear", "out_dim": 9},
    "mlp2": {"kind": "mlp", "depth": 2, "out_dim": 7},
    "fused_gelu_mlp+norm": {"kind": "fused_gelu_mlp", "out_dim": 5, "final_norm": True},
}
SEQUENCE_MERGES = ("sequence_concat", "interleave")
EPS = 1e-6

# two encoders of different widths, layer counts and grids; pixel_unshuffle folds the first 2x2
GEOMETRIES = [EncoderGeometry("clip", 8, (4, 6), 2), EncoderGeometry("dino", 6, (2, 3), 3)]


def target_grid(align):
    # (3, 5) takes the first encoder down and the second up; pixel_unshuffle can only fold down
    return (2, 3) if align == "pixel_unshuffle" else (3, 5)


def random_grids(geometries=GEOMETRIES, batch=2, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return [
        [
            torch.randn(batch, *g.grid, g.width, generator=generator, dtype=dtype) * 2 + 1
            for _ in range(g.num_layers)
        ]
        for g in geometries
    ]


def head_for(
    align="bilinear", layer_merge="weighted_ln", encoder_merge="channel_concat", connector=None, **kwargs
):
    merge_dim = None if encoder_merge == "channel_concat" else 10
    kwargs = {"grid": target_grid(align), "merge_dim": merge_dim, **kwargs}
    return FusionHead(
        GEOMETRIES,
        align=align,
        layer_merge=layer_merge,
        encoder_merge=encoder_merge,
        connector=connector,
        **kwargs,
    )


def check_gradients(out, trainable, frozen=()):
    """Gradients reach every trainable parameter (finite, not all zero) and no frozen one."""
    trainable, frozen = list(trainable), list(frozen)
    if trainable:
        (out * torch.randn_like(out)).sum().backward()
    else:
        assert not out.requires_grad
    for name, parameter in trainable:
        assert parameter.grad is not None, f"no gradient reached {name}"
        assert torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, f"the gradient of {name} is all zero"
    for name, parameter in frozen:
        assert parameter.grad is None and not parameter.requires_grad, f"frozen {name} got a gradient"


def layer_norm(x, weight=None, bias=None):
    mean = x.mean(dim=-1, keepdim=True)
    y = (x - mean) / torch.sqrt(((x - mean) ** 2).mean(dim=-1, keepdim=True) + EPS)
    return y if weight is None else y * weight + bias


# -- the full matrix on FusionHead ------------------------------------------------------------


@pytest.mark.parametrize("connector", list(CONNECTORS))
@pytest.mark.parametrize("encoder_merge", ENCODER_MERGES)
@pytest.mark.parametrize("layer_merge", LAYER_MERGES)
@pytest.mark.parametrize("align", ALIGNS)
def test_head_matrix(align, layer_merge, encoder_merge, connector):
    torch.manual_seed(0)
    head = head_for(align, layer_merge, encoder_merge, CONNECTORS[connector])
    out = head(random_grids())
    grid_h, grid_w = target_grid(align)
    tokens = grid_h * grid_w * (2 if encoder_merge in SEQUENCE_MERGES else 1)
    assert head.output_tokens == tokens
    assert out.shape == (2, tokens, head.out_dim)
    assert torch.isfinite(out).all()
    assert head.to_grid(out).shape == (2, grid_h, grid_w, head.out_dim)
    check_gradients(out, head.named_parameters())


def test_head_widths_follow_the_strategies():
    # clip: 8 wide, 2 layers, folded 2x2 -> 32; dino: 6 wide, 3 layers
    assert head_for("pixel_unshuffle", "concat").merge.out_dim == 32 * 2 + 6 * 3
    assert head_for("bilinear", "mean").merge.out_dim == 8 + 6
    assert head_for("bilinear", "mean", "add").merge.out_dim == 10
    assert head_for("bilinear", "mean", merge_dim=4).merge.out_dim == 8  # channel_concat of 2 x merge_dim
    assert head_for(connector={"kind": "mlp", "out_dim": 4096}).out_dim == 4096


def test_grid_none_takes_the_first_encoders_grid():
    head = FusionHead(GEOMETRIES)
    assert head.grid == (4, 6) and head.output_tokens == 24


# -- the grid_fuse route ----------------------------------------------------------------------


def count_grid_fuse_calls(monkeypatch):
    calls = []
    original = encoder_fusion.kernels.grid_fuse

    def counting(sources, out_hw, **kwargs):
        calls.append({"shapes": [tuple(s.shape) for s in sources], "out_hw": tuple(out_hw), **kwargs})
        return original(sources, out_hw, **kwargs)

    monkeypatch.setattr(encoder_fusion.kernels, "grid_fuse", counting)
    return calls


@pytest.mark.parametrize("normalize", [True, False], ids=["normalized", "raw"])
@pytest.mark.parametrize("layer_merge", FUSED_MERGES)
@pytest.mark.parametrize("align", encoder_fusion.kernels.MODES)
def test_channel_concat_with_kernel_modes_is_one_grid_fuse_call(monkeypatch, align, layer_merge, normalize):
    calls = count_grid_fuse_calls(monkeypatch)
    head = head_for(align, layer_merge, normalize=normalize)
    assert head.fused_route
    head(random_grids())
    assert len(calls) == 1
    call = calls[0]
    assert call["mode"] == align and call["out_hw"] == (3, 5) and call["normalize"] is normalize
    # the raw grids go in: alignment happens inside the kernel
    expected_groups = {
        "last": [0, 1],
        "mean": [0, 0, 1, 1, 1],
        "weighted_ln": [0, 0, 1, 1, 1],
        "concat": [0, 1, 2, 3, 4],
        # two groups per encoder: clip's 2 layers one each, dino's 3 as 2 + 1
        "dense_channel": [0, 1, 2, 2, 3],
    }[layer_merge]
    assert call["groups"] == expected_groups
    if layer_merge == "dense_channel":
        torch.testing.assert_close(call["layer_weights"], torch.tensor([1, 1, 1 / 2, 1 / 2, 1]))
    assert {shape[1:3] for shape in call["shapes"]} == {(4, 6), (2, 3)}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"align": "bicubic"},
        {"align": "learned"},
        {"align": "pixel_unshuffle"},
        {"encoder_merge": "add"},
        {"merge_dim": 4},
        {"layer_merge": "mmfuser"},
    ],
)
def test_other_strategies_combine_each_encoder_on_its_own(monkeypatch, kwargs):
    calls = count_grid_fuse_calls(monkeypatch)
    head = head_for(**kwargs)
    assert not head.fused_route
    head(random_grids())
    assert len(calls) == 2  # one combine per encoder, on grids already aligned
    assert all(set(shape[1:3] for shape in call["shapes"]) == {call["out_hw"]} for call in calls)


def hand_written_fusion(grids, align, layer_merge, head):
    """The fused route's function in plain PyTorch: interpolate, LayerNorm (unless raw), weight, concat."""

    def resample(x):
        if tuple(x.shape[1:3]) == head.grid:
            return x
        extra = {"align_corners": False} if align == "bilinear" else {}
        return F.interpolate(x.permute(0, 3, 1, 2), size=head.grid, mode=align, **extra).permute(0, 2, 3, 1)

    slots = []
    for combine, layers in zip(head.combines, grids):
        normed = []
        for index, x in enumerate(layers):
            if layer_merge == "weighted_ln":
                linear = combine.linears[index]
                # the Linear is written after the resampling here: a linear resampler commutes with it
                y = resample(x) @ linear.weight.T + linear.bias
                if head.normalize:
                    y = layer_norm(y, combine.ln_weight[index], combine.ln_bias[index])
                normed.append(y)
            else:
                normed.append(layer_norm(resample(x)) if head.normalize else resample(x))
        if layer_merge == "weighted_ln":
            exp = torch.exp(combine.logits)
            slots.append(sum(w * n for w, n in zip(exp / exp.sum(), normed)))
        elif layer_merge == "last":
            slots.append(normed[-1])
        elif layer_merge == "mean":
            slots.append(sum(normed) / len(normed))
        elif layer_merge == "dense_channel":  # two consecutive groups, the first the larger
            first = (len(normed) + 1) // 2
            slots += [sum(normed[:first]) / first, sum(normed[first:]) / (len(normed) - first)]
        else:
            slots.extend(normed)
    merged = torch.cat(slots, dim=-1)
    return merged.reshape(merged.shape[0], -1, merged.shape[-1])


def random_float64_head(align, layer_merge, **options):
    """A float64 head (weighted_ln with its Linear) whose every parameter is drawn at random."""
    merge = {"kind": "weighted_ln", "linear": True} if layer_merge == "weighted_ln" else layer_merge
    head = head_for(align, merge, **options).double()
    with torch.no_grad():
        for parameter in head.parameters():
            parameter.normal_()
    return head


@pytest.mark.parametrize("normalize", [True, False], ids=["normalized", "raw"])
@pytest.mark.parametrize("layer_merge", FUSED_MERGES)
@pytest.mark.parametrize("align", encoder_fusion.kernels.MODES)
def test_grid_fuse_route_equals_the_formula_written_out(align, layer_merge, normalize):
    torch.manual_seed(1)
    head = random_float64_head(align, layer_merge, normalize=normalize)
    grids = random_grids(dtype=torch.float64, seed=2)
    assert head.fused_route
    torch.testing.assert_close(head(grids), hand_written_fusion(grids, align, layer_merge, head))


@pytest.mark.parametrize("normalize", [True, False], ids=["normalized", "raw"])
@pytest.mark.parametrize("layer_merge", FUSED_MERGES)
@pytest.mark.parametrize("align", encoder_fusion.kernels.MODES)
def test_grid_fuse_route_and_per_encoder_route_agree(align, layer_merge, normalize):
    torch.manual_seed(3)
    head = random_float64_head(
        align, layer_merge, connector={"kind": "mlp", "out_dim": 4}, normalize=normalize
    )
    grids = random_grids(dtype=torch.float64, seed=4)
    fused = head(grids)
    head.fused_route = False
    torch.testing.assert_close(head(grids), fused)


# -- to_grid and layer weights ----------------------------------------------------------------


@pytest.mark.parametrize("encoder_merge", ENCODER_MERGES)
def test_to_grid_maps_tokens_back_onto_the_grid(encoder_merge):
    head = head_for("bilinear", "mean", encoder_merge)
    tokens = head(random_grids())
    grid = head.to_grid(tokens)
    if encoder_merge == "sequence_concat":
        expected = (tokens[:, :15] + tokens[:, 15:]).reshape(2, 3, 5, -1) / 2
    elif encoder_merge == "interleave":
        expected = (tokens[:, 0::2] + tokens[:, 1::2]).reshape(2, 3, 5, -1) / 2
    else:
        expected = tokens.reshape(2, 3, 5, -1)
    torch.testing.assert_close(grid, expected)


def test_to_grid_rejects_tokens_of_another_layout():
    head = head_for("bilinear", "mean", "interleave")
    with pytest.raises(ValueError, match=r"to_grid takes tokens \(B, 30, D\), got \(2, 15, 10\)"):
        head.to_grid(torch.randn(2, 15, 10))


def test_layer_weights_are_the_softmaxed_logits_for_weighted_ln_only():
    head = head_for(layer_merge="weighted_ln")
    assert head.layer_weights() == {"clip": pytest.approx([0.5, 0.5]), "dino": pytest.approx([1 / 3] * 3)}
    with torch.no_grad():
        head.combines[1].logits.copy_(torch.tensor([0.0, 1.0, 2.0]))
    expected = torch.softmax(torch.tensor([0.0, 1.0, 2.0]), dim=0).tolist()
    assert head.layer_weights()["dino"] == pytest.approx(expected)
    for layer_merge in ("last", "mean", "concat"):
        assert head_for(layer_merge=layer_merge).layer_weights() == {}


# -- bad input --------------------------------------------------------------------------------


def test_grids_that_cannot_be_aligned_are_named():
    geometries = [EncoderGeometry("sam", 8, (5, 6), 1), EncoderGeometry("clip", 8, (4, 6), 1)]
    with pytest.raises(ValueError, match=r"align='pixel_unshuffle' cannot fold a 5x6 grid onto 2x3"):
        FusionHead(geometries, grid=(2, 3), align="pixel_unshuffle")


def test_add_of_different_widths_without_projection_is_refused():
    message = (
        "encoder_merge='add' needs every encoder at one width, got {'clip': 8, 'dino': 6}; set merge_dim"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        FusionHead(GEOMETRIES, encoder_merge="add")
    assert FusionHead(GEOMETRIES, encoder_merge="add", merge_dim=6).out_dim == 6


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"align": "bilnear"}, "align='bilnear' is unknown; accepted: bilinear, bicubic, nearest, area"),
        ({"layer_merge": "max"}, "layer_merge='max' is unknown; accepted: last, mean, concat, weighted_ln"),
        (
            {"encoder_merge": "stack"},
            "encoder_merge='stack' is unknown; accepted: channel_concat, sequence_concat",
        ),
        (
            {"connector": {"kind": "resampler"}},
            "connector='resampler' is unknown; accepted: identity, linear, mlp",
        ),
        ({"merge_dim": 0}, "merge_dim must be None or a positive int, got 0"),
        ({"grid": (0, 4)}, "grid must be a positive int or an (height, width) pair, got (0, 4)"),
    ],
)
def test_bad_strategy_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        FusionHead(GEOMETRIES, **kwargs)


def test_bad_geometries_are_named():
    with pytest.raises(
        ValueError, match=r"encoder names must be unique within one fused model, got \['a', 'a'\]"
    ):
        FusionHead([EncoderGeometry("a", 4, (2, 2), 1), EncoderGeometry("a", 4, (2, 2), 1)])
    with pytest.raises(
        ValueError, match=r"EncoderGeometry.width of encoder 'a' must be a positive int, got 0"
    ):
        EncoderGeometry("a", 0, (2, 2), 1)
    with pytest.raises(ValueError, match=r"FusionHead needs a non-empty list of EncoderGeometry"):
        FusionHead([])


def test_grids_that_do_not_fit_the_geometries_are_named():
    head = head_for()
    grids = random_grids()
    with pytest.raises(
        ValueError, match=r"one list of layer grids per encoder \(2: \['clip', 'dino'\]\), got 1"
    ):
        head(grids[:1])
    with pytest.raises(ValueError, match=r"encoder 'dino' hooks 3 layer\(s\) but got 2 grids"):
        head([grids[0], grids[1][:2]])
    wrong = [grids[0], [*grids[1][:2], torch.randn(2, 2, 3, 7)]]
    with pytest.raises(
        ValueError, match=r"encoder 'dino' layer 2 has shape \(2, 2, 3, 7\); expected \(B, 2, 3, 6\)"
    ):
        head(wrong)
    wrong = [grids[0], [*grids[1][:2], torch.randn(3, 2, 3, 6)]]
    with pytest.raises(ValueError, match=r"encoder 'dino' layer 2 has batch size 3, another grid has 2"):
        head(wrong)


# -- autocast and torch.compile ---------------------------------------------------------------

COMPILE_CASES = [
    {"align": "bilinear", "layer_merge": {"kind": "weighted_ln", "linear": True}},
    {"align": "learned", "layer_merge": "mean", "encoder_merge": "cross_attention"},
    {"align": "pixel_unshuffle", "layer_merge": "concat", "encoder_merge": "interleave"},
    {"align": "bicubic", "layer_merge": "last", "encoder_merge": "gated_add"},
]


@pytest.mark.parametrize("case", COMPILE_CASES, ids=lambda c: c["align"])
def test_head_under_bf16_autocast(case):
    torch.manual_seed(5)
    head = head_for(connector={"kind": "mlp", "out_dim": 6}, **case)
    grids = random_grids()
    reference = head(grids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(grids)
    assert out.dtype == torch.bfloat16 and out.shape == reference.shape
    torch.testing.assert_close(out.float(), reference, atol=0.1, rtol=0.05)
    check_gradients(out.float(), head.named_parameters())


@pytest.mark.parametrize("case", COMPILE_CASES, ids=lambda c: c["align"])
def test_head_traces_as_one_graph(case):
    torch.manual_seed(6)
    head = head_for(connector={"kind": "linear", "out_dim": 6}, **case)
    grids = random_grids()
    compiled = torch.compile(head, backend="aot_eager", fullgraph=True)
    out = compiled(grids)
    torch.testing.assert_close(out, head(grids))
    check_gradients(out, head.named_parameters())


@pytest.mark.slow
def test_head_compiles_with_inductor_on_cpu():
    torch.manual_seed(7)
    head = head_for(layer_merge="weighted_ln", connector={"kind": "mlp", "out_dim": 6})
    grids = random_grids()
    out = torch.compile(head)(grids)
    torch.testing.assert_close(out, head(grids))
    check_gradients(out, head.named_parameters())


# -- FusedEncoder with tiny real encoders -----------------------------------------------------


@pytest.fixture(scope="module")
def tiny_encoders():
    """A tiny CLIP (4x3 grid, 2 layers) and a tiny DINOv2 with registers (8x6 grid, 3 layers)."""
    torch.manual_seed(8)
    clip = build_encoder(tiny_spec("clip", layers=(1, 3), image_size=(64, 48)))
    dino = build_encoder(tiny_spec("dino_reg", "dino", layers=(0, 2, -1), image_size=(112, 84)))
    return [clip, dino]


@pytest.fixture(scope="module")
def images():
    return torch.rand(2, 3, 70, 90, generator=torch.Generator().manual_seed(9))


FUSED_MATRIX = [
    (align, layer_merge, encoder_merge, list(CONNECTORS)[i % len(CONNECTORS)])
    for i, (align, layer_merge, encoder_merge) in enumerate(
        itertools.product(
            ("bilinear", "area", "pixel_unshuffle", "learned"),
            ("last", "concat", "weighted_ln"),
            ("channel_concat", "sequence_concat", "cross_attention"),
        )
    )
]


@pytest.mark.parametrize(("align", "layer_merge", "encoder_merge", "connector"), FUSED_MATRIX)
def test_fused_encoder_matrix(tiny_encoders, images, align, layer_merge, encoder_merge, connector):
    model = FusedEncoder(
        tiny_encoders,
        grid=(4, 3),
        align=align,
        layer_merge=layer_merge,
        encoder_merge=encoder_merge,
        connector=CONNECTORS[connector],
        merge_dim=None if encoder_merge == "channel_concat" else 16,
    )
    out = model(images)
    tokens = 12 * (2 if encoder_merge == "sequence_concat" else 1)
    assert model.output_tokens() == model.output_tokens((70, 90)) == tokens
    assert out.shape == (2, tokens, model.head.out_dim) and torch.isfinite(out).all()
    check_gradients(out, model.head.named_parameters(), model.encoders.named_parameters())


def test_extract_runs_each_encoders_own_preprocessing(tiny_encoders, images):
    model = FusedEncoder(tiny_encoders, grid=(4, 3))
    grids = model.extract(images)
    assert [[tuple(g.shape) for g in layers] for layers in grids] == [
        [(2, 4, 3, 32)] * 2,
        [(2, 8, 6, 32)] * 3,
    ]
    for encoder, layers in zip(tiny_encoders, grids):
        expected = encoder.forward_grids(encoder.preprocess(images))
        for got, want in zip(layers, expected):
            torch.testing.assert_close(got, want)
            assert not got.requires_grad
    torch.testing.assert_close(model(images), model.head(grids))


def test_grid_defaults_to_the_first_encoder(tiny_encoders):
    assert FusedEncoder(tiny_encoders).head.grid == (4, 3)
    assert FusedEncoder(tiny_encoders[::-1]).head.grid == (8, 6)


def test_frozen_encoders_stay_in_eval_mode(tiny_encoders):
    model = FusedEncoder(tiny_encoders, align="learned").train()
    assert model.head.training
    assert not any(m.training for m in model.encoders.modules())
    assert not any(p.requires_grad for p in model.encoders.parameters())
    assert all(p.requires_grad for p in model.head.parameters())


class PatchMLPEncoder(Encoder):
    """A test-only encoder: a strided-conv patch embedding and residual MLP blocks, no prefix tokens."""

    def __init__(self, name="mlp", width=12, depth=3, layers=(-1,), image_size=(32, 40), seed=0):
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = nn.ModuleDict(
                {
                    "patch": nn.Conv2d(3, width, 8, stride=8),
                    "blocks": nn.ModuleList(
                        nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU())
                        for _ in range(depth)
                    ),
                    "norm": nn.LayerNorm(width),
                }
            )
        spec = EncoderSpec(
            name=name,
            source="timm",
            model="test-patch-mlp",
            image_size=image_size,
            hooks=HookSpec(layers=layers),
            on_missing="random",
        )
        preprocessing = Preprocessing(spec.image_size, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
        super().__init__(
            spec,
            model,
            layers=[LayerInfo(width, 8)] * depth,
            num_prefix_tokens=0,
            preprocessing=preprocessing,
            weights_loaded="random",
        )

    def read_layers(self, pixels):
        tokens = self.model["patch"](pixels).permute(0, 2, 3, 1)
        layers = []
        for index, block in enumerate(self.model["blocks"][: max(self.layer_indices) + 1]):
            tokens = tokens + block(tokens)
            if index in self.layer_indices:
                grid = self.model["norm"](tokens) if self.spec.hooks.norm == "post" else tokens
                layers.append(LayerTokens(grid, grid.new_zeros(grid.shape[0], 0, grid.shape[-1])))
        return layers


def test_unfrozen_encoders_train_and_get_gradients(images):
    encoder = PatchMLPEncoder(layers=(0, 2))
    model = FusedEncoder([encoder], freeze_encoders=False, connector={"kind": "linear", "out_dim": 4}).train()
    assert encoder.training and all(p.requires_grad for p in encoder.parameters())
    out = model(images)
    # the final norm is not used with hooks.norm="pre"; everything else is
    used = [(n, p) for n, p in model.named_parameters() if ".norm." not in n]
    check_gradients(out, used)


def test_custom_encoders_of_different_widths(images, tiny_encoders):
    narrow = PatchMLPEncoder("narrow", width=12, image_size=(32, 24))
    model = FusedEncoder([tiny_encoders[0], narrow], layer_merge="mean")
    assert model.head.merge.out_dim == 32 + 12 and model(images).shape == (2, 12, 44)
    message = "encoder_merge='add' needs every encoder at one width, got {'clip': 32, 'narrow': 12}"
    with pytest.raises(ValueError, match=re.escape(message)):
        FusedEncoder([tiny_encoders[0], narrow], encoder_merge="add")
    added = FusedEncoder([tiny_encoders[0], narrow], encoder_merge="add", merge_dim=8)
    assert added(images).shape == (2, 12, 8)


def test_encoders_of_every_source_fuse(images):
    specs = [
        tiny_spec("clip", source="open_clip", layers=(-2, -1)),
        tiny_spec("dino_reg", "dino", source="transformers", layers=(1, 3)),
    ]
    model = FusedEncoder(specs, encoder_merge="interleave", merge_dim=8)
    assert model.head.grid == (4, 4)
    out = model(images)
    assert out.shape == (2, 32, 8) and torch.isfinite(out).all()


def test_weights_status(tiny_encoders):
    assert FusedEncoder(tiny_encoders).weights_status() == {"clip": "random", "dino": "random"}


def test_fused_encoder_under_bf16_autocast(tiny_encoders, images):
    model = FusedEncoder(
        tiny_encoders,
        grid=(4, 3),
        layer_merge={"kind": "weighted_ln", "linear": True},
        connector={"kind": "mlp", "out_dim": 8},
    )
    reference = model(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    torch.testing.assert_close(out.float(), reference, atol=0.15, rtol=0.05)


def test_output_tokens_rejects_a_bad_image_size(tiny_encoders):
    with pytest.raises(ValueError, match=r"image_size must be a positive int or an \(height, width\) pair"):
        FusedEncoder(tiny_encoders).output_tokens((0, 3))


# -- config -----------------------------------------------------------------------------------

TINY_CONFIG = {
    "encoders": [
        {
            "name": "clip",
            "source": "timm",
            "model": "vit_base_patch16_clip_224.openai",
            "weights": "random",
            "image_size": [64, 48],
            "hooks": {"layers": [-2, -1]},
            "on_missing": "random",
            "model_kwargs": {"depth": 4, "embed_dim": 32, "num_heads": 2},
        },
        {**dataclasses.asdict(tiny_spec("dino_reg", "dino")), "hooks": {"layers": [1, 3], "norm": "post"}},
    ],
    "grid": [4, 3],
    "align": "bilinear",
    "layer_merge": "weighted_ln",
    "encoder_merge": "channel_concat",
    "connector": {"kind": "mlp", "depth": 2, "out_dim": 64},
}


def test_from_config_builds_the_model_and_round_trips_its_config():
    model = FusedEncoder.from_config(TINY_CONFIG)
    assert [e.spec.name for e in model.encoders] == ["clip", "dino"]
    assert model.encoders[1].spec.hooks == HookSpec(layers=(1, 3), norm="post")
    assert model.head.grid == (4, 3) and model.head.out_dim == 64
    config = model.config
    assert json.loads(json.dumps(config)) == config
    assert config["connector"] == {"kind": "mlp", "depth": 2, "out_dim": 64, "final_norm": False}
    assert config["layer_merge"] == {"kind": "weighted_ln", "linear": False}
    assert config["freeze_encoders"] is True and config["merge_dim"] is None
    assert FusedEncoder.from_config(config).config == config
    assert FusedEncoder.from_config(OmegaConf.create(config)).config == config


def test_from_config_accepts_an_omegaconf_node_with_a_hydra_target():
    target = {"_target_": "encoder_fusion.FusedEncoder"}
    node = OmegaConf.create({**target, **TINY_CONFIG, "encoder_merge": "interleave"})
    node.merge_dim = 16
    model = FusedEncoder.from_config(node)
    assert model.output_tokens() == 24 and model.head.out_dim == 64


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda c: c.pop("encoders"),
            "FusedEncoder config is missing the field 'encoders'; accepted: encoders, grid,",
        ),
        (
            lambda c: c.update(conector=c.pop("connector")),
            "FusedEncoder config has unknown field(s) ['conector']; accepted: encoders, grid, align, "
            "layer_merge, encoder_merge, connector, merge_dim, normalize, deepstack_layers, "
            "freeze_encoders",
        ),
        (
            lambda c: c["encoders"][1].pop("model"),
            "encoders[1]: EncoderSpec is missing required field(s) ['model']",
        ),
        (
            lambda c: c["encoders"][0].update(hook=c["encoders"][0].pop("hooks")),
            "encoders[0]: EncoderSpec got unknown field(s) ['hook']",
        ),
        (lambda c: c.update(encoders=[]), "encoders must be a non-empty list of encoder specs"),
        (lambda c: c.update(freeze_encoders="yes"), "freeze_encoders must be true or false, got 'yes'"),
        (
            lambda c: c.update(layer_merge="weighted"),
            "layer_merge='weighted' is unknown; accepted: last, mean",
        ),
    ],
)
def test_bad_configs_are_named(change, message):
    config = json.loads(json.dumps(TINY_CONFIG))
    change(config)
    with pytest.raises(ValueError, match=re.escape(message)):
        FusedEncoder.from_config(config)


# -- save / load of the trained part ----------------------------------------------------------


def perturb(module, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator))


STRATEGIES = {
    "grid": (4, 3),
    "align": "learned",
    "layer_merge": {"kind": "weighted_ln", "linear": True},
    "encoder_merge": "cross_attention",
    "merge_dim": 16,
    "connector": {"kind": "fused_gelu_mlp", "out_dim": 8, "final_norm": True},
}


def test_save_and_load_round_trip_gives_identical_outputs(tmp_path, tiny_encoders, images):
    trained = FusedEncoder(tiny_encoders, **STRATEGIES).eval()
    perturb(trained.head, seed=10)
    path = trained.save_trained(tmp_path / "runs" / "fusion.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        keys, metadata = list(handle.keys()), handle.metadata()
    assert keys and all(key.startswith("head.") for key in keys)
    assert json.loads(metadata["config"]) == trained.config
    fresh = FusedEncoder(tiny_encoders, **STRATEGIES).eval()
    assert not torch.equal(fresh(images), trained(images))
    assert fresh.load_trained(path) is fresh
    assert torch.equal(fresh(images), trained(images))
    assert list(tmp_path.joinpath("runs").iterdir()) == [path]  # no temporary file left behind


def test_save_and_load_includes_unfrozen_encoders(tmp_path, images):
    kwargs = {"freeze_encoders": False, "connector": {"kind": "linear", "out_dim": 4}}
    trained = FusedEncoder([PatchMLPEncoder(seed=0)], **kwargs).eval()
    path = trained.save_trained(tmp_path / "fusion.safetensors")
    fresh = FusedEncoder([PatchMLPEncoder(seed=1)], **kwargs).eval()
    assert not torch.equal(fresh(images), trained(images))
    fresh.load_trained(path)
    assert torch.equal(fresh(images), trained(images))


def test_a_file_written_before_normalize_and_deepstack_loads(tmp_path, tiny_encoders, images):
    """Files whose config predates those fields were trained with normalised layers and no
    DeepStack sets: they load into such a model, and only into such a model."""
    trained = FusedEncoder(tiny_encoders, **STRATEGIES).eval()
    perturb(trained.head, seed=11)
    path = tmp_path / "old.safetensors"
    config = {k: v for k, v in trained.config.items() if k not in ("normalize", "deepstack_layers")}
    metadata = {"format": "encoder-fusion/trained/1", "config": json.dumps(config)}
    save_file({k: t.detach().clone() for k, t in trained.trained_state().items()}, str(path), metadata)
    fresh = FusedEncoder(tiny_encoders, **STRATEGIES).eval().load_trained(path)
    assert torch.equal(fresh(images), trained(images))
    raw = FusedEncoder(tiny_encoders, **STRATEGIES, normalize=False)
    with pytest.raises(ValueError, match=r"different config \(normalize: file True, model False\)"):
        raw.load_trained(path)


def test_load_refuses_a_file_of_another_config(tmp_path, tiny_encoders):
    path = FusedEncoder(tiny_encoders, **STRATEGIES).save_trained(tmp_path / "fusion.safetensors")
    other = FusedEncoder(tiny_encoders, **{**STRATEGIES, "connector": {"kind": "linear", "out_dim": 8}})
    with pytest.raises(
        ValueError,
        match=r"different config \(connector: file \{.*'fused_gelu_mlp'.*\}, model \{'kind': 'linear'",
    ):
        other.load_trained(path)


def test_load_refuses_missing_and_foreign_files(tmp_path, tiny_encoders):
    model = FusedEncoder(tiny_encoders)
    with pytest.raises(FileNotFoundError, match=r"no trained fusion file at .*absent.safetensors"):
        model.load_trained(tmp_path / "absent.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match=r"garbage.safetensors is not a safetensors file"):
        model.load_trained(garbage)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(2)}, str(foreign))
    with pytest.raises(ValueError, match=r"is not a trained-fusion file \(metadata format None"):
        model.load_trained(foreign)
