"""Connectors: structure, forward against the composition written out, config errors."""

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from encoder_fusion.connector import CONNECTORS, build_connector


def linears(connector):
    return [m for m in connector.modules() if isinstance(m, nn.Linear)]


def test_registry_names():
    assert CONNECTORS.names() == ("identity", "linear", "mlp", "fused_gelu_mlp")


def test_none_and_identity_pass_tokens_through():
    tokens = torch.randn(2, 5, 7)
    for config in (None, "identity", {"kind": "identity", "out_dim": 7}):
        connector = build_connector(config, 7)
        assert connector.out_dim == 7 and not list(connector.parameters())
        assert torch.equal(connector(tokens), tokens)


def test_identity_rejects_a_different_out_dim():
    with pytest.raises(ValueError, match=r"'identity' keeps the width 7, but out_dim=8"):
        build_connector({"kind": "identity", "out_dim": 8}, 7)


def test_linear_is_one_linear():
    connector = build_connector({"kind": "linear", "out_dim": 3}, 5)
    (layer,) = linears(connector)
    tokens = torch.randn(2, 4, 5)
    torch.testing.assert_close(connector(tokens), tokens @ layer.weight.T + layer.bias)


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_mlp_depth_n_alternates_linear_and_gelu(depth):
    connector = build_connector({"kind": "mlp", "depth": depth, "out_dim": 6}, 5)
    layers = linears(connector)
    assert [(m.in_features, m.out_features) for m in layers] == [(5, 6)] + [(6, 6)] * (depth - 1)
    assert sum(isinstance(m, nn.GELU) for m in connector.modules()) == depth - 1
    tokens = torch.randn(2, 4, 5)
    expected = tokens @ layers[0].weight.T + layers[0].bias
    for layer in layers[1:]:
        expected = F.gelu(expected) @ layer.weight.T + layer.bias
    torch.testing.assert_close(connector(tokens), expected)


def test_fused_gelu_mlp_is_prismatics_projector():
    connector = build_connector({"kind": "fused_gelu_mlp", "out_dim": 6}, 5)
    first, second, third = linears(connector)
    assert [(m.in_features, m.out_features) for m in (first, second, third)] == [(5, 20), (20, 6), (6, 6)]
    tokens = torch.randn(3, 2, 5)
    hidden = F.gelu(tokens @ first.weight.T + first.bias)
    hidden = F.gelu(hidden @ second.weight.T + second.bias)
    torch.testing.assert_close(connector(tokens), hidden @ third.weight.T + third.bias)


def test_final_norm_normalises_each_token():
    connector = build_connector({"kind": "mlp", "depth": 2, "out_dim": 8, "final_norm": True}, 5)
    assert isinstance(connector.norm, nn.LayerNorm) and connector.norm.normalized_shape == (8,)
    out = connector(torch.randn(2, 3, 5) * 10)
    torch.testing.assert_close(out.mean(dim=-1), torch.zeros(2, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.var(dim=-1, unbiased=False), torch.ones(2, 3), atol=1e-3, rtol=0)


def test_design_example_config_and_default_out_dim():
    connector = build_connector({"kind": "mlp", "depth": 2, "out_dim": 4096, "final_norm": False}, 48)
    assert connector.out_dim == 4096 and connector(torch.randn(1, 2, 48)).shape == (1, 2, 4096)
    assert build_connector("linear", 9).out_dim == 9


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {"kind": "qformer"},
            "connector='qformer' is unknown; accepted: identity, linear, mlp, fused_gelu_mlp",
        ),
        ({"kind": "linear", "depth": 2}, "connector='linear' got unknown option(s) ['depth']"),
        ({"kind": "mlp", "depth": 0}, "connector depth must be a positive integer, got 0"),
        ({"kind": "mlp", "out_dim": -3}, "connector out_dim must be a positive integer, got -3"),
        ({"kind": "mlp", "final_norm": "yes"}, "connector final_norm='yes' must be true or false"),
        ({"out_dim": 8}, "has no 'kind'"),
    ],
)
def test_bad_configs_are_named(config, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build_connector(config, 5)
