"""Model registry: ``create_model(name, **overrides)`` over the shipped presets (``lipdeq.presets``)."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from lipdeq.models.config import ModelConfig
from lipdeq.models.mdeq import MultiscaleDEQ
from lipdeq.presets import ConfigError, list_presets, read_preset


def list_models() -> list[str]:
    """Names of the registered model presets (one per shipped YAML preset)."""
    return list_presets()


def model_config(name: str, **overrides: Any) -> ModelConfig:
    """The validated :class:`ModelConfig` of preset ``name`` with ``overrides`` applied.

    Raises:
        ConfigError: unknown preset name, unknown override key or wrong value type (a
            ``ValueError`` too, as before).
    """
    names = list_models()
    if name not in names:
        raise ConfigError(f"unknown model {name!r}; registered models: {', '.join(names)}")
    section = read_preset(name).get("model")
    if not isinstance(section, dict):
        raise ConfigError(f"preset {name!r} has no 'model:' mapping")
    unknown = sorted(set(overrides) - set(ModelConfig.model_fields))
    if unknown:
        raise ConfigError(f"unknown model option(s) {unknown} for {name!r}; known: {sorted(ModelConfig.model_fields)}")
    fields = {**section, "name": name, **overrides}
    try:
        return ModelConfig.model_validate(fields)
    except ValidationError as err:
        raise ConfigError(f"invalid configuration for model {name!r}: {err}") from None


def create_model(name: str, **overrides: Any) -> MultiscaleDEQ:
    """Build the model of preset ``name`` (see :func:`list_models`), e.g.
    ``create_model("lipmdeq_tiny", dropout=0.0)``."""
    return MultiscaleDEQ(model_config(name, **overrides))
