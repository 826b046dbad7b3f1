"""The Triton ``grid_fuse`` against the reference computed in float64.

The kernels run under Triton's interpreter on the CPU (conftest sets ``TRITON_INTERPRET=1`` before
triton is imported); with ``TRITON_INTERPRET=0`` on a GPU machine the same tests run the compiled
kernels on CUDA. The interpreter is slow, so grids stay tiny except along the channels.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
from collections import OrderedDict
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import encoder_fusion.kernels
import encoder_fusion.kernels.grid_fuse_plan as plan
import encoder_fusion.kernels.grid_fuse_triton as gf
from encoder_fusion.kernels import launch, reference
from encoder_fusion.kernels.grid_fuse_args import GridFuseArgs
from encoder_fusion.kernels.grid_fuse_jit import INTERPRETED
from encoder_fusion.kernels.grid_fuse_plan import MAX_CHANNELS, Tiles, default_tiles
from encoder_fusion.kernels.grid_fuse_triton import grid_fuse_backward, grid_fuse_forward, triton_grid_fuse

DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRETED else "cpu"
EPS = 1e-6
MODES = reference.MODES
# (rtol, atol) per dtype. atol is relative to the largest magnitude of the expected tensor:
# parameter gradients are sums over all tokens, so their scale grows with the token count.
# fp32: rounding in fp32 accumulation and rsqrt; bf16 / fp16: the final rounding of the result
# (8 and 11 significant bits) dominates.
TOLERANCES = {
    torch.float32: (1e-4, 1e-5),
    torch.float16: (4e-3, 2e-3),
    torch.bfloat16: (2e-2, 1.6e-2),
}


@pytest.fixture(autouse=True)
def poisoned_buffers(monkeypatch):
    """Every buffer the kernels write starts as NaN, so an element they skip fails the comparison."""

    def nan_buffer(shape, dtype, device):
        return torch.full(tuple(shape), float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(gf, "_new_buffer", nan_buffer)


# -- inputs and the float64 reference ------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One call: (h, w, C) per source, the group of each, the target grid, batch, affine and whether
    the sources are layer-normalised."""

    grids: tuple[tuple[int, int, int], ...]
    groups: tuple[int, ...]
    out_hw: tuple[int, int]
    batch: int = 2
    affine: str = "all"  # "all", "none", or "some" (every other source has weight / bias)
    normalize: bool = True

    def raw(self) -> Case:
        """The same call on raw sources (``normalize=False``, which takes no affine)."""
        return dataclasses.replace(self, affine="none", normalize=False)


@dataclass
class Inputs:
    sources: list[torch.Tensor]
    layer_weights: torch.Tensor
    ln_weight: list[torch.Tensor | None] | None
    ln_bias: list[torch.Tensor | None] | None

    def leaves(self) -> list[torch.Tensor]:
        params = [p for p in (self.ln_weight or []) + (self.ln_bias or []) if p is not None]
        return [*self.sources, self.layer_weights, *params]

    def as_float64(self) -> Inputs:
        def cast(t):
            return None if t is None else t.detach().double().requires_grad_(t.requires_grad)

        return Inputs(
            [cast(x) for x in self.sources],
            cast(self.layer_weights),
            None if self.ln_weight is None else [cast(p) for p in self.ln_weight],
            None if self.ln_bias is None else [cast(p) for p in self.ln_bias],
        )


def make_inputs(case: Case, dtype: torch.dtype, *, grad_sources: bool = True) -> Inputs:
    """Fresh random inputs: sources with a non-zero mean and spread, random affine and weights."""

    def rand(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, device=DEVICE) * scale + shift).to(dtype)

    sources = [
        rand(case.batch, h, w, c, scale=1.5, shift=0.7).requires_grad_(grad_sources) for h, w, c in case.grids
    ]
    layer_weights = (torch.rand(len(sources), device=DEVICE) + 0.25).to(dtype).requires_grad_()

    def affine(shift: float, parity: int) -> list[torch.Tensor | None] | None:
        if case.affine == "none":
            return None
        return [
            None if case.affine == "some" and i % 2 == parity else rand(c, shift=shift).requires_grad_()
            for i, (_, _, c) in enumerate(case.grids)
        ]

    return Inputs(sources, layer_weights, affine(1.0, 1), affine(0.0, 0))


def call(fn, inputs: Inputs, case: Case, mode: str, **options) -> torch.Tensor:
    return fn(
        inputs.sources,
        case.out_hw,
        groups=list(case.groups),
        layer_weights=inputs.layer_weights,
        ln_weight=inputs.ln_weight,
        ln_bias=inputs.ln_bias,
        mode=mode,
        eps=EPS,
        normalize=case.normalize,
        **options,
    )


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    rtol, atol = TOLERANCES[dtype]
    scale = max(expected.abs().max().item(), 1.0)
    torch.testing.assert_close(
        actual.double(), expected, rtol=rtol, atol=atol * scale, msg=lambda m: f"{what}: {m}"
    )


