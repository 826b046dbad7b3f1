"""How to measure: :class:`LatencyOptions`, checked by its own field names (the config layer maps
them to ``bench.latency.*``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from encoder_fusion.benchmarks.options import OptionError, check_int, check_resamples, is_int

DTYPES = {"fp32": None, "bf16": torch.bfloat16}


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
        :func:`encoder_fusion.benchmarks.reports.stats.ratio_ci`).
        target_halfwidth: keep the round robin going, past ``repeats``, until every pipeline's
            overhead interval (TTFT with a language model, else the vision pipeline's) is within
            this share of the ratio either side (0.03: +-3 %); None stops at ``repeats``.
        max_repeats: the most rounds ``target_halfwidth`` may take; a run that reaches it first is
            marked unstable (:mod:`encoder_fusion.benchmarks.timing.stability`).

    Raises:
        OptionError: naming the field, the value and what is accepted.
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
    target_halfwidth: float | None = 0.03
    max_repeats: int = 50

    def __post_init__(self) -> None:
        check_resamples(self.ci_resamples)
        target = self.target_halfwidth
        if target is not None and (
            isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 < target < 1
        ):
            raise OptionError(
                "{target_halfwidth} must be null (stop at repeats) or a share in (0, 1), e.g. 0.03 for +-3 %",
                {"target_halfwidth": target},
            )
        check_int("max_repeats", self.max_repeats, 1)
        if self.max_repeats < self.repeats:
            raise OptionError(
                "{max_repeats} must be >= {repeats}",
                {"max_repeats": self.max_repeats, "repeats": self.repeats},
            )
        sizes = self.batch_sizes
        if isinstance(sizes, int) or not isinstance(sizes, Sequence) or not sizes:
            raise OptionError("{batch_sizes} must be a non-empty list of ints >= 1", {"batch_sizes": sizes})
        object.__setattr__(self, "batch_sizes", tuple(sizes))
        for size in self.batch_sizes:
            check_int("batch_sizes", size, 1)
        check_int("warmup", self.warmup, 0)
        check_int("repeats", self.repeats, 1)
        check_int("image_size", self.image_size, 1)
        if self.threads is not None and (not is_int(self.threads) or self.threads < 1):
            raise OptionError(
                "{threads} must be null (keep torch's count) or an int >= 1", {"threads": self.threads}
            )
        if self.dtype not in DTYPES:
            raise OptionError(f"{{dtype}} is unknown; accepted: {', '.join(DTYPES)}", {"dtype": self.dtype})
        try:
            device = torch.device(self.device)
        except RuntimeError as error:
            raise OptionError(f"{{device}} is not a device: {error}", {"device": self.device}) from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise OptionError("{device} but CUDA is not available; accepted: cpu", {"device": self.device})
        if self.streams and device.type != "cuda":
            raise OptionError(
                "{streams} needs a CUDA device, got {device}", {"streams": True, "device": self.device}
            )
