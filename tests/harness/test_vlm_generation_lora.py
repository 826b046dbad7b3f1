"""The VLM probe's extras: the present question, greedy generation against a decode done by hand
with the full sequence (no KV cache), exact match read as documented, and LoRA adapters (peft)
that train while the language model's own weights stay, reset for every fresh head."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from encoder_fusion import FusedEncoder
from encoder_fusion.benchmarks.config.plan import llm_preset
from encoder_fusion.benchmarks.options import OptionError
from encoder_fusion.benchmarks.tasks import FeatureSplit
from encoder_fusion.benchmarks.tasks.probe import ProbeModel, fit
from encoder_fusion.benchmarks.tasks.vlm import VlmContext, VlmProbeOptions, VlmTask, answer_targets
from encoder_fusion.benchmarks.tasks.vlm_lora import LoraOptions
from encoder_fusion.benchmarks.tasks.vlm_scoring import AnswerScorer
from encoder_fusion.benchmarks.timing.llm import build_language_model
from encoder_fusion.encoders import build_encoder
from encoder_fusion.encoders.tiny import tiny_spec
from encoder_fusion.hf import build_vlm

CLASSES = ["tabby", "tabby cat", "dog"]
MASK_CLASSES = ["background", "sky", "tree", "road", "car"]
CONNECTOR = {"kind": "mlp", "out_dim": 32}


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return build_encoder(tiny_spec("clip", layers=[-1]))


def make_task(clip, seed: int = 0, **options) -> VlmTask:
    spec = llm_preset("tiny")
    language_model = build_language_model(spec, torch.device("cpu"), torch.float32, seed=seed)
    vlm = build_vlm(
        FusedEncoder([clip], connector=CONNECTOR), language_model, image_token_id=spec.vocab_size - 1
    )
    vlm.requires_grad_(False)
    return VlmTask(VlmContext(vlm, VlmProbeOptions(**options), CLASSES, MASK_CLASSES))


def test_the_present_question_offers_one_present_class_and_absent_ones(clip):
    task = make_task(clip, templates={"present": "which is there ?"}, options=3)
    masks = torch.full((3, 10, 10), 3)  # road everywhere
    masks[0, :5] = 1  # sky 50 %: image 0 has road and sky, and picks sky (its position, 0 of 2)
    masks[1, 0, 0] = 4  # car on 1 % of image 1: present; image 1 picks car (position 1 of 2)
    masks[2] = 0  # background only: nothing to ask
    split = FeatureSplit([[torch.zeros(3, 2, 2, 4)]], masks=masks)
    targets = answer_targets(split, task.context)
    phrases = task.context.phrases()
    options = [[phrases[i] for i in row[1:].tolist()] for row in targets[:, 0]]
    # the right class and the absent ones (only two here: all of them), never background
    assert sorted(options[0]) == ["car", "sky", "tree"] and options[0][targets[0, 0, 0]] == "sky"
    assert sorted(options[1]) == ["car", "sky", "tree"] and options[1][targets[1, 0, 0]] == "car"
    assert (targets[2, 0] == -1).all()


def test_options_give_nothing_away_and_the_baseline_guesses_from_the_train_answers(clip):
    """Over many images the right answer sits at every option position about equally, and the
    baseline, which sees no image, scores what a guess of train's most frequent answer scores."""
    task = make_task(clip, templates={"where": "where is it ?"}, options=2)
    generator = torch.Generator().manual_seed(7)
    centres = torch.rand(400, 2, generator=generator)
    centres[:300] = centres[:300] * 0.5  # 3 in 4 boxes in the top left quadrant
    boxes = torch.cat([centres - 0.01, centres + 0.01], dim=1)
    targets = answer_targets(FeatureSplit([[torch.zeros(400, 2, 2, 4)]], boxes=boxes), task.context)
    positions = torch.bincount(targets[:, 0, 0], minlength=2)
    assert positions.min() > 150  # not always first
    train, test = targets[:200], targets[200:]
    # by hand: guess "top left" whenever offered, else the option more frequent in train
    phrases = task.context.phrases()
    counts = {p: int((train[:, 0, 1:].gather(1, train[:, 0, :1]) == p).sum()) for p in range(len(phrases))}
    guesses = [max(range(2), key=lambda o: (counts[int(row[1 + o])], -o)) for row in test[:, 0]]
    expected = sum(int(g == row[0]) for g, row in zip(guesses, test[:, 0])) / len(test)
    assert task.baseline(train, test, 0)["accuracy"] == pytest.approx(expected)
    assert expected > 0.5  # the skewed prior is worth more than chance, and the baseline says so


def hand_greedy(vlm, tokens: torch.Tensor, prompt: list[int], steps: int) -> list[int]:
    """Greedy decoding by hand: the whole sequence through the language model at every step."""
    embed, language_model = vlm.get_input_embeddings(), vlm.model.language_model
    generated: list[int] = []
    for _ in range(steps):
        ids = torch.tensor(prompt + generated)
        embeds = torch.cat([tokens, embed(ids)])[None]
        logits = vlm.lm_head(language_model(inputs_embeds=embeds).last_hidden_state)[0, -1]
        generated.append(int(logits.argmax()))
    return generated


