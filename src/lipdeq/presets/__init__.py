"""The shipped presets (the papers' reference configurations) as data: one YAML file per preset, and a reader.

This package is the bottom of the configuration stack: it imports nothing from lipdeq above it, so
``lipdeq.models`` (the registry builds models from presets) and ``lipdeq.configs`` (run
configurations start from presets) can both read it without importing each other.
"""

from __future__ import annotations

import copy
import functools
from importlib import resources
from typing import Any

from lipdeq.presets.strict_yaml import ConfigError, parse_yaml

__all__ = ["ConfigError", "list_presets", "parse_yaml", "read_preset"]

_SUFFIX = ".yaml"


def _root() -> Any:
    return resources.files(__name__)


def list_presets() -> list[str]:
    """The sorted names of the shipped presets (the ``*.yaml`` files of this package)."""
    return sorted(entry.name[: -len(_SUFFIX)] for entry in _root().iterdir() if entry.name.endswith(_SUFFIX))


@functools.cache
def _parsed(name: str) -> dict[str, Any]:
    names = list_presets()
    if name not in names:
        raise ConfigError(f"unknown preset {name!r}; valid presets: {', '.join(names)}")
    source = f"preset {name!r} (lipdeq/presets/{name}{_SUFFIX})"
    data = parse_yaml(_root().joinpath(f"{name}{_SUFFIX}").read_text(encoding="utf-8"), source)
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must hold a mapping with keys model, data, train")
    return data


def read_preset(name: str) -> dict[str, Any]:
    """The raw mapping of preset ``name`` (sections ``model``, ``data``, ``train``), unvalidated and
    fresh: the caller may change it. Raises :class:`ConfigError` for an unknown name or bad YAML."""
    return copy.deepcopy(_parsed(name))
