"""encoder_fusion.hf: the fused encoder inside a transformers VLM, checked against a VLM built by hand
from the same language model and fused encoder, on tiny random models of the real architectures."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor, PreTrainedModel
from vlm_cases import WIDTH, tiny_fused, tiny_language_model, tiny_tokenizer

import encoder_fusion.hf as hf
from encoder_fusion import FusedEncoder
from encoder_fusion.encoders.tiny import tiny_spec
from encoder_fusion.hf.training import IGNORE_INDEX, freeze_for_stage1, stage1_batch

PROMPTS = ["<image> w3 w4 w5 w6", "w7 <image> w8 <image>"]  # one image, then two: 3 images in all


@pytest.fixture
def parts(tmp_path):
    fused = tiny_fused(tmp_path)
    tokenizer = tiny_tokenizer()
    processor = hf.build_processor(fused, tokenizer)
    vlm = hf.build_vlm(fused, tiny_language_model()).eval()
    return fused, processor, vlm


def random_images(seed: int, sizes=((50, 70), (64, 64), (31, 45))) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=generator) for h, w in sizes]


def reference_embeds(vlm, fused, ids: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """The language model's input embeddings for one unpadded prompt ``ids`` (L,), the image
    placeholders replaced by ``fused(pixels)`` in order: the VLM built by hand."""
    embeds = vlm.get_input_embeddings()(ids).clone()
    positions = (ids == vlm.config.image_token_id).nonzero().flatten()
    tokens = fused(pixels).reshape(-1, WIDTH)
    assert len(positions) == len(tokens)
    embeds[positions] = tokens
    return embeds[None]


def prompt_rows(processor, images):
    """Each prompt's unpadded ids and its images' pixels (the processor run per prompt)."""
    counts = [prompt.count("<image>") for prompt in PROMPTS]
    starts = [sum(counts[:i]) for i in range(len(counts))]
    rows = []
    for prompt, start, count in zip(PROMPTS, starts, counts):
        one = processor(images=images[start : start + count], text=[prompt], return_tensors="pt")
        rows.append((one["input_ids"][0], one["pixel_values"]))
    return rows


def test_import_registers_the_classes_with_the_auto_classes():
    assert AutoConfig.for_model("fused_llava").__class__ is hf.FusedLlavaConfig
    assert AutoConfig.for_model("fused_encoder").__class__ is hf.FusedEncoderConfig
    config = hf.FusedLlavaConfig(
        vision_config=hf.FusedEncoderConfig(hidden_size=WIDTH), text_config=tiny_language_model().config
    )
    assert AutoModelForImageTextToText._model_mapping[type(config)] is hf.FusedLlavaForConditionalGeneration
    assert AutoModel._model_mapping[hf.FusedEncoderConfig] is hf.FusedEncoderModel


def test_image_features_are_the_fused_tokens_with_the_same_weights(parts):
    fused, processor, vlm = parts
    assert isinstance(vlm, PreTrainedModel)
    pixels = processor.image_processor(random_images(1), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        features = vlm.get_image_features(pixel_values=pixels).pooler_output
        expected = fused(pixels)
    assert len(features) == 3
    torch.testing.assert_close(torch.stack(list(features)), expected, rtol=0, atol=0)
    assert vlm.fused is fused  # shared, not copied
    assert not hasattr(vlm.model, "multi_modal_projector")  # the connector is the projector


def test_processor_expands_each_image_token_to_the_fused_token_count(parts):
    fused, processor, vlm = parts
    batch = processor(images=random_images(2), text=PROMPTS, return_tensors="pt")  # pads by default
    placeholders = (batch["input_ids"] == processor.image_token_id).sum(1).tolist()
    assert placeholders == [fused.output_tokens(), 2 * fused.output_tokens()]
    assert processor.image_token_id == vlm.config.image_token_id
    assert batch["pixel_values"].shape == (3, 3, 64, 64)  # the largest encoder input size
    assert batch["attention_mask"][0, 0] == 0  # padded on the left, as generation needs


def test_logits_equal_the_language_model_fed_the_fused_tokens(parts):
    fused, processor, vlm = parts
    images = random_images(3)
    for ids, pixels in prompt_rows(processor, images):
        with torch.no_grad():
            got = vlm(input_ids=ids[None], pixel_values=pixels).logits
            expected = vlm.model.language_model(inputs_embeds=reference_embeds(vlm, fused, ids, pixels))
            expected = vlm.lm_head(expected.last_hidden_state)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_batched_greedy_generate_equals_a_hand_built_greedy_decode(parts):
    fused, processor, vlm = parts
    images, steps = random_images(4), 6
    batch = processor(images=images, text=PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        generated = vlm.generate(**batch, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
    new = generated[:, batch["input_ids"].shape[1] :]
    for row, (ids, pixels) in enumerate(prompt_rows(processor, images)):
        with torch.no_grad():
            embeds, tokens = reference_embeds(vlm, fused, ids, pixels), []
            for _ in range(steps):  # no cache: every step reruns the whole sequence
                hidden = vlm.model.language_model(inputs_embeds=embeds).last_hidden_state
                token = vlm.lm_head(hidden[:, -1]).argmax(-1)
                tokens.append(int(token))
                embeds = torch.cat([embeds, vlm.get_input_embeddings()(token)[:, None]], dim=1)
        assert new[row].tolist() == tokens


def test_deepstack_sets_reach_the_first_decoder_layers(tmp_path):
    fused = tiny_fused(tmp_path, deepstack_layers={"dino": [1, 3]})
    processor = hf.build_processor(fused, tiny_tokenizer())
    vlm = hf.build_vlm(fused, tiny_language_model()).eval()
    ids, pixels = prompt_rows(processor, random_images(5))[1]
    mask = ids == vlm.config.image_token_id
    with torch.no_grad():
        _, extras = fused.forward_deepstack(pixels)

        def add(index, module, args, output):  # after decoder layer index, at the image positions
            hidden = output[0] if isinstance(output, tuple) else output
            hidden = hidden.clone()
            hidden[0, mask] += extras[index].reshape(-1, WIDTH)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        layers = vlm.model.language_model.layers
        handles = [layers[k].register_forward_hook(lambda m, a, o, k=k: add(k, m, a, o)) for k in range(2)]
        try:
            hidden = vlm.model.language_model(inputs_embeds=reference_embeds(vlm, fused, ids, pixels))
        finally:
            for handle in handles:
                handle.remove()
        expected = vlm.lm_head(hidden.last_hidden_state)
        got = vlm(input_ids=ids[None], pixel_values=pixels).logits
        plain = hf.build_vlm(tiny_fused(tmp_path), tiny_language_model()).eval()
        without = plain(input_ids=ids[None], pixel_values=pixels).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, without, atol=1e-3)  # the sets changed the answer
    generated = vlm.generate(input_ids=ids[None], pixel_values=pixels, max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, len(ids) + 3)


FRESH_PROCESS = """
import sys, torch
import encoder_fusion.hf  # registers the classes
from transformers import AutoModelForImageTextToText, AutoProcessor
folder, images_file, out = sys.argv[1:]
vlm = AutoModelForImageTextToText.from_pretrained(folder).eval()
processor = AutoProcessor.from_pretrained(folder)
batch = processor(images=torch.load(images_file), text={prompts!r}, return_tensors="pt", padding=True)
with torch.no_grad():
    torch.save(vlm(**batch).logits, out)