def check_against_reference(
    case: Case, mode: str, dtype: torch.dtype, *, grad_sources: bool = True, tiles: Tiles | None = None
) -> None:
    """Forward and every gradient of the Triton path against the float64 reference."""
    inputs = make_inputs(case, dtype, grad_sources=grad_sources)
    exact = inputs.as_float64()
    out = call(triton_grid_fuse, inputs, case, mode, tiles=tiles)
    expected = call(reference.grid_fuse, exact, case, mode)
    assert out.dtype == dtype
    assert out.shape == expected.shape
    assert_matches(out, expected, dtype, "output")

    grad_out = torch.randn_like(out)
    wanted = [t for t in inputs.leaves() if t.requires_grad]
    grads = torch.autograd.grad(out, wanted, grad_out)
    expected_grads = torch.autograd.grad(
        expected, [t for t in exact.leaves() if t.requires_grad], grad_out.double()
    )
    for index, (got, want, leaf) in enumerate(zip(grads, expected_grads, wanted)):
        assert got.dtype == leaf.dtype and got.shape == leaf.shape
        assert_matches(got, want, dtype, f"gradient of leaf {index} {tuple(leaf.shape)}")


# -- forward and backward across shapes, modes and dtypes ------------------------------------------

# name: (case, modes); every resampling shape runs in every mode, the others in one or two.
CASES = {
    "1x1 to 1x1, batch 1": (Case(((1, 1, 5),), (0,), (1, 1), batch=1), ("bilinear",)),
    "1x1 up to 3x2": (Case(((1, 1, 3), (1, 1, 3)), (0, 0), (3, 2)), MODES),
    "down to 1x1": (Case(((4, 3, 6),), (0,), (1, 1)), MODES),
    "non-square up": (Case(((2, 3, 7), (3, 3, 7)), (0, 0), (3, 5), batch=1), MODES),
    "non-square down, some affine": (
        Case(((4, 5, 6), (3, 2, 6)), (0, 0), (2, 3), batch=1, affine="some"),
        MODES,
    ),
    "identity, two groups": (Case(((3, 4, 8), (3, 4, 5)), (0, 1), (3, 4), batch=1), ("bilinear",)),
    "three groups mixed, no affine": (
        Case(((3, 3, 4), (2, 4, 5), (4, 2, 3), (3, 3, 4)), (0, 1, 2, 0), (3, 3), batch=1, affine="none"),
        ("bilinear", "nearest"),
    ),
    "odd width 383": (Case(((2, 3, 383), (3, 2, 383)), (0, 0), (2, 2), batch=1), ("area",)),
    "width 1024 and 1536": (Case(((1, 2, 1024), (2, 1, 1536)), (0, 1), (2, 1), batch=1), ("bilinear",)),
    "width 4096": (Case(((2, 1, 4096),), (0,), (1, 2), batch=1), ("nearest",)),
}


@pytest.mark.parametrize("normalize", [True, False], ids=["normalized", "raw"])
@pytest.mark.parametrize(
    ("case", "mode"),
    [(case, mode) for case, modes in CASES.values() for mode in modes],
    ids=[f"{name}-{mode}" for name, (_, modes) in CASES.items() for mode in modes],
)
def test_fp32_forward_backward_match_reference(case, mode, normalize):
    check_against_reference(case if normalize else case.raw(), mode, torch.float32)


HALF_CASES = {
    "non-square up": ("bilinear", Case(((2, 3, 9), (3, 2, 9)), (0, 0), (3, 4), batch=1)),
    "down, two groups": ("area", Case(((4, 3, 6), (3, 4, 5)), (0, 1), (2, 2), batch=1)),
    "up, odd width": ("nearest", Case(((1, 2, 383),), (0,), (2, 3), batch=1, affine="some")),
}


