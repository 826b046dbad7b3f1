"""Latency harness: stages, ratios measured in one run, parameter / token / FLOP counts, options."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from encoder_fusion import FusedEncoder
from encoder_fusion.benchmarks.config.plan import LATENCY_KEYS, keyed, llm_preset
from encoder_fusion.benchmarks.reports.records import ParamCounts
from encoder_fusion.benchmarks.timing.llm import LanguageModel, VlmOptions, prefill_flops
from encoder_fusion.benchmarks.timing.measure import LatencyOptions, gflops_per_image, measure_latency, stats
from encoder_fusion.encoders import build_encoder
from encoder_fusion.encoders.tiny import tiny_spec

CONNECTOR = {"kind": "mlp", "depth": 2, "out_dim": 24}
# a fixed number of rounds: these tests check what is measured, test_timing_stability when to stop
FAST = {"warmup": 1, "repeats": 3, "image_size": 50, "threads": 1, "target_halfwidth": None}


@pytest.fixture(scope="module")
def pipelines() -> dict[str, FusedEncoder]:
    torch.manual_seed(0)
    clip = build_encoder(tiny_spec("clip", layers=(-2, -1)))
    dino = build_encoder(tiny_spec("dino_reg", "dino", layers=(1,)))
    return {
        "clip_only": FusedEncoder([clip], connector=CONNECTOR),
        "dino_only": FusedEncoder([dino], connector=CONNECTOR),
        "interleave": FusedEncoder(
            [clip, dino], encoder_merge="interleave", merge_dim=16, connector=CONNECTOR
        ),
    }


def test_stats_against_hand_worked_percentiles():
    # 10 samples 1..10 (shuffled): linear interpolation puts p10 at 1.9, the median at 5.5, p90 at 9.1
    result = stats([7.0, 2.0, 10.0, 1.0, 5.0, 3.0, 9.0, 4.0, 8.0, 6.0])
    assert result == pytest.approx({"median": 5.5, "p10": 1.9, "p90": 9.1, "n": 10})


def test_every_pipeline_stage_and_ratio_in_one_run(pipelines):
    options = LatencyOptions(batch_sizes=(2, 1), **FAST)
    threads_before = torch.get_num_threads()
    results = measure_latency(pipelines, options)
    assert torch.get_num_threads() == threads_before
    assert set(results) == set(pipelines)
    expected_stages = {
        "clip_only": ["preprocess", "encoder.clip", "fuse", "connector"],
        "dino_only": ["preprocess", "encoder.dino", "fuse", "connector"],
        "interleave": ["preprocess", "encoder.clip", "encoder.dino", "fuse", "connector"],
    }
    base = results["clip_only"].latency.per_batch
    for name, result in results.items():
        latency = result.latency
        assert latency.batch_size == 2 and latency.threads == 1 and latency.dtype == "fp32"
        assert set(latency.per_batch) == {"2", "1"}
        for size, record in latency.per_batch.items():
            assert list(record["stages"]) == expected_stages[name]
            for timing in [record["end_to_end"], *record["stages"].values()]:
                assert timing["n"] == 3 and 0 < timing["p10"] <= timing["median"] <= timing["p90"]
            ratio = record["end_to_end"]["median"] / base[size]["end_to_end"]["median"]
            assert result.ratios.per_batch[size] == pytest.approx(ratio)
        assert latency.end_to_end == latency.per_batch["2"]["end_to_end"]
        assert result.ratios.end_to_end == result.ratios.per_batch["2"]
        assert result.ratios.summary == f"{name} / clip_only = {result.ratios.end_to_end:.2f}x"
        assert result.memory.kind.startswith("cpu process RSS")
        assert result.memory.peak_mb > 0 and result.memory.delta_mb >= 0
        assert result.out_dim == 24
    assert results["clip_only"].ratios.end_to_end == 1.0


def test_params_tokens_and_weights_are_counted_independently(pipelines):
    results = measure_latency(pipelines, LatencyOptions(**FAST))
    for name, fused in pipelines.items():
        head = sum(p.numel() for p in fused.head.parameters())
        encoders = sum(p.numel() for e in fused.encoders for p in e.parameters())
        assert results[name].params == ParamCounts(total=head + encoders, trainable=head)
        # the state dict plus each encoder's non-persistent normalisation constants (2 x 3 floats)
        weights = sum(t.numel() * t.element_size() for t in fused.state_dict().values())
        weights += len(fused.encoders) * 2 * 3 * 4
        weights /= 2**20
        assert results[name].memory.weights_mb == pytest.approx(weights, rel=1e-6)
    # 4x4 grids; interleave emits both encoders' tokens side by side
    assert results["clip_only"].tokens == 16
    assert results["interleave"].tokens == 32


def vit_flops(width: int, tokens: int, blocks: int, patches: int, patch: int) -> int:
    """Multiply-adds x 2 of a ViT: patch embedding, then per block qkv (3C), projection (C), MLP
    (4C in and out) and the two attention products (L x L x C each)."""
    return 2 * patches * 3 * patch * patch * width + blocks * (24 * tokens * width**2 + 4 * tokens**2 * width)


def test_gflops_match_a_hand_count():
    torch.manual_seed(1)
    clip = build_encoder(tiny_spec("clip", layers=(1,)))  # runs blocks 0 and 1 only
    fused = FusedEncoder([clip], layer_merge="last", connector={"kind": "linear", "out_dim": 40})
    image = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8)
    with torch.inference_mode():
        counted = gflops_per_image(lambda: fused(image))
    expected = vit_flops(32, 16 + 1, 2, 16, 16) + 2 * 16 * 32 * 40
    assert counted * 1e9 == pytest.approx(expected, rel=1e-9)


def test_bf16_autocast_and_compile_paths_run(pipelines):
    subset = {k: pipelines[k] for k in ("clip_only", "interleave")}
    results = measure_latency(
        subset, LatencyOptions(dtype="bf16", compile=True, compile_backend="eager", **FAST)
    )
    for result in results.values():
        assert result.latency.dtype == "bf16" and result.latency.compile is True
        assert np.isfinite(result.latency.end_to_end["median"])


def test_bf16_and_compile_paths_run_with_a_language_model(vlm_pipelines):
    """bf16: the language model's weights in bf16 take the autocast pipeline's tokens."""
    subset = {k: vlm_pipelines[k] for k in ("clip_only", "sequence")}
    vlm = VlmOptions(llm=llm_preset("tiny"), prompt_tokens=4, decode_tokens=2)
    options = LatencyOptions(dtype="bf16", compile=True, compile_backend="eager", **FAST)
    for result in measure_latency(subset, options, vlm=vlm).values():
        assert np.isfinite(result.vlm.ttft["median"]) and result.vlm.decode_tokens_per_s["median"] > 0


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("dtype", "fp8", r"dtype='fp8' is unknown; accepted: fp32, bf16"),
        ("batch_sizes", (), r"bench.latency.batch_sizes=\(\) must be a non-empty list"),
        ("batch_sizes", (2, 0), r"batch_sizes=0 must be an int >= 1"),
        ("repeats", 0, r"repeats=0 must be an int >= 1"),
        ("warmup", -1, r"warmup=-1 must be an int >= 0"),
        ("threads", 0, r"bench.threads=0 must be null \(keep torch's count\) or an int >= 1"),
        ("streams", True, r"streams=true needs a CUDA device"),
        ("device", "tpu9", r"bench.device='tpu9' is not a device"),
        ("image_size", 0, r"data.image_size=0 must be an int >= 1"),
        ("target_halfwidth", 0.0, r"bench.latency.target_halfwidth=0.0 must be null \(stop at repeats\)"),
        ("target_halfwidth", 1.5, r"bench.latency.target_halfwidth=1.5 must be null .* a share in \(0, 1\)"),
        ("max_repeats", 5, r"bench.latency.max_repeats=5 must be >= bench.latency.repeats=10"),
    ],
)
def test_bad_options_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=message), keyed(LATENCY_KEYS):  # named as the config keys
        LatencyOptions(**{field: value})


def test_baseline_must_be_measured(pipelines):
    with pytest.raises(ValueError, match=r"baseline='clip_only' is not among the pipelines \['dino_only'\]"):
        measure_latency({"dino_only": pipelines["dino_only"]}, LatencyOptions(**FAST))


@pytest.fixture(scope="module")
def vlm_pipelines() -> dict[str, FusedEncoder]:
    """Pipelines whose connectors emit the tiny language model's 32-wide embeddings."""
    torch.manual_seed(2)
    clip = build_encoder(tiny_spec("clip", layers=(-1,)))
    dino = build_encoder(tiny_spec("dino_reg", "dino", layers=(1, 2)))
    connector = {"kind": "mlp", "depth": 2, "out_dim": 32}
    return {
        "clip_only": FusedEncoder([clip], connector=connector),
        "channel": FusedEncoder([clip, dino], connector=connector),
        "sequence": FusedEncoder(
            [clip, dino], encoder_merge="sequence_concat", merge_dim=16, connector=connector
        ),
    }


