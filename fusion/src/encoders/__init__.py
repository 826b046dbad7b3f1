"""Vision encoders from timm, open_clip and transformers behind one interface.

``build_encoder(spec)`` picks the adapter registered for ``spec.source``. Adapters are imported on
first use, so importing :mod:`fusion` does not import every source library.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

from encoder_fusion.encoders.base import SOURCES, Encoder, EncoderSpec, LayerInfo, LayerTokens, Preprocessing
from encoder_fusion.encoders.weights import looks_like_path

# source library -> "module:builder"; each builder takes an EncoderSpec and returns an Encoder
ADAPTERS: dict[str, str] = {
    "timm": "encoder_fusion.encoders.timm_adapter:build_timm_encoder",
    "open_clip": "encoder_fusion.encoders.open_clip_adapter:build_open_clip_encoder",
    "transformers": "encoder_fusion.encoders.transformers_adapter:build_transformers_encoder",
}
assert set(ADAPTERS) == set(SOURCES), "every source named in base.SOURCES needs an adapter"


def adapter_for(source: str) -> Callable[[EncoderSpec], Encoder]:
    """The builder registered for ``source``.

    Raises:
        ValueError: no adapter for ``source``.
    """
    if source not in ADAPTERS:
        raise ValueError(f"EncoderSpec.source={source!r} is unknown; accepted: {', '.join(ADAPTERS)}")
    module_name, builder = ADAPTERS[source].split(":")
    return getattr(importlib.import_module(module_name), builder)


def build_encoder(spec: EncoderSpec | dict) -> Encoder:
    """Build the frozen, eval-mode encoder that ``spec`` names, with its weights loaded offline first.

    Args:
        spec: an :class:`EncoderSpec` or a mapping of its fields.

    Returns:
        An :class:`Encoder`; ``encoder.weights_loaded`` says ``"pretrained"`` or ``"random"``.

    Raises:
        ValueError: unknown source or model, layer index out of range, a checkpoint that does not fit.
        FileNotFoundError: a model or weights path where nothing is, or no weights with
            ``on_missing="error"``.
    """
    spec = EncoderSpec.from_any(spec)
    folder = Path(spec.model).expanduser()
    if looks_like_path(spec.model) and not folder.exists():
        # a path is never a model name: say so, rather than look it up on a hub
        raise FileNotFoundError(
            f"EncoderSpec.model={spec.model!r} of encoder {spec.name!r} is a local path, and there is no "
            f"folder at {folder.resolve()}; accepted: an existing model folder (source='transformers') or "
            f"a model name of source={spec.source!r}"
        )
    return adapter_for(spec.source)(spec)


__all__ = [
    "ADAPTERS",
    "Encoder",
    "EncoderSpec",
    "LayerInfo",
    "LayerTokens",
    "Preprocessing",
    "adapter_for",
    "build_encoder",
]