@pytest.mark.parametrize("normalize", [True, False], ids=["normalized", "raw"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize(("mode", "case"), HALF_CASES.values(), ids=HALF_CASES.keys())
def test_half_precision_forward_backward_match_reference(case, mode, dtype, normalize):
    check_against_reference(case if normalize else case.raw(), mode, dtype)


@st.composite
def small_cases(draw):
    group_count = draw(st.integers(1, 2))
    # From 3 channels: LayerNorm over 1 or 2 channels is degenerate (its output is +-1 whatever the
    # input), and its fp32 gradient amplifies rounding without bound; the fixed cases cover width 3.
    widths = [draw(st.integers(3, 7)) for _ in range(group_count)]
    groups = list(range(group_count)) + draw(st.lists(st.integers(0, group_count - 1), max_size=1))
    grids = tuple((draw(st.integers(1, 4)), draw(st.integers(1, 4)), widths[g]) for g in groups)
    out_hw = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    case = Case(
        grids, tuple(groups), out_hw, draw(st.integers(1, 2)), draw(st.sampled_from(["all", "none", "some"]))
    )
    return (case if draw(st.booleans()) else case.raw()), draw(st.sampled_from(MODES))


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(small_cases())
def test_hypothesis_shapes_match_reference(drawn):
    case, mode = drawn
    check_against_reference(case, mode, torch.float32)


# Tilings other than the default, each must give the same result: one token or many per program,
# few or many warps, prefetching on and off, backward tiles of several tokens, one rows program
# per multiprocessor. (The benchmark sweeps these on a GPU.)
TILINGS = [
    Tiles(block_t=1, num_warps=1, prefetch=False, backward_block_t=1, backward_warps=1, rows_per_sm=1),
    Tiles(block_t=8, num_warps=2, prefetch=True, backward_block_t=4, backward_warps=2, rows_per_sm=2),
    Tiles(block_t=2, num_warps=4, prefetch=False, backward_block_t=8, backward_warps=8, rows_per_sm=8),
]
TILING_CASE = Case(
    ((3, 2, 6), (2, 3, 6), (3, 3, 6), (3, 3, 5), (1, 2, 5)), (0, 0, 0, 1, 1), (3, 3), affine="some"
)


tilings = st.builds(
    Tiles,
    block_t=st.sampled_from([1, 2, 4, 8]),
    num_warps=st.sampled_from([1, 2, 4]),
    prefetch=st.booleans(),
    backward_block_t=st.sampled_from([1, 2, 4, 8]),
    backward_warps=st.sampled_from([1, 2, 4]),
    rows_per_sm=st.integers(1, 8),
)


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(small_cases(), tilings)
def test_hypothesis_tilings_match_reference(drawn, tiles):
    case, mode = drawn
    check_against_reference(case, mode, torch.float32, tiles=tiles)


@pytest.mark.parametrize("normalize", [True, False], ids=["normalized", "raw"])
@pytest.mark.parametrize("tiles", TILINGS, ids=lambda t: f"T{t.block_t}w{t.num_warps}p{int(t.prefetch)}")
@pytest.mark.parametrize("mode", MODES)
def test_every_tiling_matches_reference(tiles, mode, normalize):
    check_against_reference(TILING_CASE if normalize else TILING_CASE.raw(), mode, torch.float32, tiles=tiles)


@pytest.mark.parametrize("programs", ["one per tile", "as on a 2-SM GPU"])
def test_parameter_reduction_over_many_partial_rows(monkeypatch, programs):
    """More backward row programs than the reduction takes rows a step (4 at 1536 channels), with
    a ragged last step; and the GPU's grid rule (at least 8 tiles a program, 4 programs an SM)."""
    gpu = contextlib.nullcontext()
    if programs == "one per tile":
        monkeypatch.setattr(gf, "_row_programs", lambda tiles, per_sm, device: tiles)
    else:  # the launch hook: kernels run as usual, their grids sized for 2 multiprocessors

        def run(kernel, grid, args, kwargs):
            kernel[grid](*args, **kwargs)

        gpu = launch.hooked_launches(launch.LaunchHook(run, sm_count=2))
    case = Case(((2, 3, 1536), (3, 3, 1536)), (0, 0), (3, 3), affine="some")
    tiles = Tiles(block_t=1, num_warps=4, prefetch=True, backward_block_t=1, backward_warps=4, rows_per_sm=4)
    with gpu:
        check_against_reference(case, "bilinear", torch.float32, tiles=tiles)


def test_default_tiles_hold_a_fixed_tile_whatever_the_dtype():
    """2048 elements per forward tile (16 per thread), half the tokens in the backward (16 per
    thread, at most 8 warps); prefetching up to 4096 channels, where it no longer spills."""
    assert default_tiles(1024) == Tiles(2, 4, True, 1, 2, 4)
    assert default_tiles(768) == default_tiles(1024)
    assert default_tiles(64) == Tiles(16, 2, True, 8, 1, 4)
    assert default_tiles(4096) == Tiles(1, 8, True, 1, 8, 4)
    assert default_tiles(16384) == Tiles(1, 16, False, 1, 8, 4)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("block_t", 3, r"Tiles.block_t must be one of \(1, 2, 4"),
        ("num_warps", 32, r"Tiles.num_warps must be one of \(1, 2, 4, 8, 16\), got 32"),
        ("backward_warps", True, r"Tiles.backward_warps must be one of"),
        ("prefetch", 1, r"Tiles.prefetch must be a bool, got 1"),
        ("rows_per_sm", 0, r"Tiles.rows_per_sm must be an int >= 1, got 0"),
    ],
)
def test_bad_tiles_are_rejected(field, value, message):
    fields = {**default_tiles(1024).__dict__, field: value}
    with pytest.raises(ValueError, match=message):
        Tiles(**fields)


def test_tiles_must_be_a_tiles_object():
    case = Case(((2, 2, 4),), (0,), (2, 2))
    inputs = make_inputs(case, torch.float32)
    message = r"tiles must be an encoder_fusion\.kernels\.grid_fuse_plan\.Tiles or None, got dict"
    with pytest.raises(ValueError, match=message):
        call(triton_grid_fuse, inputs, case, "bilinear", tiles={"block_t": 2})


