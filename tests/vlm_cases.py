"""Tiny transformers parts for the VLM tests: a word-level tokenizer, a four-layer Qwen2 causal LM of
its vocabulary, and fused encoders whose encoders load from checkpoints the tests write (so a model
rebuilt from its config gets the same weights)."""

from __future__ import annotations

import timm
import torch
from checkpoints import perturb
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from encoder_fusion import EncoderSpec, FusedEncoder, HookSpec
from encoder_fusion.encoders.tiny import RECIPES

WIDTH = 32  # the language model's hidden size, and so every connector's out_dim
WORDS = ["<pad>", "<unk>", "</s>", *(f"w{i}" for i in range(61))]  # 64 tokens


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over :data:`WORDS` (split on whitespace), padding on the left."""
    model = models.WordLevel({word: i for i, word in enumerate(WORDS)}, unk_token="<unk>")
    backend = Tokenizer(model)
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", eos_token="</s>", padding_side="left"
    )


def tiny_language_model(seed: int = 0, positions: int = 256) -> Qwen2ForCausalLM:
    """A four-layer Qwen2 causal LM of :data:`WORDS`' vocabulary, random weights, in eval mode."""
    config = Qwen2Config(
        hidden_size=WIDTH, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, vocab_size=len(WORDS), max_position_embeddings=positions,
        tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config).eval()


def checkpoint_spec(tmp_path, kind: str, layers, seed: int = 0) -> EncoderSpec:
    """The spec of a tiny timm encoder of a real architecture whose weights load from a checkpoint
    written here (perturbed, so a checkpoint that fails to load shows)."""
    recipe = RECIPES["timm", kind]
    size = recipe.image_size
    model = timm.create_model(
        recipe.model, pretrained=False, num_classes=0, img_size=size, **recipe.model_kwargs
    )
    path = tmp_path / f"{kind}-{seed}.safetensors"
    save_file(perturb(model, seed).state_dict(), str(path))
    return EncoderSpec(
        name=kind, source="timm", model=recipe.model, weights=str(path), image_size=size,
        model_kwargs=dict(recipe.model_kwargs), hooks=HookSpec(layers=tuple(layers)),
    )  # fmt: skip


def tiny_fused(tmp_path, **strategies) -> FusedEncoder:
    """CLIP read at one layer and DINOv2 at two, from checkpoints, fused to :data:`WIDTH`-wide tokens
    by a perturbed head; ``strategies`` override the defaults."""
    specs = [checkpoint_spec(tmp_path, "clip", [-2]), checkpoint_spec(tmp_path, "dino", [1, 3])]
    fused = FusedEncoder(specs, **{"connector": {"kind": "mlp", "out_dim": WIDTH}, **strategies})
    perturb(fused.head, seed=7)
    return fused.eval()
