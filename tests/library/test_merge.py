"""Layer combines and encoder merges against their formulas written out by hand, in float64."""

import math
import re

import pytest
import torch
import torch.nn.functional as F

from encoder_fusion.align import build_aligner
from encoder_fusion.combine import LAYER_COMBINES, build_layer_combine
from encoder_fusion.merge import ENCODER_MERGES, build_encoder_merge, layout_to_grid, layout_tokens

EPS = 1e-6
GRID_3x5 = (3, 5)


def layer_norm(x, weight=None, bias=None, eps=EPS):
    """LayerNorm over the last dimension, written out."""
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def norm(x, normalize):
    """``N`` of the module docstring: the plain LayerNorm, or the identity for raw layers."""
    return layer_norm(x) if normalize else x


def tokens(grid):
    """A (B, H, W, C) grid as its row-major tokens (B, H*W, C)."""
    return grid.reshape(grid.shape[0], -1, grid.shape[-1])


def random_layers(count, grid=GRID_3x5, width=6, batch=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.randn(batch, *grid, width, generator=generator, dtype=torch.float64) * 2 + 0.5
        for _ in range(count)
    ]


def identity_aligner(width, grid):
    return build_aligner("bilinear", width, grid, grid)


def combine_of(kind, count, *, grid=GRID_3x5, width=6, normalize=True):
    return build_layer_combine(kind, width, width, count, grid, normalize).double()


def perturb(module, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype) * 0.5)


def attention(module, query, key, value):
    """``nn.MultiheadAttention`` with one head, written out."""
    w_q, w_k, w_v = module.in_proj_weight.chunk(3)
    b_q, b_k, b_v = module.in_proj_bias.chunk(3)
    q, k, v = query @ w_q.T + b_q, key @ w_k.T + b_k, value @ w_v.T + b_v
    scores = q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])
    mixed = torch.softmax(scores, dim=-1) @ v
    return mixed @ module.out_proj.weight.T + module.out_proj.bias


# -- layer combine ------------------------------------------------------------------------------


def test_layer_combine_registry_names():
    assert LAYER_COMBINES.names() == (
        "last",
        "mean",
        "concat",
        "weighted_ln",
        "dense_channel",
        "sparse_token",
        "mmfuser",
    )


@pytest.mark.parametrize("normalize", [True, False], ids=["normalized", "raw"])
def test_last_is_the_last_layer_in_hooks_order(normalize):
    layers = random_layers(3)
    out = combine_of("last", 3, normalize=normalize)(layers, identity_aligner(6, GRID_3x5))
    torch.testing.assert_close(out, tokens(norm(layers[2], normalize)))


@pytest.mark.parametrize("normalize", [True, False], ids=["normalized", "raw"])
def test_mean_is_the_mean_of_the_layers(normalize):
    layers = random_layers(3)
    out = combine_of("mean", 3, normalize=normalize)(layers, identity_aligner(6, GRID_3x5))
    torch.testing.assert_close(out, tokens(sum(norm(x, normalize) for x in layers) / 3))


@pytest.mark.parametrize("normalize", [True, False], ids=["normalized", "raw"])
def test_concat_puts_layers_side_by_side_in_order(normalize):
    """Dense Connector's sparse channel integration (raw, as the paper takes hidden states)."""
    layers = random_layers(3)
    combine = combine_of("concat", 3, normalize=normalize)
    assert combine.out_dim == 18 and combine.num_slots == 3
    out = combine(layers, identity_aligner(6, GRID_3x5))
    torch.testing.assert_close(out, tokens(torch.cat([norm(x, normalize) for x in layers], dim=-1)))


def test_weighted_ln_equals_its_formula():
    layers = random_layers(3, seed=1)
    combine = combine_of("weighted_ln", 3)
    with torch.no_grad():
        combine.logits.copy_(torch.tensor([0.3, -1.2, 2.0]))
        combine.ln_weight.normal_()
        combine.ln_bias.normal_()
    out = combine(layers, identity_aligner(6, GRID_3x5))
    a = combine.logits.detach()
    softmax = torch.exp(a) / torch.exp(a).sum()
    expected = sum(
        softmax[i] * layer_norm(layers[i], combine.ln_weight[i], combine.ln_bias[i]) for i in range(3)
    )
    torch.testing.assert_close(out, tokens(expected))
    torch.testing.assert_close(torch.tensor(combine.learned_weights(), dtype=torch.float64), softmax)