def test_vlm_stage_ttft_decode_and_projections_in_one_run(vlm_pipelines):
    tiny, target = llm_preset("tiny"), llm_preset("qwen2_5_1_5b")
    vlm = VlmOptions(llm=tiny, prompt_tokens=7, decode_tokens=3, project=(target,))
    results = measure_latency(vlm_pipelines, LatencyOptions(batch_sizes=(2, 1), **FAST), vlm=vlm)
    base = results["clip_only"].vlm
    # one prefill rate for the run: every pipeline's prefill FLOPs (batch 2) over their summed medians
    flops = sum(prefill_flops(tiny, r.vlm.visual_tokens + 7, 2) for r in results.values())
    rate = flops / sum(r.vlm.prefill["median"] for r in results.values())
    assert {name: r.vlm.visual_tokens for name, r in results.items()} == {
        "clip_only": 16,
        "channel": 16,
        "sequence": 32,  # sequence concat doubles the visual tokens
    }
    for result in results.values():
        record = result.vlm
        assert list(result.latency.stages)[-1] == "llm.prefill"
        assert (record.llm, record.hidden_size, record.prompt_tokens, record.decode_tokens) == (
            "tiny",
            32,
            7,
            3,
        )
        assert record.ttft["n"] == 3 and record.prefill["median"] > 0
        assert record.prefill == result.latency.stages["llm.prefill"]
        assert record.ratios["ttft"] == pytest.approx(record.ttft["median"] / base.ttft["median"])
        assert record.ratios["vision"] == pytest.approx(result.ratios.end_to_end)
        stage_sum = sum(stage["median"] for stage in result.latency.stages.values())
        assert record.llm_share == pytest.approx(record.prefill["median"] / stage_sum)
        assert record.decode_tokens_per_s["median"] > 0 and set(record.per_batch) == {"2", "1"}
        tokens = record.visual_tokens + 7
        assert record.prefill_gflops == pytest.approx(prefill_flops(tiny, tokens) / 1e9)
        assert result.gflops_stages["llm.prefill"] == pytest.approx(record.prefill_gflops)
        vision_stages = {k: v for k, v in result.gflops_stages.items() if k != "llm.prefill"}
        assert sum(vision_stages.values()) == pytest.approx(result.gflops, rel=1e-6)
        # projected: the measured vision time plus the target's prefill FLOPs at the measured rate
        (projection,) = record.projected.values()
        assert projection["projected"] is True and set(record.projected) == {"qwen2_5_1_5b"}
        expected = result.latency.end_to_end["median"] + prefill_flops(target, tokens, 2) / rate
        assert projection["ttft_ms"] == pytest.approx(expected)
        assert projection["ratio"] == pytest.approx(expected / base.projected["qwen2_5_1_5b"]["ttft_ms"])
    # the baseline against itself: every paired resample gives exactly 1
    assert base.ratios == {"ttft": 1.0, "vision": 1.0, "ttft_ci": [1.0, 1.0], "vision_ci": [1.0, 1.0]}
    for result in results.values():
        ratios = result.vlm.ratios
        for name in ("ttft", "vision"):
            low, high = ratios[f"{name}_ci"]
            assert low <= ratios[name] <= high, (name, ratios)


