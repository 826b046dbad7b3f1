"""LLaVA's stage 1 on the fused VLM: only the fusion head trains, against the frozen language model, with
the loss on the answer tokens.

.. code-block:: python

    parameters = freeze_for_stage1(vlm)
    optimizer = torch.optim.AdamW(parameters, lr=1e-3)
    batch = stage1_batch(processor, images, prompts, answers)
    loss = vlm(**batch).loss  # LLaVA's own shifted cross-entropy, prompt positions masked out
    loss.backward(); optimizer.step(); optimizer.zero_grad()
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import BatchFeature

from encoder_fusion.hf.modeling import FusedLlavaForConditionalGeneration
from encoder_fusion.hf.processing import FusedLlavaProcessor

IGNORE_INDEX = -100  # the label transformers' causal-LM loss skips


def freeze_for_stage1(vlm: FusedLlavaForConditionalGeneration) -> list[nn.Parameter]:
    """Freeze everything but the fusion head (encoders, language model, its head and embeddings) and
    return the head's parameters, the ones to hand the optimizer."""
    vlm.requires_grad_(False)
    head = vlm.fused.head
    head.requires_grad_(True)
    return list(head.parameters())


def stage1_batch(
    processor: FusedLlavaProcessor,
    images: Sequence[Any],
    prompts: Sequence[str],
    answers: Sequence[str],
) -> BatchFeature:
    """A training batch: each prompt (its ``<image>`` expanded) followed by its answer and the end-of-
    sequence token when the tokenizer has one; ``labels`` are the answer tokens, every prompt, image
    and padding position is :data:`IGNORE_INDEX`. Padded on the tokenizer's side.

    Args:
        processor: from :func:`~encoder_fusion.hf.build_processor`.
        images: every prompt's images in order (a flat list, or one list per prompt).
        prompts: one per item, with one ``<image>`` per image.
        answers: one per item.

    Raises:
        ValueError: prompts and answers of different counts, an empty answer, or any error of the
            processor (``<image>`` counts that differ from the images).
    """
    if len(prompts) != len(answers):
        raise ValueError(
            f"{len(prompts)} prompts for {len(answers)} answers; accepted: one answer per prompt"
        )
    tokenizer = processor.tokenizer
    encoded = processor(images=list(images), text=list(prompts))  # checks the <image> counts
    answer_ids = tokenizer(list(answers), add_special_tokens=False)["input_ids"]
    end = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    rows, labels = [], []
    for index, (prompt, answer) in enumerate(zip(encoded["input_ids"], answer_ids)):
        if not answer:
            raise ValueError(f"answers[{index}] is empty; accepted: an answer of at least one token")
        rows.append(list(prompt) + list(answer) + end)
        labels.append([IGNORE_INDEX] * len(prompt) + list(answer) + end)
    length = max(len(row) for row in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    left = tokenizer.padding_side == "left"

    def padded(row: list[int], value: int) -> list[int]:
        filler = [value] * (length - len(row))
        return filler + row if left else row + filler

    return BatchFeature(
        {
            "input_ids": torch.tensor([padded(row, pad) for row in rows]),
            "attention_mask": torch.tensor([padded([1] * len(row), 0) for row in rows]),
            "labels": torch.tensor([padded(row, IGNORE_INDEX) for row in labels]),
            "pixel_values": torch.stack(list(encoded["pixel_values"])),
        }
    )
