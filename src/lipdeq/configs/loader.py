"""Load run configurations from the shipped YAML presets or user files, with ``key.sub=value`` overrides.

Nothing is silently ignored: unknown presets, missing files, YAML syntax errors, duplicate keys,
unknown keys and wrong types all raise :class:`ConfigError` with the dotted key and where the value
came from (file or override).
"""

from __future__ import annotations

import copy
import difflib
import functools
import os
import reprlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, get_args

from pydantic import BaseModel, ValidationError

from lipdeq.configs.schema import RunConfig
from lipdeq.presets import ConfigError, list_presets, parse_yaml, read_preset

__all__ = [
    "RETIRED_KEYS",
    "ConfigError",
    "config_from_dict",
    "drop_retired_keys",
    "list_presets",
    "load_config",
    "model_preset",
    "parse_override",
]

_BASE_KEY = "base"


# ------------------------------------------------------------------------------------------ presets


@functools.cache
def _preset_raw(name: str) -> dict[str, Any]:
    """The preset's mapping, checked to be self-contained (cached: callers deep-merge it, never mutate)."""
    data = read_preset(name)
    if _BASE_KEY in data:
        raise ConfigError(f"preset {name!r}: presets may not use '{_BASE_KEY}'")
    return data


def model_preset(name: str) -> dict[str, Any]:
    """Return the complete, validated ``model:`` section of preset ``name`` as a fresh dict.

    Raises :class:`ConfigError` for an unknown preset.
    """
    return load_config(name).model.model_dump()


# ------------------------------------------------------------------------------------------ merging


def _deep_merge(
    base: dict[str, Any], update: Mapping[str, Any], source: str, origin: dict[str, str], prefix: str = ""
) -> dict[str, Any]:
    """Merge ``update`` into a copy of ``base``: mappings merge key by key, anything else replaces."""
    out = dict(base)
    for key, value in update.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(out[key], value, source, origin, dotted + ".")
        else:
            out[key] = copy.deepcopy(value)
            for k in [k for k in origin if k == dotted or k.startswith(dotted + ".")]:
                del origin[k]
            _record_origin(value, source, origin, dotted)
    return out


def _record_origin(value: Any, source: str, origin: dict[str, str], dotted: str) -> None:
    if isinstance(value, Mapping) and value:
        for k, v in value.items():
            _record_origin(v, source, origin, f"{dotted}.{k}")
    else:
        origin[dotted] = source


def parse_override(override: str) -> tuple[list[str], Any]:
    """Split ``"key.sub=value"`` into ``(["key", "sub"], value)``, the value parsed as YAML."""
    if not isinstance(override, str):
        raise ConfigError(f"override {override!r} must be a string 'key.sub=value'")
    key, sep, raw = override.partition("=")
    key = key.strip()
    if not sep:
        raise ConfigError(f"override {override!r} has no '=': write it as key.sub=value (e.g. train.lr=0.01)")
    parts = key.split(".")
    if not key or any(not p.strip() or p != p.strip() for p in parts):
        raise ConfigError(f"override {override!r}: {key!r} is not a dotted key such as train.lr")
    return parts, parse_yaml(raw, f"override {override!r}") if raw.strip() else None


def _apply_override(
    data: dict[str, Any], parts: list[str], value: Any, source: str, origin: dict[str, str]
) -> dict[str, Any]:
    """Set the dotted key ``parts`` to ``value`` (a mapping value merges into the section it names)."""
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        node = node.get(part)
        if node is None:
            break
        if not isinstance(node, dict):
            raise ConfigError(
                f"{source}: {'.'.join(parts[: i + 1])} is a {type(node).__name__}, not a section; "
                f"cannot set {'.'.join(parts)}"
            )
    update: Any = value
    for part in reversed(parts):
        update = {part: update}
    return _deep_merge(data, update, source, origin)


# ------------------------------------------------------------------------------------ user files


def _is_path_syntax(text: str) -> bool:
    return os.sep in text or "/" in text or text.endswith((".yaml", ".yml"))