def test_raw_weighted_ln_is_the_softmax_weighted_sum_without_affine():
    layers = random_layers(3, seed=1)
    combine = combine_of("weighted_ln", 3, normalize=False)
    assert combine.ln_weight is None and combine.ln_bias is None
    with torch.no_grad():
        combine.logits.copy_(torch.tensor([0.3, -1.2, 2.0]))
    out = combine(layers, identity_aligner(6, GRID_3x5))
    a = combine.logits.detach()
    softmax = torch.exp(a) / torch.exp(a).sum()
    torch.testing.assert_close(out, tokens(sum(softmax[i] * layers[i] for i in range(3))))


def test_weighted_ln_with_linear_applies_it_before_alignment():
    layers = random_layers(2, grid=(2, 3), seed=2)
    combine = build_layer_combine({"kind": "weighted_ln", "linear": True}, 6, 6, 2, (4, 5)).double()
    with torch.no_grad():
        combine.logits.copy_(torch.tensor([1.0, -0.5]))
        combine.ln_weight.normal_()
    aligner = build_aligner("bilinear", 6, (2, 3), (4, 5))
    out = combine(layers, aligner)
    assert out.shape == (2, 20, 6)
    softmax = torch.softmax(combine.logits.detach(), dim=0)
    expected = 0
    for i, x in enumerate(layers):
        projected = x @ combine.linears[i].weight.T + combine.linears[i].bias
        upsampled = F.interpolate(
            projected.permute(0, 3, 1, 2), size=(4, 5), mode="bilinear", align_corners=False
        )
        expected = expected + softmax[i] * layer_norm(
            upsampled.permute(0, 2, 3, 1), combine.ln_weight[i], combine.ln_bias[i]
        )
    torch.testing.assert_close(out, tokens(expected))


def test_combines_with_folding_alignment_normalise_the_folded_width():
    layers = random_layers(2, grid=(4, 6), width=3)
    aligner = build_aligner("pixel_unshuffle", 3, (4, 6), (2, 3))
    combine = build_layer_combine("weighted_ln", 3, aligner.out_dim, 2, (2, 3))
    assert combine.ln_weight.shape == (2, 12)
    out = combine([x.float() for x in layers], aligner)
    folded = [F.pixel_unshuffle(x.float().permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1) for x in layers]
    torch.testing.assert_close(out, tokens((layer_norm(folded[0]) + layer_norm(folded[1])) / 2))


def test_only_weighted_ln_reports_learned_weights():
    for kind in ("last", "mean", "concat", "dense_channel", "sparse_token", "mmfuser"):
        assert build_layer_combine(kind, 4, 4, 2, GRID_3x5).learned_weights() is None
    weighted = build_layer_combine("weighted_ln", 4, 4, 3, GRID_3x5)
    assert weighted.learned_weights() == pytest.approx([1 / 3] * 3)


def test_unknown_layer_merge_lists_the_valid_ones():
    accepted = "last, mean, concat, weighted_ln, dense_channel, sparse_token, mmfuser"
    with pytest.raises(ValueError, match=re.escape(f"layer_merge='sum' is unknown; accepted: {accepted}")):
        build_layer_combine("sum", 4, 4, 2, GRID_3x5)
    with pytest.raises(ValueError, match=r"linear='yes' must be true or false"):
        build_layer_combine({"kind": "weighted_ln", "linear": "yes"}, 4, 4, 2, GRID_3x5)


# -- Dense Connector and MMFuser ----------------------------------------------------------------


@pytest.mark.parametrize("normalize", [True, False], ids=["normalized", "raw"])
@pytest.mark.parametrize(
    ("count", "groups", "members"),
    [
        (5, 2, [[0, 1, 2], [3, 4]]),
        (6, 3, [[0, 1], [2, 3], [4, 5]]),
        (4, 1, [[0, 1, 2, 3]]),
        (3, 3, [[0], [1], [2]]),
    ],
)
def test_dense_channel_concatenates_the_means_of_consecutive_groups(count, groups, members, normalize):
    layers = random_layers(count, seed=count)
    combine = combine_of({"kind": "dense_channel", "layer_groups": groups}, count, normalize=normalize)
    assert (combine.out_dim, combine.num_slots) == (6 * groups, groups)
    out = combine(layers, identity_aligner(6, GRID_3x5))
    means = [sum(norm(layers[i], normalize) for i in group) / len(group) for group in members]
    torch.testing.assert_close(out, tokens(torch.cat(means, dim=-1)))


