"""Every key of the run configuration is read by some code: a strict schema must not validate keys
that nothing uses (they would be silently ignored, which is what strictness promises to prevent).

A key counts as read when its name is read somewhere in ``src/lipdeq`` outside the files that
define the schema: an attribute load ``x.<name>``, a subscript ``x["<name>"]``, or
``x.get("<name>")`` / ``getattr(x, "<name>")``. Names shared with unrelated attributes (``name``,
``seed``) can pass by coincidence; a key that nothing reads under any spelling cannot.
"""

from __future__ import annotations

import ast
from pathlib import Path

from pydantic import BaseModel

from lipdeq.configs import RunConfig

SRC = Path(__file__).resolve().parents[1] / "src" / "lipdeq"
SCHEMA_FILES = ("configs/schema.py", "models/config.py")  # definitions and validators, not uses


def schema_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Dotted names of every field of ``model``, descending into fields that are models themselves."""
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys += schema_keys(annotation, f"{prefix}{name}.")
    return keys


def names_read(root: Path, exclude: tuple[str, ...] = SCHEMA_FILES) -> set[str]:
    """Every attribute or string key that some module under ``root`` reads."""
    found: set[str] = set()
    for path in sorted(root.rglob("*.py")):
        if path.relative_to(root).as_posix() in exclude:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                found.add(node.attr)
            elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load):
                if isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str):
                    found.add(node.slice.value)
            elif isinstance(node, ast.Call) and node.args:
                func = node.func
                is_get = isinstance(func, ast.Attribute) and func.attr == "get"
                is_getattr = isinstance(func, ast.Name) and func.id == "getattr" and len(node.args) >= 2
                key = node.args[1] if is_getattr else node.args[0] if is_get else None
                if isinstance(key, ast.Constant) and isinstance(key.value, str):
                    found.add(key.value)
    return found


def unread_keys(keys: list[str], read: set[str]) -> list[str]:
    return [key for key in keys if key.rpartition(".")[2] not in read]


def test_the_check_finds_an_unread_key(tmp_path: Path) -> None:
    """The checker itself: writes and reads inside the schema files do not count, reads elsewhere do."""
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "schema.py").write_text("def check(self):\n    return self.momentum\n")
    (tmp_path / "use.py").write_text(
        "def f(cfg, d):\n    cfg.unused_key = 1\n"
        "    return cfg.train.lr, d['seed'], d.get('amp'), getattr(cfg, 'epochs')\n"
    )
    read = names_read(tmp_path)
    keys = ["train.lr", "train.momentum", "train.seed", "train.amp", "train.epochs", "train.unused_key"]
    assert unread_keys(keys, read) == ["train.momentum", "train.unused_key"]


def test_schema_walk_reaches_every_section() -> None:
    keys = schema_keys(RunConfig)
    assert {"model", "data", "train", "preset"} <= set(keys)
    assert {"model.conv_cap", "data.train_subset", "train.max_nonfinite_in_row"} <= set(keys)


def test_every_configuration_key_is_read_by_some_code() -> None:
    missing = unread_keys(schema_keys(RunConfig), names_read(SRC))
    assert missing == [], f"configuration keys that no code under src/lipdeq reads: {missing}"
