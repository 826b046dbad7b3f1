"""The language-model stage of a vision-language model, for measuring what a VLM user waits for.

A :class:`LlmSpec` names a decoder-only architecture by its published shape (hidden size, layers,
heads, key/value heads, MLP width, vocabulary, tied embeddings); :func:`build_language_model`
builds it with ``transformers`` from that configuration alone, with random weights: latency does
not depend on weight values, so no hub and no download are involved. The presets live in
``conf/llm/``.

:class:`LanguageModel` runs the three calls a VLM makes after its vision tower:

* ``prefill(visual)``: the visual tokens (the connector's output, ``(B, N, hidden)``) followed by
  ``prompt_tokens`` text-token embeddings, one forward with the KV cache on, keeping only the last
  position's logits (as generation does);
* ``first_token(images, vision)``: raw images through the vision pipeline, then ``prefill``: the
  time to first token (TTFT) as one call;
* ``decoder(visual)()``: ``decode_tokens`` greedy steps from a kept prefill cache, each reading
  the whole cache (a longer visual prefix makes every step slower); the cache is cut back after
  each call, so every call starts from the same state.

FLOPs of a prefill are counted by ``FlopCounterMode`` on a model built on the ``meta`` device: no
memory, so a 70B model's prefill can be counted on a laptop; :func:`prefill_flops` is what projects
measured prefill rates onto presets too big to run here.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import psutil
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from encoder_fusion.benchmarks.records import VlmRecord
from encoder_fusion.benchmarks.stats import stats

# family -> its ``transformers`` configuration class
FAMILIES = {"qwen2": "Qwen2Config", "llama": "LlamaConfig"}
# the share of free memory a model's weights may take; the rest is for activations, the KV cache
# and the vision encoders
MEMORY_HEADROOM = 0.85


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

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"llm.family={self.family!r} is unknown; accepted: {', '.join(FAMILIES)}")
        for field in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"llm.{field}={value!r} (llm={self.name}) must be an int >= 1")
        if not isinstance(self.vocab_size, int) or self.vocab_size < 2:
            raise ValueError(f"llm.vocab_size={self.vocab_size!r} (llm={self.name}) must be an int >= 2")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"llm.hidden_size={self.hidden_size} (llm={self.name}) must be divisible by "
                f"llm.num_heads={self.num_heads}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"llm.num_heads={self.num_heads} (llm={self.name}) must be a multiple of "
                f"llm.num_kv_heads={self.num_kv_heads}"
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
def meta_model(spec: LlmSpec) -> nn.Module:
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


def available_bytes(device: torch.device) -> int:
    """Free memory on ``device``: the GPU's free memory, or the host's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return psutil.virtual_memory().available


def check_fits(spec: LlmSpec, dtype: torch.dtype, device: torch.device) -> None:
    """Refuse, before building it, a model whose weights cannot fit in ``device``'s free memory.

    Raises:
        ValueError: the estimate (parameters x bytes), the memory available, and the way out.
    """
    params = parameter_count(spec)
    width = torch.empty((), dtype=dtype).element_size()
    needed, free = params * width, available_bytes(device)
    if needed > MEMORY_HEADROOM * free:
        raise ValueError(
            f"llm={spec.name} does not fit: {params / 1e9:.2f}B parameters x {width} bytes ({dtype}) = "
            f"{needed / 2**30:.1f} GiB of weights, but {free / 2**30:.1f} GiB of {device.type} memory is "
            f"available ({MEMORY_HEADROOM:.0%} of it may hold weights). Run a smaller llm (e.g. "
            f"llm=qwen2_5_0_5b) and list {spec.name} in bench.project_llms to project its time to "
            "first token from the prefill rate measured here."
        )