def test_unsorted_groups_mixed_grids_and_partial_affine_in_one_launch():
    """Groups listed out of order (the kernels visit them sorted), identity and resampled sources in
    one group, weight without bias and bias without weight: all in ONE forward launch."""
    case = Case(
        ((3, 2, 6), (2, 3, 5), (2, 3, 6), (4, 4, 5), (1, 2, 3)), (1, 0, 1, 0, 2), (2, 3), affine="some"
    )
    launches = []
    kernel = gf._grid_fuse_forward_kernel

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gf, "_grid_fuse_forward_kernel", Counting())
        for mode in MODES:
            check_against_reference(case, mode, torch.float32)
    assert len(launches) == len(MODES)


def test_statistics_rows_follow_the_source_order():
    """mean / rstd row i belongs to sources[i] even when the kernels reorder sources by group."""
    case = Case(((2, 2, 4), (3, 1, 7), (2, 2, 4)), (1, 0, 1), (2, 2))
    inputs = make_inputs(case, torch.float32)
    args = GridFuseArgs(
        inputs.sources, case.out_hw, groups=list(case.groups), layer_weights=inputs.layer_weights
    )
    _, mean, rstd = grid_fuse_forward(args, save_stats=True)
    for i, x in enumerate(inputs.sources):
        aligned = reference.resample(x.detach().double(), case.out_hw, "bilinear").reshape(-1, x.shape[-1])
        var, centre = torch.var_mean(aligned, dim=-1, unbiased=False)
        assert_matches(mean[i], centre, torch.float32, f"mean of sources[{i}]")
        assert_matches(rstd[i], (var + EPS).rsqrt(), torch.float32, f"rstd of sources[{i}]")


@pytest.mark.parametrize("normalize", [True, False], ids=["normalized", "raw"])
def test_backward_gives_only_the_source_gradients_asked_for(normalize):
    """need_sources per source: the frozen ones get None, the others match the reference. Raw
    sources take no statistics: the forward returns none and the backward reads none."""
    case = Case(((2, 3, 5), (3, 3, 5), (2, 2, 4)), (0, 0, 1), (3, 3), batch=1)
    inputs = make_inputs(case, torch.float32)
    detached = [x.detach() for x in inputs.sources]
    args = GridFuseArgs(
        detached,
        case.out_hw,
        groups=list(case.groups),
        layer_weights=inputs.layer_weights.detach(),
        normalize=normalize,
    )
    out, mean, rstd = grid_fuse_forward(args, save_stats=True)
    assert (mean is None and rstd is None) == (not normalize)
    grad_out = torch.randn_like(out)
    grads = grid_fuse_backward(
        grad_out, args, mean, rstd, need_sources=[False, True, True], need_params=False
    )
    assert grads.sources[0] is None and grads.layer_weights is None
    exact = [x.detach().double().requires_grad_() for x in inputs.sources]
    expected = reference.grid_fuse(
        exact,
        case.out_hw,
        groups=list(case.groups),
        layer_weights=inputs.layer_weights.detach().double(),
        eps=EPS,
        normalize=normalize,
    )
    want = torch.autograd.grad(expected, exact[1:], grad_out.double())
    for got, w in zip(grads.sources[1:], want):
        assert_matches(got, w, torch.float32, "requested source gradient")
    with pytest.raises(ValueError, match=r"need_sources has 2 flags; give one bool or one per source \(3\)"):
        grid_fuse_backward(
            grad_out, dataclasses.replace(args, layer_weights=[1.0, 1.0, 1.0]), mean, rstd,
            need_sources=[True, False],
        )  # fmt: skip


@pytest.mark.parametrize("normalize", [True, False], ids=["normalized", "raw"])
def test_frozen_sources_get_only_parameter_gradients(normalize):
    """Frozen encoders: no source gradient is asked for, the parameters still get theirs."""
    case = Case(((3, 2, 5), (2, 2, 5), (2, 2, 4)), (0, 0, 1), (2, 3), batch=1, affine="some")
    check_against_reference(case if normalize else case.raw(), "bilinear", torch.float32, grad_sources=False)


def test_softmax_layer_weights_and_plain_numbers():
    """layer_weights as a softmax output (gradient flows to the logits) and as a list of floats."""
    case = Case(((2, 3, 6), (3, 3, 6)), (0, 0), (3, 3), batch=1)
    inputs = make_inputs(case, torch.float32)
    logits = torch.randn(2, device=DEVICE, requires_grad=True)
    inputs.layer_weights = torch.softmax(logits, 0)
    out = call(triton_grid_fuse, inputs, case, "bilinear")
    exact = inputs.as_float64()
    exact_logits = logits.detach().double().requires_grad_()
    exact.layer_weights = torch.softmax(exact_logits, 0)
    expected = call(reference.grid_fuse, exact, case, "bilinear")
    grad_out = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, [logits], grad_out)
    (want,) = torch.autograd.grad(expected, [exact_logits], grad_out.double())
    assert_matches(got, want, torch.float32, "logit gradient")

    numbers = [0.3, -1.25]
    inputs.layer_weights, exact.layer_weights = numbers, numbers
    assert_matches(
        call(triton_grid_fuse, inputs, case, "bilinear"),
        call(reference.grid_fuse, exact, case, "bilinear"),
        torch.float32,
        "output with numeric layer weights",
    )


