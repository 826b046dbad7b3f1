"""The whole vision-language model's cost from the timed samples of a run: each pipeline's prefill,
time to first token and decode speed, their ratios to the baseline, and projections of the time to
first token to language models too big to run here."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from encoder_fusion.benchmarks.reports.records import VlmRecord
from encoder_fusion.benchmarks.reports.stats import stats
from encoder_fusion.benchmarks.timing.llm import LlmSpec, VlmOptions, prefill_flops


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
    image_size: int,
) -> dict[str, VlmRecord]:
    """Every pipeline's :class:`VlmRecord` at the first batch size, with its TTFT and vision ratios
    against ``baseline`` and its projections to ``vlm.project``.

    Args:
        built: name -> :class:`encoder_fusion.benchmarks.timing.pipeline.Pipeline`.
        per_batch: name -> batch size -> ``{"stages", "end_to_end", "vlm"}`` statistics.
        image_size: the side of the timed images (a tiled pipeline's token count follows it).

    A projection takes one prefill rate for the whole run, the FLOPs of every pipeline's prefill over
    the sum of their medians, so that the noise of one pipeline's prefill does not bend its ratio.

    Raises:
        ValueError: ``vlm`` without a language model (``llm=None``).
    """
    size, batch, spec = str(batch_sizes[0]), batch_sizes[0], vlm.llm
    if spec is None:
        raise ValueError("vlm_records needs the language model the pipelines were timed with; got llm=None")
    prompt = vlm.prompt_tokens
    timings = {name: per_batch[name][size]["vlm"] for name in built}
    vision = {name: per_batch[name][size]["end_to_end"]["median"] for name in built}
    tokens = {name: pipeline.fused.output_tokens(image_size) for name, pipeline in built.items()}
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
