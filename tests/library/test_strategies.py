"""encoder_fusion.strategies(): every strategy argument and the names it accepts, as DESIGN.md lists them."""

import pytest

import encoder_fusion
from encoder_fusion import EncoderGeometry, FusionHead

# the strategy names of DESIGN.md's public API (a contract), and the connector kinds of connector.py
DESIGN_NAMES = {
    "align": ["bilinear", "bicubic", "nearest", "area", "pixel_unshuffle", "learned"],
    "layer_merge": ["last", "mean", "concat", "weighted_ln", "sparse_token", "dense_channel", "mmfuser"],
    "encoder_merge": [
        "channel_concat",
        "sequence_concat",
        "interleave",
        "add",
        "gated_add",
        "cross_attention",
    ],
    "connector": ["identity", "linear", "mlp", "fused_gelu_mlp"],
}


def test_strategies_lists_every_name_sorted():
    listed = encoder_fusion.strategies()
    assert listed == {what: sorted(names) for what, names in DESIGN_NAMES.items()}
    assert "strategies" in encoder_fusion.__all__


def test_strategies_returns_a_fresh_mapping():
    encoder_fusion.strategies()["align"].clear()
    assert encoder_fusion.strategies()["align"] == sorted(DESIGN_NAMES["align"])


@pytest.mark.parametrize("what", list(DESIGN_NAMES))
def test_every_listed_name_builds_a_head(what):
    geometries = [EncoderGeometry("a", 8, (4, 4), 2), EncoderGeometry("b", 8, (4, 4), 2)]
    for name in encoder_fusion.strategies()[what]:
        grid = (2, 2) if name == "pixel_unshuffle" else None
        head = FusionHead(geometries, grid=grid, **{what: name})
        assert head.output_tokens > 0
