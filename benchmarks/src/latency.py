"""Inference latency of fused and single-encoder pipelines, per stage and end to end, in one run.

Every pipeline is a :class:`~encoder_fusion.FusedEncoder` (the single-encoder baselines are FusedEncoders of
one encoder with their own connector to the same output width). For each batch size:

* stages, each timed on the previous stage's (precomputed) output: ``preprocess`` (every encoder's
  own resize + normalise), ``encoder.<name>`` (its blocks up to the deepest hooked one), then the
  head: ``fuse`` (alignment, layer combine and encoder merge; one ``grid_fuse`` on the fused route)
  and ``connector``;
* ``end_to_end``: the pipeline's forward on raw images.

With a language model (:class:`encoder_fusion.benchmarks.llm.VlmOptions`), every pipeline also gets the stage
``llm.prefill`` (its visual tokens + the prompt, KV cache on) and two more calls: ``ttft`` (raw
images in, first token's logits out, as one call) and ``decode`` (greedy steps with the KV cache).
Its ``vlm`` record holds them, the TTFT and vision ratios against the baseline and, for each
``project`` preset, a TTFT projected from the prefill FLOP rate measured here. One model serves every
pipeline; it is built only after the memory check of :func:`encoder_fusion.benchmarks.llm.check_fits`.

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

import contextlib
import copy
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import psutil
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from encoder_fusion import FusedEncoder
from encoder_fusion.benchmarks.llm import (
    LanguageModel,
    VlmOptions,
    build_language_model,
    prefill_flops,
    vlm_records,
    vlm_timings,
)
from encoder_fusion.benchmarks.records import BASELINE
from encoder_fusion.benchmarks.stats import check_resamples, ratio_ci, stats

DTYPES = {"fp32": None, "bf16": torch.bfloat16}
RSS_INTERVAL_S = 0.001


@dataclass(frozen=True)
class LatencyOptions:
    """How to measure.

    Args:
        batch_sizes: batch sizes to time; the first is the one reports show.
        warmup: untimed calls before the repeats (per stage and pipeline).
        repeats: timed calls.
        dtype: ``"fp32"``, or ``"bf16"`` (autocast).
        compile: run every stage and the end-to-end forward through ``torch.compile``.
        compile_backend: the ``torch.compile`` backend (``"inductor"``).
        streams: on a GPU, run the encoders on separate CUDA streams in the end-to-end forward.
        threads: torch CPU threads while timing (None keeps the current count).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
        image_size: side of the raw square uint8 images fed to the pipelines.
        seed: seeds the random images and the ratio intervals' resamples.
        ci_resamples: bootstrap resamples of each ratio's interval (see
        :func:`encoder_fusion.benchmarks.stats.ratio_ci`).

    Raises:
        ValueError: naming the config key the field comes from, the value and what is accepted.
    """

    batch_sizes: tuple[int, ...] = (1,)
    warmup: int = 2
    repeats: int = 10
    dtype: str = "fp32"
    compile: bool = False
    compile_backend: str = "inductor"
    streams: bool = False
    threads: int | None = None
    device: str = "cpu"
    image_size: int = 224
    seed: int = 0
    ci_resamples: int = 2000

    def __post_init__(self) -> None:
        # messages name the config keys these fields come from
        # (encoder_fusion.benchmarks.config.latency_options)
        check_resamples(self.ci_resamples)
        sizes = self.batch_sizes
        if isinstance(sizes, int) or not isinstance(sizes, Sequence) or not sizes:
            raise ValueError(f"bench.latency.batch_sizes={sizes!r} must be a non-empty list of ints >= 1")
        object.__setattr__(self, "batch_sizes", tuple(sizes))
        for name, value, least in (
            *(("bench.latency.batch_sizes", size, 1) for size in self.batch_sizes),
            ("bench.latency.warmup", self.warmup, 0),
            ("bench.latency.repeats", self.repeats, 1),
            ("data.image_size", self.image_size, 1),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"{name}={value!r} must be an int >= {least}")
        threads = self.threads
        if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
            raise ValueError(f"bench.threads={threads!r} must be null (keep torch's count) or an int >= 1")
        if self.dtype not in DTYPES:
            raise ValueError(f"bench.latency.dtype={self.dtype!r} is unknown; accepted: {', '.join(DTYPES)}")
        try:
            device = torch.device(self.device)
        except RuntimeError as error:
            raise ValueError(f"bench.device={self.device!r} is not a device: {error}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"bench.device={self.device!r} but CUDA is not available; accepted: cpu")
        if self.streams and device.type != "cuda":
            raise ValueError(
                f"bench.latency.streams=true needs a CUDA device, got bench.device={self.device!r}"
            )


@contextlib.contextmanager
def fixed_threads(threads: int | None) -> Iterator[None]:
    """Set torch's CPU thread count for the block, then restore it."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Timer:
    """Times one call: CUDA events on a GPU (synchronised), ``perf_counter`` on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], object]) -> float:
        """Run ``fn`` once; its duration in milliseconds."""
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)
        begin = time.perf_counter()
        fn()
        return (time.perf_counter() - begin) * 1e3


def compile_wrapper(options: LatencyOptions) -> Callable[[Callable], Callable]:
    """``torch.compile`` with the options' backend and static shapes, or the identity."""
    if not options.compile:
        return lambda fn: fn
    return lambda fn: torch.compile(fn, backend=options.compile_backend, dynamic=False)


