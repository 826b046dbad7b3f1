"""``encoder_fusion.kernels.grid_fuse`` validates its arguments once for both paths: every bad argument gets
the same ValueError from the reference and from the Triton kernels (interpreted on the CPU: conftest sets
``TRITON_INTERPRET=1``), before any launch, with or without an autograd node to record."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

import encoder_fusion.kernels
from encoder_fusion.kernels import launch
from encoder_fusion.kernels.grid_fuse_jit import INTERPRETED

DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRETED else "cpu"
BACKENDS = ("reference", "triton")


def grid(*shape, dtype=torch.float32, device=DEVICE):
    return torch.randn(*shape, dtype=dtype, device=device) + 0.5


@contextlib.contextmanager
def no_launch():
    """Any kernel launch fails the test: a bad argument must be refused before one."""

    def refuse(kernel, grid, args, kwargs):
        raise AssertionError(f"{kernel.__name__} was launched (grid {grid}) despite a bad argument")

    with launch.hooked_launches(launch.LaunchHook(refuse, sm_count=1)):
        yield


def fuse(backend, monkeypatch, grad, **overrides):
    """``encoder_fusion.kernels.grid_fuse`` on ``backend`` with one source (1, 2, 2, 3) -> (3, 2) unless
    overridden; with ``grad`` the default source requires grad (the Triton path then records an autograd
    node)."""
    monkeypatch.setenv("FUSION_KERNEL", backend)
    args = {
        "sources": [grid(1, 2, 2, 3).requires_grad_(grad)],
        "out_hw": (3, 2),
        "groups": [0],
        "layer_weights": [0.5],
        **overrides,
    }
    return encoder_fusion.kernels.grid_fuse(args.pop("sources"), args.pop("out_hw"), **args)


NAN, INF = math.nan, math.inf
EPS_RULE = "grid_fuse eps must be a finite number in [1e-12, 1]"
# name: (arguments, the whole message)
BAD_ARGUMENTS = {
    "eps below 0": ({"eps": -1.0}, f"{EPS_RULE}, got -1.0"),
    "eps 0 (a constant token would divide by zero)": ({"eps": 0}, f"{EPS_RULE}, got 0"),
    "eps below the range": ({"eps": 1e-13}, f"{EPS_RULE}, got 1e-13"),
    "eps absurd (it would flatten every token)": ({"eps": 1e30}, f"{EPS_RULE}, got 1e+30"),
    "eps NaN": ({"eps": NAN}, f"{EPS_RULE}, got nan"),
    "eps infinite": ({"eps": INF}, f"{EPS_RULE}, got inf"),
    "eps a string": ({"eps": "1e-6"}, f"{EPS_RULE}, got '1e-6'"),
    "eps a bool": ({"eps": True}, f"{EPS_RULE}, got True"),
    "NaN in ln_weight": (
        {"ln_weight": [torch.tensor([1.0, NAN, 1.0], device=DEVICE)]},
        "grid_fuse ln_weight[0] holds NaN or Inf; accepted: finite LayerNorm parameters",
    ),
    "Inf in ln_bias": (
        {"ln_bias": [torch.tensor([0.0, 0.0, INF], device=DEVICE)]},
        "grid_fuse ln_bias[0] holds NaN or Inf; accepted: finite LayerNorm parameters",
    ),
    "NaN in a list of layer weights": (
        {"sources": [grid(1, 2, 2, 3), grid(1, 3, 3, 3)], "groups": [0, 0], "layer_weights": [0.5, NAN]},
        "grid_fuse layer_weights[1] is nan; every layer weight must be a finite number",
    ),
    "NaN in a layer-weight tensor": (
        {"layer_weights": torch.tensor([NAN])},
        "grid_fuse layer_weights[0] is nan; every layer weight must be a finite number",
    ),
    "infinity in a trainable layer-weight tensor": (
        {"layer_weights": torch.tensor([-INF], requires_grad=True)},
        "grid_fuse layer_weights[0] is -inf; every layer weight must be a finite number",
    ),
    "layer weights a number": (
        {"layer_weights": 0.5},
        "grid_fuse layer_weights must be a 1-D tensor or a list of numbers, got 0.5",
    ),
    "layer weights of ints": (
        {"layer_weights": torch.tensor([1])},
        "grid_fuse layer_weights must be floating point, got torch.int64",
    ),
    "sources on the meta device": (
        {"sources": [torch.empty(1, 2, 2, 3, device="meta")]},
        "grid_fuse sources[0] is on the meta device, which holds no values; "
        "give tensors on a device with data (cpu, cuda)",
    ),
    "layer weights on the meta device": (
        {"layer_weights": torch.ones(1, device="meta")},
        f"grid_fuse layer_weights is on meta but the sources are on {torch.device(DEVICE)}; "
        "all tensors must share one device",
    ),
    "ln_bias on the meta device": (
        {"ln_bias": [torch.zeros(3, device="meta")]},
        f"grid_fuse ln_bias[0] is on meta but the sources are on {torch.device(DEVICE)}; "
        "all tensors must share one device",
    ),
    "out_hw an int": ({"out_hw": 4}, "grid_fuse out_hw must be a pair of positive ints (H, W), got 4"),
    "out_hw a string of digits": (
        {"out_hw": "44"},
        "grid_fuse out_hw must be a pair of positive ints (H, W), got '44'",
    ),
    "out_hw of floats": (
        {"out_hw": (3.0, 2)},
        "grid_fuse out_hw must be a pair of positive ints (H, W), got (3.0, 2)",
    ),
    "groups an int": ({"groups": 0}, "grid_fuse groups must hold one int per source (1), got 0"),
    "sources one tensor": (
        {"sources": grid(1, 2, 2, 3)},
        "grid_fuse sources must be a non-empty list of (B, h, w, C) tensors, got (1, 2, 2, 3)",
    ),
    "ln_weight one tensor": (
        {"ln_weight": torch.ones(1, 3)},
        "grid_fuse ln_weight must be None or a list with one (C,) tensor or None per source, got (1, 3)",
    ),
    "ln_weight entry a list": (
        {"ln_weight": [[1.0, 1.0, 1.0]]},
        "grid_fuse ln_weight[0] must be a (3,) tensor or None, got list",
    ),
    "ln_weight of ints": (
        {"ln_weight": [torch.ones(3, dtype=torch.int64, device=DEVICE)]},
        "grid_fuse ln_weight[0] must be floating point, got torch.int64",
    ),
    "mode unknown": (
        {"mode": "bicubic"},
        "grid_fuse mode='bicubic' is unknown; accepted: bilinear, nearest, area",
    ),
}


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize(("overrides", "message"), BAD_ARGUMENTS.values(), ids=BAD_ARGUMENTS.keys())
def test_both_paths_refuse_a_bad_argument_with_one_message(monkeypatch, overrides, message, grad):
    got = {}
    for backend in BACKENDS:
        with no_launch(), pytest.raises(ValueError) as refused:
            fuse(backend, monkeypatch, grad, **overrides)
        got[backend] = str(refused.value)
    assert got == {backend: message for backend in BACKENDS}


@pytest.mark.parametrize(
    "overrides",
    [
        {"eps": 1e-12},
        {"eps": 1},
        {"layer_weights": [-1.5]},
        {"layer_weights": torch.tensor([0.0], device=DEVICE)},
    ],
    ids=["the smallest eps", "eps an int (the largest)", "a negative weight", "a zero weight tensor"],
)
def test_both_paths_accept_the_edges_of_what_is_valid_and_agree(monkeypatch, overrides):
    outputs = {}
    for backend in BACKENDS:
        torch.manual_seed(0)
        outputs[backend] = fuse(backend, monkeypatch, False, **overrides)
    assert torch.isfinite(outputs["reference"]).all()
    torch.testing.assert_close(outputs["triton"], outputs["reference"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("poison", [NAN, INF, -INF], ids=["NaN", "Inf", "-Inf"])
def test_with_finite_checks_both_paths_name_a_poisoned_source(monkeypatch, poison):
    sources = [grid(2, 3, 3, 3), grid(2, 2, 2, 3)]
    sources[1][1, 0, 1, 2] = poison
    args = {"groups": [0, 0], "layer_weights": [0.5, 0.5]}
    for backend in BACKENDS:
        monkeypatch.setenv("FUSION_KERNEL", backend)
        with (
            encoder_fusion.kernels.finite_checks(),
            pytest.raises(
                encoder_fusion.kernels.NonFiniteError, match=r"sources\[1\] holds NaN or Inf"
            ) as caught,
        ):
            encoder_fusion.kernels.grid_fuse(sources, (3, 3), **args)
        assert caught.value.source == 1
        # the switch is off by default: the poison passes through, as any tensor op would pass it
        assert not torch.isfinite(encoder_fusion.kernels.grid_fuse(sources, (3, 3), **args)).all()


def test_with_finite_checks_an_output_beyond_its_dtype_is_named_by_slot(monkeypatch):
    # finite float16 sources whose normalised, weighted sum (about 3 x 40,000) passes float16's 65,504
    sources = [grid(2, 3, 3, 6).half(), grid(2, 3, 3, 4).half(), grid(2, 2, 2, 4).half()]
    args = {"groups": [0, 1, 1], "layer_weights": [1.0, 40000.0, 40000.0]}
    for backend in BACKENDS:
        monkeypatch.setenv("FUSION_KERNEL", backend)
        with (
            encoder_fusion.kernels.finite_checks(),
            pytest.raises(
                encoder_fusion.kernels.NonFiniteError,
                match=r"grid_fuse output slot 1 \(sources \[1, 2\]\) is NaN or Inf although every source is "
                r"finite: its values went beyond torch\.float16's range",
            ) as caught,
        ):
            encoder_fusion.kernels.grid_fuse(sources, (3, 3), **args)
        assert caught.value.source == 1 and caught.value.in_output


def test_a_constant_token_is_normalised_to_zero_at_the_smallest_eps(monkeypatch):
    constant = torch.full((1, 2, 2, 3), 7.0, device=DEVICE)
    for backend in BACKENDS:
        monkeypatch.setenv("FUSION_KERNEL", backend)
        out = encoder_fusion.kernels.grid_fuse([constant], (2, 2), groups=[0], layer_weights=[1.0], eps=1e-12)
        torch.testing.assert_close(out, torch.zeros_like(out))
