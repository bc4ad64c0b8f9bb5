"""Run configuration: strict typed records, the shipped YAML presets and their loader."""

from __future__ import annotations

from lipdeq.configs.loader import ConfigError, list_presets, load_config, model_preset, parse_override
from lipdeq.configs.schema import DataConfig, RunConfig, TrainConfig

__all__ = [
    "ConfigError",
    "DataConfig",
    "RunConfig",
    "TrainConfig",
    "list_presets",
    "load_config",
    "model_preset",
    "parse_override",
]
