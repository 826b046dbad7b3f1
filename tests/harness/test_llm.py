"""The language-model stage: presets equal the published architectures, FLOPs match a hand count,
prefill and decode match transformers' own forward and generate, and bad settings fail early."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

import encoder_fusion.benchmarks.run.compare as compare
import encoder_fusion.benchmarks.timing.llm as llm
from encoder_fusion import FusedEncoder
from encoder_fusion.benchmarks.config.plan import (
    LLM_KEYS,
    VLM_KEYS,
    check_fits,
    keyed,
    llm_preset,
    llm_spec,
    strategies,
    vlm_options,
)
from encoder_fusion.benchmarks.run import run_benchmark
from encoder_fusion.benchmarks.timing.llm import LanguageModel, LlmSpec, VlmOptions, build_language_model
from encoder_fusion.benchmarks.timing.measure import gflops_per_image
from encoder_fusion.encoders.tiny import tiny_spec

CONF = Path(__file__).resolve().parents[2] / "conf"

# (hidden, layers, heads, kv heads, intermediate, vocab, tied embeddings) as published, and the
# parameter count of the released checkpoints (their model cards)
PUBLISHED = {
    "qwen2_5_0_5b": ((896, 24, 14, 2, 4864, 151936, True), 494_032_768),
    "qwen2_5_1_5b": ((1536, 28, 12, 2, 8960, 151936, True), 1_543_714_304),
    "qwen2_5_7b": ((3584, 28, 28, 4, 18944, 152064, False), 7_615_616_512),
    "llama3_8b": ((4096, 32, 32, 8, 14336, 128256, False), 8_030_261_248),
    "vicuna_7b": ((4096, 32, 32, 32, 11008, 32000, False), 6_738_415_616),
}


def make(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def shape(spec: LlmSpec) -> tuple:
    return (
        spec.hidden_size,
        spec.num_layers,
        spec.num_heads,
        spec.num_kv_heads,
        spec.intermediate_size,
        spec.vocab_size,
        spec.tie_embeddings,
    )


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_every_preset_is_the_published_architecture(name):
    numbers, params = PUBLISHED[name]
    composed = llm_spec(make(f"llm={name}").llm)
    assert composed == llm_preset(name) and composed.name == name
    assert shape(composed) == numbers
    config = composed.hf_config()
    hf_shape = (config.hidden_size, config.num_hidden_layers, config.num_attention_heads)
    assert (*hf_shape, config.num_key_value_heads, config.intermediate_size) == numbers[:5]
    assert llm.parameter_count(composed) == params


def test_defaults_per_job_and_the_connector_follows_the_hidden_size():
    assert make().llm.name == "qwen2_5_0_5b"
    assert make("bench=gpu").llm.name == "qwen2_5_7b"
    assert make("bench=gpu", "llm=vicuna_7b").llm.name == "vicuna_7b"  # the command line wins
    assert make("experiment=smoke").llm.name == "tiny"
    assert llm_spec(make("llm=none").llm) is None
    for overrides, width in (((), 896), (("llm=llama3_8b",), 4096), (("llm=none",), 256)):
        cfg = make(*overrides)
        assert {s.head["connector"]["out_dim"] for s in strategies(cfg)} == {width}
    # a width set by hand stands with no language model, and is refused where one cannot take it
    assert {s.head["connector"]["out_dim"] for s in strategies(make("llm=none", "connector.out_dim=96"))} == {
        96
    }
    with pytest.raises(
        ValueError, match=r"connector.out_dim=96 cannot feed llm=qwen2_5_0_5b \(hidden size 896\)"
    ):
        strategies(make("connector.out_dim=96"))


def hand_prefill_flops(spec: LlmSpec, tokens: int) -> int:
    """Multiply-adds x 2 of a Llama-shaped prefill: per layer the q, k, v and output projections and
    the three MLP matrices for every token, and the two attention products over all token pairs; then
    the vocabulary projection of the last token only."""
    head = spec.hidden_size // spec.num_heads
    q, kv = spec.num_heads * head, spec.num_kv_heads * head
    per_token = (
        spec.hidden_size * (q + 2 * kv) + q * spec.hidden_size + 3 * spec.hidden_size * spec.intermediate_size
    )
    attention = 2 * spec.num_heads * tokens * tokens * head
    return spec.num_layers * 2 * (tokens * per_token + attention) + 2 * spec.hidden_size * spec.vocab_size


def test_tiny_prefill_flops_grow_with_the_visual_tokens_as_counted_by_hand():
    spec = llm_preset("tiny")
    prompt, visual = 32, 49  # an odd visual count
    single, double = llm.prefill_flops(spec, visual + prompt), llm.prefill_flops(spec, 2 * visual + prompt)
    assert single == hand_prefill_flops(spec, visual + prompt)
    assert double - single == hand_prefill_flops(spec, 2 * visual + prompt) - hand_prefill_flops(
        spec, visual + prompt
    )
    assert llm.prefill_flops(spec, 10, batch=3) == 3 * llm.prefill_flops(spec, 10)
    # counted on the meta device, it is the count of a real prefill on the CPU
    model = build_language_model(spec, torch.device("cpu"), torch.float32, seed=0)
    embeds = torch.randn(1, 17, spec.hidden_size)
    with torch.inference_mode():
        real = gflops_per_image(lambda: model(inputs_embeds=embeds, use_cache=True, logits_to_keep=1))
    assert real * 1e9 == pytest.approx(llm.prefill_flops(spec, 17), rel=1e-12)


def tiny_language_model(prompt_tokens=5, decode_tokens=4, seed=3) -> LanguageModel:
    spec = llm_preset("tiny")
    model = build_language_model(spec, torch.device("cpu"), torch.float32, seed=seed)
    return LanguageModel(spec, model, prompt_tokens=prompt_tokens, decode_tokens=decode_tokens, seed=seed)


def tiny_vlm(language: LanguageModel):
    """The VLM the calls go through: a one-encoder fused encoder around the language model (the
    prefill and decode calls take precomputed visual tokens, so its encoder never runs)."""
    return language.vlm_for(FusedEncoder([tiny_spec("clip")], connector={"kind": "mlp", "out_dim": 32}))


def test_prefill_and_decode_match_the_model_run_without_cache_and_its_own_generate():
    language = tiny_language_model()
    vlm = tiny_vlm(language)
    visual = torch.randn(2, 7, 32, dtype=torch.float64).float()
    embeds = torch.cat([visual, language.model.get_input_embeddings()(language.prompt_ids(2))], dim=1)
    assert not (language.prompt_ids(2) == language.image_token_id).any()
    with torch.inference_mode():
        logits = language.prefill(vlm, visual)
        full = language.model(inputs_embeds=embeds, use_cache=False).logits[:, -1]
        torch.testing.assert_close(logits, full, rtol=1e-5, atol=1e-5)
        expected = language.model.generate(
            inputs_embeds=embeds, max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None
        )
        decode = language.decoder(vlm, visual)
        for _ in range(3):  # the cache is cut back after each call: every call decodes the same tokens
            generated = decode()
            assert torch.equal(
                torch.cat([logits.argmax(-1, keepdim=True), generated], dim=1), expected[:, -5:]
            )
    assert generated.shape == (2, 4)


def test_decode_of_zero_steps_and_a_prompt_of_zero_tokens():
    language = tiny_language_model(prompt_tokens=0, decode_tokens=0)
    vlm = tiny_vlm(language)
    with torch.inference_mode():
        assert language.prefill(vlm, torch.randn(1, 3, 32)).shape == (1, 512)
        assert language.decoder(vlm, torch.randn(1, 3, 32))().shape == (1, 0)


def test_a_model_too_big_for_memory_is_refused_before_anything_is_built(monkeypatch, tmp_path):
    monkeypatch.setattr(llm, "available_bytes", lambda device: 8 * 2**30)
    with pytest.raises(ValueError) as caught:
        check_fits(llm_preset("llama3_8b"), torch.float32, torch.device("cpu"))
    message = str(caught.value)
    assert "llm=llama3_8b does not fit: 8.03B parameters x 4 bytes (torch.float32) = 29.9 GiB" in message
    assert "8.0 GiB of cpu memory is available" in message and "bench.project_llms" in message
    check_fits(llm_preset("qwen2_5_0_5b"), torch.float32, torch.device("cpu"))  # 1.8 GiB fits
    with pytest.raises(ValueError, match="x 2 bytes"):  # bf16 halves it, still too big for 8 GiB
        check_fits(llm_preset("llama3_8b"), torch.bfloat16, torch.device("cpu"))

    def no_build(*args, **kwargs):
        raise AssertionError("an encoder or model was built before the memory check")

    monkeypatch.setattr(compare, "build_encoders", no_build)
    monkeypatch.setattr(llm, "build_language_model", no_build)
    with pytest.raises(ValueError, match="llm=llama3_8b does not fit"):
        run_benchmark(make("experiment=smoke", "llm=llama3_8b"), tmp_path)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("prompt_tokens", -1, r"bench.prompt_tokens=-1 must be an int >= 0"),
        ("decode_tokens", -2, r"bench.decode_tokens=-2 must be an int >= 0"),
        ("prompt_tokens", 1.5, r"bench.prompt_tokens=1.5 must be an int >= 0"),
    ],
)
def test_bad_token_counts_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=message), keyed(VLM_KEYS):  # named as the config keys
        VlmOptions(**{field: value})


def test_bad_presets_name_the_field_and_list_the_accepted():
    with pytest.raises(
        ValueError,
        match=r"bench.project_llms entry 'gpt5' is not a language-model preset; "
        r"accepted: llama3_8b, qwen2_5_0_5b, qwen2_5_1_5b, qwen2_5_7b, tiny, vicuna_7b",
    ):
        vlm_options(make("bench.project_llms=[qwen2_5_7b,gpt5]"))
    with pytest.raises(ValueError, match=r"bench.project_llms entry 'none' is not a language-model preset"):
        vlm_options(make("bench.project_llms=[none]"))
    with pytest.raises(ConfigCompositionException, match=r"llm/gpt5") as caught:
        make("llm=gpt5")
    assert "qwen2_5_0_5b" in str(caught.value.__cause__ or caught.value)  # Hydra lists the options
    family = r"llm.family='mamba' is unknown; accepted: qwen2, llama"
    with pytest.raises(ValueError, match=family), keyed(LLM_KEYS):
        dataclasses.replace(llm_preset("tiny"), family="mamba")
    with (
        pytest.raises(
            ValueError, match=r"llm.hidden_size=30 \(model tiny\) must be divisible by llm.num_heads=4"
        ),
        keyed(LLM_KEYS),
    ):
        dataclasses.replace(llm_preset("tiny"), hidden_size=30)
    with pytest.raises(ValueError, match=r"llm='custom' leaves \['vocab_size'\] unset"):
        llm_spec(make("llm=tiny", "llm.name=custom", "llm.vocab_size=null").llm)


def test_deepstack_sets_are_added_after_the_first_layers_at_the_visual_positions():
    """Layer 1's input with DeepStack is layer 0's output without it plus set 0, at the visual
    positions only; a set of zeros changes nothing; more sets than layers are refused."""
    language = tiny_language_model(prompt_tokens=3)
    vlm = tiny_vlm(language)
    generator = torch.Generator().manual_seed(8)
    visual = torch.randn(2, 5, 32, generator=generator)
    extras = [torch.randn(2, 5, 32, generator=generator) for _ in range(2)]
    outputs, inputs = {}, {}

    def output_of(module, args, output):
        outputs[module] = (output[0] if isinstance(output, tuple) else output).clone()

    def input_of(module, args, kwargs):
        inputs[module] = (args[0] if args else kwargs["hidden_states"]).clone()

    first, second = language.model.model.layers[0], language.model.model.layers[1]
    hooks = [
        first.register_forward_hook(output_of),
        second.register_forward_pre_hook(input_of, with_kwargs=True),
    ]
    with torch.inference_mode():
        plain = language.prefill(vlm, visual)
        expected = outputs[first].clone()
        stacked = language.prefill(vlm, visual, extras)
        received = inputs[second]
        zeros = language.prefill(vlm, visual, [torch.zeros_like(e) for e in extras])
    for hook in hooks:
        hook.remove()
    shift = torch.zeros(2, 8, 32)
    shift[:, :5] = extras[0]
    torch.testing.assert_close(received, expected + shift)  # the prompt's positions are untouched
    assert not torch.allclose(stacked, plain)
    torch.testing.assert_close(zeros, plain)
    with pytest.raises(
        ValueError, match=r"5 DeepStack token sets need as many decoder layers, but the language model has 4"
    ):
        language.prefill(vlm, visual, [torch.zeros(2, 5, 32)] * 5)
    with pytest.raises(
        ValueError, match=r"gives 5 DeepStack token sets, one per decoder layer, but llm=tiny has 4"
    ):
        vlm_options(make("experiment=smoke", "fusion=deepstack", "fusion.deepstack_layers.clip=[0,1,2,3,4]"))


def test_time_to_first_token_is_one_forward_of_the_vlm_a_user_runs(monkeypatch):
    """Pipeline.ttft calls the encoder_fusion.hf VLM once on the raw images, and its logits are the
    language model's, fed the fused tokens and the prompt by hand."""
    from encoder_fusion.benchmarks.timing.options import LatencyOptions
    from encoder_fusion.benchmarks.timing.pipeline import Pipeline
    from encoder_fusion.hf import FusedLlavaForConditionalGeneration

    language = tiny_language_model(prompt_tokens=4)
    fused = FusedEncoder(
        [tiny_spec("clip"), tiny_spec("dino")], connector={"kind": "mlp", "out_dim": 32}
    ).eval()
    pipeline = Pipeline.build("two", fused, LatencyOptions(device="cpu"), language)
    assert isinstance(pipeline.vlm, FusedLlavaForConditionalGeneration) and pipeline.vlm.fused is fused
    calls = []
    forward = FusedLlavaForConditionalGeneration.forward

    def spy(self, *args, **kwargs):
        calls.append(sorted(key for key, value in kwargs.items() if value is not None))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(FusedLlavaForConditionalGeneration, "forward", spy)
    images = torch.rand(2, 3, 50, 60, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        logits = pipeline.ttft(images)
        embeds = torch.cat(
            [fused(images), language.model.get_input_embeddings()(language.prompt_ids(2))], dim=1
        )
        expected = language.model(inputs_embeds=embeds).logits[:, -1]
    assert calls == [["input_ids", "logits_to_keep", "pixel_values", "use_cache"]]
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
