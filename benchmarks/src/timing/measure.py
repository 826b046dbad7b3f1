"""Inference latency of fused and single-encoder pipelines, per stage and end to end, in one run.

Every pipeline is a :class:`~encoder_fusion.FusedEncoder` (the single-encoder baselines are FusedEncoders of
one encoder with their own connector to the same output width). For each batch size:

* stages, each timed on the previous stage's (precomputed) output: ``preprocess`` (every encoder's
  own resize + normalise), ``encoder.<name>`` (its blocks up to the deepest hooked one), then the
  head: ``fuse`` (alignment, layer combine and encoder merge; one ``grid_fuse`` on the fused route)
  and ``connector``;
* ``end_to_end``: the pipeline's forward on raw images.

With a language model (:class:`encoder_fusion.benchmarks.timing.llm.VlmOptions`), every pipeline also
gets the stage ``llm.prefill`` (its visual tokens + the prompt, KV cache on) and two more calls: ``ttft``
(raw images in, first token's logits out, as one forward of the ``encoder_fusion.hf`` VLM a user runs)
and ``decode`` (greedy steps with the KV cache).
Its ``vlm`` record holds them, the TTFT and vision ratios against the baseline and, for each ``project``
preset, a TTFT projected from the prefill FLOP rate measured here. One model serves every pipeline; it is
built only after the memory check of :func:`encoder_fusion.benchmarks.timing.llm.check_fits`.

The repeats of every stage and end-to-end call of every pipeline are taken round-robin, so drift or
a noisy neighbour on a shared machine hits every pipeline alike and the ratios against the CLIP-only
baseline (``fused / clip_only = 1.43x``) stay honest.

Times: warm-up calls, then repeats; median, p10 and p90 in milliseconds. On a GPU, CUDA events; on
the CPU, ``time.perf_counter`` with a fixed torch thread count. Peak memory: on a GPU
``torch.cuda.max_memory_allocated`` over the end-to-end calls; on the CPU the process's resident
set size sampled with psutil every millisecond during the end-to-end calls (``peak_mb``, the whole
process including every loaded model) and its rise over the level before them (``delta_mb``).
With a language model, peak memory is taken over the ``ttft`` calls instead (the whole VLM).
Also: parameters (total, trainable), output tokens, and GFLOPs per image of the pipeline and of each
stage, counted by ``torch.utils.flop_counter.FlopCounterMode`` (a multiply-add counts as two).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import cast

import torch

from encoder_fusion import FusedEncoder
from encoder_fusion.benchmarks.config.schema import BASELINE
from encoder_fusion.benchmarks.reports.records import (
    LatencyRecord,
    MemoryRecord,
    PipelineCost,
    RatioRecord,
)
from encoder_fusion.benchmarks.reports.stats import ratio_ci, stats
from encoder_fusion.benchmarks.timing.flops import gflops_per_image, parameter_counts, stage_gflops
from encoder_fusion.benchmarks.timing.llm import LanguageModel, VlmOptions, build_language_model
from encoder_fusion.benchmarks.timing.memory import peak_memory, tensor_megabytes
from encoder_fusion.benchmarks.timing.options import DTYPES, LatencyOptions
from encoder_fusion.benchmarks.timing.pipeline import Pipeline
from encoder_fusion.benchmarks.timing.stability import stability
from encoder_fusion.benchmarks.timing.timer import (
    Timer,
    autocast_binder,
    compile_wrapper,
    fixed_threads,
    random_images,
    round_robin,
)
from encoder_fusion.benchmarks.timing.vlm import vlm_records, vlm_timings


def measure_latency(
    pipelines: Mapping[str, FusedEncoder],
    options: LatencyOptions,
    *,
    baseline: str = BASELINE,
    vlm: VlmOptions | None = None,
) -> dict[str, PipelineCost]:
    """Time every pipeline, all in this one run, and express them against ``baseline``.

    Args:
        pipelines: name -> FusedEncoder; must contain ``baseline``.
        options: what to measure (:class:`LatencyOptions`).
        baseline: the pipeline the ratios are against (the CLIP-only one).
        vlm: the language-model stage (None or ``llm=None``: the vision pipelines alone).

    Returns:
        name -> its :class:`~encoder_fusion.benchmarks.reports.records.PipelineCost`.

    Raises:
        ValueError: no pipelines, ``baseline`` missing from them, or a language model that does not
            fit in memory or whose hidden size differs from a pipeline's output width.
    """
    if not pipelines:
        raise ValueError("measure_latency needs at least one pipeline")
    if baseline not in pipelines:
        raise ValueError(f"latency baseline={baseline!r} is not among the pipelines {sorted(pipelines)}")
    vlm = vlm or VlmOptions()
    device = torch.device(options.device)
    timer = Timer(device)
    bound = autocast_binder(device, DTYPES[options.dtype])
    language = None
    if vlm.llm is not None:
        for name, fused in pipelines.items():
            if fused.head.out_dim != vlm.llm.hidden_size:
                raise ValueError(
                    f"pipeline {name} emits {fused.head.out_dim}-wide tokens but llm={vlm.llm.name} takes "
                    f"{vlm.llm.hidden_size}; accepted: a connector out_dim equal to the hidden size"
                )
        model = build_language_model(vlm.llm, device, DTYPES[options.dtype] or torch.float32, options.seed)
        language = LanguageModel(
            vlm.llm,
            model,
            prompt_tokens=vlm.prompt_tokens,
            decode_tokens=vlm.decode_tokens,
            seed=options.seed,
            wrap=compile_wrapper(options.compile, options.compile_backend),
        )
    built = {name: Pipeline.build(name, fused, options, language) for name, fused in pipelines.items()}
    settings = {
        "unit": "ms",
        "device": str(device),
        "dtype": options.dtype,
        "compile": options.compile,
        "streams": options.streams,
        "threads": options.threads if options.threads is not None else torch.get_num_threads(),
        "batch_sizes": list(options.batch_sizes),
        "warmup": options.warmup,
        "repeats": options.repeats,
        "image_size": options.image_size,
    }
    per_batch: dict[str, dict[str, dict]] = {name: {} for name in built}
    key = "ttft" if language is not None else "end_to_end"  # the overhead a user pays
    repeats: dict[str, dict] = {}  # batch size -> the timed samples of every call, for the intervals
    steadiness: dict[str, dict] = {}  # batch size -> how far the overhead intervals narrowed
    with fixed_threads(options.threads), torch.inference_mode():
        for batch in options.batch_sizes:
            images = random_images(batch, options.image_size, options.seed, device)
            calls: dict[tuple[str, str], Callable[[], object]] = {}
            for name, pipeline in built.items():
                inputs = bound(pipeline.stage_inputs, images)()
                calls.update(
                    {(name, stage): bound(fn, *inputs[stage]) for stage, fn in pipeline.stages.items()}
                )
                calls[name, "end_to_end"] = bound(pipeline.end_to_end, images)
                if language is not None:
                    calls[name, "ttft"] = bound(pipeline.ttft, images)
                    calls[name, "decode"] = bound(pipeline.decoder(*inputs["llm.prefill"]))

            def check(samples: dict) -> dict:
                return stability(samples, list(built), baseline, key, options.ci_resamples, options.seed)

            def enough(samples: dict) -> bool:
                return check(samples)["halfwidth"] <= cast(float, options.target_halfwidth)

            samples = repeats[str(batch)] = round_robin(
                timer,
                calls,
                warmup=options.warmup,
                repeats=options.repeats,
                enough=None if options.target_halfwidth is None else enough,
                max_repeats=options.max_repeats,
            )
            reached = check(samples)
            target = options.target_halfwidth
            steadiness[str(batch)] = {
                **reached,
                "target_halfwidth": target,
                "max_repeats": options.max_repeats,
                "stable": target is None or reached["halfwidth"] <= target,
            }
            for name in built:
                stages = {stage: stats(samples[name, stage]) for stage in built[name].stages}
                whole = calls[name, "ttft" if language is not None else "end_to_end"]
                per_batch[name][str(batch)] = {
                    "stages": stages,
                    "end_to_end": stats(samples[name, "end_to_end"]),
                    "memory": dataclasses.asdict(peak_memory(whole, device, max(1, min(3, options.repeats)))),
                }
                if language is not None:
                    per_batch[name][str(batch)]["vlm"] = vlm_timings(samples, name, batch, vlm.decode_tokens)
        one_image = random_images(1, options.image_size, options.seed, device)
        flops = {
            name: gflops_per_image(bound(p.fused.forward_deepstack, one_image)) for name, p in built.items()
        }
        flops_stages = {
            name: stage_gflops(p, bound, one_image, vlm.prompt_tokens) for name, p in built.items()
        }
    first = str(options.batch_sizes[0])

    def interval(name: str, call: str, size: str) -> list[float]:
        runs = repeats[size]
        return ratio_ci(runs[name, call], runs[baseline, call], options.ci_resamples, options.seed)

    results = {}
    for name, pipeline in built.items():
        ratios = {
            size: record["end_to_end"]["median"] / per_batch[baseline][size]["end_to_end"]["median"]
            for size, record in per_batch[name].items()
        }
        intervals = {size: interval(name, "end_to_end", size) for size in per_batch[name]}
        main = per_batch[name][first]
        results[name] = PipelineCost(
            latency=LatencyRecord(
                **settings,
                batch_size=options.batch_sizes[0],
                end_to_end=main["end_to_end"],
                stages=main["stages"],
                per_batch=per_batch[name],
                stability=steadiness,
            ),
            ratios=RatioRecord(
                baseline=baseline,
                end_to_end=ratios[first],
                end_to_end_ci=intervals[first],
                per_batch=ratios,
                per_batch_ci=intervals,
                summary=f"{name} / {baseline} = {ratios[first]:.2f}x",
            ),
            memory=MemoryRecord(**{**main["memory"], "weights_mb": tensor_megabytes(pipeline.fused)}),
            tokens=pipeline.fused.output_tokens(options.image_size),
            out_dim=pipeline.fused.head.out_dim,
            params=parameter_counts(pipeline.fused),
            gflops=flops[name],
            gflops_stages=flops_stages[name],
        )
    if language is not None:
        for name, record in vlm_records(
            built, per_batch, baseline, vlm, options.batch_sizes, options.image_size
        ).items():
            record.ratios["ttft_ci"] = interval(name, "ttft", first)
            record.ratios["vision_ci"] = results[name].ratios.end_to_end_ci
            results[name].vlm = record
    return results
