"""The language-model stage of a vision-language model, for measuring what a VLM user waits for.

A :class:`LlmSpec` names a decoder-only architecture by its published shape (hidden size, layers,
heads, key/value heads, MLP width, vocabulary, tied embeddings); :func:`build_language_model`
builds it with ``transformers`` from that configuration alone, with random weights: latency does
not depend on weight values, so no hub and no download are involved. The presets live in
``conf/llm/``.

:class:`LanguageModel` runs the three calls a VLM makes, through the VLM class a user runs
(:func:`encoder_fusion.hf.build_vlm` of each pipeline around the one language model), with the
image placeholders first and ``prompt_tokens`` text tokens after them:

* ``prefill(vlm, tokens, extras)``: the visual tokens (the connector's output, ``(B, N, hidden)``,
  and any DeepStack sets) and the prompt, one forward with the KV cache on, keeping only the last
  position's logits (as generation does);
* ``first_token(vlm, images)``: raw images in, the first token's logits out, as one forward of the
  VLM (vision tower, connector, prefill): the time to first token (TTFT);
* ``decoder(vlm, tokens, extras)()``: ``decode_tokens`` greedy steps from a kept prefill cache, each
  reading the whole cache (a longer visual prefix makes every step slower); the cache is cut back
  after each call, so every call starts from the same state.

FLOPs of a prefill are counted by ``FlopCounterMode`` on a model built on the ``meta`` device: no
memory, so a 70B model's prefill can be counted on a laptop; :func:`prefill_flops` is what projects
measured prefill rates onto presets too big to run here.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from encoder_fusion.benchmarks.options import OptionError, check_int, is_int
from encoder_fusion.memory import available_bytes

if TYPE_CHECKING:  # transformers is imported where a model is built: it is slow to import
    from transformers import PreTrainedModel

    from encoder_fusion import FusedEncoder
    from encoder_fusion.hf import FusedLlavaForConditionalGeneration

# family -> its ``transformers`` configuration class
FAMILIES = {"qwen2": "Qwen2Config", "llama": "LlamaConfig"}


@dataclass(frozen=True)
class LlmSpec:
    """A decoder-only language model by its architecture numbers (see ``conf/llm/``).

    Raises:
        ValueError: an unknown family, or a shape the architecture cannot have, naming the field.
    """

    name: str
    family: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    tie_embeddings: bool
    # a checkpoint of this model (a local folder or a hub repo id; see llm_weights); None: random weights
    weights: str | None = None

    def __post_init__(self) -> None:
        if self.weights is not None and (not isinstance(self.weights, str) or not self.weights.strip()):
            raise OptionError(
                "{weights} must name a checkpoint folder or hub repo id, or be null for random weights",
                {"weights": self.weights},
            )
        if self.family not in FAMILIES:
            raise OptionError(
                f"{{family}} is unknown; accepted: {', '.join(FAMILIES)}", {"family": self.family}
            )
        for field in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size"):
            value = getattr(self, field)
            if not is_int(value) or value < 1:
                raise OptionError(f"{{{field}}} (model {self.name}) must be an int >= 1", {field: value})
        if not is_int(self.vocab_size) or self.vocab_size < 2:
            raise OptionError(
                f"{{vocab_size}} (model {self.name}) must be an int >= 2", {"vocab_size": self.vocab_size}
            )
        if self.hidden_size % self.num_heads:
            raise OptionError(
                f"{{hidden_size}} (model {self.name}) must be divisible by {{num_heads}}",
                {"hidden_size": self.hidden_size, "num_heads": self.num_heads},
            )
        if self.num_heads % self.num_kv_heads:
            raise OptionError(
                f"{{num_heads}} (model {self.name}) must be a multiple of {{num_kv_heads}}",
                {"num_heads": self.num_heads, "num_kv_heads": self.num_kv_heads},
            )

    def hf_config(self):
        """The ``transformers`` configuration of this architecture (SDPA attention)."""
        import transformers

        config = getattr(transformers, FAMILIES[self.family])(
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            intermediate_size=self.intermediate_size,
            vocab_size=self.vocab_size,
            tie_word_embeddings=self.tie_embeddings,
        )
        config._attn_implementation = "sdpa"
        return config


@functools.lru_cache(maxsize=16)
def meta_model(spec: LlmSpec) -> PreTrainedModel:
    """The architecture built on the ``meta`` device: shapes without memory, for counting."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(spec.hf_config()).eval()


