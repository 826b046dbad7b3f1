"""A VLM tiled with grid="auto": the processor gives each image the grid its own aspect ratio picks
(a hand computation), expands each <image> to that image's count, and the VLM reads each padded image
back at its own size; logits, generate and save / load agree with the model fed by hand."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoProcessor
from vlm_cases import tiny_fused, tiny_language_model, tiny_tokenizer

import encoder_fusion.hf as hf
from encoder_fusion.tiling import choose_grid

TILING = {"grid": "auto", "max_tiles": 4, "thumbnail": "first", "newline": True}
PROMPTS = ["<image> w3 w4", "w5 <image> w6 <image>"]
# wide, tall, square: hand-picked grids for at most 4 tiles (the square one holds more than half of
# a 2x2 grid of the tiny encoders' 64-pixel tiles, so the larger of the tied grids)
SIZES, GRIDS = ((60, 190), (200, 66), (100, 100)), ((1, 3), (3, 1), (2, 2))


@pytest.fixture
def parts(tmp_path):
    fused = tiny_fused(tmp_path, tiling=TILING, deepstack_layers={"dino": [1]})
    processor = hf.build_processor(fused, tiny_tokenizer())
    vlm = hf.build_vlm(fused, tiny_language_model()).eval()
    return fused, processor, vlm


def images_of(sizes, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=generator) for h, w in sizes]


def test_each_image_gets_its_own_grid_and_count(parts):
    fused, processor, _ = parts
    tile, per_tile = fused.tile_size, fused.head.output_tokens
    assert tile == 64 and [choose_grid(h, w, 4, tile) for h, w in SIZES] == list(GRIDS)
    batch = processor(images=images_of(SIZES), text=PROMPTS, return_tensors="pt")
    assert batch["image_sizes"].tolist() == [[rows * tile, cols * tile] for rows, cols in GRIDS]
    assert tuple(batch["pixel_values"].shape) == (3, 3, 192, 192)  # padded to the largest image
    counts = [rows * cols * per_tile + per_tile + rows for rows, cols in GRIDS]  # tiles, thumbnail, rows
    placeholders = (batch["input_ids"] == processor.image_token_id).sum(1).tolist()
    assert placeholders == [counts[0], counts[1] + counts[2]]
    # the padding is zeros, beyond each image's own size
    for image, (height, width) in zip(batch["pixel_values"], batch["image_sizes"].tolist()):
        assert not image[:, height:].any() and not image[:, :, width:].any()


def test_logits_and_generate_equal_the_language_model_fed_each_images_tokens(parts):
    fused, processor, vlm = parts
    images = images_of(SIZES, seed=1)
    batch = processor(images=images, text=PROMPTS, return_tensors="pt")
    with torch.no_grad():
        got = vlm(**batch).logits
        generated = vlm.generate(**batch, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    shown = [p[:, :h, :w] for p, (h, w) in zip(batch["pixel_values"], batch["image_sizes"].tolist())]
    for image, pixels in zip(images, shown):  # each image resized to its own grid, nothing else
        rows, cols = pixels.shape[1] // 64, pixels.shape[2] // 64
        assert (rows, cols) == choose_grid(*image.shape[1:], 4, 64)
    with torch.no_grad():
        tokens, extras = fused.forward_deepstack(shown)
    flat, flat_extra = torch.cat(tokens), torch.cat(extras[0])
    ids, mask = batch["input_ids"], batch["input_ids"] == processor.image_token_id
    embeds = vlm.get_input_embeddings()(ids).clone()
    embeds[mask] = flat

    def add(module, args, output):  # the DeepStack set after decoder layer 0, at the image positions
        hidden = (output[0] if isinstance(output, tuple) else output).clone()
        hidden[mask] += flat_extra
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = vlm.model.language_model.layers[0].register_forward_hook(add)
    try:
        with torch.no_grad():
            hidden = vlm.model.language_model(inputs_embeds=embeds, attention_mask=batch["attention_mask"])
    finally:
        handle.remove()
    expected = vlm.lm_head(hidden.last_hidden_state)
    keep = batch["attention_mask"].bool()
    torch.testing.assert_close(got[keep], expected[keep], rtol=1e-5, atol=1e-5)
    assert generated.shape == (2, ids.shape[1] + 3)


def test_the_processor_saves_and_loads_its_tiling(parts, tmp_path):
    processor = parts[1]
    processor.save_pretrained(tmp_path / "vlm")
    again = AutoProcessor.from_pretrained(tmp_path / "vlm")
    images = images_of(SIZES, seed=2)
    first = processor(images=images, text=PROMPTS, return_tensors="pt")
    second = again(images=images, text=PROMPTS, return_tensors="pt")
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert again.image_processor.tiling == processor.image_processor.tiling


def test_image_sizes_that_do_not_fit_the_batch_are_refused(parts):
    _, processor, vlm = parts
    batch = processor(images=images_of(SIZES), text=PROMPTS, return_tensors="pt")
    with pytest.raises(
        ValueError, match=r"image_sizes must be \(B, 2\) = \(3, 2\) for 3 image\(s\), got \(2, 2\)"
    ):
        vlm(**{**batch, "image_sizes": batch["image_sizes"][:2]})
    with pytest.raises(ValueError, match=r"must lie within the padded images' 192x192"):
        vlm(**{**batch, "image_sizes": batch["image_sizes"] * 2})
    with pytest.raises(
        ValueError, match=r"3 image\(s\) of \[33, 49, 33\] tokens were given, but the prompts hold 214 image"
    ):
        vlm(**{**batch, "image_sizes": torch.tensor([[64, 64], [64, 128], [64, 64]])})
