"""Tiled images: a grid of regions plus the whole image, each through the whole fused pipeline, equals
the regions cropped by hand and fused one by one; the automatic grid is the one a hand computation
picks; images of several shapes get their own grids; the separator token learns; bad tilings are
refused naming what is accepted."""

from __future__ import annotations

import pytest
import torch

from encoder_fusion import FusedEncoder
from encoder_fusion.encoders import build_encoder
from encoder_fusion.encoders.tiny import tiny_spec
from encoder_fusion.tiling import TilingSpec, choose_grid, cut_tiles

CONNECTOR = {"kind": "mlp", "out_dim": 24}


@pytest.fixture(scope="module")
def encoders():
    torch.manual_seed(0)
    return [build_encoder(tiny_spec("clip", layers=[-2, -1])), build_encoder(tiny_spec("dino", layers=[-1]))]


def pair(encoders, tiling, seed: int = 1) -> tuple[FusedEncoder, FusedEncoder]:
    """An untiled model and a tiled one with the same head weights."""
    torch.manual_seed(seed)
    plain = FusedEncoder(encoders, grid=4, connector=CONNECTOR).eval()
    tiled = FusedEncoder(encoders, grid=4, connector=CONNECTOR, tiling=tiling).eval()
    tiled.head.load_state_dict(plain.head.state_dict())
    return plain, tiled


@torch.no_grad()
@pytest.mark.parametrize("thumbnail", ["last", "first", "none"])
def test_a_grid_plus_thumbnail_equals_the_regions_fused_one_by_one(encoders, thumbnail):
    plain, tiled = pair(encoders, {"grid": [2, 3], "thumbnail": thumbnail})
    images = torch.rand(2, 3, 70, 96, generator=torch.Generator().manual_seed(2))  # 35 x 32 regions
    out = tiled(images)
    per_image = plain.output_tokens()
    count = 6 * per_image + (per_image if thumbnail != "none" else 0)
    assert out.shape == (2, count, 24) and tiled.output_tokens() == count
    for b in range(2):
        regions = [
            plain(images[b : b + 1, :, 35 * r : 35 * (r + 1), 32 * c : 32 * (c + 1)])[0]
            for r in range(2)
            for c in range(3)
        ]
        whole = [plain(images[b : b + 1])[0]] if thumbnail != "none" else []
        expected = torch.cat(whole + regions if thumbnail == "first" else regions + whole)
        torch.testing.assert_close(out[b], expected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_separators_follow_each_row_of_tiles_and_deepstack_sets_get_zeros_there(encoders):
    spec = {"grid": [2, 2], "thumbnail": "last", "newline": True}
    torch.manual_seed(3)
    tiled = FusedEncoder(encoders, grid=4, connector=CONNECTOR, tiling=spec, deepstack_layers={"clip": [-2]})
    tiled.eval()
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    tokens, (extra,) = tiled.forward_deepstack(images)
    n = tiled.head.output_tokens
    assert tokens.shape[1] == 4 * n + n + 2 == tiled.output_tokens()
    for separator in (2 * n, 4 * n + 1):  # after row 0's two tiles, after row 1's (and the first separator)
        torch.testing.assert_close(tokens[0, separator], tiled.tiler.newline)
        assert not extra[0, separator].any()
    assert extra.shape == tokens.shape


def test_gradients_reach_the_separator_token(encoders):
    torch.manual_seed(5)
    tiled = FusedEncoder(encoders, grid=4, connector=CONNECTOR, tiling={"grid": [1, 2], "newline": True})
    tiled(torch.rand(2, 3, 64, 128)).square().sum().backward()
    assert tiled.tiler.newline.grad is not None and tiled.tiler.newline.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("height", "width", "max_tiles", "expected"),
    [
        (100, 200, 6, (1, 2)),  # 2:1 exactly
        (200, 100, 6, (2, 1)),
        (224, 224, 6, (1, 1)),  # square, too small to fill half of four tiles' pixels: one tile
        (448, 448, 6, (2, 2)),  # square and large: the larger square grid wins the tie
        (300, 1000, 6, (1, 3)),  # 3.33: 3:1 is closest (4:1 is 0.67 away)
        (300, 1000, 2, (1, 2)),  # with at most two tiles
        (500, 1000, 9, (2, 4)),  # 2x4 ties 1x2, and the image fills more than half of its tiles
    ],
)
def test_the_automatic_grid_is_the_one_a_hand_computation_picks(height, width, max_tiles, expected):
    assert choose_grid(height, width, max_tiles, tile=224) == expected


