"""Strict YAML reading shared by the presets and user configuration files, and :class:`ConfigError`.

Both live here, at the bottom of the configuration stack, because the preset reader and the
configuration loader above it raise the same error for the same faults.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from lipdeq.errors import LipdeqError

__all__ = ["ConfigError", "dump_yaml", "parse_yaml"]


class ConfigError(LipdeqError, ValueError):
    """A configuration could not be loaded: bad preset name, file, YAML, key, type or value."""


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


class _StrictDumper(yaml.SafeDumper):
    """SafeDumper that quotes a string exactly when :func:`parse_yaml` would read it as something else
    (it shares the loader's resolvers: the string ``"1e5"`` is quoted, unlike with plain SafeDumper)."""


_StrictDumper.yaml_implicit_resolvers = _StrictLoader.yaml_implicit_resolvers


def dump_yaml(data: Any) -> str:
    """Block-style YAML of plain data (keys in their given order) that :func:`parse_yaml` reads back
    equal."""
    return yaml.dump(data, Dumper=_StrictDumper, sort_keys=False, allow_unicode=True)


def parse_yaml(text: str, source: str) -> Any:
    """Parse ``text`` strictly; a syntax error or duplicate key raises :class:`ConfigError` naming
    ``source`` (a file, preset or override) with line and column."""
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expanded_size(node, source)
        return loader.construct_document(node)
    except RecursionError:
        raise ConfigError(f"YAML error in {source}: nested too deeply") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{source}, line {mark.line + 1}, column {mark.column + 1}" if mark else source
        problem = exc.problem or exc.context or str(exc)
        raise ConfigError(f"YAML error in {where}: {problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"YAML error in {source}: {exc}") from None
    finally:
        loader.dispose()


MAX_EXPANDED_NODES = 100_000
"""Largest number of YAML nodes a document may stand for once its aliases are expanded (a
configuration has a few hundred). Aliases share nodes, so a few hundred bytes of nested aliases can
stand for 10^9 values, and anything that walks or prints them (validation, an error message) would
take minutes and gigabytes: such a document is refused before it is constructed."""


def _check_expanded_size(root: yaml.Node, source: str) -> None:
    memo: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in memo:
            return memo[key]
        if key in open_nodes:
            raise ConfigError(f"YAML error in {source}: a recursive alias (a value that contains itself)")
        open_nodes.add(key)
        if isinstance(node, yaml.SequenceNode):
            n = 1 + sum(size(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            n = 1 + sum(size(k) + size(v) for k, v in node.value)
        else:
            n = 1
        if n > MAX_EXPANDED_NODES:
            raise ConfigError(f"YAML error in {source}: its aliases expand to more than {MAX_EXPANDED_NODES:,} "
                              f"values (line {node.start_mark.line + 1}); a configuration needs a few hundred")
        open_nodes.discard(key)
        memo[key] = n
        return n

    size(root)
