"""One pipeline's stages as callables, each timed on the previous stage's output: every encoder's
preprocess and blocks, the fuse (align + combine + merge), the connector, DeepStack's extra sets and,
with a language model, its prefill."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from encoder_fusion import FusedEncoder
from encoder_fusion.benchmarks.timing.llm import LanguageModel
from encoder_fusion.benchmarks.timing.options import LatencyOptions
from encoder_fusion.benchmarks.timing.timer import compile_wrapper

if TYPE_CHECKING:
    from encoder_fusion.hf import FusedLlavaForConditionalGeneration


def fuse_stage(head: nn.Module) -> nn.Module:
    """``head`` without its connector: the same object graph (shared parameters), with the connector
    swapped for the identity, so the head's own forward runs align + combine + merge only."""
    stage = copy.copy(head)
    stage._modules = {**head._modules, "connector": nn.Identity()}
    return stage


def streamed_forward(fused: FusedEncoder, streams: Sequence[torch.cuda.Stream]) -> Callable:
    """``fused.forward_deepstack`` with each encoder's preprocess and blocks on its own CUDA stream."""
    encoders = fused.encoder_list

    def forward(images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        main = torch.cuda.current_stream()
        grids = []
        for encoder, stream in zip(encoders, streams):
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
    vlm: FusedLlavaForConditionalGeneration | None = None  # the language model's VLM of ``fused``
    streamed: bool = False  # each encoder on its own CUDA stream (end_to_end runs them so)

    @classmethod
    def build(
        cls, name: str, fused: FusedEncoder, options: LatencyOptions, language: LanguageModel | None = None
    ) -> Pipeline:
        """Stage callables of ``fused`` under ``options`` (autocast, compile, streams), with the
        language model's prefill as the last stage when ``language`` is given."""
        device = torch.device(options.device)
        fused = fused.to(device).eval()
        wrap = compile_wrapper(options.compile, options.compile_backend)
        head, encoders = fused.head, fused.encoder_list
        if fused.tiler is not None:  # the tiles' passes are one stage: cutting, every encoder, the head
            end_to_end = wrap(fused.forward_deepstack)
            stages = {"vision": end_to_end}
            vlm = None
            if language is not None:
                vlm = language.vlm_for(fused)
                stages["llm.prefill"] = functools.partial(language.prefill, vlm)
            return cls(name, fused, stages, end_to_end, language, vlm, False)
        stages: dict[str, Callable] = {
            "preprocess": wrap(lambda images: [e.preprocess(images) for e in encoders]),
        }
        for encoder in encoders:
            stages[f"encoder.{encoder.spec.name}"] = wrap(encoder.forward_grids)
        if isinstance(getattr(head, "connector", None), nn.Module):
            stages["fuse"] = wrap(fuse_stage(head))
            stages["connector"] = wrap(head.connector)
        else:
            stages["head"] = wrap(head)
        if head.deepstack.entries:
            stages["deepstack"] = wrap(head.deepstack)
        streamed = bool(options.streams and len(fused.encoders) > 1)
        if streamed:
            end_to_end = wrap(streamed_forward(fused, [torch.cuda.Stream(device) for _ in fused.encoders]))
        else:
            end_to_end = wrap(fused.forward_deepstack)
        vlm = None
        if language is not None:
            vlm = language.vlm_for(fused)
            stages["llm.prefill"] = functools.partial(language.prefill, vlm)
        return cls(name, fused, stages, end_to_end, language, vlm, streamed)

    def ttft(self, images: torch.Tensor) -> torch.Tensor:
        """Raw images in, the first token's logits out: one forward of the VLM (its vision tower,
        connector and prefill; the encoders on their own CUDA streams when the pipeline has them).

        Raises:
            ValueError: a pipeline built without a language model.
        """
        if self.language is None or self.vlm is None:
            raise ValueError(f"pipeline {self.name} has no language model to time the first token with")
        return self.language.first_token(self.vlm, images, self.end_to_end if self.streamed else None)

    def decoder(self, tokens: torch.Tensor, extras: Sequence[torch.Tensor]) -> Callable[[], torch.Tensor]:
        """The language model's decode call after prefilling ``tokens`` (see ``LanguageModel.decoder``).

        Raises:
            ValueError: a pipeline built without a language model.
        """
        if self.language is None or self.vlm is None:
            raise ValueError(f"pipeline {self.name} has no language model to decode with")
        return self.language.decoder(self.vlm, tokens, extras)

    def stage_inputs(self, images: torch.Tensor) -> dict[str, tuple]:
        """Each stage's positional arguments, computed once by running the stages in order."""
        if "vision" in self.stages:  # a tiled pipeline (see build)
            tokens, extras = self.stages["vision"](images)
            inputs = {"vision": (images,)}
            return inputs | ({"llm.prefill": (tokens, extras)} if self.language is not None else {})
        inputs: dict[str, tuple] = {"preprocess": (images,)}
        pixels = self.stages["preprocess"](images)
        grids = []
        for encoder, encoder_pixels in zip(self.fused.encoder_list, pixels):
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
