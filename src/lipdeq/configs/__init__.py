"""Run configuration: strict typed records, the shipped YAML presets and their loader.

Import order matters: ``loader`` (no lipdeq imports at module level) comes before ``schema`` (which
imports lipdeq.models, whose registry imports ``list_presets`` / ``model_preset`` from here).
"""

from __future__ import annotations

from lipdeq.configs.loader import (
    ConfigError,
    config_from_dict,
    list_presets,
    load_config,
    model_preset,
    parse_override,
)
from lipdeq.configs.schema import DataConfig, RunConfig, TrainConfig

__all__ = [
    "ConfigError",
    "config_from_dict",
    "DataConfig",
    "RunConfig",
    "TrainConfig",
    "list_presets",
    "load_config",
    "model_preset",
    "parse_override",
]