def fuse_stage(head: nn.Module) -> nn.Module:
    """``head`` without its connector: the same object graph (shared parameters), with the connector
    swapped for the identity, so the head's own forward runs align + combine + merge only."""
    stage = copy.copy(head)
    stage._modules = {**head._modules, "connector": nn.Identity()}
    return stage


def streamed_forward(fused: FusedEncoder, streams: Sequence[torch.cuda.Stream]) -> Callable:
    """``fused.forward_deepstack`` with each encoder's preprocess and blocks on its own CUDA stream."""

    def forward(images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        main = torch.cuda.current_stream()
        grids = []
        for encoder, stream in zip(fused.encoders, streams):
            stream.wait_stream(main)
            with torch.cuda.stream(stream):
                grids.append(encoder.forward_grids(encoder.preprocess(images)))
        for stream, layers in zip(streams, grids):
            main.wait_stream(stream)
            for grid in layers:  # allocated on a side stream, consumed on the main one
                grid.record_stream(main)
        return fused.head.forward_deepstack(grids)

    return forward


@dataclass
class Pipeline:
    """One pipeline's stages as callables, each taking the previous stage's output.

    The end-to-end call is ``fused.forward_deepstack``: the main tokens and a DeepStack strategy's
    extra token sets (an empty list for the others), whose projection is its own stage,
    ``deepstack``, and which the language model's prefill adds to its first layers.
    """

    name: str
    fused: FusedEncoder
    stages: dict[str, Callable]
    end_to_end: Callable
    language: LanguageModel | None = None

    @classmethod
    def build(
        cls, name: str, fused: FusedEncoder, options: LatencyOptions, language: LanguageModel | None = None
    ) -> Pipeline:
        """Stage callables of ``fused`` under ``options`` (autocast, compile, streams), with the
        language model's prefill as the last stage when ``language`` is given."""
        device = torch.device(options.device)
        fused = fused.to(device).eval()
        wrap = compile_wrapper(options)
        head = fused.head
        stages: dict[str, Callable] = {
            "preprocess": wrap(lambda images: [e.preprocess(images) for e in fused.encoders]),
        }
        for encoder in fused.encoders:
            stages[f"encoder.{encoder.spec.name}"] = wrap(encoder.forward_grids)
        if isinstance(getattr(head, "connector", None), nn.Module):
            stages["fuse"] = wrap(fuse_stage(head))
            stages["connector"] = wrap(head.connector)
        else:
            stages["head"] = wrap(head)
        if head.deepstack.entries:
            stages["deepstack"] = wrap(head.deepstack)
        if options.streams and len(fused.encoders) > 1:
            end_to_end = wrap(streamed_forward(fused, [torch.cuda.Stream(device) for _ in fused.encoders]))
        else:
            end_to_end = wrap(fused.forward_deepstack)
        if language is not None:
            stages["llm.prefill"] = language.prefill
        return cls(name, fused, stages, end_to_end, language)

    def ttft(self, images: torch.Tensor) -> torch.Tensor:
        """Raw images in, the first token's logits out: the vision pipeline, then the prefill."""
        return self.language.first_token(images, self.end_to_end)

    def stage_inputs(self, images: torch.Tensor) -> dict[str, tuple]:
        """Each stage's positional arguments, computed once by running the stages in order."""
        inputs: dict[str, tuple] = {"preprocess": (images,)}
        pixels = self.stages["preprocess"](images)
        grids = []
        for encoder, encoder_pixels in zip(self.fused.encoders, pixels):
            inputs[f"encoder.{encoder.spec.name}"] = (encoder_pixels,)
            grids.append(self.stages[f"encoder.{encoder.spec.name}"](encoder_pixels))
        if "fuse" in self.stages:
            inputs["fuse"] = (grids,)
            inputs["connector"] = (self.stages["fuse"](grids),)
            tokens = self.stages["connector"](*inputs["connector"])
        else:
            inputs["head"] = (grids,)
            tokens = self.stages["head"](grids)
        extras = []
        if "deepstack" in self.stages:
            inputs["deepstack"] = (grids,)
            extras = self.stages["deepstack"](grids)
        if self.language is not None:
            inputs["llm.prefill"] = (tokens, extras)
        return inputs


def parameter_counts(module: nn.Module) -> dict:
    """Total and trainable (``requires_grad``) parameter counts; shared tensors counted once."""
    unique = {id(p): p for p in module.parameters()}.values()
    return {
        "total": sum(p.numel() for p in unique),
        "trainable": sum(p.numel() for p in unique if p.requires_grad),
    }


def tensor_megabytes(module: nn.Module) -> float:
    """Megabytes held by ``module``'s parameters and buffers."""
    tensors = {id(t): t for t in [*module.parameters(), *module.buffers()]}.values()
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


# torch's table counts the CUDA attention kernels but not the CPU one, which would drop every
# attention matmul from a CPU estimate
CPU_ATTENTION_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}