def test_strided_and_channel_first_sources():
    """A prefix-dropped token view is read in place; a channels-first permute is copied first."""
    batch, c = 2, 7
    tokens = (torch.randn(batch, 1 + 3 * 2, c, device=DEVICE) + 0.5).requires_grad_()
    channels_first = (torch.randn(batch, c, 2, 3, device=DEVICE) - 0.3).requires_grad_()
    exact_leaves = [t.detach().double().requires_grad_() for t in (tokens, channels_first)]

    def sources(tok, cf):
        return [tok[:, 1:].view(batch, 3, 2, c), cf.permute(0, 2, 3, 1)]

    dropped, permuted = sources(tokens, channels_first)
    assert not dropped.is_contiguous() and permuted.stride(-1) != 1
    args = {"groups": [0, 0], "layer_weights": [0.7, 0.4], "mode": "bilinear", "eps": EPS}
    out = triton_grid_fuse([dropped, permuted], (2, 2), **args)
    expected = reference.grid_fuse(sources(*exact_leaves), (2, 2), **args)
    assert_matches(out, expected, torch.float32, "output from strided sources")
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, [tokens, channels_first], grad_out)
    expected_grads = torch.autograd.grad(expected, exact_leaves, grad_out.double())
    for got, want in zip(grads, expected_grads):
        assert_matches(got, want, torch.float32, "gradient through a strided source")


def test_backward_is_deterministic():
    case = Case(((2, 3, 5), (3, 2, 5)), (0, 0), (3, 3), batch=1)
    inputs = make_inputs(case, torch.float32)
    out = call(triton_grid_fuse, inputs, case, "bilinear")
    grad_out = torch.randn_like(out)
    first = torch.autograd.grad(out, inputs.leaves(), grad_out, retain_graph=True)
    second = torch.autograd.grad(out, inputs.leaves(), grad_out)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_forward_writes_every_element_of_a_given_out_buffer():
    case = Case(((2, 2, 3), (3, 1, 4)), (0, 1), (2, 3), batch=2)
    inputs = make_inputs(case, torch.float32)
    out = torch.full((2, 6, 7), float("nan"), device=DEVICE)
    args = call(GridFuseArgs, inputs, case, "area")
    result, mean, rstd = grid_fuse_forward(args, out=out, save_stats=True)
    assert result is out
    assert mean.shape == rstd.shape == (2, 12)
    assert_matches(out, call(reference.grid_fuse, inputs.as_float64(), case, "area"), torch.float32, "out")


# -- dispatch ------------------------------------------------------------------------------------


def small_call(fn=encoder_fusion.kernels.grid_fuse, **overrides):
    args = {
        "sources": [torch.randn(1, 2, 2, 3, device=DEVICE) + 0.1],
        "out_hw": (3, 2),
        "groups": [0],
        "layer_weights": [0.5],
    }
    args.update(overrides)
    return fn(args.pop("sources"), args.pop("out_hw"), **args)


