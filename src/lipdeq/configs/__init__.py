"""Run configuration: strict typed records and their loader (presets, user files, overrides).

Layering: ``lipdeq.presets`` (the YAML data) < ``lipdeq.models.config`` < this package; nothing
below imports back, so any import order works.
"""

from __future__ import annotations

from lipdeq.configs.loader import (
    RETIRED_KEYS,
    ConfigError,
    config_from_dict,
    drop_retired_keys,
    list_presets,
    load_config,
    model_preset,
    parse_override,
)
from lipdeq.configs.schema import DataConfig, RunConfig, TrainConfig

__all__ = [
    "RETIRED_KEYS",
    "ConfigError",
    "config_from_dict",
    "drop_retired_keys",
    "DataConfig",
    "RunConfig",
    "TrainConfig",
    "list_presets",
    "load_config",
    "model_preset",
    "parse_override",
]
