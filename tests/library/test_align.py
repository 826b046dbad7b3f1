"""Grid alignment modes: hand-worked cases, PyTorch's own operators as references, and bad input."""

import re

import pytest
import torch
import torch.nn.functional as F

from encoder_fusion.align import ALIGNERS, build_aligner
from encoder_fusion.registry import Registry


def channels_first(op, x):
    """Apply a (B, C, H, W) operator to a channels-last grid."""
    return op(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


def test_registry_names_every_mode():
    assert ALIGNERS.names() == ("bilinear", "bicubic", "nearest", "area", "pixel_unshuffle", "learned")


def test_bilinear_hand_worked_upsample():
    # 1x2 -> 1x4 with align_corners=False: sources at -0.25 (clamped to 0), 0.25, 0.75, 1.25 (clamped)
    x = torch.tensor([0.0, 4.0]).view(1, 1, 2, 1)
    out = build_aligner("bilinear", 1, (1, 2), (1, 4))(x)
    torch.testing.assert_close(out.flatten(), torch.tensor([0.0, 1.0, 3.0, 4.0]))


def test_bilinear_hand_worked_downsample_to_one_cell():
    # 2x2 -> 1x1 samples the centre: the mean of the four cells, per channel
    x = torch.tensor([[1.0, 10.0], [3.0, 30.0], [5.0, 50.0], [7.0, 70.0]]).view(1, 2, 2, 2)
    out = build_aligner("bilinear", 2, (2, 2), (1, 1))(x)
    torch.testing.assert_close(out.flatten(), torch.tensor([4.0, 40.0]))


def test_area_hand_worked_block_means():
    x = torch.arange(16.0).view(1, 4, 4, 1)
    out = build_aligner("area", 1, (4, 4), (2, 2))(x)
    expected = torch.tensor(
        [[(0 + 1 + 4 + 5) / 4, (2 + 3 + 6 + 7) / 4], [(8 + 9 + 12 + 13) / 4, (10 + 11 + 14 + 15) / 4]]
    )
    torch.testing.assert_close(out[0, ..., 0], expected)


@pytest.mark.parametrize(("in_grid", "out_grid"), [((5, 7), (3, 2)), ((3, 2), (5, 7)), ((6, 4), (4, 6))])
def test_interpolating_modes_match_pytorch(in_grid, out_grid):
    x = torch.randn(2, *in_grid, 5)
    references = {
        "bilinear": lambda t: F.interpolate(t, size=out_grid, mode="bilinear", align_corners=False),
        "bicubic": lambda t: F.interpolate(t, size=out_grid, mode="bicubic", align_corners=False),
        "nearest": lambda t: F.interpolate(t, size=out_grid, mode="nearest"),
        "area": lambda t: F.adaptive_avg_pool2d(t, out_grid),
    }
    for mode, reference in references.items():
        aligner = build_aligner(mode, 5, in_grid, out_grid)
        assert aligner.out_dim == 5
        torch.testing.assert_close(aligner(x), channels_first(reference, x), msg=mode)


@pytest.mark.parametrize("mode", ["bilinear", "bicubic", "nearest", "area"])
def test_interpolating_modes_are_the_identity_on_a_matching_grid(mode):
    x = torch.randn(2, 3, 5, 4)
    assert build_aligner(mode, 4, (3, 5), (3, 5))(x) is x


def test_pixel_unshuffle_matches_pytorch_for_a_square_factor():
    x = torch.randn(2, 6, 4, 3)
    aligner = build_aligner("pixel_unshuffle", 3, (6, 4), (3, 2))
    assert aligner.out_dim == 12
    torch.testing.assert_close(aligner(x), channels_first(lambda t: F.pixel_unshuffle(t, 2), x))


def test_pixel_unshuffle_unequal_factors_by_hand():
    x = torch.randn(1, 6, 4, 2)
    aligner = build_aligner("pixel_unshuffle", 2, (6, 4), (2, 4))  # kh = 3, kw = 1
    out = aligner(x)
    assert out.shape == (1, 2, 4, 6)
    for i in range(2):
        for j in range(4):
            for c in range(2):
                for di in range(3):
                    assert out[0, i, j, c * 3 + di] == x[0, 3 * i + di, j, c]


def test_pixel_unshuffle_rejects_indivisible_grids_naming_the_sizes():
    with pytest.raises(ValueError, match=r"cannot fold a 7x6 grid onto 2x3"):
        build_aligner("pixel_unshuffle", 4, (7, 6), (2, 3))
    with pytest.raises(ValueError, match=r"cannot fold a 2x2 grid onto 4x4"):
        build_aligner("pixel_unshuffle", 4, (2, 2), (4, 4))


def test_learned_resampler_shapes_and_gradients():
    torch.manual_seed(0)
    aligner = build_aligner({"kind": "learned", "heads": 2}, 6, (5, 3), (2, 4))
    assert aligner.out_dim == 6 and aligner.attention.num_heads == 2
    x = torch.randn(3, 5, 3, 6)
    out = aligner(x)
    assert out.shape == (3, 2, 4, 6) and torch.isfinite(out).all()
    (out * torch.randn_like(out)).sum().backward()
    assert aligner.queries.grad is not None and aligner.queries.grad.abs().sum() > 0
    # every output cell reads the input: change the input, change each cell
    changed = aligner(x + torch.randn_like(x))
    assert (changed - out).abs().amax(dim=-1).min() > 0


def test_learned_resampler_matches_attention_written_out():
    torch.manual_seed(1)
    aligner = build_aligner({"kind": "learned", "heads": 2}, 4, (2, 3), (1, 2)).double()
    x = torch.randn(2, 2, 3, 4, dtype=torch.float64)
    keys = F.layer_norm(x.reshape(2, 6, 4), (4,), aligner.norm.weight, aligner.norm.bias)
    w_q, w_k, w_v = aligner.attention.in_proj_weight.chunk(3)
    b_q, b_k, b_v = aligner.attention.in_proj_bias.chunk(3)
    q = (aligner.queries @ w_q.T + b_q).view(2, 2, 2).transpose(0, 1)  # (heads, queries, head_dim)
    k = (keys @ w_k.T + b_k).view(2, 6, 2, 2).permute(0, 2, 1, 3)  # (B, heads, tokens, head_dim)
    v = (keys @ w_v.T + b_v).view(2, 6, 2, 2).permute(0, 2, 1, 3)
    attention = torch.softmax(q @ k.transpose(-1, -2) / 2**0.5, dim=-1)
    mixed = (attention @ v).permute(0, 2, 1, 3).reshape(2, 2, 4)
    expected = mixed @ aligner.attention.out_proj.weight.T + aligner.attention.out_proj.bias
    torch.testing.assert_close(aligner(x), expected.view(2, 1, 2, 4))


def test_learned_resampler_rejects_heads_that_do_not_divide_the_width():
    with pytest.raises(ValueError, match=r"heads=3 must be a positive divisor of the width 8"):
        build_aligner({"kind": "learned", "heads": 3}, 8, (2, 2), (2, 2))


def test_unknown_mode_lists_the_valid_ones():
    accepted = "bilinear, bicubic, nearest, area, pixel_unshuffle, learned"
    with pytest.raises(ValueError, match=re.escape(f"align='lanczos' is unknown; accepted: {accepted}")):
        build_aligner("lanczos", 4, (2, 2), (2, 2))


def test_unknown_option_and_missing_kind_are_named():
    with pytest.raises(
        ValueError, match=re.escape("align='bilinear' got unknown option(s) ['heads']; accepted: none")
    ):
        build_aligner({"kind": "bilinear", "heads": 2}, 4, (2, 2), (2, 2))
    with pytest.raises(ValueError, match=r"align=\{'heads': 2\} has no 'kind'"):
        build_aligner({"heads": 2}, 4, (2, 2), (2, 2))
    with pytest.raises(ValueError, match=r"align must be a name or a mapping with 'kind', got int 3"):
        build_aligner(3, 4, (2, 2), (2, 2))


def test_registry_canonical_form_fills_defaults():
    registry = Registry("thing")

    @registry.register("widget")
    class Widget:
        def __init__(self, size, *, depth=2, norm=False):
            self.size, self.depth, self.norm = size, depth, norm

    assert registry.canonical("widget") == {"kind": "widget", "depth": 2, "norm": False}
    assert registry.canonical({"kind": "widget", "depth": 5}) == {"kind": "widget", "depth": 5, "norm": False}
    built = registry.build({"kind": "widget", "norm": True}, 7)
    assert (built.size, built.depth, built.norm) == (7, 2, True)
