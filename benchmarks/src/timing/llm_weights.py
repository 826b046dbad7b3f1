"""A language model's own checkpoint (``llm.weights``): a local ``transformers`` folder or a hub repo id.

Latency does not depend on weight values, so the presets build their architecture with random
weights. The VLM probe's accuracy does: given ``llm.weights``, the model loads its checkpoint (and
the probe asks its questions through the checkpoint's tokenizer). The checkpoint must be the model
the preset describes; a mismatch is named field by field at start, before any image is read, so
``llm=qwen2_5_0_5b llm.weights=/models/Qwen2.5-1.5B`` does not measure one model and report another.

Resolution is offline first, as for the encoders: an existing folder, then the hub's local cache,
then the hub (unless ``HF_HUB_OFFLINE``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from encoder_fusion.benchmarks.options import OptionError
from encoder_fusion.encoders.weights import hub_offline, local_weights_path

if TYPE_CHECKING:
    from encoder_fusion.benchmarks.timing.llm import LlmSpec

# LlmSpec field -> the key of a transformers config.json that holds it
CONFIG_KEYS = {
    "hidden_size": "hidden_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
    "intermediate_size": "intermediate_size",
    "vocab_size": "vocab_size",
    "tie_embeddings": "tie_word_embeddings",
}
# the files that make a folder a model's, and those a tokenizer saves (any one is enough)
MODEL_FILES = ("config.json", "*.safetensors", "*.bin", "*.json", "*.model", "*.txt")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def checkpoint_folder(weights: object) -> Path:
    """The local folder ``weights`` names: a folder holding ``config.json``, or a hub repo id found
    in the local cache or (online) downloaded.

    Raises:
        OptionError: ``weights`` not a non-empty string.
        FileNotFoundError: nothing there, a folder without ``config.json``, or a repo id not found.
    """
    if not isinstance(weights, str) or not weights.strip():
        raise OptionError(
            "{weights} must name a checkpoint: a local folder of a transformers model or a hub repo id "
            "(null: random weights)",
            {"weights": weights},
        )
    path = local_weights_path(weights)
    if path is None:
        path = hub_snapshot(weights)
    if not (path.is_dir() and (path / "config.json").is_file()):
        raise FileNotFoundError(
            f"llm.weights={weights!r}: {path} is not a transformers model folder (no config.json); accepted: "
            "a folder saved by save_pretrained, or a hub repo id"
        )
    return path


def hub_snapshot(repo_id: str) -> Path:
    """The local snapshot of hub repo ``repo_id``: the cache first, then a download unless offline."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception as cached_error:  # not in the cache (or not a repo id at all)
        if hub_offline():
            raise FileNotFoundError(
                f"llm.weights={repo_id!r} is neither a local folder nor in the hub's local cache, and "
                "the hub is offline; accepted: a local folder of the model, or a cached repo id"
            ) from cached_error
    try:
        return Path(snapshot_download(repo_id, allow_patterns=list(MODEL_FILES)))
    except Exception as error:
        raise FileNotFoundError(
            f"llm.weights={repo_id!r} is neither a local folder nor a hub repo that could be fetched "
            f"({type(error).__name__}); accepted: a local folder of the model, or a hub repo id"
        ) from error


def check_checkpoint(spec: LlmSpec) -> Path:
    """The checkpoint folder of ``spec.weights``, its ``config.json`` checked against the preset.

    Raises:
        OptionError, FileNotFoundError: as :func:`checkpoint_folder`.
        ValueError: another architecture family, or a shape field that differs, each named.
    """
    folder = checkpoint_folder(spec.weights)
    try:
        config = json.loads((folder / "config.json").read_text())
    except ValueError as error:
        raise ValueError(f"llm.weights: {folder / 'config.json'} is not JSON ({error})") from error
    found = config.get("model_type")
    if found != spec.family:
        raise ValueError(
            f"llm.weights={spec.weights!r} holds a {found!r} model, but llm={spec.name} is a {spec.family!r} "
            "model; accepted: the llm preset of that checkpoint's architecture"
        )
    differ = [
        f"{field} {getattr(spec, field)} in llm={spec.name} vs {config.get(key)} in the checkpoint"
        for field, key in CONFIG_KEYS.items()
        if key in config and config[key] != getattr(spec, field)
    ]
    if differ:
        raise ValueError(
            f"llm.weights={spec.weights!r} is not the model llm={spec.name} describes: {'; '.join(differ)}; "
            "accepted: the llm preset of that checkpoint (or its numbers set by llm.<field>=...)"
        )
    return folder


def has_tokenizer(folder: Path) -> bool:
    """Whether ``folder`` holds a saved tokenizer."""
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(spec: LlmSpec) -> Any | None:
    """The tokenizer saved with ``spec.weights``; None for random weights (no checkpoint).

    Raises:
        FileNotFoundError: a checkpoint folder without a tokenizer.
    """
    if spec.weights is None:
        return None
    from transformers import AutoTokenizer

    folder = checkpoint_folder(spec.weights)
    if not has_tokenizer(folder):
        raise FileNotFoundError(
            f"llm.weights={spec.weights!r} ({folder}) holds no tokenizer (looked for "
            f"{', '.join(TOKENIZER_FILES)}), which the vlm probe asks its questions with; accepted: a "
            "folder saved with its tokenizer (tokenizer.save_pretrained)"
        )
    return AutoTokenizer.from_pretrained(folder)