@torch.no_grad()
def test_greedy_generation_equals_a_decode_by_hand(clip):
    task = make_task(clip, templates={"class": "what is it ?"}, generate=True)
    head = task.build_head(32, (4, 4), len(CLASSES))
    assert isinstance(head, AnswerScorer)
    tokens = torch.randn(3, 16, 32, generator=torch.Generator().manual_seed(4))
    image = [task.context.vlm.config.image_token_id] * 16
    ids = torch.tensor([image + head.questions[0]] * 3)
    from encoder_fusion.benchmarks.tasks.vlm_scoring import image_features

    generated = head.greedy(ids, image_features(tokens, [], torch.arange(3)), steps=4)
    for b in range(3):
        assert generated[b] == hand_greedy(task.context.vlm, tokens[b], image[16:] + head.questions[0], 4)


@torch.no_grad()
def test_exact_match_reads_the_right_answers_length_and_refuses_a_longer_answer(clip, monkeypatch):
    task = make_task(clip, templates={"class": "what is it ?"}, generate=True)
    head = task.build_head(32, (4, 4), len(CLASSES)).eval()
    tabby, tabby_cat, dog = head.phrases[:3]
    assert tabby_cat[: len(tabby)] == tabby  # "tabby cat" starts with "tabby"
    decoded = [tabby + dog, tabby_cat, dog + tabby, tabby_cat]  # what the model "generates"
    monkeypatch.setattr(head, "greedy", lambda ids, features, steps: decoded)
    labels = torch.tensor([0, 0, 2, 1])  # tabby, tabby, dog, tabby cat
    targets = answer_targets(FeatureSplit([[torch.zeros(4, 2, 2, 4)]], labels=labels), task.context)
    outputs = head(torch.zeros(4, 16, 32), [], targets)
    assert outputs.shape == (4, 1, 5)  # 4 option slots (the 4th empty: 3 classes), then exact match
    # tabby then more: right; tabby cat for tabby: wrong; dog: right; tabby cat: right
    assert outputs[:, 0, -1].tolist() == [1.0, 0.0, 1.0, 1.0]
    assert task.scores(outputs, targets, 3)["accuracy_generated"] == 0.75


def test_lora_options_are_checked():
    assert not LoraOptions().enabled
    for bad, message in (
        ({"rank": -1}, r"rank=-1 must be an int >= 0"),
        ({"alpha": 0}, r"alpha=0 must be a finite number > 0"),
        ({"dropout": 1.0}, r"dropout=1\.0 must be a number in \[0, 1\)"),
        ({"target_modules": []}, r"target_modules=\[\] must be a non-empty list"),
    ):
        with pytest.raises(OptionError, match=message):
            LoraOptions(**bad)
    with pytest.raises(OptionError, match=r"lora\.rank=-1 must be an int >= 0"):
        VlmProbeOptions(lora={"rank": -1})
    with pytest.raises(OptionError, match=r"lora=.* holds an unknown field"):
        VlmProbeOptions(lora={"r": 4})


def test_lora_without_peft_is_refused(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a)
    )
    with pytest.raises(OptionError, match=r"rank=4 > 0 asks for LoRA adapters, which need peft"):
        LoraOptions(rank=4)
    assert LoraOptions(rank=0).rank == 0  # off needs nothing


@pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="needs peft")
def test_lora_adapters_train_and_reset_while_the_language_model_stays(clip):
    from encoder_fusion import EncoderGeometry, FusionHead

    task = make_task(clip, templates={"class": "what is it ?"}, lora={"rank": 2})
    language_model = task.context.vlm.model.language_model
    base = {n: p.detach().clone() for n, p in language_model.named_parameters() if "lora_" not in n}
    fusion = FusionHead([EncoderGeometry.of(clip)], connector=CONNECTOR)
    model = ProbeModel(fusion, task.build_head(32, (4, 4), 3), "vlm")
    adapters = {n: p for n, p in language_model.named_parameters() if "lora_" in n}
    assert adapters and all(p.requires_grad for p in adapters.values())
    assert all(not p.any() for n, p in adapters.items() if "lora_B" in n)  # LoRA's start: B = 0
    generator = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 3, (16,), generator=generator)
    split = FeatureSplit([[torch.randn(16, 4, 4, 32, generator=generator)]], labels=labels, num_classes=3)
    fit(
        model, task, split, task.targets(split, (4, 4)), epochs=3, lr=1e-2, batch_size=8, weight_decay=0.0,
        generator=torch.Generator().manual_seed(0), device=torch.device("cpu"),
    )  # fmt: skip
    trained = {n: p for n, p in language_model.named_parameters() if "lora_" in n}
    assert any(p.any() for n, p in trained.items() if "lora_B" in n)  # the adapters learned
    for name, parameter in language_model.named_parameters():
        if "lora_" not in name:
            assert torch.equal(parameter, base[name.replace(".base_layer", "")]), (
                name
            )  # the model's own weights stay
    task.build_head(32, (4, 4), 3)  # the next strategy's or seed's head: adapters back at the start
    assert all(not p.any() for n, p in language_model.named_parameters() if "lora_B" in n)
