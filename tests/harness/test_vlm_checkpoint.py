"""A language model's own checkpoint for the VLM probe (``llm.weights``): a folder the test saves from
a randomly initialised model of the tiny preset's architecture, with a word-level tokenizer of its
own. The checkpoint is checked against the preset at start, its weights are the ones loaded, the
probe asks its questions through its tokenizer, and a whole run with it, greedy generation and
LoRA on reports every figure."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from bench_runs import check_report, smoke_config

from encoder_fusion.benchmarks.config.checks import build_datasets
from encoder_fusion.benchmarks.config.plan import llm_preset
from encoder_fusion.benchmarks.run import run_benchmark
from encoder_fusion.benchmarks.tasks.vlm import answer_phrases
from encoder_fusion.benchmarks.tasks.vlm_text import TokenizerText
from encoder_fusion.benchmarks.timing.llm import build_language_model
from encoder_fusion.benchmarks.timing.llm_weights import check_checkpoint, load_tokenizer

QUESTION = "what is in the image ?"


def word_tokenizer(words: list[str]):
    """A word-level fast tokenizer of ``words`` (ids 0-2: unknown, padding, end of sequence)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocabulary = {word: index for index, word in enumerate(["[UNK]", "[PAD]", "[EOS]", *sorted(set(words))])}
    backend = Tokenizer(WordLevel(vocabulary, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]"
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A saved tiny-preset model with random weights, and a tokenizer of the smoke data's words."""
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("llm")
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(llm_preset("tiny").hf_config())
    model.save_pretrained(folder)
    train, _ = build_datasets(smoke_config())
    texts = [QUESTION, *answer_phrases(train.classes, train.mask_classes or [])]
    word_tokenizer([w for text in texts for w in text.split()]).save_pretrained(folder)
    return folder, model


def test_the_checkpoint_is_the_presets_model_and_its_weights_load(checkpoint):
    folder, saved = checkpoint
    spec = dataclasses.replace(llm_preset("tiny"), weights=str(folder))
    assert check_checkpoint(spec) == folder
    loaded = build_language_model(spec, torch.device("cpu"), torch.float32, seed=0)
    for name, tensor in saved.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=0)
    assert not any(p.requires_grad for p in loaded.parameters())


def test_a_checkpoint_of_another_model_is_named_field_by_field(checkpoint, tmp_path):
    folder, _ = checkpoint
    wider = dataclasses.replace(llm_preset("tiny"), hidden_size=64, num_heads=8, weights=str(folder))
    with pytest.raises(ValueError, match=r"hidden_size 64 in llm=tiny vs 32 in the checkpoint; num_heads 8"):
        check_checkpoint(wider)
    qwen = dataclasses.replace(llm_preset("qwen2_5_0_5b"), weights=str(folder))
    with pytest.raises(ValueError, match=r"holds a 'llama' model, but llm=qwen2_5_0_5b is a 'qwen2' model"):
        check_checkpoint(qwen)
    (tmp_path / "empty").mkdir()
    empty = dataclasses.replace(llm_preset("tiny"), weights=str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match=r"is not a transformers model folder \(no config.json\)"):
        check_checkpoint(empty)
    with pytest.raises(FileNotFoundError, match=r"weights file or folder not found"):
        check_checkpoint(dataclasses.replace(empty, weights=str(tmp_path / "absent")))


def test_the_questions_are_asked_through_the_checkpoints_tokenizer(checkpoint, tmp_path):
    folder, saved = checkpoint
    spec = dataclasses.replace(llm_preset("tiny"), weights=str(folder))
    tokenizer = load_tokenizer(spec)
    coder = TokenizerText(tokenizer, [QUESTION], limit=spec.vocab_size - 1)
    # the saved vocabulary's own ids, looked up by hand
    vocabulary = json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]
    assert coder.encode(QUESTION) == [vocabulary[word] for word in QUESTION.split()]
    with pytest.raises(ValueError, match=r"at or above 3, the id of the image placeholders"):
        TokenizerText(tokenizer, [QUESTION], limit=3)
    assert load_tokenizer(llm_preset("tiny")) is None  # random weights: no tokenizer
    bare = tmp_path / "bare"
    saved.save_pretrained(bare)
    with pytest.raises(FileNotFoundError, match=r"holds no tokenizer"):
        load_tokenizer(dataclasses.replace(spec, weights=str(bare)))


def test_a_run_with_the_checkpoint_generation_and_lora(checkpoint, tmp_path):
    """The whole VLM probe on the checkpoint: its tokenizer, greedy generation and LoRA adapters,
    with every strategy's per-item results and deltas; the report names the checkpoint."""
    folder, _ = checkpoint
    cfg = smoke_config(
        "task=vlm",
        f"+task.vlm.templates.present={QUESTION}",
        "task.vlm.generate=true",
        "task.vlm.lora.rank=2",
        f"llm.weights={folder}",
        f"bench.cache_dir={tmp_path / 'cache'}",
    )
    path = run_benchmark(cfg, tmp_path / "run")
    report = check_report(path, ["vlm"], "eagle")
    for record in report.strategies:
        accuracy = record.accuracy["vlm"]
        assert 0.0 <= accuracy.mean <= 1.0 and accuracy.delta is not None
        assert {"accuracy_class", "accuracy_present", "accuracy_generated"} <= set(accuracy.extra)
        assert 0.0 <= accuracy.extra["accuracy_generated"]["mean"] <= 1.0
    assert f"weights of {folder}" in (path.parent / "report.md").read_text()
