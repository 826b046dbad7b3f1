"""FLOPs and parameters of a pipeline: GFLOPs per image counted by ``FlopCounterMode`` (a multiply-add
counts as two; the CPU attention kernel counted like the CUDA ones), per stage and end to end."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from encoder_fusion.benchmarks.reports.records import ParamCounts
from encoder_fusion.benchmarks.timing.llm import prefill_flops
from encoder_fusion.benchmarks.timing.pipeline import Pipeline
from encoder_fusion.benchmarks.timing.timer import Binder


def parameter_counts(module: nn.Module) -> ParamCounts:
    """Total and trainable (``requires_grad``) parameter counts; shared tensors counted once."""
    unique = {id(p): p for p in module.parameters()}.values()
    return ParamCounts(
        total=sum(p.numel() for p in unique), trainable=sum(p.numel() for p in unique if p.requires_grad)
    )


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


def stage_gflops(pipeline: Pipeline, bind: Binder, one_image: torch.Tensor, prompt_tokens: int) -> dict:
    """GFLOPs of every stage on one image; the prefill's are counted on the model built on the meta
    device (:func:`encoder_fusion.benchmarks.timing.llm.prefill_flops`), which is the same count without
    a second prefill."""
    inputs = bind(pipeline.stage_inputs, one_image)()
    counts = {}
    for stage, fn in pipeline.stages.items():
        if stage == "llm.prefill":
            # Pipeline.build adds this stage only together with the language model it runs
            assert pipeline.language is not None
            tokens = pipeline.fused.output_tokens(tuple(one_image.shape[-2:])) + prompt_tokens
            counts[stage] = prefill_flops(pipeline.language.spec, tokens) / 1e9
        else:
            counts[stage] = gflops_per_image(bind(fn, *inputs[stage]))
    return counts