def gflops_per_image(forward_one_image: Callable[[], object]) -> float:
    """GFLOPs of one call of a forward on one image, counted by FlopCounterMode (with the CPU
    attention kernel counted like the CUDA ones)."""
    counter = FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS)
    with counter:
        forward_one_image()
    return counter.get_total_flops() / 1e9


def stage_gflops(pipeline: Pipeline, bind: Callable, one_image: torch.Tensor, prompt_tokens: int) -> dict:
    """GFLOPs of every stage on one image; the prefill's are counted on the model built on the meta
    device (:func:`encoder_fusion.benchmarks.llm.prefill_flops`), which is the same count without a second
    prefill."""
    inputs = bind(pipeline.stage_inputs, one_image)()
    counts = {}
    for stage, fn in pipeline.stages.items():
        if stage == "llm.prefill":
            tokens = pipeline.fused.output_tokens() + prompt_tokens
            counts[stage] = prefill_flops(pipeline.language.spec, tokens) / 1e9
        else:
            counts[stage] = gflops_per_image(bind(fn, *inputs[stage]))
    return counts


class RssSampler:
    """Samples this process's resident set size in a background thread; ``peak`` in bytes."""

    def __init__(self) -> None:
        self.process = psutil.Process()
        self.peak = self.start = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(RSS_INTERVAL_S)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def peak_memory(call: Callable[[], object], device: torch.device, calls: int) -> dict:
    """Peak memory over ``calls`` calls of ``call`` (see the module docstring for what is measured)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(calls):
            call()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {
            "kind": "cuda max_memory_allocated",
            "peak_mb": peak / 2**20,
            "delta_mb": (peak - before) / 2**20,
        }
    with RssSampler() as sampler:
        for _ in range(calls):
            call()
    return {
        "kind": "cpu process RSS (psutil, sampled every 1 ms)",
        "peak_mb": sampler.peak / 2**20,
        "delta_mb": (sampler.peak - sampler.start) / 2**20,
    }


def random_images(batch: int, size: int, seed: int, device: torch.device) -> torch.Tensor:
    """A fixed batch of random uint8 images (B, 3, size, size)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, size, size), generator=generator, dtype=torch.uint8).to(device)