@torch.no_grad()
def test_images_of_several_shapes_get_their_own_grids(encoders):
    plain, tiled = pair(encoders, {"grid": "auto", "max_tiles": 4, "thumbnail": "last"})
    generator = torch.Generator().manual_seed(6)
    images = [torch.rand(3, 64, 128, generator=generator), torch.rand(3, 128, 64, generator=generator)]
    images.append(images[0].flip(-1))
    out = tiled(images)
    n = plain.output_tokens()
    assert [t.shape[0] for t in out] == [3 * n, 3 * n, 3 * n]  # 1x2 and 2x1, each plus the thumbnail
    assert [tiled.output_tokens(tuple(i.shape[-2:])) for i in images] == [3 * n] * 3
    tall = torch.cat(
        [plain(images[1][None, :, :64])[0], plain(images[1][None, :, 64:])[0], plain(images[1][None])[0]]
    )
    torch.testing.assert_close(out[1], tall, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[0], tiled(images[0][None])[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(
        ValueError, match=r"grid='auto' depends on the image: accepted: output_tokens\(image_size"
    ):
        tiled.output_tokens()


def test_sides_that_the_grid_does_not_divide_are_resized_to_the_nearest_that_it_does():
    images = torch.rand(2, 3, 65, 97)
    tiles = cut_tiles(images, (2, 3))
    assert tiles.shape == (12, 3, 32, 32)
    exact = torch.rand(1, 3, 64, 96)
    torch.testing.assert_close(cut_tiles(exact, (2, 3))[4], exact[0, :, 32:, 32:64])  # row 1, col 1


def test_a_tiled_model_saves_and_loads_its_separator(encoders, tmp_path):
    torch.manual_seed(7)
    tiled = FusedEncoder(encoders, grid=4, connector=CONNECTOR, tiling={"grid": [2, 2], "newline": True})
    path = tiled.save_trained(tmp_path / "tiled.safetensors")
    again = FusedEncoder.from_config(tiled.config).load_trained(path)
    torch.testing.assert_close(again.tiler.newline, tiled.tiler.newline)
    assert again.config["tiling"] == {"grid": [2, 2], "thumbnail": "last", "max_tiles": 6, "newline": True}
    untiled = FusedEncoder(encoders, grid=4, connector=CONNECTOR)
    with pytest.raises(ValueError, match=r"different config \(tiling: file"):
        untiled.load_trained(path)


@pytest.mark.parametrize(
    ("tiling", "message"),
    [
        ({"grid": [0, 2]}, r"tiling grid=\(0, 2\) must be \[rows, cols\] of ints >= 1, or 'auto'"),
        ({"grid": [2, -1]}, r"tiling grid=\(2, -1\) must be \[rows, cols\]"),
        ({"grid": "auto", "max_tiles": 0}, r"tiling max_tiles=0 must be an int >= 1"),
        ({"thumbnail": "middle"}, r"tiling thumbnail='middle' is unknown; accepted: first, last, none"),
        (
            {"rows": 2},
            r"tiling has unknown field\(s\) \['rows'\]; accepted: grid, thumbnail, max_tiles, newline",
        ),
    ],
)
def test_a_bad_tiling_is_refused_before_any_encoder_is_built(tiling, message):
    with pytest.raises(ValueError, match=message):
        FusedEncoder([tiny_spec("clip")], tiling=tiling)
    with pytest.raises(ValueError, match=message):
        TilingSpec.from_any(tiling)


def test_tiles_smaller_than_a_patch_are_refused(encoders):
    tiled = FusedEncoder(encoders, grid=4, connector=CONNECTOR, tiling={"grid": [4, 4]})
    with pytest.raises(
        ValueError,
        match=r"tiling grid 4x4 cuts 48x48 images into 12x12 tiles, smaller than one 16-pixel patch of "
        r"encoder 'clip'; accepted: a grid whose tiles are at least 16 pixels a side",
    ):
        tiled(torch.rand(1, 3, 48, 48))


def test_the_transformers_processor_counts_a_tiled_models_tokens(encoders):
    """The processor resizes to the tiled model's full resolution (the grid times the largest encoder
    input) and expands each <image> to that size's count, which the VLM's forward accepts."""
    from vlm_cases import WIDTH, tiny_language_model, tiny_tokenizer

    from encoder_fusion.hf import build_processor, build_vlm

    torch.manual_seed(8)
    connector = {"kind": "mlp", "out_dim": WIDTH}
    tiled = FusedEncoder(encoders, grid=4, connector=connector, tiling={"grid": [1, 2], "newline": True})
    assert tiled.image_size == (64, 128)
    processor = build_processor(tiled, tiny_tokenizer())
    vlm = build_vlm(tiled, tiny_language_model()).eval()
    generator = torch.Generator().manual_seed(9)
    images = [
        torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
        for shape in ((3, 50, 90), (3, 80, 40))
    ]
    batch = processor(images=images, text=["<image> w1 w2", "<image> w3"], return_tensors="pt")
    assert tuple(batch["pixel_values"].shape[-2:]) == (64, 128)
    count = (batch["input_ids"] == vlm.config.image_token_id).sum(1)
    assert count.tolist() == [tiled.output_tokens((64, 128))] * 2 == [2 * 16 + 16 + 1] * 2
    with torch.no_grad():
        assert vlm(**batch).logits.shape[:2] == batch["input_ids"].shape