def _read_user_file(
    path: Path, seen: tuple[Path, ...], origin: dict[str, str]
) -> tuple[dict[str, Any], str | None]:
    """Read a user YAML (resolving ``base:``) into (merged dict, preset name it started from)."""
    try:
        resolved = path.resolve()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    if resolved in seen:
        chain = " -> ".join(str(p) for p in (*seen, resolved))
        raise ConfigError(f"config file {path}: '{_BASE_KEY}' chain loops: {chain}")
    if not path.is_file():
        if path.exists():
            raise ConfigError(f"config file {path} is not a file")
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    data = parse_yaml(text, str(path))
    if data is None:
        raise ConfigError(f"config file {path} is empty")
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path} must hold a mapping (model:, data:, train:), got {type(data).__name__}"
        )
    data = dict(data)
    preset: str | None = None
    merged: dict[str, Any] = {}
    if _BASE_KEY in data:
        base = data.pop(_BASE_KEY)
        if not isinstance(base, str) or not base:
            raise ConfigError(f"{path}: '{_BASE_KEY}' must be a preset name or a YAML path, got {base!r}")
        if base in list_presets() and not _is_path_syntax(base):
            merged = _deep_merge({}, _preset_raw(base), f"preset {base!r}", origin)
            preset = base
        elif _is_path_syntax(base) or (path.parent / base).exists():
            base_path = Path(base) if Path(base).is_absolute() else path.parent / base
            merged, preset = _read_user_file(base_path, (*seen, resolved), origin)
        else:
            raise ConfigError(
                f"{path}: '{_BASE_KEY}: {base}' is not a known preset; "
                f"valid presets: {', '.join(list_presets())}"
            )
    merged = _deep_merge(merged, data, str(path), origin)
    return merged, preset


# ------------------------------------------------------------------------------------- validation


def _section_model(loc: Sequence[str | int]) -> type[BaseModel] | None:
    """The pydantic model class reached by following ``loc`` from RunConfig (None if not a model)."""
    model: type[BaseModel] = RunConfig
    for part in loc:
        if not isinstance(part, str) or part not in model.model_fields:
            return None
        annotation = model.model_fields[part].annotation
        candidates = [annotation, *get_args(annotation)]
        sub = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if sub is None:
            return None
        model = sub
    return model


def _dotted(loc: Sequence[str | int]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<top level>"


_TYPE_NAMES = {
    "int_type": "int",
    "int_from_float": "int",
    "float_type": "float",
    "bool_type": "bool",
    "string_type": "str",
    "list_type": "list",
    "dict_type": "mapping",
    "model_type": "mapping",
    "model_attributes_type": "mapping",
    "none_required": "null",
}


_SHORT = reprlib.Repr()  # (keyword arguments need Python 3.12)
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxstring, _SHORT.maxother = 3, 4, 4, 40, 40


def _describe(value: Any) -> str:
    # reprlib stops at a few levels and items: a full repr of a deeply nested or aliased value (shared
    # sublists) could be gigabytes long before it was shortened
    text = _SHORT.repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}" if value is not None else "null"


def _error_message(err: Mapping[str, Any], origin: Mapping[str, str]) -> str:
    loc = [p for p in err["loc"]]
    key = _dotted(loc)
    kind = err["type"]
    value = err.get("input")
    if kind == "extra_forbidden":
        section = _section_model(loc[:-1])
        known = sorted(section.model_fields) if section is not None else []
        where = _dotted(loc[:-1]) if loc[:-1] else "the top level"
        text = f"{key} is not a known key; known keys in {where}: {', '.join(known)}"
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        if close:
            text += f" (did you mean {close[0]!r}?)"
    elif kind == "missing":
        text = f"{key} is required but missing"
    elif kind in _TYPE_NAMES:
        text = f"{key}: expected {_TYPE_NAMES[kind]}, got {_describe(value)}"
    elif kind == "literal_error":
        text = f"{key}: expected one of {err.get('ctx', {}).get('expected', '?')}, got {_describe(value)}"
    elif kind == "value_error":
        msg = str(err.get("ctx", {}).get("error", err["msg"]))
        text = f"{key}: {msg}"
    else:
        text = f"{key}: {err['msg'][0].lower()}{err['msg'][1:]}, got {_describe(value)}"
    source = _origin_of(loc, origin)
    return f"{text} [from {source}]" if source else text


def _origin_of(loc: Sequence[str | int], origin: Mapping[str, str]) -> str | None:
    keys = [str(p) for p in loc]
    for n in range(len(keys), 0, -1):
        dotted = ".".join(keys[:n])
        if dotted in origin:
            return origin[dotted]
    prefix = ".".join(keys) + "." if keys else ""
    sources = sorted({src for k, src in origin.items() if k.startswith(prefix)})
    return ", ".join(sources) if sources else None