def measure_latency(
    pipelines: Mapping[str, FusedEncoder],
    options: LatencyOptions,
    *,
    baseline: str = BASELINE,
    vlm: VlmOptions | None = None,
) -> dict[str, dict]:
    """Time every pipeline, all in this one run, and express them against ``baseline``.

    Args:
        pipelines: name -> FusedEncoder; must contain ``baseline``.
        options: what to measure (:class:`LatencyOptions`).
        baseline: the pipeline the ratios are against (the CLIP-only one).
        vlm: the language-model stage (None or ``llm=None``: the vision pipelines alone).

    Returns:
        name -> ``{"latency", "ratios", "memory", "tokens", "out_dim", "params", "gflops",
        "gflops_stages", "vlm"}``: ``latency`` holds ``batch_size`` (the first), ``end_to_end`` and
        ``stages`` statistics at it, ``per_batch`` (every batch size: ``end_to_end``, ``stages``,
        ``memory``) and the settings; ``ratios`` holds ``end_to_end`` (at the first batch size),
        ``per_batch`` and a readable ``summary`` (``"fused / clip_only = 1.43x"``); ``vlm`` is a
        :class:`~encoder_fusion.benchmarks.records.VlmRecord` (None without a language model).

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
            wrap=compile_wrapper(options),
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
    repeats: dict[str, dict] = {}  # batch size -> the timed samples of every call, for the intervals
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
                    calls[name, "decode"] = bound(language.decoder(*inputs["llm.prefill"]))
            samples = repeats[str(batch)] = round_robin(timer, calls, options)
            for name in built:
                stages = {stage: stats(samples[name, stage]) for stage in built[name].stages}
                whole = calls[name, "ttft" if language is not None else "end_to_end"]
                per_batch[name][str(batch)] = {
                    "stages": stages,
                    "end_to_end": stats(samples[name, "end_to_end"]),
                    "memory": peak_memory(whole, device, max(1, min(3, options.repeats))),
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
        results[name] = {
            "latency": {
                **settings,
                "batch_size": options.batch_sizes[0],
                "end_to_end": main["end_to_end"],
                "stages": main["stages"],
                "per_batch": per_batch[name],
            },
            "ratios": {
                "baseline": baseline,
                "end_to_end": ratios[first],
                "end_to_end_ci": intervals[first],
                "per_batch": ratios,
                "per_batch_ci": intervals,
                "summary": f"{name} / {baseline} = {ratios[first]:.2f}x",
            },
            "memory": {**main["memory"], "weights_mb": tensor_megabytes(pipeline.fused)},
            "tokens": pipeline.fused.output_tokens(),
            "out_dim": pipeline.fused.head.out_dim,
            "params": parameter_counts(pipeline.fused),
            "gflops": flops[name],
            "gflops_stages": flops_stages[name],
            "vlm": None,
        }
    if language is not None:
        for name, record in vlm_records(built, per_batch, baseline, vlm, options.batch_sizes).items():
            record.ratios["ttft_ci"] = interval(name, "ttft", first)
            record.ratios["vision_ci"] = results[name]["ratios"]["end_to_end_ci"]
            results[name]["vlm"] = record
    return results


def autocast_binder(device: torch.device, dtype: torch.dtype | None) -> Callable[..., Callable[[], object]]:
    """``bind(fn, *args)`` -> a no-argument call of ``fn(*args)`` under autocast to ``dtype``
    (plain when ``dtype`` is None)."""

    def bind(fn: Callable, *args: object) -> Callable[[], object]:
        def call() -> object:
            if dtype is None:
                return fn(*args)
            with torch.autocast(device.type, dtype=dtype):
                return fn(*args)

        return call

    return bind


def round_robin(
    timer: Timer, calls: Mapping[tuple[str, str], Callable[[], object]], options: LatencyOptions
) -> dict[tuple[str, str], list[float]]:
    """Samples of every call (each stage and the end-to-end forward of every pipeline), the repeats
    taken round-robin across all of them."""
    for _ in range(options.warmup):
        for call in calls.values():
            call()
    samples: dict[tuple[str, str], list[float]] = {key: [] for key in calls}
    for _ in range(options.repeats):
        for name, call in calls.items():
            samples[name].append(timer(call))
    return samples
