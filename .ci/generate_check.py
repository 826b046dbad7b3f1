"""Run from a folder outside the checkout by .ci/run: the installed package builds a tiny fused VLM,
generates with it, saves it, and reloads it through transformers' Auto classes."""

import sys
import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import encoder_fusion.hf
from encoder_fusion import FusedEncoder
from encoder_fusion.encoders.tiny import tiny_spec

words = ["<pad>", "<unk>", "what", "is", "this", "?"]
backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
backend.pre_tokenizer = pre_tokenizers.Whitespace()
tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>")
config = Qwen2Config(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=64, vocab_size=len(words),
)  # fmt: skip
fused = FusedEncoder(
    [tiny_spec("clip", layers=[-2]), tiny_spec("dino", layers=[1, 3])],
    connector={"kind": "mlp", "out_dim": 32},
)
processor = encoder_fusion.hf.build_processor(fused, tokenizer)
vlm = encoder_fusion.hf.build_vlm(
    fused, Qwen2ForCausalLM(config), image_token_id=processor.image_token_id
).eval()
images = [torch.randint(0, 256, (3, 48, 64), dtype=torch.uint8) for _ in range(3)]
batch = processor(
    images=images, text=["<image> what is this ?", "<image> <image> what ?"], return_tensors="pt"
)
with torch.no_grad():
    generated = vlm.generate(**batch, max_new_tokens=4, do_sample=False)
folder = Path(tempfile.mkdtemp()) / "vlm"
vlm.save_pretrained(folder)
processor.save_pretrained(folder)
reloaded = AutoModelForImageTextToText.from_pretrained(folder).eval()
again = AutoProcessor.from_pretrained(folder)(
    images=images, text=["<image> what is this ?", "<image> <image> what ?"], return_tensors="pt"
)
with torch.no_grad():
    assert torch.equal(reloaded.generate(**again, max_new_tokens=4, do_sample=False), generated)
print(f"CI: generate() ran from {Path.cwd()} with {encoder_fusion.hf.__file__}: {tuple(generated.shape)}")
sys.exit(0)