def _validate(data: dict[str, Any], origin: Mapping[str, str], what: str, hint: str | None = None) -> RunConfig:
    """RunConfig.model_validate with one line per error; ``hint`` is added when a key is missing."""
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        lines = [_error_message(err, origin) for err in errors]
        if hint is not None and any(err["type"] == "missing" for err in errors):
            lines.append(hint)
        raise ConfigError(f"invalid configuration from {what}:\n  " + "\n  ".join(lines)) from None


# ------------------------------------------------------------------------------------------ loading


def _check_overrides(overrides: Sequence[str]) -> None:
    # a str is a Sequence[str] too: iterated, it would apply one override per letter
    if isinstance(overrides, str):
        raise ConfigError(f"overrides must be a sequence of 'key=value' strings, got the string {overrides!r}")


def load_config(preset_or_path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> RunConfig:
    """Load a :class:`RunConfig` from a preset name or a YAML file, then apply ``key.sub=value`` overrides.

    A user file may say ``base: <preset>`` (or a path relative to it) to start from that preset and
    deep-merge its own keys on top. Override values are parsed as YAML (``train.lr=0.01``,
    ``model.channels=[16,16]``, ``train.max_steps=null``). Raises :class:`ConfigError` naming the
    key and where the bad value came from.

    ``preset`` records the preset the configuration started from: set from the preset or ``base:``
    it was loaded from, or kept as written when the file states it (as a run's ``config.yaml``
    does). It is a record only, never a starting point: a file with ``preset: X`` and no ``base:``
    must be complete, so a dumped configuration loads back exactly as it was.
    """
    _check_overrides(overrides)
    origin: dict[str, str] = {}
    text = os.fspath(preset_or_path)
    if not text.strip():
        raise ConfigError(f"the configuration name is empty: give a preset ({', '.join(list_presets())}) "
                          "or a YAML file")
    is_preset = not isinstance(preset_or_path, os.PathLike) and not _is_path_syntax(text)
    if is_preset and text in list_presets():
        data = _deep_merge({}, _preset_raw(text), f"preset {text!r}", origin)
        preset = text
        what = f"preset {text!r}"
    elif not is_preset or Path(text).exists():
        data, preset = _read_user_file(Path(text), (), origin)
        what = text
    else:
        raise ConfigError(
            f"unknown preset {text!r} (and no such file); valid presets: {', '.join(list_presets())}"
        )
    hint = None
    if "preset" not in data:
        data["preset"] = preset
    elif preset is None:
        hint = f"('preset' only records where a configuration came from; to start from one write '{_BASE_KEY}: NAME')"
    for item in overrides:
        parts, value = parse_override(item)
        data = _apply_override(data, parts, value, f"override {item!r}", origin)
    if overrides:
        what += " with overrides " + " ".join(overrides)
    return _validate(data, origin, what, hint)


# Keys that earlier versions wrote into stored configurations but never read (issue 9): dropping them
# from a checkpoint's configuration changes nothing. User files still get an error for them.
RETIRED_KEYS = frozenset({"data.synthetic_train_size", "data.synthetic_test_size"})


def drop_retired_keys(data: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of the nested mapping ``data`` without the :data:`RETIRED_KEYS`."""
    out = dict(data)
    for dotted in RETIRED_KEYS:
        section, _, key = dotted.partition(".")
        if isinstance(out.get(section), Mapping) and key in out[section]:
            out[section] = {k: v for k, v in out[section].items() if k != key}
    return out


def config_from_dict(
    data: Mapping[str, Any], overrides: Sequence[str] = (), *, what: str = "configuration"
) -> RunConfig:
    """Validate a configuration mapping (e.g. the one stored in a checkpoint) after applying
    ``key.sub=value`` overrides, with the same strict checks and messages as :func:`load_config`.

    Stored configurations may hold :data:`RETIRED_KEYS` (never read by any version); they are
    dropped first, so checkpoints of earlier versions still load.
    """
    _check_overrides(overrides)
    origin: dict[str, str] = {}
    merged = _deep_merge({}, drop_retired_keys(data), what, origin)
    for item in overrides:
        parts, value = parse_override(item)
        merged = _apply_override(merged, parts, value, f"override {item!r}", origin)
    return _validate(merged, origin, what)
