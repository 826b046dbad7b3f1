"""``encoder_fusion.kernels.reference.grid_fuse`` against a naive implementation written with loops over
tokens."""

import math
import re

import numpy as np
import pytest
import torch

from encoder_fusion.kernels.reference import grid_fuse

EPS = 1e-6


# -- the naive implementation: one output token at a time, float64 -----------------------------


def bilinear_taps(dst: int, in_size: int, out_size: int) -> list[tuple[int, float]]:
    """Source indices and weights of output index ``dst`` (align_corners=False, edge clamped)."""
    src = max((dst + 0.5) * in_size / out_size - 0.5, 0.0)
    low = math.floor(src)
    high = min(low + 1, in_size - 1)
    frac = src - low
    return [(low, 1.0 - frac), (high, frac)]


def nearest_taps(dst: int, in_size: int, out_size: int) -> list[tuple[int, float]]:
    """PyTorch's ``nearest``: floor(dst * in/out), the scale and product in float32."""
    scale = np.float32(in_size) / np.float32(out_size)
    return [(min(int(np.floor(np.float32(dst) * scale)), in_size - 1), 1.0)]


def area_taps(dst: int, in_size: int, out_size: int) -> list[tuple[int, float]]:
    """Adaptive average pooling: the cells from floor(dst*in/out) to ceil((dst+1)*in/out)."""
    start = (dst * in_size) // out_size
    end = -((-(dst + 1) * in_size) // out_size)
    return [(i, 1.0 / (end - start)) for i in range(start, end)]


TAPS = {"bilinear": bilinear_taps, "nearest": nearest_taps, "area": area_taps}


def naive_grid_fuse(sources, out_hw, groups, weights, ln_weight, ln_bias, mode, normalize=True):
    """The definition, token by token, in float64 Python loops."""
    out_h, out_w = out_hw
    batch = sources[0].shape[0]
    widths = {}
    for g, x in zip(groups, sources):
        widths[g] = x.shape[-1]
    offsets = np.cumsum([0] + [widths[g] for g in range(len(widths))])
    out = torch.zeros(batch, out_h * out_w, int(offsets[-1]), dtype=torch.float64)
    for b in range(batch):
        for i in range(out_h):
            for j in range(out_w):
                for s, (g, x) in enumerate(zip(groups, sources)):
                    h, w = x.shape[1:3]
                    if (h, w) == (out_h, out_w):
                        token = x[b, i, j].double()
                    else:
                        token = torch.zeros(x.shape[-1], dtype=torch.float64)
                        for row, row_weight in TAPS[mode](i, h, out_h):
                            for col, col_weight in TAPS[mode](j, w, out_w):
                                token = token + row_weight * col_weight * x[b, row, col].double()
                    normed = token
                    if normalize:
                        mean = token.sum() / token.numel()
                        var = ((token - mean) ** 2).sum() / token.numel()
                        normed = (token - mean) / math.sqrt(var + EPS)
                    if ln_weight is not None and ln_weight[s] is not None:
                        normed = normed * ln_weight[s].double()
                    if ln_bias is not None and ln_bias[s] is not None:
                        normed = normed + ln_bias[s].double()
                    out[b, i * out_w + j, offsets[g] : offsets[g + 1]] += float(weights[s]) * normed
    return out


# -- cases: (source shapes (h, w, C), groups, out_hw) -------------------------------------------

CASES = {
    "two groups, non-square, up and down": ([(3, 5, 4), (7, 2, 4), (4, 4, 6)], [0, 0, 1], (5, 3)),
    "1x1 up to 3x4": ([(1, 1, 5), (2, 3, 5)], [0, 0], (3, 4)),
    "down to 1x1": ([(5, 5, 3), (4, 2, 7)], [0, 1], (1, 1)),
    "three groups out of order, one already on the grid": (
        [(2, 3, 3), (4, 6, 5), (4, 6, 3), (9, 7, 2)],
        [1, 0, 1, 2],
        (4, 6),
    ),
    "odd sizes, area remainders": ([(7, 5, 3), (3, 7, 3)], [0, 0], (3, 4)),
}


def random_inputs(shapes, groups, *, batch=2, affine="all", seed=0):
    generator = torch.Generator().manual_seed(seed)
    sources = [
        torch.randn(batch, h, w, c, generator=generator, dtype=torch.float64) * 3 + 1 for h, w, c in shapes
    ]
    weights = torch.randn(len(shapes), generator=generator, dtype=torch.float64)
    ln_weight = [torch.randn(c, generator=generator, dtype=torch.float64) for _, _, c in shapes]
    ln_bias = [torch.randn(c, generator=generator, dtype=torch.float64) for _, _, c in shapes]
    if affine == "none":
        ln_weight = ln_bias = None
    elif affine == "some":
        ln_weight[0] = None
        ln_bias[-1] = None
    return sources, weights, ln_weight, ln_bias


@pytest.mark.parametrize("mode", ["bilinear", "nearest", "area"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("affine", ["all", "none", "some"])
def test_reference_matches_naive_loops(mode, case, affine):
    shapes, groups, out_hw = CASES[case]
    sources, weights, ln_weight, ln_bias = random_inputs(
        shapes, groups, affine=affine, seed=list(CASES).index(case)
    )
    got = grid_fuse(
        sources,
        out_hw,
        groups=groups,
        layer_weights=weights,
        ln_weight=ln_weight,
        ln_bias=ln_bias,
        mode=mode,
        eps=EPS,
    )
    expected = naive_grid_fuse(sources, out_hw, groups, weights, ln_weight, ln_bias, mode)
    assert got.shape == (2, out_hw[0] * out_hw[1], expected.shape[-1])
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mode", ["bilinear", "nearest", "area"])
@pytest.mark.parametrize("case", list(CASES))
def test_raw_reference_matches_naive_loops(mode, case):
    """normalize=False: the weighted sum of the resampled sources as they are."""
    shapes, groups, out_hw = CASES[case]
    sources, weights, _, _ = random_inputs(shapes, groups, affine="none", seed=list(CASES).index(case))
    got = grid_fuse(sources, out_hw, groups=groups, layer_weights=weights, mode=mode, normalize=False)
    expected = naive_grid_fuse(sources, out_hw, groups, weights, None, None, mode, normalize=False)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_reference_weights_as_numbers_and_batch_one():
    sources, _, _, _ = random_inputs([(3, 2, 4), (2, 2, 4)], [0, 0], batch=1)
    got = grid_fuse(sources, (2, 3), groups=[0, 0], layer_weights=[0.25, -1.5], mode="bilinear", eps=EPS)
    expected = naive_grid_fuse(sources, (2, 3), [0, 0], [0.25, -1.5], None, None, "bilinear")
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_reference_is_differentiable_in_every_input():
    shapes, groups, out_hw = [(3, 2, 3), (2, 4, 3), (1, 1, 2)], [0, 0, 1], (2, 3)
    sources, weights, ln_weight, ln_bias = random_inputs(shapes, groups, batch=1)
    leaves = [*sources, weights, *ln_weight, *ln_bias]
    for leaf in leaves:
        leaf.requires_grad_(True)
    count = len(shapes)

    def fused(*args):
        return grid_fuse(
            list(args[:count]),
            out_hw,
            groups=groups,
            layer_weights=args[count],
            ln_weight=list(args[count + 1 : 2 * count + 1]),
            ln_bias=list(args[2 * count + 1 :]),
            mode="bilinear",
            eps=EPS,
        )

    assert torch.autograd.gradcheck(fused, leaves)


def test_reference_bf16_computes_in_float32_and_returns_bf16():
    sources, weights, ln_weight, ln_bias = random_inputs([(3, 5, 8), (6, 4, 8)], [0, 0])
    low = [s.to(torch.bfloat16) for s in sources]
    affine = {"ln_weight": [w.float() for w in ln_weight], "ln_bias": [b.float() for b in ln_bias]}
    got = grid_fuse(low, (4, 4), groups=[0, 0], layer_weights=weights.float(), mode="area", eps=EPS, **affine)
    expected = grid_fuse(
        [s.float() for s in low],
        (4, 4),
        groups=[0, 0],
        layer_weights=weights.float(),
        mode="area",
        eps=EPS,
        **affine,
    )
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected.to(torch.bfloat16), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "bicubic"}, "mode='bicubic' is unknown; accepted: bilinear, nearest, area"),
        ({"groups": [0, 2]}, "must number the output slots 0..G-1"),
        ({"layer_weights": [1.0]}, "layer_weights has 1 entries but there are 2 sources"),
        ({"out_hw": (0, 3)}, "out_hw must be a pair of positive ints"),
        ({"normalize": "no"}, "normalize must be True or False, got 'no'"),
        (
            {"normalize": False, "ln_weight": [torch.ones(3), None]},
            "ln_weight is given with normalize=False; the affine belongs to the LayerNorm that "
            "normalize=False skips: pass ln_weight=None",
        ),
    ],
)
def test_reference_rejects_bad_arguments(kwargs, message):
    sources = [torch.randn(1, 2, 2, 3), torch.randn(1, 3, 3, 3)]
    arguments = {
        "out_hw": (2, 2),
        "groups": [0, 0],
        "layer_weights": [0.5, 0.5],
        "mode": "bilinear",
        **kwargs,
    }
    out_hw = arguments.pop("out_hw")
    with pytest.raises(ValueError, match=re.escape(message)):
        grid_fuse(sources, out_hw, **arguments)
