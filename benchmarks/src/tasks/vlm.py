"""The stage-1 VLM probe: the fusion head trained against a frozen language model, answers scored.

Every image is asked the questions of ``task.vlm.templates``, built from the dataset's own labels:

* ``class``: what it shows (its label; every dataset with labels);
* ``where``: where the object is, the quadrant of its box centre (``top left`` ... ``bottom right``);
* ``size``: how large it is, its mask's share of the image (``small`` < 10 %, ``medium`` < 30 %,
  ``large``).

Each question has at most ``task.vlm.options`` answer options (the class question: the right class
and the next classes after it, cyclically, when there are more). The fusion head trains as LLaVA's
stage 1 does: the language model frozen, the loss the cross-entropy of the right answer's tokens.
Scoring is lmms-eval's multiple choice: the option of the highest log-likelihood. Everything goes
through the transformers VLM of :mod:`encoder_fusion.hf` (its language model, its placeholder
scatter, its DeepStack layers), fed the fusion head's tokens.

The language models here have random weights and no tokenizer, so words become token ids by a
fixed vocabulary of the questions' and answers' words: a pipeline check, not a VLM's accuracy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, cast

import torch
from torch import nn

from encoder_fusion.benchmarks.options import OptionError, is_int
from encoder_fusion.benchmarks.tasks.base import FeatureSplit, ProbeTask, register_task

if TYPE_CHECKING:
    from encoder_fusion.hf import FusedLlavaForConditionalGeneration

# template kind -> the dataset annotation it reads
TEMPLATE_ANNOTATIONS = {"class": "label", "where": "box", "size": "mask"}
WHERE = ("top left", "top right", "bottom left", "bottom right")
SIZES = ("small", "medium", "large")
SIZE_EDGES = (0.1, 0.3)  # the mask's share of the pixels between sizes


@dataclasses.dataclass(frozen=True)
class VlmProbeOptions:
    """The questions and answer options of the VLM probe (config ``task.vlm``).

    Args:
        templates: template kind (``class``, ``where``, ``size``) -> its question text.
        options: answer options per question (>= 2).

    Raises:
        OptionError: naming the field, the value and what is accepted.
    """

    templates: Mapping[str, str] = dataclasses.field(
        default_factory=lambda: {"class": "what is in the image ?"}
    )
    options: int = 4

    def __post_init__(self) -> None:
        if not isinstance(self.templates, Mapping) or not self.templates:
            raise OptionError(
                "{templates} must map template kinds to questions; accepted kinds: "
                + ", ".join(TEMPLATE_ANNOTATIONS),
                {"templates": self.templates},
            )
        for kind, question in self.templates.items():
            if kind not in TEMPLATE_ANNOTATIONS:
                raise OptionError(
                    f"{{templates}} has the unknown kind {kind!r}; accepted: "
                    + ", ".join(TEMPLATE_ANNOTATIONS),
                    {"templates": dict(self.templates)},
                )
            if not isinstance(question, str) or not question.split():
                raise OptionError(
                    f"{{templates}}[{kind!r}] must be a question of at least one word, got {question!r}",
                    {"templates": dict(self.templates)},
                )
        object.__setattr__(self, "templates", dict(self.templates))
        if not is_int(self.options) or self.options < 2:
            raise OptionError("{options} must be an int >= 2", {"options": self.options})

    def annotations(self) -> list[str]:
        """The dataset annotations the templates read."""
        return sorted({TEMPLATE_ANNOTATIONS[kind] for kind in self.templates})


class Vocabulary:
    """Words -> token ids ``1, 2, ...`` in sorted order (0 is padding), below ``limit`` (the image
    token and anything after it).

    Raises:
        ValueError: more words than ids below ``limit``.
    """

    def __init__(self, texts: Sequence[str], limit: int) -> None:
        words = sorted({word for text in texts for word in text.split()})
        if len(words) + 1 > limit:
            raise ValueError(
                f"the VLM probe's questions and answers hold {len(words)} distinct words, but the language "
                f"model's vocabulary leaves {limit - 1} ids for them; accepted: a language model with a "
                "larger vocabulary, or fewer classes"
            )
        self.ids = {word: index + 1 for index, word in enumerate(words)}

    def encode(self, text: str) -> list[int]:
        return [self.ids[word] for word in text.split()]


@dataclasses.dataclass
class VlmContext:
    """What the VLM probe of one strategy runs with.

    Attributes:
        vlm: the strategy's :class:`encoder_fusion.hf.FusedLlavaForConditionalGeneration` around the
            frozen language model (its own fusion head unused: the probe's trains instead).
        options: the questions and options.
        class_names: the dataset's class names, which the class question's options name.
    """

    vlm: FusedLlavaForConditionalGeneration
    options: VlmProbeOptions
    class_names: list[str]

    def phrases(self) -> list[str]:
        """Every answer option's text; targets index this list."""
        return answer_phrases(self.class_names)


def answer_phrases(class_names: Sequence[str]) -> list[str]:
    """Every answer option's text: the class names (words split on ``_``), then :data:`WHERE` and
    :data:`SIZES`."""
    return [*(name.replace("_", " ") for name in class_names), *WHERE, *SIZES]


class AnswerScorer(nn.Module):
    """The log-likelihood of every answer option of every question, through the VLM.

    ``forward(tokens, extras, targets)``: the fused tokens (B, N, D) and DeepStack sets of B images,
    their targets (B, T, 1 + O) (per question: the right option, then O phrase indices, -1 where
    none); returns (B, T, O) summed log-likelihoods of each option's tokens after the image and the
    question (-inf where there is no option).
    """

    def __init__(
        self, vlm: FusedLlavaForConditionalGeneration, questions: list[list[int]], phrases: list[list[int]]
    ) -> None:
        super().__init__()
        self.vlm = vlm
        self.questions, self.phrases = questions, phrases

    def forward(
        self, tokens: torch.Tensor, extras: Sequence[torch.Tensor], targets: torch.Tensor
    ) -> torch.Tensor:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

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
        picked = index[:, 0]
        features = BaseModelOutputWithPooling(
            pooler_output=cast(Any, list(tokens[picked])),
            hidden_states=tuple(extra[picked] for extra in extras),
        )
        hidden = self.vlm.model(
            input_ids=ids, attention_mask=mask, mm_encoder_outputs={"image": features}
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


def answer_targets(split: FeatureSplit, context: VlmContext) -> torch.Tensor:
    """(N, T, 1 + O) long: per image and question, the right option and the phrase index of each
    option (-1 where the image cannot be asked it: no label, box or mask).

    A question's options are the right answer and the answers after it, cyclically, in answer order
    (every answer when there are at most O)."""
    options, kinds = context.options.options, list(context.options.templates)
    n, classes = len(split), len(context.class_names)
    targets = torch.full((n, len(kinds), 1 + options), -1, dtype=torch.long)
    for t, kind in enumerate(kinds):
        if kind == "class":
            answers, total, offset = cast(torch.Tensor, split.labels), classes, 0
        elif kind == "where":
            answers, total, offset = where_answers(cast(torch.Tensor, split.boxes)), len(WHERE), classes
        else:
            answers, total, offset = size_answers(split), len(SIZES), classes + len(WHERE)
        count = min(options, total)
        for i in range(n):
            answer = int(answers[i])
            if answer < 0:
                continue
            choices = sorted((answer + k) % total for k in range(count))
            targets[i, t, 0] = choices.index(answer)
            targets[i, t, 1 : 1 + count] = torch.tensor(choices) + offset
    return targets


def where_answers(boxes: torch.Tensor) -> torch.Tensor:
    """The index into :data:`WHERE` of each box's centre quadrant; -1 for a NaN box."""
    centre_x = (boxes[:, 0] + boxes[:, 2]) / 2
    centre_y = (boxes[:, 1] + boxes[:, 3]) / 2
    answers = (centre_y >= 0.5).long() * 2 + (centre_x >= 0.5).long()
    return torch.where(torch.isnan(boxes).any(1), -1, answers)


def size_answers(split: FeatureSplit) -> torch.Tensor:
    """The index into :data:`SIZES` of each mask's foreground share (pixels of a class > 0 among the
    pixels not ignored); -1 for a mask that is all ignored."""
    masks = cast(torch.Tensor, split.masks)
    known = (masks >= 0).flatten(1).sum(1)
    share = (masks > 0).flatten(1).sum(1) / known.clamp(min=1)
    answers = torch.bucketize(share, torch.tensor(SIZE_EDGES, dtype=share.dtype))
    return torch.where(known == 0, -1, answers)


@register_task
class VlmTask(ProbeTask):
    """The stage-1 VLM probe (see the module docstring). Registered without a context (for its name
    and metric); a run gives each strategy its own: ``VlmTask(VlmContext(...))``."""

    NAME = "vlm"
    METRIC = "accuracy"
    TARGET = "labels"
    ANNOTATION = "label"
    INPUT: ClassVar[str] = "vlm"  # the head takes the tokens, the DeepStack sets and the targets

    def __init__(self, context: VlmContext | None = None) -> None:
        self.context = context

    def _context(self) -> VlmContext:
        if self.context is None:
            raise ValueError(
                "the vlm probe runs only inside a benchmark run, which builds its language model: "
                "VlmTask(VlmContext(...)); accepted: fusion-bench task.names=[vlm] with an llm"
            )
        return self.context

    def check(self, split: FeatureSplit, which: str) -> None:
        context = self._context()
        for kind in context.options.templates:
            field = {"label": "labels", "box": "boxes", "mask": "masks"}[TEMPLATE_ANNOTATIONS[kind]]
            if getattr(split, field) is None:
                raise ValueError(
                    f"the vlm probe's {kind!r} question needs {which} FeatureSplit.{field}, got None; "
                    "accepted: data with that annotation, or task.vlm.templates without it"
                )

    def targets(self, split: FeatureSplit, grid_hw: tuple[int, int]) -> torch.Tensor:
        return answer_targets(split, self._context())

    def valid(self, targets: torch.Tensor) -> torch.Tensor:
        return (targets[:, :, 0] >= 0).any(1)

    def build_head(self, width: int, grid_hw: tuple[int, int], num_classes: int) -> nn.Module:
        context = self._context()
        vocabulary = Vocabulary(
            [*context.options.templates.values(), *context.phrases()], context.vlm.config.image_token_id
        )
        questions = [vocabulary.encode(q) for q in context.options.templates.values()]
        return AnswerScorer(context.vlm, questions, [vocabulary.encode(p) for p in context.phrases()])

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The right answer's cross-entropy (summed over its tokens), averaged over the questions."""
        asked = targets[:, :, 0] >= 0
        right = outputs.gather(2, targets[:, :, :1].clamp(min=0)).squeeze(2)
        return -right[asked].mean()

    def correct(self, outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, T) bools: the question was asked, and the best-scored option is the right one."""
        asked = targets[:, :, 0] >= 0
        return asked, asked & (outputs.argmax(-1) == targets[:, :, 0])

    def scores(self, outputs: torch.Tensor, targets: torch.Tensor, num_classes: int) -> dict[str, float]:
        asked, correct = self.correct(outputs, targets)
        scores = {"accuracy": correct.sum().item() / max(1, asked.sum().item())}
        for t, kind in enumerate(self._context().options.templates):
            scores[f"accuracy_{kind}"] = correct[:, t].sum().item() / max(1, asked[:, t].sum().item())
        return scores

    def item_stats(self, outputs: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
        asked, correct = self.correct(outputs, targets)
        return torch.stack([correct.sum(1), asked.sum(1)], dim=1).double()

    def metric_from_sums(self, sums: torch.Tensor) -> torch.Tensor:
        return sums[..., 0] / sums[..., 1]

    def baseline(self, train_targets: torch.Tensor, test_targets: torch.Tensor, num_classes: int) -> dict:
        """Per question, always the option position most often right in train."""
        correct = asked = 0
        for t in range(test_targets.shape[1]):
            seen = train_targets[:, t, 0]
            seen = seen[seen >= 0]
            best = int(torch.bincount(seen).argmax()) if len(seen) else 0
            test = test_targets[:, t, 0]
            correct += int((test == best).sum())
            asked += int((test >= 0).sum())
        return {"accuracy": correct / max(1, asked)}
