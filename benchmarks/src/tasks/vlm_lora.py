"""Optional LoRA adapters on the VLM probe's language model (``task.vlm.lora``), for a run closer to
stage 2 (LLaVA's instruction tuning with LoRA) than the frozen stage 1; off by default.

The adapters go into the one language model every strategy shares, once, through peft's
``inject_adapter_in_model``; every fresh head (each strategy, each seed) resets them to LoRA's
start (B = 0, so the model starts as the frozen one; A drawn from the seeded generator), so no
strategy learns from another's training.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math

from torch import nn

from encoder_fusion.benchmarks.options import OptionError, is_int

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclasses.dataclass(frozen=True)
class LoraOptions:
    """LoRA on the language model (config ``task.vlm.lora``).

    Args:
        rank: the adapters' rank; 0 (the default) trains no adapter.
        alpha: LoRA's scale numerator (the update is scaled by alpha / rank).
        dropout: dropout on the adapters' input while training.
        target_modules: names of the language model's linear layers that get adapters.

    Raises:
        OptionError: naming the field, the value and what is accepted; a rank > 0 without peft
            installed.
    """

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ATTENTION_PROJECTIONS

    def __post_init__(self) -> None:
        if not is_int(self.rank) or self.rank < 0:
            raise OptionError("{rank} must be an int >= 0 (0: no LoRA)", {"rank": self.rank})
        alpha = self.alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < math.inf:
            raise OptionError("{alpha} must be a finite number > 0", {"alpha": alpha})
        dropout = self.dropout
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise OptionError("{dropout} must be a number in [0, 1)", {"dropout": dropout})
        targets = self.target_modules
        targets = [targets] if isinstance(targets, str) else list(targets)
        if not targets or not all(isinstance(name, str) and name for name in targets):
            raise OptionError(
                "{target_modules} must be a non-empty list of module names, e.g. "
                + ", ".join(ATTENTION_PROJECTIONS),
                {"target_modules": self.target_modules},
            )
        object.__setattr__(self, "target_modules", tuple(targets))
        if self.rank and importlib.util.find_spec("peft") is None:
            raise OptionError(
                "{rank} > 0 asks for LoRA adapters, which need peft, and peft is not installed; accepted: "
                "pip install 'encoder-fusion[lora]' (or pip install peft), or rank 0",
                {"rank": self.rank},
            )

    @property
    def enabled(self) -> bool:
        """Whether any adapter trains (rank > 0)."""
        return self.rank > 0


def linear_layer_names(model: nn.Module) -> list[str]:
    """The last name part of every linear layer of ``model`` (what ``target_modules`` matches), sorted."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})


def fresh_lora(language_model: nn.Module, options: LoraOptions) -> list[nn.Parameter]:
    """LoRA adapters on ``language_model``'s target modules, injected on the first call, reset to
    LoRA's start on every call (A from the global generator), trainable; returns their parameters.

    Raises:
        ValueError: no module of the language model matches ``target_modules``.
    """
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    layers = [m for m in language_model.modules() if isinstance(m, LoraLayer)]
    if not layers:
        config = LoraConfig(
            r=options.rank,
            lora_alpha=options.alpha,  # type: ignore[arg-type]  # peft scales by alpha / r: a float works
            lora_dropout=options.dropout,
            target_modules=list(options.target_modules),
        )
        try:
            inject_adapter_in_model(config, language_model)
        except ValueError as error:  # peft: "Target modules ... not found in the base model"
            raise ValueError(
                f"task.vlm.lora.target_modules={list(options.target_modules)} match no module of the "
                f"language model; accepted: names of its linear layers: "
                + ", ".join(linear_layer_names(language_model))
            ) from error
        layers = [m for m in language_model.modules() if isinstance(m, LoraLayer)]
    for layer in layers:
        layer.reset_lora_parameters("default", True)
    parameters = [p for name, p in language_model.named_parameters() if "lora_" in name]
    for parameter in parameters:
        parameter.requires_grad_(True)
    return parameters