def test_the_language_model_must_take_the_pipelines_width(pipelines):
    vlm = VlmOptions(llm=llm_preset("tiny"))
    with pytest.raises(ValueError, match=r"pipeline clip_only emits 24-wide tokens but llm=tiny takes 32"):
        measure_latency(pipelines, LatencyOptions(**FAST), vlm=vlm)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_events_memory_and_streams(pipelines):
    options = LatencyOptions(device="cuda", streams=True, dtype="bf16", **FAST)
    results = measure_latency(pipelines, options)
    for result in results.values():
        assert result.memory.kind == "cuda max_memory_allocated"
        assert result.memory.peak_mb > 0
    with torch.inference_mode():
        images = torch.randint(0, 256, (2, 3, 50, 50), dtype=torch.uint8, device="cuda")
        from encoder_fusion.benchmarks.timing.pipeline import streamed_forward

        fused = pipelines["interleave"]
        streams = [torch.cuda.Stream() for _ in fused.encoders]
        torch.testing.assert_close(streamed_forward(fused, streams)(images), fused(images))


def test_a_deepstack_pipeline_times_its_extra_sets_and_feeds_them_to_the_prefill():
    torch.manual_seed(4)
    clip = build_encoder(tiny_spec("clip", layers=(1, -1)))
    connector = {"kind": "mlp", "depth": 2, "out_dim": 32}
    pipelines = {
        "clip_only": FusedEncoder([clip], connector=connector),
        "deepstack": FusedEncoder([clip], connector=connector, deepstack_layers={"clip": [1, -1]}),
    }
    vlm = VlmOptions(llm=llm_preset("tiny"), prompt_tokens=4, decode_tokens=2)
    seen = []
    original = LanguageModel.prefill_with_cache

    def spy(self, vlm, visual, extras=()):
        seen.append(len(extras))
        return original(self, vlm, visual, extras)

    LanguageModel.prefill_with_cache = spy
    try:
        results = measure_latency(pipelines, LatencyOptions(**FAST), vlm=vlm)
    finally:
        LanguageModel.prefill_with_cache = original
    assert "deepstack" in results["deepstack"].latency.stages
    assert "deepstack" not in results["clip_only"].latency.stages
    assert set(seen) == {0, 2}  # the DeepStack pipeline's prefills carry its two sets, the other none
    assert results["deepstack"].gflops_stages["deepstack"] > 0
