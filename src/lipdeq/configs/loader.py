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
import re
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

import yaml
from pydantic import BaseModel, ValidationError

if TYPE_CHECKING:
    from lipdeq.configs.schema import RunConfig

# lipdeq.configs.schema is imported inside the functions that need it: it imports lipdeq.models, whose
# registry imports this module (list_presets, model_preset), so a top-level import would be circular.

__all__ = ["ConfigError", "list_presets", "load_config", "model_preset", "parse_override"]

_PRESET_PACKAGE = "lipdeq.configs"
_PRESET_DIR = "presets"
_BASE_KEY = "base"


class ConfigError(ValueError):
    """A configuration could not be loaded: bad preset name, file, YAML, key, type or value."""


# --------------------------------------------------------------------------------------------- YAML


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys and reads ``1e-3`` as a float (YAML 1.2), not a string."""


_FLOAT_RE = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)
_StrictLoader.yaml_implicit_resolvers = {
    ch: [(tag, _FLOAT_RE if tag == "tag:yaml.org,2002:float" else rx) for tag, rx in resolvers]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    out: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if not isinstance(key, str):
            raise yaml.constructor.ConstructorError(
                None, None, f"mapping key {key!r} is not a string", key_node.start_mark
            )
        if key in out:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        out[key] = loader.construct_object(value_node, deep=deep)
    return out


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{source}, line {mark.line + 1}, column {mark.column + 1}" if mark else source
        problem = exc.problem or exc.context or str(exc)
        raise ConfigError(f"YAML error in {where}: {problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"YAML error in {source}: {exc}") from None


# ------------------------------------------------------------------------------------------ presets


def _preset_root() -> Any:
    return resources.files(_PRESET_PACKAGE).joinpath(_PRESET_DIR)


def list_presets() -> list[str]:
    """Return the sorted names of the YAML presets shipped in ``lipdeq/configs/presets``."""
    return sorted(
        entry.name[: -len(".yaml")] for entry in _preset_root().iterdir() if entry.name.endswith(".yaml")
    )


@functools.cache
def _preset_raw(name: str) -> dict[str, Any]:
    names = list_presets()
    if name not in names:
        raise ConfigError(f"unknown preset {name!r}; valid presets: {', '.join(names)}")
    source = f"preset {name!r} ({_PRESET_DIR}/{name}.yaml)"
    data = _parse_yaml(_preset_root().joinpath(f"{name}.yaml").read_text(encoding="utf-8"), source)
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must hold a mapping with keys model, data, train")
    if _BASE_KEY in data:
        raise ConfigError(f"{source}: presets may not use '{_BASE_KEY}'")
    return data


def model_preset(name: str) -> dict[str, Any]:
    """Return the complete, validated ``model:`` section of preset ``name`` as a fresh dict.

    This is what ``lipdeq.models.create_model(name)`` builds from: the model registry is the preset
    directory. Raises :class:`ConfigError` for an unknown preset.
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
    return parts, _parse_yaml(raw, f"override {override!r}") if raw.strip() else None


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
    data = _parse_yaml(text, str(path))
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
    from lipdeq.configs.schema import RunConfig

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


def _describe(value: Any) -> str:
    text = repr(value)
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


def _validate(data: dict[str, Any], origin: Mapping[str, str], what: str) -> RunConfig:
    from lipdeq.configs.schema import RunConfig

    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        lines = [_error_message(err, origin) for err in exc.errors(include_url=False)]
        raise ConfigError(f"invalid configuration from {what}:\n  " + "\n  ".join(lines)) from None


# ------------------------------------------------------------------------------------------ loading


def load_config(preset_or_path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> RunConfig:
    """Load a :class:`RunConfig` from a preset name or a YAML file, then apply ``key.sub=value`` overrides.

    A user file may say ``base: <preset>`` (or a path relative to it) to start from that preset and
    deep-merge its own keys on top. Override values are parsed as YAML (``train.lr=0.01``,
    ``model.channels=[16,16]``, ``train.max_steps=null``). ``preset`` records the preset the
    configuration started from. Raises :class:`ConfigError` naming the key and where the bad
    value came from.
    """
    if isinstance(overrides, str):
        raise ConfigError(
            f"overrides must be a sequence of 'key=value' strings, got the string {overrides!r}"
        )
    origin: dict[str, str] = {}
    text = os.fspath(preset_or_path)
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
    if "preset" not in data:
        data["preset"] = preset
    for item in overrides:
        parts, value = parse_override(item)
        data = _apply_override(data, parts, value, f"override {item!r}", origin)
    if overrides:
        what += " with overrides " + " ".join(overrides)
    return _validate(data, origin, what)


def config_from_dict(
    data: Mapping[str, Any], overrides: Sequence[str] = (), *, what: str = "configuration"
) -> RunConfig:
    """Validate a configuration mapping (e.g. the one stored in a checkpoint) after applying
    ``key.sub=value`` overrides, with the same strict checks and messages as :func:`load_config`."""
    origin: dict[str, str] = {}
    merged = _deep_merge({}, data, what, origin)
    for item in overrides:
        parts, value = parse_override(item)
        merged = _apply_override(merged, parts, value, f"override {item!r}", origin)
    return _validate(merged, origin, what)