def parameter_count(spec: LlmSpec) -> int:
    """The model's parameter count (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in meta_model(spec).parameters()}.values())


@functools.lru_cache(maxsize=256)
def prefill_flops(spec: LlmSpec, tokens: int, batch: int = 1) -> int:
    """FLOPs (a multiply-add counts as two) of one prefill of ``tokens`` positions at ``batch``,
    with the last position's logits only, as counted by ``FlopCounterMode``."""
    model = meta_model(spec)
    embeds = torch.empty(batch, tokens, spec.hidden_size, device="meta")
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model(inputs_embeds=embeds, use_cache=True, logits_to_keep=1)
    return counter.get_total_flops()


def memory_needs(spec: LlmSpec, dtype: torch.dtype, device: torch.device) -> tuple[int, int, int]:
    """``(parameters, bytes per parameter in dtype, free bytes on device)``: what a memory check needs
    before a model is built."""
    return parameter_count(spec), torch.empty((), dtype=dtype).element_size(), available_bytes(device)


def build_language_model(
    spec: LlmSpec, device: torch.device, dtype: torch.dtype, seed: int
) -> PreTrainedModel:
    """The model with random weights (seeded), or its checkpoint's when ``spec.weights`` names one;
    frozen, in eval mode, on ``device`` in ``dtype``.

    The caller checks first that it fits (:func:`memory_needs`) and that the checkpoint is the
    preset's model (:func:`encoder_fusion.benchmarks.timing.llm_weights.check_checkpoint`): a model
    too big for the machine fails here only after filling its memory.
    """
    from transformers import AutoModelForCausalLM

    if spec.weights is not None:
        from encoder_fusion.benchmarks.timing.llm_weights import checkpoint_folder

        loaded = AutoModelForCausalLM.from_pretrained(
            checkpoint_folder(spec.weights), dtype=dtype, attn_implementation="sdpa"
        )
        return cast("PreTrainedModel", nn.Module.to(loaded, device)).eval().requires_grad_(False)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(spec.hf_config(), dtype=dtype)
    return model.eval().requires_grad_(False)


