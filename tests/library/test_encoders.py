"""Encoder adapters against their own libraries, family by family, on tiny random models of the real
architectures (the recipes of encoder_fusion.encoders.tiny).

Each parity test builds a model with the source library, perturbs every parameter (so that norms and
tokens are not at their init values), saves it as a checkpoint, loads it back through an EncoderSpec
and compares the grids with the library's own intermediate outputs of the unpruned model.
"""

from __future__ import annotations

import pytest
import torch
from encoder_cases import CASES, NO_POST_NORM, PREFIX_TOKENS, SIZES

from encoder_fusion import FusedEncoder
from encoder_fusion.encoders import EncoderSpec, build_encoder
from encoder_fusion.encoders.tiny import RECIPES, tiny_spec
from encoder_fusion.hooks import HookSpec

LAYERS = (-1, 0)  # out of order on purpose: outputs follow the spec, not the block order
TOL = {"rtol": 1e-5, "atol": 1e-5}
SOURCE_KINDS = sorted(RECIPES)
PARITY = [(s, k, n) for s, k in SOURCE_KINDS for n in ("pre", "post") if n == "pre" or k not in NO_POST_NORM]


@pytest.mark.parametrize("source,kind,norm", PARITY)
def test_grids_match_library_intermediates(tmp_path, source, kind, norm):
    hooks = HookSpec(layers=LAYERS, norm=norm, prefix="keep")
    spec, reference = CASES[source](tmp_path, kind, hooks)
    encoder = build_encoder(spec)
    assert encoder.weights_loaded == "pretrained"
    assert (encoder.depth, encoder.num_prefix_tokens) == (4, PREFIX_TOKENS[kind])
    torch.manual_seed(1)
    pixels = torch.randn(2, 3, *SIZES[kind])
    with torch.no_grad():
        got = encoder.forward_tokens(pixels)
        expected = reference(pixels, sorted(encoder.layer_indices), norm == "post")
    by_block = dict(zip(sorted(encoder.layer_indices), expected))
    assert len(got) == len(LAYERS)
    for layer, index in zip(got, encoder.layer_indices):
        want_grid, want_prefix = by_block[index]
        assert layer.grid.shape[1] != layer.grid.shape[2]  # non-square input, non-square grid
        torch.testing.assert_close(layer.grid, want_grid, **TOL)
        torch.testing.assert_close(layer.prefix, want_prefix, **TOL)


@pytest.mark.parametrize("source,kind", SOURCE_KINDS)
def test_prefix_drop_returns_the_same_grids_without_prefix(tmp_path, source, kind):
    keep, _ = CASES[source](tmp_path, kind, HookSpec(layers=LAYERS, prefix="keep"))
    drop = EncoderSpec.from_any({**keep.__dict__, "hooks": HookSpec(layers=LAYERS, prefix="drop")})
    pixels = torch.randn(2, 3, *SIZES[kind])
    with torch.no_grad():
        kept, dropped = build_encoder(keep).forward_tokens(pixels), build_encoder(drop).forward_tokens(pixels)
    for a, b in zip(kept, dropped):
        assert b.prefix is None and a.prefix.shape[1] == PREFIX_TOKENS[kind]
        torch.testing.assert_close(a.grid, b.grid, rtol=0, atol=0)


@pytest.mark.parametrize("source,kind", sorted(k for k in RECIPES if k[1] in NO_POST_NORM))
def test_post_norm_is_refused_where_the_model_has_none_for_the_hooked_layers(source, kind):
    with pytest.raises(ValueError, match=r"HookSpec.norm='post' is not available .*accepted: norm='pre'"):
        build_encoder(tiny_spec(kind, source=source, norm="post"))


def block_list(model: torch.nn.Module) -> torch.nn.Module:
    """The model's list of blocks (or ConvNeXt stages), whatever the library calls it."""
    names = ("blocks", "stages", "resblocks", "layer", "layers")
    return next(m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in names)


@pytest.mark.parametrize("source,kind", SOURCE_KINDS)
def test_blocks_after_the_deepest_hooked_layer_never_run(source, kind):
    encoder = build_encoder(tiny_spec(kind, source=source, layers=[1, 0]))
    block_type = type(block_list(encoder.model)[0])
    calls = []

    def count(module, args):
        if type(module) is block_type:
            calls.append(module)

    # every module call anywhere, so a block run outside the model's block list is counted too
    handle = torch.nn.modules.module.register_module_forward_pre_hook(count)
    try:
        grids = encoder(encoder.preprocess(torch.randint(0, 256, (2, 3, 50, 61), dtype=torch.uint8)))
    finally:
        handle.remove()
    assert encoder.depth == 4 and calls == list(block_list(encoder.model)[:2])
    assert len(grids) == 2