def test_dense_channel_maps_onto_grid_fuse_slots_and_weights():
    combine = combine_of({"kind": "dense_channel", "layer_groups": 2}, 5)
    inputs = combine.fuse_inputs(random_layers(5))
    assert inputs.slots == [0, 0, 0, 1, 1]
    torch.testing.assert_close(inputs.weights, torch.tensor([1 / 3, 1 / 3, 1 / 3, 1 / 2, 1 / 2]))


def pooled(x, stride):
    """Each ``stride`` consecutive tokens of a grid averaged, written token by token; a remainder of
    fewer than ``stride`` tokens is dropped."""
    flat = tokens(x)
    count = flat.shape[1] // stride
    return torch.stack([flat[:, j * stride : (j + 1) * stride].mean(dim=1) for j in range(count)], dim=1)


@pytest.mark.parametrize("normalize", [True, False], ids=["normalized", "raw"])
@pytest.mark.parametrize("stride", [1, 4, 5, 15])
def test_sparse_token_puts_the_last_layer_then_the_pooled_others_along_the_sequence(stride, normalize):
    layers = random_layers(3, seed=stride)
    combine = combine_of({"kind": "sparse_token", "stride": stride}, 3, normalize=normalize)
    assert combine.out_dim == 6 and combine.strides == (1, stride, stride)
    out = combine(layers, identity_aligner(6, GRID_3x5))
    normed = [norm(x, normalize) for x in layers]
    expected = torch.cat([tokens(normed[2]), pooled(normed[0], stride), pooled(normed[1], stride)], dim=1)
    assert out.shape == (2, layout_tokens(GRID_3x5, combine.strides), 6) == expected.shape
    torch.testing.assert_close(out, expected)


def test_sparse_token_uses_the_papers_stride_by_default():
    combine = combine_of("sparse_token", 3, grid=(24, 24))
    assert combine.strides == (1, 8, 8) and layout_tokens((24, 24), combine.strides) == 576 + 2 * 72


@pytest.mark.parametrize("normalize", [True, False], ids=["normalized", "raw"])
def test_mmfuser_equals_attention_written_out(normalize):
    layers = random_layers(4, seed=7)
    combine = combine_of({"kind": "mmfuser", "heads": 1}, 4, normalize=normalize)
    perturb(combine, seed=7)
    assert combine.out_dim == 6 and combine.num_slots == 4
    out = combine(layers, identity_aligner(6, GRID_3x5))
    normed = [tokens(norm(x, normalize)) for x in layers]
    deep = normed[-1]
    eps = combine.norm.eps  # nn.LayerNorm's own (1e-5)
    keys = layer_norm(torch.cat(normed[:-1], dim=1), combine.key_norm.weight, combine.key_norm.bias, eps)
    queries = layer_norm(deep, combine.query_norm.weight, combine.query_norm.bias, eps)
    attended = attention(combine.cross_attention, queries, keys, keys)
    mixed = layer_norm(attended, combine.norm.weight, combine.norm.bias, eps)
    expected = deep + attended + attention(combine.self_attention, mixed, mixed, mixed)
    torch.testing.assert_close(out, expected)


def test_mmfuser_trains_every_parameter():
    combine = build_layer_combine("mmfuser", 8, 8, 3, GRID_3x5)
    out = combine([x.float() for x in random_layers(3, width=8)], identity_aligner(8, GRID_3x5))
    (out * torch.randn_like(out)).sum().backward()
    for name, parameter in combine.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