@pytest.fixture
def backend_calls(monkeypatch):
    """Record which backend each ``encoder_fusion.kernels.grid_fuse`` call reaches."""
    calls = []
    for name, fn in list(encoder_fusion.kernels.BACKENDS.items()):

        def spy(*args, _name=name, _fn=fn, **kwargs):
            calls.append(_name)
            return _fn(*args, **kwargs)

        monkeypatch.setitem(encoder_fusion.kernels.BACKENDS, name, spy)
    return calls


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        (None, "triton" if DEVICE == "cuda" else "reference"),
        ("auto", "triton" if DEVICE == "cuda" else "reference"),
        ("triton", "triton"),
        ("reference", "reference"),
    ],
)
def test_fusion_kernel_selects_the_backend(monkeypatch, backend_calls, setting, expected):
    if setting is None:
        monkeypatch.delenv("FUSION_KERNEL", raising=False)
    else:
        monkeypatch.setenv("FUSION_KERNEL", setting)
    torch.manual_seed(3)
    out = small_call()
    assert backend_calls == [expected]
    torch.manual_seed(3)
    torch.testing.assert_close(out, small_call(reference.grid_fuse), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_dispatch_passes_normalize_on(monkeypatch, backend_calls, backend):
    """normalize=False reaches the chosen backend: raw sources, the same result as the reference's."""
    monkeypatch.setenv("FUSION_KERNEL", backend)
    torch.manual_seed(4)
    raw = small_call(normalize=False)
    torch.manual_seed(4)
    normalized = small_call()
    assert backend_calls == [backend, backend]
    torch.manual_seed(4)
    torch.testing.assert_close(raw, small_call(reference.grid_fuse, normalize=False), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(raw, normalized)


def test_auto_keeps_float64_on_the_reference(monkeypatch, backend_calls):
    monkeypatch.setenv("FUSION_KERNEL", "auto")
    small_call(sources=[torch.randn(1, 2, 2, 3, dtype=torch.float64, device=DEVICE)])
    assert backend_calls == ["reference"]


def test_unknown_fusion_kernel_is_rejected(monkeypatch):
    monkeypatch.setenv("FUSION_KERNEL", "cuda")
    with pytest.raises(
        ValueError, match=r"FUSION_KERNEL='cuda' is unknown; accepted: auto, reference, triton"
    ):
        small_call()


def test_fusion_head_fused_route_matches_the_reference(monkeypatch):
    """FusedEncoder's trainable head fuses through encoder_fusion.kernels.grid_fuse: Triton equals the
    reference."""
    from encoder_fusion import EncoderGeometry, FusionHead

    torch.manual_seed(0)
    head = FusionHead(
        [EncoderGeometry("clip", 6, (2, 3), 2), EncoderGeometry("dino", 5, (3, 3), 2)], grid=(3, 3)
    ).to(DEVICE)
    assert head.fused_route
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    grids = [
        [torch.randn(1, 2, 3, 6, device=DEVICE) + 0.2 for _ in range(2)],
        [torch.randn(1, 3, 3, 5, device=DEVICE) - 0.1 for _ in range(2)],
    ]
    results = {}
    for backend in ("reference", "triton"):
        monkeypatch.setenv("FUSION_KERNEL", backend)
        head.zero_grad()
        out = head(grids)
        out.square().sum().backward()
        results[backend] = (out.detach(), [p.grad.clone() for p in head.parameters() if p.grad is not None])
    assert_matches(results["triton"][0], results["reference"][0].double(), torch.float32, "head output")
    assert len(results["triton"][1]) == len(results["reference"][1]) > 0
    for got, want in zip(results["triton"][1], results["reference"][1]):
        assert_matches(got, want.double(), torch.float32, "head parameter gradient")


# -- bad input -----------------------------------------------------------------------------------


class NoLaunch:
    """Stands in for a kernel: any launch fails the test (errors must come before launches)."""

    def __getitem__(self, grid):
        raise AssertionError(f"a kernel was launched (grid {grid}) despite bad input")


def grid(*shape, dtype=torch.float32, device=DEVICE):
    return torch.randn(*shape, dtype=dtype, device=device)


BAD_INPUTS = {
    "mismatched batch": (
        {"sources": [grid(1, 2, 2, 3), grid(2, 2, 2, 3)], "groups": [0, 0], "layer_weights": [1.0, 1.0]},
        r"sources\[1\] has batch size 2 but sources\[0\] has 1",
    ),
    "group widths differ": (
        {"sources": [grid(1, 2, 2, 3), grid(1, 2, 2, 4)], "groups": [0, 0], "layer_weights": [1.0, 1.0]},
        r"sources of group 0 differ in width: sources\[1\] has 4 channels",
    ),
    "wrong rank": (
        {"sources": [grid(1, 4, 3)]},
        r"sources\[0\] must be a 4-D \(B, h, w, C\) tensor, got \(1, 4, 3\)",
    ),
    "layer weights length": (
        {"layer_weights": [1.0, 2.0]},
        r"layer_weights has 2 entries but there are 1 sources",
    ),
    "layer weights not numbers": (
        {"layer_weights": ["a"]},
        r"layer_weights must be a 1-D tensor or a list of numbers, got \['a'\]",
    ),
    "unknown mode": ({"mode": "bicubic"}, r"mode='bicubic' is unknown; accepted: bilinear, nearest, area"),
    "float64": (
        {"sources": [grid(1, 2, 2, 3, dtype=torch.float64)]},
        r"sources have dtype torch.float64; accepted: float32, bfloat16, float16",
    ),
    "ln weight on another device": (
        {"ln_weight": [torch.ones(3, device="meta")]},
        r"ln_weight\[0\] is on meta but the sources are on",
    ),
    "layer weights on another device": (
        {"layer_weights": torch.ones(1, device="meta")},
        r"layer_weights is on meta but the sources are on",
    ),
    "negative eps": ({"eps": -1.0}, r"eps must be a finite number in \[1e-12, 1\], got -1.0"),
    "normalize not a bool": ({"normalize": 1}, r"grid_fuse normalize must be True or False, got 1"),
    "affine on raw sources": (
        {"normalize": False, "ln_bias": [torch.ones(3, device=DEVICE)]},
        r"ln_bias is given with normalize=False; the affine belongs to the LayerNorm that "
        r"normalize=False skips: pass ln_bias=None",
    ),
    "too wide": (
        {"sources": [grid(1, 1, 1, MAX_CHANNELS + 1)]},
        rf"group 0 has {MAX_CHANNELS + 1} channels; at most {MAX_CHANNELS} are supported",
    ),
}


@pytest.mark.parametrize(("overrides", "message"), BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_raises_before_any_launch(monkeypatch, overrides, message):
    launchers = [name for name in vars(gf) if name.startswith("_grid_fuse_") and name.endswith("_kernel")]
    assert len(launchers) == 4
    for name in launchers:
        monkeypatch.setattr(gf, name, NoLaunch())
    with pytest.raises(ValueError, match=message):
        small_call(triton_grid_fuse, **overrides)


def test_repeated_call_skips_the_checks_but_not_a_changed_argument(monkeypatch):
    """The second call of a signature reuses the checked plan (and still matches the reference);
    a call that differs in any checked property, even True for 1 in groups, is checked again."""
    checks = []
    make_plan = plan._make_plan
    monkeypatch.setattr(plan, "_make_plan", lambda *a: checks.append(1) or make_plan(*a))
    monkeypatch.setattr(plan, "_PLAN_CACHE", OrderedDict())
    case = Case(((2, 3, 5), (3, 3, 5)), (0, 0), (3, 3), batch=1)
    check_against_reference(case, "bilinear", torch.float32)
    assert len(checks) == 1
    check_against_reference(case, "bilinear", torch.float32)  # fresh tensors, same signature
    assert len(checks) == 1
    check_against_reference(Case(case.grids, case.groups, (2, 3), batch=1), "bilinear", torch.float32)
    assert len(checks) == 2
    small_call(triton_grid_fuse)
    with pytest.raises(ValueError, match=r"groups must hold one int per source \(1\), got \[False\]"):
        small_call(triton_grid_fuse, groups=[False])
    with pytest.raises(ValueError, match="layer_weights must be a 1-D tensor or a list of numbers"):
        small_call(triton_grid_fuse, layer_weights=[True])
    with pytest.raises(ValueError, match=r"out_hw must be a pair of positive ints"):
        small_call(triton_grid_fuse, out_hw=(3.0, 2))
    with pytest.raises(ValueError, match=r"normalize must be True or False, got 1"):
        small_call(triton_grid_fuse, normalize=1)


def test_plan_cache_stays_bounded(monkeypatch):
    monkeypatch.setattr(plan, "_PLAN_CACHE", OrderedDict())
    for width in range(1, plan._PLAN_CACHE_SIZE + 6):
        small_call(triton_grid_fuse, sources=[grid(1, 1, 1, width)])
    assert len(plan._PLAN_CACHE) == plan._PLAN_CACHE_SIZE


def test_no_autograd_node_when_no_gradient_is_wanted():
    """Inference (no_grad, or no input requiring grad) launches the forward alone; with a leaf that
    requires grad the result is differentiable."""
    case = Case(((2, 2, 4), (3, 3, 4)), (0, 0), (2, 2))
    inputs = make_inputs(case, torch.float32)
    with torch.no_grad():
        assert call(triton_grid_fuse, inputs, case, "area").grad_fn is None
    frozen = Inputs([x.detach() for x in inputs.sources], inputs.layer_weights.detach(), None, None)
    out = call(triton_grid_fuse, frozen, case, "area")
    assert out.grad_fn is None
    expected = call(reference.grid_fuse, frozen.as_float64(), case, "area")
    assert_matches(out, expected, torch.float32, "inference output")
    assert call(triton_grid_fuse, inputs, case, "area").grad_fn is not None


@pytest.mark.parametrize(
    ("interpreted", "triton_version", "numpy_version", "broken"),
    [
        (True, "3.6.0", "2.4.6", True),
        (True, "3.6.0", "2.3.5", False),
        (True, "3.7.0", "2.4.0", False),
        (True, "3.10.1+git1234", "2.5.0", False),
        (False, "3.6.0", "2.4.6", False),  # compiled kernels are not affected
    ],
)
def test_interpreter_problem_is_named(interpreted, triton_version, numpy_version, broken):
    problem = launch.interpreter_problem(interpreted, triton_version, numpy_version)
    assert (problem is not None) == broken
    if broken:
        assert "install numpy<2.4 or triton>=3.7" in problem


def test_broken_interpreter_is_reported_before_any_launch(monkeypatch):
    monkeypatch.setattr(launch, "_INTERPRETER_PROBLEM", "the reason")
    with pytest.raises(RuntimeError, match="grid_fuse \\(triton\\): the reason"):
        small_call(triton_grid_fuse)


def test_bad_buffers_are_rejected():
    args = GridFuseArgs([grid(1, 2, 2, 3)], (3, 2), groups=[0], layer_weights=[1.0])
    with pytest.raises(ValueError, match=re.escape("grid_fuse out must have shape (1, 6, 3), got (1, 6, 4)")):
        grid_fuse_forward(args, out=grid(1, 6, 4))
    with pytest.raises(ValueError, match=r"grid_fuse out is torch.float16 on .*; it must be torch.float32"):
        grid_fuse_forward(args, out=grid(1, 6, 3, dtype=torch.float16))
    _, mean, rstd = grid_fuse_forward(args, save_stats=True)
    with pytest.raises(
        ValueError, match=re.escape("grid_fuse grad_out must have shape (1, 6, 3), got (1, 5, 3)")
    ):
        grid_fuse_backward(grid(1, 5, 3), args, mean, rstd)
    with pytest.raises(ValueError, match=re.escape("grid_fuse rstd must have shape (1, 6), got (1, 5)")):
        grid_fuse_backward(grid(1, 6, 3), args, mean, rstd[:, :5])


# -- the benchmark module -------------------------------------------------------------------------


@pytest.mark.slow
def test_benchmark_quick_run_writes_ratios(tmp_path, capsys):
    """A smoke run of the benchmark on a tiny case (torch.compile with its quick 'eager' backend)."""
    from encoder_fusion.benchmarks.kernel import bench

    out = tmp_path / "bench.json"
    argv = ["--quick", "--case", "tiny=2x2x8*2+3x3x8*1->2x2", "--batch", "1", "--compile-backend", "eager"]
    bench.main([*argv, "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["device"]
    rows = report["rows"]
    assert {row["pass"] for row in rows} == {"fwd", "fwdbwd"}
    for row in rows:
        assert row["median_ms"] > 0 and row["bytes"] > 0
        assert "speedup_vs_eager" in row and "speedup_vs_compile" in row
        assert "host_ms" in row
        # a fresh compiled function per problem: the compile column ran a real dynamo graph
        assert (
            (row["compile_graphs"] or 0) >= 1 if row["impl"] == "compile" else row["compile_graphs"] is None
        )
    assert out.with_suffix(".md").read_text().startswith("#")
    assert "no GPU" in capsys.readouterr().out or DEVICE == "cuda"


def test_tiling_sweep_varies_one_field_at_a_time(tmp_path):
    """The tiling sweep (interpreted on the CPU: plumbing only) writes one row per candidate, the
    default first with ratio 1, each other candidate one field away from it, every output right."""
    from encoder_fusion.benchmarks.kernel import tiles as kernel_tiles

    out = tmp_path / "tiles.json"
    argv = ["--device", DEVICE, "--quick", "--case", "tiny=2x2x8*2+3x3x8*1->3x3", "--batch", "1"]
    kernel_tiles.main([*argv, "--dtype", "fp32", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    default = default_tiles(8).__dict__
    varied = {
        "fwd": {"block_t", "num_warps", "prefetch"},
        "fwdbwd": {"backward_block_t", "backward_warps", "rows_per_sm", "prefetch"},
    }
    for pass_name, fields in varied.items():
        mine = [row for row in rows if row["pass"] == pass_name]
        assert mine[0]["tiling"] == "default" and mine[0]["speedup_vs_default"] == 1.0
        assert len(mine) > len(fields)  # each field has at least one valid neighbour here
        for row in mine[1:]:
            changed = {k for k, v in row["tiles"].items() if v != default[k]}
            assert len(changed) == 1 and changed <= fields, row["tiling"]
            assert row["tiling"] == f"{changed.pop()}={row['tiles'][row['tiling'].split('=')[0]]}"
        assert all(row["max_abs_err_vs_eager"] < 1e-4 for row in mine)
    assert out.with_suffix(".md").read_text().startswith("# grid_fuse tiling sweep")


def test_tiling_sweep_keeps_going_past_a_failing_candidate(tmp_path, monkeypatch):
    """A candidate that raises gets a row saying why; the others are still timed."""
    from encoder_fusion.benchmarks.kernel import tiles as kernel_tiles

    fuse = kernel_tiles.triton_grid_fuse

    def flaky(*args, tiles=None, **kwargs):
        if tiles is not None and tiles.num_warps == 2:  # the default has 1 warp here
            raise RuntimeError("out of resources")
        return fuse(*args, tiles=tiles, **kwargs)

    monkeypatch.setattr(kernel_tiles, "triton_grid_fuse", flaky)
    out = tmp_path / "tiles.json"
    argv = ["--device", DEVICE, "--quick", "--case", "tiny=2x2x8*2->2x2", "--batch", "1", "--dtype", "fp32"]
    kernel_tiles.main([*argv, "--pass", "fwd", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    failed = [row for row in rows if "failed" in row]
    assert [row["tiling"] for row in failed] == ["num_warps=2"]
    assert failed[0]["failed"] == "RuntimeError: out of resources"
    assert len(rows) - len(failed) >= 3 and all("median_ms" in row for row in rows if "failed" not in row)
    assert "failed: RuntimeError: out of resources" in out.with_suffix(".md").read_text()


@pytest.mark.parametrize("spec", ["tiny", "tiny=2x2x8->2x2", "tiny=2x2x8*2->0x2", "=2x2x8*1->2x2"])
def test_benchmark_rejects_malformed_case_specs(spec):
    from encoder_fusion.benchmarks.kernel.harness import parse_case

    with pytest.raises(ValueError, match=re.escape(f"--case {spec!r}")):
        parse_case(spec)


def test_benchmark_case_spec_and_bytes():
    from encoder_fusion.benchmarks.kernel.harness import EncoderShape, bytes_moved, make_problem, parse_case

    case = parse_case("pair=3x2x4*2+1x1x6*1->2x2")
    assert case.encoders == (EncoderShape(3, 2, 4, 2), EncoderShape(1, 1, 6, 1)) and case.out_hw == (2, 2)
    problem = make_problem(case, 2, torch.float32, torch.device("cpu"))
    assert problem.args.groups == [0, 0, 1]
    inputs = 4 * (2 * (2 * 3 * 2 * 4) + 2 * 6 + 3 + 2 * (2 * 4 + 6))  # sources, layer weights, LN affines
    out = 4 * 2 * 4 * (4 + 6)
    assert bytes_moved(problem, out, "fwd") == inputs + out
    assert bytes_moved(problem, out, "fwdbwd") == 3 * inputs + 2 * out
