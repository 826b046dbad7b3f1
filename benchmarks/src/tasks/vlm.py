"""The stage-1 VLM probe: the fusion head trained against a frozen language model, answers scored.

Every image is asked the questions of ``task.vlm.templates``, built from the dataset's own labels:

* ``class``: what it shows (its label; every dataset with labels);
* ``where``: where the object is, the quadrant of its box centre (``top left`` ... ``bottom right``);
* ``size``: how large the object is, the share of the image its class covers in the mask
  (``small`` < 10 %, ``medium`` < 30 %, ``large``; the label's class found among the mask's
  classes by name);
* ``present``: which of the options is in the image (the mask's classes covering at least 1 % of
  it, a background class aside): one present class, the others absent (COCO128's 133 thing and
  stuff classes).

Each question has at most ``task.vlm.options`` answer options (the right answer and the answers
drawn at random, the same for every strategy: a fixed draw per image and question; for
``present``, drawn from the classes absent from the image). The fusion head trains as
LLaVA's stage 1 does: the language model frozen (or, with ``task.vlm.lora``, LoRA adapters on
it), the loss the cross-entropy of the right answer's tokens. Scoring is
lmms-eval's multiple choice: the option of the highest log-likelihood; ``task.vlm.generate`` adds
greedy generation with exact match (``accuracy_generated``). Everything goes through the
transformers VLM of :mod:`encoder_fusion.hf` (its language model, its placeholder scatter, its
DeepStack layers), fed the fusion head's tokens.

A language model with random weights has no tokenizer: words become ids by a vocabulary of the
questions' and answers' words (:mod:`encoder_fusion.benchmarks.tasks.vlm_text`), a pipeline
check, not a VLM's accuracy. A checkpoint (``llm.weights``) brings its own tokenizer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, cast

import torch
from torch import nn

from encoder_fusion.benchmarks.options import OptionError, is_int
from encoder_fusion.benchmarks.tasks.base import FeatureSplit, ProbeTask, register_task
from encoder_fusion.benchmarks.tasks.vlm_lora import LoraOptions, fresh_lora
from encoder_fusion.benchmarks.tasks.vlm_scoring import AnswerScorer
from encoder_fusion.benchmarks.tasks.vlm_text import text_coder

if TYPE_CHECKING:
    from encoder_fusion.hf import FusedLlavaForConditionalGeneration

# template kind -> the dataset annotations it reads
TEMPLATE_ANNOTATIONS = {
    "class": ("label",),
    "where": ("box",),
    "size": ("label", "mask"),
    "present": ("mask",),
}
WHERE = ("top left", "top right", "bottom left", "bottom right")
SIZES = ("small", "medium", "large")
SIZE_EDGES = (0.1, 0.3)  # the object's share of the pixels between sizes
PRESENT_SHARE = 0.01  # a mask class covering less of the image is not asked about as present
BACKGROUND = "background"  # a mask class of this name is never an answer to ``present``
# LoRA fields as this class names them in its errors
LORA_FIELDS = {f.name: f"lora.{f.name}" for f in dataclasses.fields(LoraOptions)}


@dataclasses.dataclass(frozen=True)
class VlmProbeOptions:
    """The questions, answer options and training extras of the VLM probe (config ``task.vlm``).

    Args:
        templates: template kind (``class``, ``where``, ``size``, ``present``) -> its question text.
        options: answer options per question (>= 2).
        generate: also score greedy generation with exact match (``accuracy_generated``).
        lora: LoRA adapters on the language model (:class:`LoraOptions`, or its fields); rank 0: none.

    Raises:
        OptionError: naming the field, the value and what is accepted.
    """

    templates: Mapping[str, str] = dataclasses.field(
        default_factory=lambda: {"class": "what is in the image ?"}
    )
    options: int = 4
    generate: bool = False
    lora: LoraOptions = dataclasses.field(default_factory=LoraOptions)  # or a mapping of its fields

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
        if not isinstance(self.generate, bool):
            raise OptionError("{generate} must be true or false", {"generate": self.generate})
        if isinstance(self.lora, Mapping):
            try:
                object.__setattr__(self, "lora", LoraOptions(**self.lora))
            except OptionError as error:
                raise error.keyed(LORA_FIELDS) from None
            except TypeError as error:  # a field LoraOptions does not have
                raise OptionError(
                    f"{{lora}} holds an unknown field ({error}); accepted: {', '.join(LORA_FIELDS)}",
                    {"lora": dict(self.lora)},
                ) from None
        elif not isinstance(self.lora, LoraOptions):
            raise OptionError("{lora} must be a mapping of LoRA options", {"lora": self.lora})

    def annotations(self) -> list[str]:
        """The dataset annotations the templates read."""
        return sorted({a for kind in self.templates for a in TEMPLATE_ANNOTATIONS[kind]})


@dataclasses.dataclass
class VlmContext:
    """What the VLM probe of one strategy runs with.

    Attributes:
        vlm: the strategy's :class:`encoder_fusion.hf.FusedLlavaForConditionalGeneration` around the
            frozen language model (its own fusion head unused: the probe's trains instead).
        options: the questions and options.
        class_names: the dataset's class names, which the class question's options name.
        mask_class_names: the mask's class names (the ``size`` and ``present`` questions read them).
        tokenizer: the language model's tokenizer; None words the questions by a vocabulary.
    """

    vlm: FusedLlavaForConditionalGeneration
    options: VlmProbeOptions
    class_names: list[str]
    mask_class_names: list[str] = dataclasses.field(default_factory=list)
    tokenizer: Any = None

    def phrases(self) -> list[str]:
        """Every answer option's text; targets index this list."""
        return answer_phrases(self.class_names, self.mask_class_names)

    def label_mask_classes(self) -> torch.Tensor:
        """Per class of the labels, the mask class of the same name (-1 where none)."""
        return label_mask_classes(self.class_names, self.mask_class_names)


def phrase(name: str) -> str:
    """A class name as answer words (``_`` split)."""
    return name.replace("_", " ")


def answer_phrases(class_names: Sequence[str], mask_class_names: Sequence[str] = ()) -> list[str]:
    """Every answer option's text: the class names, :data:`WHERE`, :data:`SIZES`, then the mask's
    class names (for ``present``)."""
    return [*map(phrase, class_names), *WHERE, *SIZES, *map(phrase, mask_class_names)]


def label_mask_classes(class_names: Sequence[str], mask_class_names: Sequence[str]) -> torch.Tensor:
    """Per class of the labels, the index of the mask class of the same name (-1 where none)."""
    index = {name: i for i, name in enumerate(mask_class_names)}
    return torch.tensor([index.get(name, -1) for name in class_names], dtype=torch.long)


def answer_targets(split: FeatureSplit, context: VlmContext) -> torch.Tensor:
    """(N, T, 1 + O) long: per image and question, the right option and the phrase index of each
    option (-1 where the image cannot be asked it: no label, box or mask, or nothing present).

    A question's options are the right answer and O - 1 others (every answer when there are at
    most O); for ``present``, the others are classes absent from the image. The others and the
    options' order are fixed random draws per image and question (:func:`draw_order`), so every
    strategy is asked the same options and neither the set nor the order gives the answer away."""
    options, kinds = context.options.options, list(context.options.templates)
    n, classes = len(split), len(context.class_names)
    targets = torch.full((n, len(kinds), 1 + options), -1, dtype=torch.long)
    # where each kind's answers start in answer_phrases
    offsets = {"class": 0, "where": classes, "size": classes + len(WHERE)}
    offsets["present"] = offsets["size"] + len(SIZES)
    for t, kind in enumerate(kinds):
        for i, choice in enumerate(question_choices(kind, split, context, t)):
            if choice is None:
                continue
            answer, others = choice
            picked = draw_order([answer, *others[: options - 1]], i, t, draw=1)
            targets[i, t, 0] = picked.index(answer)
            targets[i, t, 1 : 1 + len(picked)] = torch.tensor(picked) + offsets[kind]
    return targets


Choices = list[tuple[int, list[int]] | None]


def draw_order(candidates: Sequence[int], image: int, question: int, draw: int = 0) -> list[int]:
    """``candidates`` in a fixed random order of image ``image``'s question ``question`` (seeded by
    both and by ``draw``: 0 for the other answers, 1 for the options' order; so the draw does not
    depend on the strategy or the run)."""
    generator = torch.Generator().manual_seed(1_000_003 * (2 * question + draw) + image)
    return [candidates[k] for k in torch.randperm(len(candidates), generator=generator).tolist()]


def question_choices(kind: str, split: FeatureSplit, context: VlmContext, question: int) -> Choices:
    """Per image, ``(right answer, the other answers in the order options take them)`` as indices
    into the kind's answers, or None where the image cannot be asked."""
    if kind == "present":
        return present_choices(cast(torch.Tensor, split.masks), context.mask_class_names, question)
    if kind == "class":
        answers, total = cast(torch.Tensor, split.labels), len(context.class_names)
    elif kind == "where":
        answers, total = where_answers(cast(torch.Tensor, split.boxes)), len(WHERE)
    else:
        answers, total = size_answers(split, context.label_mask_classes()), len(SIZES)
    return [
        None if a < 0 else (a, draw_order([c for c in range(total) if c != a], i, question))
        for i, a in enumerate(map(int, answers.tolist()))
    ]


def where_answers(boxes: torch.Tensor) -> torch.Tensor:
    """The index into :data:`WHERE` of each box's centre quadrant; -1 for a NaN box."""
    centre_x = (boxes[:, 0] + boxes[:, 2]) / 2
    centre_y = (boxes[:, 1] + boxes[:, 3]) / 2
    answers = (centre_y >= 0.5).long() * 2 + (centre_x >= 0.5).long()
    return torch.where(torch.isnan(boxes).any(1), -1, answers)


def size_answers(split: FeatureSplit, label_mask_class: torch.Tensor) -> torch.Tensor:
    """The index into :data:`SIZES` of the share of each image's known (not ignored) pixels that
    its label's class covers in the mask (``label_mask_class``: label -> mask class, -1 for none);
    -1 without a label, a matching mask class or a known pixel."""
    masks, labels = cast(torch.Tensor, split.masks), cast(torch.Tensor, split.labels)
    wanted = torch.where(labels >= 0, label_mask_class[labels.clamp(min=0)], -1)
    known = (masks >= 0).flatten(1).sum(1)
    share = (masks == wanted[:, None, None]).flatten(1).sum(1) / known.clamp(min=1)
    answers = torch.bucketize(share, torch.tensor(SIZE_EDGES, dtype=share.dtype))
    return torch.where((known == 0) | (wanted < 0), -1, answers)


def present_choices(masks: torch.Tensor, mask_class_names: Sequence[str], question: int) -> Choices:
    """Per image, a present mask class (covering >= :data:`PRESENT_SHARE` of its known pixels, not
    named :data:`BACKGROUND`) and the absent classes in :func:`draw_order`. Of several present
    classes, the image's position picks one, so a split is not asked only about its largest ones.
    None for an image without a present or an absent class."""
    total = len(mask_class_names)
    choices: Choices = []
    for i, mask in enumerate(masks):
        known = mask[mask >= 0]
        counts = torch.bincount(known, minlength=total)
        covered = counts >= PRESENT_SHARE * max(1, len(known))
        present = [c for c in range(total) if covered[c] and mask_class_names[c] != BACKGROUND]
        absent = [c for c in range(total) if counts[c] == 0 and mask_class_names[c] != BACKGROUND]
        if not present or not absent:
            choices.append(None)
            continue
        answer = present[i % len(present)]
        choices.append((answer, draw_order(absent, i, question)))
    return choices


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
            for annotation in TEMPLATE_ANNOTATIONS[kind]:
                field = {"label": "labels", "box": "boxes", "mask": "masks"}[annotation]
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
        """The scorer over the VLM; with LoRA, the language model's adapters reset to a fresh start
        (this runs once per seed, under the seeded generator)."""
        context = self._context()
        questions = list(context.options.templates.values())
        answers = [" " + text for text in context.phrases()]  # an answer follows the question's words
        coder = text_coder(context.tokenizer, [*questions, *answers], context.vlm.config.image_token_id)
        if context.options.lora.enabled:
            fresh_lora(context.vlm.model.language_model, context.options.lora)
        return AnswerScorer(
            context.vlm,
            [coder.encode(q) for q in questions],
            [coder.encode(a) for a in answers],
            generate=context.options.generate,
        )

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The right answer's cross-entropy (summed over its tokens), averaged over the questions."""
        asked = targets[:, :, 0] >= 0
        right = outputs.gather(2, targets[:, :, :1].clamp(min=0)).squeeze(2)
        return -right[asked].mean()

    def correct(self, outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, T) bools: the question was asked, and the best-scored option is the right one."""
        asked = targets[:, :, 0] >= 0
        likelihoods = outputs[:, :, : targets.shape[2] - 1]  # without the exact-match column
        return asked, asked & (likelihoods.argmax(-1) == targets[:, :, 0])

    def scores(self, outputs: torch.Tensor, targets: torch.Tensor, num_classes: int) -> dict[str, float]:
        asked, correct = self.correct(outputs, targets)
        scores = {"accuracy": correct.sum().item() / max(1, asked.sum().item())}
        for t, kind in enumerate(self._context().options.templates):
            scores[f"accuracy_{kind}"] = correct[:, t].sum().item() / max(1, asked[:, t].sum().item())
        if outputs.shape[2] == targets.shape[2]:  # the scorer generated: exact matches are the last column
            generated = outputs[:, :, -1] * asked
            scores["accuracy_generated"] = generated.sum().item() / max(1, asked.sum().item())
        return scores

    def item_stats(self, outputs: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
        asked, correct = self.correct(outputs, targets)
        return torch.stack([correct.sum(1), asked.sum(1)], dim=1).double()

    def metric_from_sums(self, sums: torch.Tensor) -> torch.Tensor:
        return sums[..., 0] / sums[..., 1]

    def baseline(self, train_targets: torch.Tensor, test_targets: torch.Tensor, num_classes: int) -> dict:
        """A guesser that sees no image: per question, of the options offered, the answer most often
        right in train (ties: the first option)."""
        correct = asked = 0
        for t in range(test_targets.shape[1]):
            seen = train_targets[:, t]
            seen = seen[seen[:, 0] >= 0]
            right = seen[:, 1:].gather(1, seen[:, :1]).squeeze(1)  # the right answers' phrase indices
            counts = torch.bincount(right, minlength=int(test_targets[:, t, 1:].max()) + 1).double()
            test = test_targets[:, t]
            test = test[test[:, 0] >= 0]
            offered = torch.where(test[:, 1:] >= 0, counts[test[:, 1:].clamp(min=0)], -1.0)
            correct += int((offered.argmax(1) == test[:, 0]).sum())
            asked += len(test)
        return {"accuracy": correct / max(1, asked)}