@pytest.mark.parametrize(
    ("layer_merge", "count", "grid", "message"),
    [
        (
            {"kind": "dense_channel", "layer_groups": 0},
            3,
            GRID_3x5,
            "layer_merge='dense_channel' option layer_groups=0 must be an int from 1 to the number of "
            "hooked layers (3)",
        ),
        (
            {"kind": "dense_channel", "layer_groups": 4},
            3,
            GRID_3x5,
            "option layer_groups=4 must be an int from 1 to the number of hooked layers (3)",
        ),
        (
            {"kind": "dense_channel", "layer_groups": 1.5},
            3,
            GRID_3x5,
            "option layer_groups=1.5 must be an int from 1",
        ),
        (
            "mmfuser",
            1,
            GRID_3x5,
            "layer_merge='mmfuser' needs at least 2 hooked layers (the deepest as queries, the others "
            "as keys and values), got 1; accepted: hooks with 2 or more layers",
        ),
        (
            "sparse_token",
            3,
            (2, 3),
            "layer_merge='sparse_token' averages every 8 consecutive tokens (option stride), but the "
            "2x3 grid has only 6, too few for one; accepted: a grid of at least 8 tokens, or stride <= 6",
        ),
        (
            {"kind": "sparse_token", "stride": 0},
            3,
            GRID_3x5,
            "layer_merge='sparse_token' option stride=0 must be an int >= 1",
        ),
    ],
)
def test_bad_multilayer_settings_are_named(layer_merge, count, grid, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build_layer_combine(layer_merge, 6, 6, count, grid)
    combine, options = LAYER_COMBINES.strategy(layer_merge)
    with pytest.raises(ValueError, match=re.escape(message)):
        combine.check(count, grid, options)  # the same check, before anything is built


# -- token layouts ------------------------------------------------------------------------------


def test_layout_to_grid_averages_the_tokens_covering_each_cell():
    """Cell i gets its own token of the stride-1 set and token i // s of a stride-s set (when that
    token exists: the remainder of a pooled set covers nothing)."""
    grid, strides = (3, 5), (1, 4, 2)
    generator = torch.Generator().manual_seed(3)
    count = layout_tokens(grid, strides)
    assert count == 15 + 3 + 7
    values = torch.randn(2, count, 4, generator=generator, dtype=torch.float64)
    expected = torch.zeros(2, 15, 4, dtype=torch.float64)
    for cell in range(15):
        covering = [values[:, cell]]
        if cell < 12:
            covering.append(values[:, 15 + cell // 4])
        if cell < 14:
            covering.append(values[:, 18 + cell // 2])
        expected[:, cell] = sum(covering) / len(covering)
    torch.testing.assert_close(layout_to_grid(values, grid, strides), expected.reshape(2, 3, 5, 4))
    plain = values[:, :15]
    torch.testing.assert_close(layout_to_grid(plain, grid, (1,)), plain.reshape(2, 3, 5, 4))


# -- encoder merge ------------------------------------------------------------------------------

GRID = (2, 3)


def encoder_grids(count=2, width=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(2, *GRID, width, generator=generator) for _ in range(count)]


def test_encoder_merge_registry_names():
    assert ENCODER_MERGES.names() == (
        "channel_concat",
        "sequence_concat",
        "interleave",
        "add",
        "gated_add",
        "cross_attention",
    )


def test_channel_concat_takes_different_widths_in_encoder_order():
    a, b = torch.randn(2, *GRID, 3), torch.randn(2, *GRID, 5)
    merge = build_encoder_merge("channel_concat", ["a", "b"], [3, 5], GRID)
    assert (merge.out_dim, merge.output_tokens) == (8, 6)
    merged = merge([tokens(a), tokens(b)])
    torch.testing.assert_close(merged[:, :, :3], a.reshape(2, 6, 3))
    torch.testing.assert_close(merged[:, :, 3:], b.reshape(2, 6, 5))
    torch.testing.assert_close(merge.to_grid(merged), torch.cat([a, b], dim=-1))


@pytest.mark.parametrize("count", [2, 3])
def test_sequence_concat_gives_each_encoders_tokens_in_turn(count):
    grids = encoder_grids(count)
    merge = build_encoder_merge("sequence_concat", [f"e{i}" for i in range(count)], [4] * count, GRID)
    merged = merge([tokens(g) for g in grids])
    assert merged.shape == (2, count * 6, 4) and merge.output_tokens == count * 6
    for e, grid in enumerate(grids):
        for row in range(GRID[0]):
            for col in range(GRID[1]):
                assert torch.equal(merged[:, e * 6 + row * GRID[1] + col], grid[:, row, col])
    torch.testing.assert_close(merge.to_grid(merged), sum(grids) / count)


@pytest.mark.parametrize("count", [2, 3])
def test_interleave_alternates_encoders_location_by_location(count):
    grids = encoder_grids(count, seed=1)
    merge = build_encoder_merge("interleave", [f"e{i}" for i in range(count)], [4] * count, GRID)
    merged = merge([tokens(g) for g in grids])
    assert merged.shape == (2, count * 6, 4) and merge.output_tokens == count * 6
    for row in range(GRID[0]):
        for col in range(GRID[1]):
            location = row * GRID[1] + col
            for e, grid in enumerate(grids):
                assert torch.equal(merged[:, location * count + e], grid[:, row, col])
    torch.testing.assert_close(merge.to_grid(merged), sum(grids) / count)


def test_add_is_the_sum():
    grids = encoder_grids(3, seed=2)
    merge = build_encoder_merge("add", ["a", "b", "c"], [4, 4, 4], GRID)
    merged = merge([tokens(g) for g in grids])
    torch.testing.assert_close(merged, (grids[0] + grids[1] + grids[2]).reshape(2, 6, 4))
    torch.testing.assert_close(merge.to_grid(merged), grids[0] + grids[1] + grids[2])


def test_gated_add_is_the_gated_sum():
    grids = encoder_grids(2, seed=3)
    merge = build_encoder_merge("gated_add", ["a", "b"], [4, 4], GRID)
    halves = (grids[0] + grids[1]) / 2
    torch.testing.assert_close(merge([tokens(g) for g in grids]), halves.reshape(2, 6, 4))
    with torch.no_grad():
        merge.gates.normal_()
    gate = 1 / (1 + torch.exp(-merge.gates.detach()))
    expected = gate[0] * grids[0] + gate[1] * grids[1]
    torch.testing.assert_close(merge([tokens(g) for g in grids]), expected.reshape(2, 6, 4))


def test_cross_attention_equals_attention_written_out():
    torch.manual_seed(4)
    grids = [g.double() for g in encoder_grids(2, seed=4)]
    merge = build_encoder_merge({"kind": "cross_attention", "heads": 1}, ["a", "b"], [4, 4], GRID).double()
    with torch.no_grad():
        merge.source_embedding.normal_()
    merged = merge([tokens(g) for g in grids])
    assert merged.shape == (2, 6, 4) and merge.output_tokens == 6
    keys = torch.cat([g.reshape(2, 6, 4) + merge.source_embedding[e] for e, g in enumerate(grids)], dim=1)
    keys = layer_norm(keys, merge.norm.weight, merge.norm.bias, eps=merge.norm.eps)
    queries = merge.queries.expand(2, -1, -1)
    torch.testing.assert_close(merged, attention(merge.attention, queries, keys, keys))
    torch.testing.assert_close(merge.to_grid(merged), merged.reshape(2, *GRID, 4))


@pytest.mark.parametrize(
    ("kind", "per_encoder", "total"),
    [
        ("channel_concat", 15 + 3, 18),
        ("sequence_concat", 18, 36),
        ("interleave", 18, 36),
        ("add", 18, 18),
        ("cross_attention", 18, 15),
    ],
)
def test_merges_take_a_layout_of_several_token_sets(kind, per_encoder, total):
    """sparse_token's layout (the grid, then a set pooled by 5): the merges line the encoders up
    token by token and map back through the layout."""
    grid, strides = (3, 5), (1, 5)
    generator = torch.Generator().manual_seed(5)
    parts = [torch.randn(2, per_encoder, 4, generator=generator) for _ in range(2)]
    merge = build_encoder_merge(kind, ["a", "b"], [4, 4], grid, strides)
    merged = merge(parts)
    assert merge.tokens == per_encoder and merged.shape[1] == merge.output_tokens == total
    if kind == "cross_attention":
        expected = merged.reshape(2, 3, 5, -1)
    elif kind in ("sequence_concat", "interleave"):
        expected = layout_to_grid((parts[0] + parts[1]) / 2, grid, strides)
    else:
        expected = layout_to_grid(merged, grid, strides)
    torch.testing.assert_close(merge.to_grid(merged), expected)


@pytest.mark.parametrize("kind", ["sequence_concat", "interleave", "add", "gated_add", "cross_attention"])
def test_merges_needing_one_width_name_the_widths_and_merge_dim(kind):
    message = (
        f"encoder_merge='{kind}' needs every encoder at one width, got {{'clip': 4, 'dino': 6}}; "
        "set merge_dim"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        build_encoder_merge(kind, ["clip", "dino"], [4, 6], GRID)


def test_unknown_encoder_merge_lists_the_valid_ones():
    accepted = "channel_concat, sequence_concat, interleave, add, gated_add, cross_attention"
    with pytest.raises(
        ValueError, match=re.escape(f"encoder_merge='concat' is unknown; accepted: {accepted}")
    ):
        build_encoder_merge("concat", ["a", "b"], [4, 4], GRID)
    with pytest.raises(ValueError, match=re.escape("encoder_merge='add' got unknown option(s) ['heads']")):
        build_encoder_merge({"kind": "add", "heads": 2}, ["a", "b"], [4, 4], GRID)
