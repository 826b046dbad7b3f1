"""The trained part of a fused encoder on the Hub's terms: ``save_pretrained`` / ``from_pretrained`` /
``push_to_hub`` through huggingface_hub's :class:`~huggingface_hub.PyTorchModelHubMixin`, with a
model card.

A folder (or Hub repository) holds:

* ``model.safetensors``: :meth:`FusedEncoder.save_trained`'s file (the head, and the encoders when
  they train), so loading keeps its guarantees: all or nothing, the checksum, a strict load, and a
  clear error for a file of another config;
* ``config.json``: :attr:`FusedEncoder.config`, from which the model is rebuilt (the frozen encoders
  load their weights from their own names, as when the model was first built), and under
  ``encoder_weights`` whether each encoder held pretrained or random weights when saved;
* ``README.md``: the model card (encoders, hooks, strategy, tokens, and a run's verdict when given).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Protocol

from huggingface_hub import ModelCard, hf_hub_download

from encoder_fusion.io import write_json


class _FusedEncoder(Protocol):
    """What this module reads of an :class:`encoder_fusion.FusedEncoder` (which imports it)."""

    head: Any

    @property
    def config(self) -> dict[str, Any]: ...
    def save_trained(self, path: str | os.PathLike) -> Path: ...
    def weights_status(self) -> dict[str, str]: ...
    def output_tokens(self, image_size: Any = None) -> int: ...
    @property
    def image_size(self) -> tuple[int, int]: ...


WEIGHTS_NAME = "model.safetensors"
STATUS_KEY = "encoder_weights"  # config.json's record of each encoder's weights when saved
CONFIG_NAME = "config.json"
LIBRARY = "encoder-fusion"
TAGS = ["encoder-fusion", "vision-language-model", "multi-encoder-fusion"]


def save_folder(model: _FusedEncoder, folder: Path) -> None:
    """Write ``model``'s trained tensors and config into ``folder`` (the card is the mixin's job)."""
    model.save_trained(folder / WEIGHTS_NAME)
    write_json(folder / CONFIG_NAME, {**model.config, STATUS_KEY: model.weights_status()})


def weights_file(model_id: str, **download: Any) -> Path:
    """The trained tensors of a folder or Hub repository ``model_id``.

    Raises:
        FileNotFoundError: a folder without them, naming it.
    """
    if os.path.isdir(model_id):
        path = Path(model_id) / WEIGHTS_NAME
        if not path.is_file():
            raise FileNotFoundError(
                f"{model_id} holds no {WEIGHTS_NAME}; accepted: a folder written by "
                "FusedEncoder.save_pretrained"
            )
        return path
    return Path(hf_hub_download(repo_id=model_id, filename=WEIGHTS_NAME, **download))


def fused_config(model_id: str, config: dict[str, Any]) -> dict[str, Any]:
    """The :meth:`FusedEncoder.from_config` fields of a folder's ``config.json``; warns when an
    encoder was saved on random weights (rebuilt, it gets new random ones, so its tokens differ).

    Raises:
        ValueError: a folder of another kind (a transformers model's, say), naming what it holds.
    """
    if "encoders" not in config:
        kind = config.get("model_type") or config.get("architectures") or sorted(config)
        raise ValueError(
            f"{model_id} is not a saved FusedEncoder: its config.json has no 'encoders' (it holds {kind!r}); "
            "accepted: a folder or repository written by FusedEncoder.save_pretrained (a VLM folder of "
            "encoder_fusion.hf loads with AutoModelForImageTextToText)"
        )
    status = config.get(STATUS_KEY) or {}
    random = sorted(name for name, weights in status.items() if weights == "random")
    if random:
        warnings.warn(
            f"{model_id}: encoder(s) {', '.join(random)} were saved on random weights; rebuilt, they get new "
            "random weights, so the loaded model's tokens differ from the saved one's",
            stacklevel=3,
        )
    return {key: value for key, value in config.items() if key != STATUS_KEY}


def model_card(model: _FusedEncoder, verdict: str | None = None) -> ModelCard:
    """The card of ``model``: its encoders, hooks, strategy and tokens, and ``verdict`` (a benchmark
    run's, for a file that comes from one)."""
    config = model.config
    rows = [
        f"| {spec['name']} | {spec['source']} | `{spec['model']}` | {spec['weights']} | "
        f"{spec['hooks']['layers']} | {model.weights_status()[spec['name']]} |"
        for spec in config["encoders"]
    ]
    strategy = ", ".join(
        f"{key}: `{config[key]['kind'] if isinstance(config[key], dict) else config[key]}`"
        for key in ("align", "layer_merge", "encoder_merge", "connector")
    )
    tags = "\n".join(f"- {tag}" for tag in TAGS)
    text = "\n".join(
        [
            "---",
            f"library_name: {LIBRARY}",
            "tags:",
            tags,
            "---",
            "",
            "# Fused vision encoder: trained fusion head",
            "",
            "The trained part (alignment, layer combine, encoder merge, connector) of an encoder-fusion "
            "`FusedEncoder`. The frozen encoders are not in this repository: they load from the names below.",
            "",
            "| encoder | source | model | weights | hooked layers | weights when saved |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
            f"Strategy: {strategy}; grid {config['grid']}; "
            f"DeepStack sets: {config['deepstack_layers'] or 'none'}.",
            f"Tokens per image: {model.output_tokens(model.image_size)} at {model.image_size[0]}x"
            f"{model.image_size[1]} pixels, each {model.head.out_dim} wide.",
            "",
            f"Benchmark verdict: {verdict}"
            if verdict
            else "No benchmark verdict was recorded with this file.",
            "",
            "```python",
            "from encoder_fusion import FusedEncoder",
            "",
            'model = FusedEncoder.from_pretrained("THIS_FOLDER_OR_REPO")',
            "tokens = model(images)  # (B, tokens, width)",
            "```",
            "",
        ]
    )
    return ModelCard(text)
