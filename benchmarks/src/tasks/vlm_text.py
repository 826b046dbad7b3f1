"""Text to token ids for the VLM probe: the language model's own tokenizer, or a word vocabulary.

A language model with its real weights comes with its tokenizer (``llm.weights``), and the probe
asks its questions in that tokenizer's ids. A model built with random weights has no tokenizer,
so :class:`Vocabulary` numbers the questions' and answers' words instead: the ids mean nothing to
such a model anyway, and it learns them like any other id during the probe.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol


class TextCoder(Protocol):
    """Token ids of a text (no special tokens)."""

    def encode(self, text: str) -> list[int]: ...


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


class TokenizerText:
    """A ``transformers`` tokenizer's ids (no special tokens; answers are given after a space, as
    they follow the question in running text).

    Raises:
        ValueError: a text whose ids reach ``limit`` (the id the probe gives the image placeholders).
    """

    def __init__(self, tokenizer: Any, texts: Sequence[str], limit: int) -> None:
        self.tokenizer = tokenizer
        for text in texts:
            clash = [i for i in self.encode(text) if i >= limit]
            if clash:
                raise ValueError(
                    f"the tokenizer gives {text!r} the id(s) {clash}, at or above {limit}, the id of the "
                    "image placeholders; accepted: a checkpoint whose embedding rows outnumber its "
                    "tokenizer's ids"
                )

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def text_coder(tokenizer: Any | None, texts: Sequence[str], limit: int) -> TextCoder:
    """The tokenizer's coder when there is one, else a :class:`Vocabulary` of ``texts``."""
    return Vocabulary(texts, limit) if tokenizer is None else TokenizerText(tokenizer, texts, limit)