@pytest.mark.parametrize("source,kind", SOURCE_KINDS)
def test_tiny_specs_report_their_geometry(source, kind):
    encoder = build_encoder(tiny_spec(kind, "enc", source=source, layers=[-1], prefix="keep"))
    assert encoder.spec.name == "enc" and encoder.weights_loaded == "random"
    assert encoder.num_prefix_tokens == PREFIX_TOKENS[kind]
    assert encoder.patch_size == {"dino": 14, "dino_reg": 14, "convnext": 32}.get(kind, 16)
    assert (encoder.width, encoder.depth, encoder.layer_indices) == (32, 4, (3,))
    (layer,) = encoder.forward_tokens(encoder.preprocess(torch.rand(3, 3, 40, 90)))
    assert layer.grid.shape == (3, 4, 4, 32) and layer.prefix.shape == (3, PREFIX_TOKENS[kind], 32)


# -- family specifics -------------------------------------------------------------------------------
@pytest.mark.parametrize("source", ["timm", "open_clip"])
def test_convnext_hooks_are_stages_with_their_own_grids(source):
    encoder = build_encoder(tiny_spec("convnext", source=source, layers=[3, 0, 1, 2]))
    assert [(info.channels, info.reduction) for info in encoder.layers] == [
        (8, 4),
        (16, 8),
        (24, 16),
        (32, 32),
    ]
    grids = encoder(encoder.preprocess(torch.rand(2, 3, 128, 128)))
    assert [tuple(g.shape) for g in grids] == [(2, 4, 4, 32), (2, 32, 32, 8), (2, 16, 16, 16), (2, 8, 8, 24)]
    # one encoder, four widths and grids: a fused model, which takes one of each, says so
    with pytest.raises(
        ValueError, match=r"hooks layers \[3, 0, 1, 2\] of different widths \[32, 8, 16, 24\]"
    ):
        FusedEncoder([encoder])


@pytest.mark.parametrize(
    "layers,message",
    [
        ([0, 1, 2, 3, 4], r"hooks 5 layers but encoder 'convnext' has 4 stages"),
        ([4], r"index 4 is out of range .*of depth 4 \(4 stages\)"),
    ],
)
def test_more_layers_than_convnext_stages_names_the_stage_count(layers, message):
    with pytest.raises(ValueError, match=message):
        build_encoder(tiny_spec("convnext", layers=layers))


@pytest.mark.parametrize(
    "model,prefix", [("naflexvit_base_patch16_radio_v3", 8), ("naflexvit_so400m_patch16_radio_v4", 10)]
)
def test_c_radio_counts_its_summary_and_register_tokens(model, prefix):
    # C-RADIO keeps one CLS (summary) token per teacher plus registers before the patch tokens
    spec = EncoderSpec(
        name="radio", source="timm", model=model, weights="random", image_size=(48, 80),
        model_kwargs={"depth": 2, "embed_dim": 32, "num_heads": 2}, hooks={"layers": [-1], "prefix": "keep"},
    )  # fmt: skip
    encoder = build_encoder(spec)
    (layer,) = encoder.forward_tokens(torch.randn(1, 3, 48, 80))
    assert encoder.num_prefix_tokens == prefix and layer.prefix.shape == (1, prefix, 32)
    assert layer.grid.shape == (1, 3, 5, 32)  # 15 spatial tokens, none of them a summary token


@pytest.mark.parametrize("kind", ["naflex_siglip2", "radio"])
def test_naflex_sizes_off_the_patch_grid_lose_the_partial_patches(kind):
    # NaFlexVit fails on such sizes; every encoder crops the partial last patch row and column
    encoder = build_encoder(tiny_spec(kind, layers=[0, -1], prefix="keep"))
    pixels = torch.randn(2, 3, 50, 83)
    with torch.no_grad():
        off_grid, on_grid = encoder.forward_tokens(pixels), encoder.forward_tokens(pixels[..., :48, :80])
    for a, b in zip(off_grid, on_grid):
        assert a.grid.shape == (2, 3, 5, 32)
        torch.testing.assert_close(a.grid, b.grid, rtol=0, atol=0)
        torch.testing.assert_close(a.prefix, b.prefix, rtol=0, atol=0)


def test_open_clip_vit_reads_its_own_size_only():
    encoder = build_encoder(tiny_spec("clip", source="open_clip", image_size=(48, 80)))
    assert encoder.forward_grids(torch.randn(1, 3, 48, 80))[0].shape == (1, 3, 5, 32)
    with pytest.raises(
        ValueError, match=r"\(64, 64\), a 4x4 grid; its position table is built for \(48, 80\)"
    ):
        encoder.forward_grids(torch.randn(1, 3, 64, 64))


def test_encoders_are_frozen_and_stay_in_eval_mode():
    encoder = build_encoder(tiny_spec("dinov3"))
    assert not any(p.requires_grad for p in encoder.parameters())
    encoder.train()
    assert encoder.training and not encoder.model.training
    assert not any(m.training for m in encoder.model.modules())
