"""Configuration values as plain Python: OmegaConf nodes and Enums turned into the dicts, lists and
strings that validation, comparison and JSON expect, wherever a value may arrive from Hydra."""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf


def plain(value: Any) -> Any:
    """An OmegaConf node as plain Python containers (interpolations resolved, Enums of a structured
    config as their names), an Enum as its name, anything else unchanged."""
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True, enum_to_str=True)
    return value.name if isinstance(value, Enum) else value


def json_ready(value: Any) -> Any:
    """Tuples to lists, recursively, so a config survives a JSON round trip unchanged."""
    if isinstance(value, Mapping):
        return {key: json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(item) for item in value]
    return value