def build_language_model(spec: LlmSpec, device: torch.device, dtype: torch.dtype, seed: int) -> nn.Module:
    """The model with random weights (seeded), in eval mode, on ``device`` in ``dtype``.

    Raises:
        ValueError: it would not fit in memory (see :func:`check_fits`).
    """
    from transformers import AutoModelForCausalLM

    check_fits(spec, dtype, device)
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
    docstring), with a fixed random prompt.

    Args:
        spec: the architecture.
        model: the built model (:func:`build_language_model`).
        prompt_tokens: text tokens after the visual ones (>= 0).
        decode_tokens: greedy steps per :meth:`decode` call (>= 0).
        seed: seeds the prompt's token ids.
        wrap: applied to the prefill forward (``torch.compile`` or the identity).
    """

    def __init__(
        self,
        spec: LlmSpec,
        model: nn.Module,
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
        self._cache_keyword = cache_keyword(model)
        self._forward = wrap(self._prefill_forward)
        self.layers = model.get_decoder().layers
        self._deepstack: tuple[list[torch.Tensor], int] | None = None
        for index, layer in enumerate(self.layers):
            layer.register_forward_hook(functools.partial(self._add_deepstack, index))

    def _add_deepstack(self, index: int, module: nn.Module, args: tuple, output):
        """After decoder layer ``index``, add DeepStack set ``index`` (when there is one) to the hidden
        states at the visual positions, the first ones."""
        if self._deepstack is None or index >= len(self._deepstack[0]):
            return None
        extras, visual = self._deepstack
        hidden = output[0] if isinstance(output, tuple) else output
        hidden[:, :visual] += extras[index].to(hidden.dtype)
        return output

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    def prompt_ids(self, batch: int) -> torch.Tensor:
        """A fixed batch of random prompt token ids (batch, prompt_tokens)."""
        generator = torch.Generator().manual_seed(self.seed)
        ids = torch.randint(0, self.spec.vocab_size, (batch, self.prompt_tokens), generator=generator)
        return ids.to(self.device)

    def _prefill_forward(self, embeds: torch.Tensor):
        return self.model(inputs_embeds=embeds, use_cache=True, logits_to_keep=1)

    def prefill_with_cache(self, visual: torch.Tensor, extras: Sequence[torch.Tensor] = ()):
        """Prefill ``visual`` (B, N, hidden) + the prompt, adding DeepStack set ``k`` of ``extras``
        (each (B, N, hidden)) to the hidden states of decoder layer ``k`` at the visual positions;
        returns the model output (last position's logits and the KV cache).

        Raises:
            ValueError: more DeepStack sets than decoder layers.
        """
        if len(extras) > len(self.layers):
            raise ValueError(
                f"{len(extras)} DeepStack token sets need as many decoder layers, but llm={self.spec.name} "
                f"has {len(self.layers)}; accepted: at most {len(self.layers)} deepstack_layers"
            )
        embeddings = self.model.get_input_embeddings()
        prompt = embeddings(self.prompt_ids(visual.shape[0]))
        embeds = torch.cat([visual.to(prompt.dtype), prompt], dim=1)
        self._deepstack = (list(extras), visual.shape[1]) if extras else None
        try:
            return self._forward(embeds)
        finally:
            self._deepstack = None

    def prefill(self, visual: torch.Tensor, extras: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        """The first token's logits (B, vocab) after prefilling ``visual`` and the prompt."""
        return self.prefill_with_cache(visual, extras).logits[:, -1]

    def first_token(self, images: torch.Tensor, vision: Callable) -> torch.Tensor:
        """Raw ``images`` through ``vision`` (the pipeline's ``forward_deepstack``: tokens and
        DeepStack sets), then :meth:`prefill`: the time to first token."""
        return self.prefill(*vision(images))

    def decoder(
        self, visual: torch.Tensor, extras: Sequence[torch.Tensor] = ()
    ) -> Callable[[], torch.Tensor]:
        """Prefill ``visual`` (and its DeepStack ``extras``) and the prompt once; returns a call that
        runs ``decode_tokens`` greedy steps from that KV cache and then cuts the cache back to its
        prefill length, so that every call starts from the same state. The call returns the generated
        ids (B, decode_tokens)."""
        output = self.prefill_with_cache(visual, extras)
        # the output names the cache as the forward's keyword does
        cache, first = output[self._cache_keyword], output.logits[:, -1].argmax(-1, keepdim=True)

        def decode() -> torch.Tensor:
            token, generated = first, []
            for _ in range(self.decode_tokens):
                step = self.model(input_ids=token, use_cache=True, **{self._cache_keyword: cache})
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
        for field in ("prompt_tokens", "decode_tokens"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"bench.{field}={value!r} must be an int >= 0")
        if not all(isinstance(spec, LlmSpec) for spec in self.project):
            raise ValueError(f"bench.project_llms={self.project!r} must hold language-model presets")


def projected_ttft(vision_ms: float, target: LlmSpec, tokens: int, batch: int, flops_per_ms: float) -> dict:
    """Time to first token with ``target`` as the language model: the measured vision pipeline time
    plus ``target``'s prefill FLOPs at the prefill FLOP rate measured in the same run on this machine.

    Args:
        vision_ms: the vision pipeline's measured end-to-end median.
        target: the preset to project to.
        tokens: visual + prompt tokens of the prefill.
        batch: the batch size the rate was measured at.
        flops_per_ms: the measured prefill rate.

    Returns:
        ``{"ttft_ms", "prefill_ms", "prefill_gflops", "projected": True}`` (GFLOPs per image).
    """
    flops = prefill_flops(target, tokens, batch)
    prefill_ms = flops / flops_per_ms
    return {
        "ttft_ms": vision_ms + prefill_ms,
        "prefill_ms": prefill_ms,
        "prefill_gflops": flops / batch / 1e9,
        "projected": True,
    }


def vlm_timings(samples: Mapping, name: str, batch: int, decode_tokens: int) -> dict:
    """One pipeline's prefill, TTFT and decode statistics at one batch size; decode as tokens per
    second per sequence (None when no token is decoded)."""
    decode_ms = np.asarray(samples[name, "decode"], dtype=np.float64)
    return {
        "batch_size": batch,
        "prefill": stats(samples[name, "llm.prefill"]),
        "ttft": stats(samples[name, "ttft"]),
        "decode_tokens_per_s": stats(decode_tokens / (decode_ms / 1e3)) if decode_tokens else None,
    }


def vlm_records(
    built: Mapping[str, Any],
    per_batch: Mapping[str, dict],
    baseline: str,
    vlm: VlmOptions,
    batch_sizes: Sequence[int],
) -> dict[str, VlmRecord]:
    """Every pipeline's :class:`VlmRecord` at the first batch size, with its TTFT and vision ratios
    against ``baseline`` and its projections to ``vlm.project``.

    Args:
        built: name -> :class:`encoder_fusion.benchmarks.latency.Pipeline`.
        per_batch: name -> batch size -> ``{"stages", "end_to_end", "vlm"}`` statistics.

    A projection takes one prefill rate for the whole run, the FLOPs of every pipeline's prefill over
    the sum of their medians, so that the noise of one pipeline's prefill does not bend its ratio.
    """
    size, batch, spec = str(batch_sizes[0]), batch_sizes[0], vlm.llm
    prompt = vlm.prompt_tokens
    timings = {name: per_batch[name][size]["vlm"] for name in built}
    vision = {name: per_batch[name][size]["end_to_end"]["median"] for name in built}
    tokens = {name: pipeline.fused.output_tokens() for name, pipeline in built.items()}
    flops = sum(prefill_flops(spec, tokens[name] + prompt, batch) for name in built)
    rate = flops / sum(t["prefill"]["median"] for t in timings.values())
    projected = {
        name: {
            t.name: projected_ttft(vision[name], t, tokens[name] + prompt, batch, rate) for t in vlm.project
        }
        for name in built
    }
    for name in built:
        for target, projection in projected[name].items():
            projection["ratio"] = projection["ttft_ms"] / projected[baseline][target]["ttft_ms"]
    records = {}
    for name in built:
        mine, stages = timings[name], per_batch[name][size]["stages"]
        records[name] = VlmRecord(
            llm=spec.name,
            hidden_size=spec.hidden_size,
            visual_tokens=tokens[name],
            prompt_tokens=prompt,
            decode_tokens=vlm.decode_tokens,
            prefill=mine["prefill"],
            ttft=mine["ttft"],
            decode_tokens_per_s=mine["decode_tokens_per_s"],
            prefill_gflops=prefill_flops(spec, tokens[name] + prompt) / 1e9,
            llm_share=mine["prefill"]["median"] / sum(stage["median"] for stage in stages.values()),
            ratios={
                "ttft": mine["ttft"]["median"] / timings[baseline]["ttft"]["median"],
                "vision": vision[name] / vision[baseline],
            },
            projected=projected[name],
            per_batch={size: per_batch[name][size]["vlm"] for size in per_batch[name]},
        )
    return records
