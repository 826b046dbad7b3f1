"""The Dense Connector and MMFuser layer merges inside FusionHead: every encoder merge, alignment and
normalisation; their token layouts; what they refuse. (Their formulas: tests/library/test_merge.py.)"""

import re

import pytest
import torch

from encoder_fusion import EncoderGeometry, FusionHead

# two encoders of different widths and grids, hooking as many layers (sparse_token lines up the
# encoders' token sets, one per hooked layer)
GEOMETRIES = [EncoderGeometry("clip", 8, (4, 6), 3), EncoderGeometry("dino", 6, (2, 3), 3)]
LAYER_MERGES = {
    "dense_channel": {"kind": "dense_channel", "layer_groups": 2},
    "sparse_token": {"kind": "sparse_token", "stride": 2},
    "mmfuser": {"kind": "mmfuser"},
}
ENCODER_MERGES = ("channel_concat", "sequence_concat", "interleave", "add", "gated_add", "cross_attention")
SEQUENCE_MERGES = ("sequence_concat", "interleave")


def random_grids(geometries=GEOMETRIES, batch=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [
        [torch.randn(batch, *g.grid, g.width, generator=generator) * 2 + 1 for _ in range(g.num_layers)]
        for g in geometries
    ]


def head_for(layer_merge, encoder_merge="channel_concat", align="bilinear", **kwargs):
    grid = (2, 3) if align == "pixel_unshuffle" else (3, 5)
    merge_dim = None if encoder_merge == "channel_concat" else 10
    options = {"connector": {"kind": "mlp", "out_dim": 7}, "merge_dim": merge_dim, **kwargs}
    return FusionHead(
        GEOMETRIES,
        grid=grid,
        align=align,
        layer_merge=LAYER_MERGES[layer_merge],
        encoder_merge=encoder_merge,
        **options,
    )


@pytest.mark.parametrize("normalize", [True, False], ids=["normalized", "raw"])
@pytest.mark.parametrize("align", ["bilinear", "pixel_unshuffle", "learned"])
@pytest.mark.parametrize("encoder_merge", ENCODER_MERGES)
@pytest.mark.parametrize("layer_merge", LAYER_MERGES)
def test_head_matrix(layer_merge, encoder_merge, align, normalize):
    torch.manual_seed(0)
    head = head_for(layer_merge, encoder_merge, align, normalize=normalize)
    out = head(random_grids())
    cells = 6 if align == "pixel_unshuffle" else 15
    per_encoder = cells + 2 * (cells // 2) if layer_merge == "sparse_token" else cells
    expected = {"cross_attention": cells, "sequence_concat": 2 * per_encoder, "interleave": 2 * per_encoder}
    assert head.output_tokens == expected.get(encoder_merge, per_encoder)
    assert out.shape == (2, head.output_tokens, 7) and torch.isfinite(out).all()
    grid = (2, 3) if align == "pixel_unshuffle" else (3, 5)
    assert head.to_grid(out).shape == (2, *grid, 7)
    (out * torch.randn_like(out)).sum().backward()
    for name, parameter in head.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, f"the gradient of {name} is all zero"


def test_only_dense_channel_rides_the_one_call_route():
    assert head_for("dense_channel").fused_route
    assert not head_for("sparse_token").fused_route and not head_for("mmfuser").fused_route


def test_sparse_token_widths_and_layout():
    head = head_for("sparse_token")
    # clip: 8 wide, 3 layers -> 15 cells + 2 sets of 7 pooled tokens; channel concat: 8 + 6 channels
    assert head.merge.strides == (1, 2, 2) and head.output_tokens == 29 and head.merge.out_dim == 14
    assert head_for("dense_channel").merge.out_dim == 2 * 8 + 2 * 6
    assert head_for("mmfuser").merge.out_dim == 8 + 6


def test_sparse_token_to_grid_averages_each_cell_over_its_token_sets():
    head = head_for("sparse_token", connector=None)
    tokens = torch.randn(2, 29, 7)
    grid = head.to_grid(tokens)
    cell = 4  # row-major; covered by its own token and by token 2 (cells 4-5) of both pooled sets
    expected = (tokens[:, cell] + tokens[:, 15 + 2] + tokens[:, 22 + 2]) / 3
    torch.testing.assert_close(grid.reshape(2, 15, 7)[:, cell], expected)
    last = 14  # the remainder of a 15-cell grid at stride 2: only its own token covers it
    torch.testing.assert_close(grid.reshape(2, 15, 7)[:, last], tokens[:, last])


def test_sparse_token_needs_every_encoder_to_hook_as_many_layers():
    geometries = [EncoderGeometry("clip", 8, (4, 6), 3), EncoderGeometry("dino", 6, (2, 3), 2)]
    message = (
        "layer_merge='sparse_token' gives each encoder one token set per hooked layer; the encoders' "
        "tokens line up only when they hook as many layers, got {'clip': 3, 'dino': 2}"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        FusionHead(geometries, grid=(3, 5), layer_merge="sparse_token")


@pytest.mark.parametrize(
    ("layer_merge", "message"),
    [
        (
            {"kind": "dense_channel", "layer_groups": 4},
            "encoder 'clip': layer_merge='dense_channel' option layer_groups=4 must be an int from 1 to "
            "the number of hooked layers (3)",
        ),
        (
            "sparse_token",
            "encoder 'clip': layer_merge='sparse_token' averages every 8 consecutive tokens (option "
            "stride), but the 2x3 grid has only 6, too few for one",
        ),
    ],
)
def test_the_head_names_the_encoder_a_layer_merge_cannot_take(layer_merge, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        FusionHead(GEOMETRIES, grid=(2, 3), layer_merge=layer_merge)


def test_mmfuser_needs_two_hooked_layers_per_encoder():
    geometries = [EncoderGeometry("clip", 8, (4, 6), 3), EncoderGeometry("dino", 6, (2, 3), 1)]
    with pytest.raises(ValueError, match=r"encoder 'dino': layer_merge='mmfuser' needs at least 2 hooked"):
        FusionHead(geometries, layer_merge="mmfuser")


def test_normalize_must_be_a_bool():
    with pytest.raises(ValueError, match=r"normalize must be true or false, got 1"):
        FusionHead(GEOMETRIES, normalize=1)
