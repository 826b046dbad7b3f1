"""Layer combines and encoder merges against their formulas written out by hand."""

import re

import pytest
import torch
import torch.nn.functional as F

from fusion.align import build_aligner
from fusion.merge import ENCODER_MERGES, LAYER_COMBINES, build_encoder_merge, build_layer_combine

EPS = 1e-6


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


def random_layers(count, grid=(3, 5), width=6, batch=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.randn(batch, *grid, width, generator=generator, dtype=torch.float64) * 2 + 0.5
        for _ in range(count)
    ]


def identity_aligner(width, grid):
    return build_aligner("bilinear", width, grid, grid)


# -- layer combine ------------------------------------------------------------------------------


def test_layer_combine_registry_names():
    assert LAYER_COMBINES.names() == ("last", "mean", "concat", "weighted_ln")


def test_last_is_the_normalised_last_layer_in_hooks_order():
    layers = random_layers(3)
    out = build_layer_combine("last", 6, 6, 3)(layers, identity_aligner(6, (3, 5)))
    torch.testing.assert_close(out, layer_norm(layers[2]))


def test_mean_is_the_mean_of_normalised_layers():
    layers = random_layers(3)
    out = build_layer_combine("mean", 6, 6, 3)(layers, identity_aligner(6, (3, 5)))
    torch.testing.assert_close(out, sum(layer_norm(x) for x in layers) / 3)


def test_concat_puts_normalised_layers_side_by_side_in_order():
    layers = random_layers(3)
    combine = build_layer_combine("concat", 6, 6, 3)
    assert combine.out_dim == 18 and combine.num_slots == 3
    out = combine(layers, identity_aligner(6, (3, 5)))
    torch.testing.assert_close(out, torch.cat([layer_norm(x) for x in layers], dim=-1))


def test_weighted_ln_equals_its_formula():
    layers = random_layers(3, seed=1)
    combine = build_layer_combine("weighted_ln", 6, 6, 3).double()
    with torch.no_grad():
        combine.logits.copy_(torch.tensor([0.3, -1.2, 2.0]))
        combine.ln_weight.normal_()
        combine.ln_bias.normal_()
    out = combine(layers, identity_aligner(6, (3, 5)))
    a = combine.logits.detach()
    softmax = torch.exp(a) / torch.exp(a).sum()
    expected = sum(
        softmax[i] * layer_norm(layers[i], combine.ln_weight[i], combine.ln_bias[i]) for i in range(3)
    )
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(torch.tensor(combine.learned_weights(), dtype=torch.float64), softmax)


def test_weighted_ln_with_linear_applies_it_before_alignment():
    layers = random_layers(2, grid=(2, 3), seed=2)
    combine = build_layer_combine({"kind": "weighted_ln", "linear": True}, 6, 6, 2).double()
    with torch.no_grad():
        combine.logits.copy_(torch.tensor([1.0, -0.5]))
        combine.ln_weight.normal_()
    aligner = build_aligner("bilinear", 6, (2, 3), (4, 5))
    out = combine(layers, aligner)
    assert out.shape == (2, 4, 5, 6)
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
    torch.testing.assert_close(out, expected)


def test_combines_with_folding_alignment_normalise_the_folded_width():
    layers = random_layers(2, grid=(4, 6), width=3)
    aligner = build_aligner("pixel_unshuffle", 3, (4, 6), (2, 3))
    combine = build_layer_combine("weighted_ln", 3, aligner.out_dim, 2)
    assert combine.ln_weight.shape == (2, 12)
    out = combine([x.float() for x in layers], aligner)
    folded = [F.pixel_unshuffle(x.float().permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1) for x in layers]
    torch.testing.assert_close(out, (layer_norm(folded[0]) + layer_norm(folded[1])) / 2)


def test_only_weighted_ln_reports_learned_weights():
    for kind in ("last", "mean", "concat"):
        assert build_layer_combine(kind, 4, 4, 2).learned_weights() is None
    assert build_layer_combine("weighted_ln", 4, 4, 3).learned_weights() == pytest.approx([1 / 3] * 3)