"""


def test_save_and_reload_gives_identical_logits_here_and_in_a_fresh_process(parts, tmp_path):
    _, processor, vlm = parts
    folder = tmp_path / "vlm"
    vlm.save_pretrained(folder)
    processor.save_pretrained(folder)
    images = random_images(6)
    batch = processor(images=images, text=PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = vlm(**batch).logits
    for loader in (hf.FusedLlavaForConditionalGeneration, AutoModelForImageTextToText):
        reloaded = loader.from_pretrained(folder).eval()
        assert type(reloaded) is hf.FusedLlavaForConditionalGeneration
        assert reloaded.config.vision_config.encoder_weights == {"clip": "pretrained", "dino": "pretrained"}
        again = AutoProcessor.from_pretrained(folder)(
            images=images, text=PROMPTS, return_tensors="pt", padding=True
        )
        assert all(torch.equal(batch[key], again[key]) for key in batch)
        with torch.no_grad():
            assert torch.equal(reloaded(**again).logits, expected)
    # the encoders' checkpoints are gone: the folder holds every tensor
    for checkpoint in tmp_path.glob("*.safetensors"):
        checkpoint.unlink()
    torch.save(images, tmp_path / "images.pt")
    script = textwrap.dedent(FRESH_PROCESS.format(prompts=PROMPTS))
    subprocess.run(
        [sys.executable, "-c", script, str(folder), str(tmp_path / "images.pt"), str(tmp_path / "logits.pt")],
        check=True,
        cwd=tmp_path,
    )
    assert torch.equal(torch.load(tmp_path / "logits.pt"), expected)


def test_stage_one_trains_only_the_head_on_the_answer_tokens(parts):
    fused, processor, vlm = parts
    vlm.train()
    parameters = freeze_for_stage1(vlm)
    assert {id(p) for p in parameters} == {id(p) for p in fused.head.parameters()}
    frozen = {name: p.detach().clone() for name, p in vlm.named_parameters() if not p.requires_grad}
    head_before = [p.detach().clone() for p in parameters]
    assert frozen and len(frozen) + len(parameters) == len(list(vlm.parameters()))
    images = random_images(7, sizes=[(64, 64)] * 4)
    prompts = ["<image> w1 w2", "<image> w3", "w4 <image>", "<image>"]
    answers = ["w5", "w6 w7", "w8", "w9 w10 w11"]
    batch = stage1_batch(processor, images, prompts, answers)
    answer_tokens = (batch["labels"] != IGNORE_INDEX).sum(1).tolist()
    assert answer_tokens == [2, 3, 2, 4]  # the answer and the end-of-sequence token
    assert not (batch["labels"] == processor.image_token_id).any()
    optimizer = torch.optim.AdamW(parameters, lr=1e-2)
    losses = []
    for _ in range(6):
        loss = vlm(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
    assert all(torch.equal(p, frozen[name]) for name, p in vlm.named_parameters() if name in frozen)
    assert any(not torch.equal(p, before) for p, before in zip(parameters, head_before))


# -- bad input: a clear error before any forward --------------------------------------------------
def test_a_connector_narrower_than_the_language_model_is_refused(tmp_path):
    fused = FusedEncoder([tiny_spec("clip")], connector={"kind": "mlp", "out_dim": 16})
    lm = tiny_language_model()
    rows = lm.get_input_embeddings().num_embeddings
    with pytest.raises(
        ValueError, match=r"16 wide .* hidden size is 32; accepted: a connector with out_dim=32"
    ):
        hf.build_vlm(fused, lm)
    assert lm.get_input_embeddings().num_embeddings == rows  # refused before the model was changed


def test_more_deepstack_sets_than_decoder_layers_are_refused():
    fused = FusedEncoder(
        [tiny_spec("clip", layers=[0, 1, 2, 3])],
        connector={"kind": "mlp", "out_dim": WIDTH},
        deepstack_layers={"clip": [0, 1, 2, 3]},
    )
    lm = tiny_language_model()
    lm.model.layers = lm.model.layers[:3]
    lm.config.num_hidden_layers = 3
    with pytest.raises(
        ValueError, match=r"4 DeepStack token sets but the language model only 3 decoder layers"
    ):
        hf.build_vlm(fused, lm)


@pytest.mark.parametrize(
    ("images", "prompts", "message"),
    [
        (3, ["w1 w2", "w3"], r"the prompts hold 0 <image> for 3 image\(s\)"),
        (0, ["<image> w1"], r"the prompts hold 1 <image> but no images were given"),
        ([[0], [1, 2]], ["<image> <image>", "<image>"], r"prompt 0 holds 2 <image> for 1 image\(s\)"),
        ([[0]], PROMPTS, r"1 list\(s\) of images for 2 prompt\(s\)"),
    ],
)
def test_image_token_counts_that_differ_from_the_images_are_refused(parts, images, prompts, message):
    _, processor, _ = parts
    pool = random_images(8)
    if isinstance(images, int):
        given = pool[:images] or None
    else:
        given = [[pool[i] for i in group] for group in images]
    with pytest.raises(ValueError, match=message):
        processor(images=given, text=prompts, return_tensors="pt")


def test_images_the_prompt_has_no_placeholders_for_are_refused_by_the_model(parts, monkeypatch):
    fused, processor, vlm = parts
    pixels = processor.image_processor(random_images(9)[:1], return_tensors="pt")["pixel_values"]
    calls = []
    monkeypatch.setattr(fused, "extract", lambda images: calls.append(images))
    with pytest.raises(
        ValueError, match=r"1 image\(s\) of 16 tokens each were given, but the prompts hold 0"
    ):
        vlm(input_ids=torch.tensor([[3, 4, 5]]), pixel_values=pixels)
    assert not calls  # before any encoder ran


def test_a_prompt_longer_than_the_positions_is_refused(tmp_path):
    fused = tiny_fused(tmp_path)
    vlm = hf.build_vlm(fused, tiny_language_model(positions=20)).eval()
    with pytest.raises(ValueError, match=r"the prompt is 21 tokens long .* has 20 positions"):
        vlm(input_ids=torch.full((1, 21), 3))


def test_an_image_token_id_outside_the_vocabulary_is_refused(tmp_path):
    with pytest.raises(
        ValueError, match=r"image_token_id=65 is not a token .* accepted: an int in \[0, 64\]"
    ):
        hf.build_vlm(tiny_fused(tmp_path), tiny_language_model(), image_token_id=65)


def test_folders_of_another_architecture_are_refused(parts, tmp_path):
    fused, _, vlm = parts
    lm_folder, vlm_folder = tmp_path / "lm", tmp_path / "vlm"
    tiny_language_model().save_pretrained(lm_folder)
    vlm.save_pretrained(vlm_folder)
    with pytest.raises(ValueError, match=r"holds a 'qwen2' model, not a fused VLM"):
        hf.FusedLlavaForConditionalGeneration.from_pretrained(lm_folder)
    with pytest.raises(ValueError, match=r"holds a 'fused_llava' model, not a causal LM"):
        hf.build_vlm(fused, vlm_folder)
    with pytest.raises(
        ValueError, match=r"language_model is a FusedEncoder; accepted: a transformers causal LM"
    ):
        hf.build_vlm(fused, fused)
    built = hf.build_vlm(fused, lm_folder)  # a causal LM's folder is a language model
    assert built.config.text_config.model_type == "qwen2"
