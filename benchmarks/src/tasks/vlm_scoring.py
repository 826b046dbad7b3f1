"""Scoring a VLM's answers: the log-likelihood of each option (lmms-eval's multiple choice), and
greedy generation compared with the right answer (exact match).

Both run through the transformers VLM of :mod:`encoder_fusion.hf`: its language model, its
placeholder scatter and its DeepStack layers, fed precomputed fused tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from encoder_fusion.benchmarks.timing.llm import cache_keyword

if TYPE_CHECKING:
    from encoder_fusion.hf import FusedLlavaForConditionalGeneration


def image_features(tokens: torch.Tensor, extras: Sequence[torch.Tensor], picked: torch.Tensor):
    """The VLM's ``mm_encoder_outputs`` for the images ``picked`` of a batch: their tokens and
    DeepStack sets, as the vision tower would return them."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    features = BaseModelOutputWithPooling(
        pooler_output=cast(Any, list(tokens[picked])),
        hidden_states=tuple(extra[picked] for extra in extras),
    )
    return {"image": features}


class AnswerScorer(nn.Module):
    """The log-likelihood of every answer option of every question, through the VLM.

    ``forward(tokens, extras, targets)``: the fused tokens (B, N, D) and DeepStack sets of B images,
    their targets (B, T, 1 + O) (per question: the right option, then O phrase indices, -1 where
    none); returns (B, T, O) summed log-likelihoods of each option's tokens after the image and the
    question (-inf where there is no option). With ``generate`` and in eval mode, one more column
    (B, T, O + 1): 1.0 where greedy generation after the question gave exactly the right answer
    (:meth:`exact_matches`).

    Args:
        vlm: the VLM; its language model frozen (or with trainable LoRA adapters).
        questions: each question's token ids.
        phrases: each answer's token ids.
        generate: also score greedy generation with exact match, outside training.
    """

    def __init__(
        self,
        vlm: FusedLlavaForConditionalGeneration,
        questions: list[list[int]],
        phrases: list[list[int]],
        generate: bool = False,
    ) -> None:
        super().__init__()
        self.vlm = vlm
        self.questions, self.phrases, self.generate = questions, phrases, generate

    def forward(
        self, tokens: torch.Tensor, extras: Sequence[torch.Tensor], targets: torch.Tensor
    ) -> torch.Tensor:
        likelihoods = self.option_likelihoods(tokens, extras, targets)
        if not self.generate or self.training:
            return likelihoods
        return torch.cat([likelihoods, self.exact_matches(tokens, extras, targets)[:, :, None]], dim=2)

    def option_likelihoods(
        self, tokens: torch.Tensor, extras: Sequence[torch.Tensor], targets: torch.Tensor
    ) -> torch.Tensor:
        """(B, T, O): each option's summed log-likelihood after the image and its question, every
        option of the batch one row of a single padded forward of the VLM."""
        visual = tokens.shape[1]
        image_token = self.vlm.config.image_token_id
        cells = (targets[:, :, 1:] >= 0) & (targets[:, :, :1] >= 0)
        index = cells.nonzero()  # (S, 3): image, question, option
        rows, spans = [], []
        for b, t, o in index.tolist():
            prompt = [image_token] * visual + self.questions[t]
            answer = self.phrases[int(targets[b, t, 1 + o])]
            rows.append(prompt + answer)
            spans.append((len(prompt), len(answer)))
        length = max(len(row) for row in rows)
        device = tokens.device
        ids = torch.zeros(len(rows), length, dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for row, values in enumerate(rows):
            ids[row, : len(values)] = torch.tensor(values, device=device)
            mask[row, : len(values)] = 1
        hidden = self.vlm.model(
            input_ids=ids, attention_mask=mask, mm_encoder_outputs=image_features(tokens, extras, index[:, 0])
        ).last_hidden_state
        # the option's token at position p is predicted at p - 1
        sequence, position, token = [], [], []
        for row, (start, count) in enumerate(spans):
            sequence += [row] * count
            position += range(start - 1, start - 1 + count)
            token += rows[row][start : start + count]
        logits = self.vlm.lm_head(hidden[sequence, position]).float()
        chosen = logits.log_softmax(-1)[torch.arange(len(token)), torch.tensor(token, device=device)]
        per_row = torch.zeros(len(rows), device=device).index_add(
            0, torch.tensor(sequence, device=device), chosen
        )
        out = torch.full(cells.shape, float("-inf"), device=device)
        out[index[:, 0], index[:, 1], index[:, 2]] = per_row
        return out

    @torch.no_grad()
    def exact_matches(
        self, tokens: torch.Tensor, extras: Sequence[torch.Tensor], targets: torch.Tensor
    ) -> torch.Tensor:
        """(B, T): 1.0 where greedy decoding after the image and the question gives the right answer
        (0.0 elsewhere, and where not asked).

        The probe trains no end-of-answer token (a frozen random model learns one only at the cost
        of the answers themselves, and multiple choice scores the options' own tokens, as
        lmms-eval does), so decoding runs as many steps as the longest answer and is read up to
        the right answer's length: right when those tokens are the answer's, unless decoding went
        on into a longer answer that starts with it (``tabby`` read as ``tabby cat``)."""
        matches = torch.zeros(targets.shape[:2], device=tokens.device)
        steps = max(len(phrase) for phrase in self.phrases)
        for t, question in enumerate(self.questions):
            images = (targets[:, t, 0] >= 0).nonzero().squeeze(1)
            if not len(images):
                continue
            prompt = [self.vlm.config.image_token_id] * tokens.shape[1] + question
            ids = torch.tensor([prompt] * len(images), device=tokens.device)
            generated = self.greedy(ids, image_features(tokens, extras, images), steps)
            for row, b in enumerate(images.tolist()):
                answer = generated[row]
                right = self.phrases[int(targets[b, t, 1 + targets[b, t, 0]])]
                longer = [p for p in self.phrases if len(p) > len(right) and p[: len(right)] == right]
                went_on = any(answer[: len(p)] == p for p in longer)
                matches[b, t] = float(answer[: len(right)] == right and not went_on)
        return matches

    def greedy(self, ids: torch.Tensor, features: dict, steps: int) -> list[list[int]]:
        """``steps`` greedy tokens after the prompts ``ids`` (one length, so no padding), from the
        VLM's KV cache."""
        output = self.vlm(input_ids=ids, mm_encoder_outputs=features, use_cache=True, logits_to_keep=1)
        keyword = cache_keyword(self.vlm)
        cache, token = output[keyword], output.logits[:, -1].argmax(-1, keepdim=True)
        generated = [token]
        for _ in range(steps - 1):
            step = self.vlm(input_ids=token, use_cache=True, **{keyword: cache})
            token = step.logits[:, -1].argmax(-1, keepdim=True)
            generated.append(token)
        return torch.cat(generated, dim=1).tolist()