def test_unknown_layer_merge_lists_the_valid_ones():
    message = "layer_merge='sum' is unknown; accepted: last, mean, concat, weighted_ln"
    with pytest.raises(ValueError, match=re.escape(message)):
        build_layer_combine("sum", 4, 4, 2)
    with pytest.raises(ValueError, match=r"linear='yes' must be true or false"):
        build_layer_combine({"kind": "weighted_ln", "linear": "yes"}, 4, 4, 2)


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
    tokens = merge([a, b])
    torch.testing.assert_close(tokens[:, :, :3], a.reshape(2, 6, 3))
    torch.testing.assert_close(tokens[:, :, 3:], b.reshape(2, 6, 5))
    torch.testing.assert_close(merge.to_grid(tokens), torch.cat([a, b], dim=-1))


@pytest.mark.parametrize("count", [2, 3])
def test_sequence_concat_gives_each_encoders_tokens_in_turn(count):
    grids = encoder_grids(count)
    merge = build_encoder_merge("sequence_concat", [f"e{i}" for i in range(count)], [4] * count, GRID)
    tokens = merge(grids)
    assert tokens.shape == (2, count * 6, 4) and merge.output_tokens == count * 6
    for e, grid in enumerate(grids):
        for row in range(GRID[0]):
            for col in range(GRID[1]):
                assert torch.equal(tokens[:, e * 6 + row * GRID[1] + col], grid[:, row, col])
    torch.testing.assert_close(merge.to_grid(tokens), sum(grids) / count)


@pytest.mark.parametrize("count", [2, 3])
def test_interleave_alternates_encoders_location_by_location(count):
    grids = encoder_grids(count, seed=1)
    merge = build_encoder_merge("interleave", [f"e{i}" for i in range(count)], [4] * count, GRID)
    tokens = merge(grids)
    assert tokens.shape == (2, count * 6, 4) and merge.output_tokens == count * 6
    for row in range(GRID[0]):
        for col in range(GRID[1]):
            location = row * GRID[1] + col
            for e, grid in enumerate(grids):
                assert torch.equal(tokens[:, location * count + e], grid[:, row, col])
    torch.testing.assert_close(merge.to_grid(tokens), sum(grids) / count)


def test_add_is_the_sum():
    grids = encoder_grids(3, seed=2)
    merge = build_encoder_merge("add", ["a", "b", "c"], [4, 4, 4], GRID)
    tokens = merge(grids)
    torch.testing.assert_close(tokens, (grids[0] + grids[1] + grids[2]).reshape(2, 6, 4))
    torch.testing.assert_close(merge.to_grid(tokens), grids[0] + grids[1] + grids[2])


def test_gated_add_is_the_gated_sum():
    grids = encoder_grids(2, seed=3)
    merge = build_encoder_merge("gated_add", ["a", "b"], [4, 4], GRID)
    torch.testing.assert_close(merge(grids), ((grids[0] + grids[1]) / 2).reshape(2, 6, 4))
    with torch.no_grad():
        merge.gates.normal_()
    gate = 1 / (1 + torch.exp(-merge.gates.detach()))
    expected = gate[0] * grids[0] + gate[1] * grids[1]
    torch.testing.assert_close(merge(grids), expected.reshape(2, 6, 4))


def test_cross_attention_equals_attention_written_out():
    torch.manual_seed(4)
    grids = [g.double() for g in encoder_grids(2, seed=4)]
    merge = build_encoder_merge({"kind": "cross_attention", "heads": 1}, ["a", "b"], [4, 4], GRID).double()
    with torch.no_grad():
        merge.source_embedding.normal_()
    tokens = merge(grids)
    assert tokens.shape == (2, 6, 4) and merge.output_tokens == 6
    keys = torch.cat([g.reshape(2, 6, 4) + merge.source_embedding[e] for e, g in enumerate(grids)], dim=1)
    keys = layer_norm(keys, merge.norm.weight, merge.norm.bias, eps=merge.norm.eps)
    w_q, w_k, w_v = merge.attention.in_proj_weight.chunk(3)
    b_q, b_k, b_v = merge.attention.in_proj_bias.chunk(3)
    scores = (merge.queries @ w_q.T + b_q) @ (keys @ w_k.T + b_k).transpose(1, 2) / 2.0
    mixed = torch.softmax(scores, dim=-1) @ (keys @ w_v.T + b_v)
    expected = mixed @ merge.attention.out_proj.weight.T + merge.attention.out_proj.bias
    torch.testing.assert_close(tokens, expected)
    torch.testing.assert_close(merge.to_grid(tokens), tokens.reshape(2, *GRID, 4))


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