def cache_keyword(model: nn.Module) -> str:
    """The name under which this ``transformers`` version's forward takes (and its output returns)
    the KV cache: ``cache`` since 5.x deprecated ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class LanguageModel:
    """The prefill, time-to-first-token and decode calls of one language model (see the module
    docstring), with a fixed random prompt, made through the VLM a user runs: each pipeline's
    :func:`encoder_fusion.hf.build_vlm` around this one model (shared, not copied).

    Args:
        spec: the architecture.
        model: the built causal LM (:func:`build_language_model`).
        prompt_tokens: text tokens after the visual ones (>= 0).
        decode_tokens: greedy steps per :meth:`decode` call (>= 0).
        seed: seeds the prompt's token ids.
        wrap: applied to the prefill forward (``torch.compile`` or the identity).
    """

    def __init__(
        self,
        spec: LlmSpec,
        model: PreTrainedModel,
        *,
        prompt_tokens: int,
        decode_tokens: int,
        seed: int = 0,
        wrap: Callable[[Callable], Callable] = lambda fn: fn,
    ) -> None:
        self.spec = spec
        self.model = model
        self.prompt_tokens = prompt_tokens
        self.decode_tokens = decode_tokens
        self.seed = seed
        # the last token of the vocabulary marks the image positions; the prompt never draws it
        self.image_token_id = spec.vocab_size - 1
        self._forward = wrap(self._prefill_forward)

    def vlm_for(self, fused: FusedEncoder) -> FusedLlavaForConditionalGeneration:
        """The VLM of ``fused`` and this language model, as a user builds it."""
        from encoder_fusion.hf import build_vlm  # transformers is slow to import

        return build_vlm(fused, self.model, image_token_id=self.image_token_id)

    @property
    def device(self) -> torch.device:
        return cast(nn.Embedding, self.model.get_input_embeddings()).weight.device

    def prompt_ids(self, batch: int) -> torch.Tensor:
        """A fixed batch of random prompt token ids (batch, prompt_tokens), none the image token."""
        generator = torch.Generator().manual_seed(self.seed)
        ids = torch.randint(0, self.image_token_id, (batch, self.prompt_tokens), generator=generator)
        return ids.to(self.device)

    def input_ids(self, batch: int, visual_tokens: int) -> torch.Tensor:
        """``visual_tokens`` image placeholders, then the prompt: (batch, visual_tokens + prompt_tokens)."""
        images = torch.full((batch, visual_tokens), self.image_token_id, device=self.device)
        return torch.cat([images, self.prompt_ids(batch)], dim=1)

    @staticmethod
    def _prefill_forward(vlm: nn.Module, **inputs: Any):
        return vlm(**inputs, use_cache=True, logits_to_keep=1)

    def prefill_with_cache(
        self,
        vlm: FusedLlavaForConditionalGeneration,
        tokens: torch.Tensor,
        extras: Sequence[torch.Tensor] = (),
    ):
        """Prefill the visual ``tokens`` (B, N, hidden) + the prompt through ``vlm``, its DeepStack
        ``extras`` (each (B, N, hidden)) added in its first decoder layers; returns the model output
        (last position's logits and the KV cache)."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        features = BaseModelOutputWithPooling(
            pooler_output=cast(Any, list(tokens)), hidden_states=tuple(extras)
        )
        ids = self.input_ids(tokens.shape[0], tokens.shape[1])
        return self._forward(vlm, input_ids=ids, mm_encoder_outputs={"image": features})

    def prefill(
        self,
        vlm: FusedLlavaForConditionalGeneration,
        tokens: torch.Tensor,
        extras: Sequence[torch.Tensor] = (),
    ) -> torch.Tensor:
        """The first token's logits (B, vocab) after prefilling ``tokens`` and the prompt."""
        return self.prefill_with_cache(vlm, tokens, extras).logits[:, -1]

    def first_token(
        self, vlm: FusedLlavaForConditionalGeneration, images: torch.Tensor, vision: Callable | None = None
    ) -> torch.Tensor:
        """Raw ``images`` through ``vlm`` (its vision tower, connector and prefill in one forward, as
        ``generate`` runs it): the time to first token. ``vision`` (tokens and DeepStack sets of
        the images) replaces the vision tower's own call, for a pipeline with CUDA streams."""
        if vision is not None:
            return self.prefill(vlm, *vision(images))
        # as many placeholders as the fused encoder gives images of this size (tiles included)
        ids = self.input_ids(images.shape[0], vlm.model.fused.output_tokens(tuple(images.shape[-2:])))
        return self._forward(vlm, input_ids=ids, pixel_values=images).logits[:, -1]

    def decoder(
        self,
        vlm: FusedLlavaForConditionalGeneration,
        tokens: torch.Tensor,
        extras: Sequence[torch.Tensor] = (),
    ) -> Callable[[], torch.Tensor]:
        """Prefill ``tokens`` (and their DeepStack ``extras``) and the prompt once; returns a call that
        runs ``decode_tokens`` greedy steps of ``vlm`` from that KV cache and then cuts the cache back
        to its prefill length, so that every call starts from the same state. The call returns the
        generated ids (B, decode_tokens)."""
        output = self.prefill_with_cache(vlm, tokens, extras)
        keyword = cache_keyword(vlm)
        # the output names the cache as the forward's keyword does
        cache, first = output[keyword], output.logits[:, -1].argmax(-1, keepdim=True)

        def decode() -> torch.Tensor:
            token, generated = first, []
            for _ in range(self.decode_tokens):
                step = vlm(input_ids=token, use_cache=True, **{keyword: cache})
                token = step.logits[:, -1].argmax(-1, keepdim=True)
                generated.append(token)
            if generated:
                cache.crop(-len(generated))  # a negative count removes that many positions
            return torch.cat(generated, dim=1) if generated else first[:, :0]

        return decode


@dataclass(frozen=True)
class VlmOptions:
    """The language-model stage of a latency run.

    Args:
        llm: the language model the visual tokens feed; None measures the vision pipeline alone.
        prompt_tokens: text tokens after the visual ones in every prefill.
        decode_tokens: greedy steps timed after the prefill (0: no decode timing).
        project: presets whose time to first token is projected from the prefill rate measured here.

    Raises:
        ValueError: naming the field, the value and what is accepted.
    """

    llm: LlmSpec | None = None
    prompt_tokens: int = 32
    decode_tokens: int = 16
    project: tuple[LlmSpec, ...] = ()

    def __post_init__(self) -> None:
        check_int("prompt_tokens", self.prompt_tokens, 0)
        check_int("decode_tokens", self.decode_tokens, 0)
        if not all(isinstance(spec, LlmSpec) for spec in self.project):
            raise OptionError("{project} must hold language-model presets", {"project": self.project})
