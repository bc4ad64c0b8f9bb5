"""Crash-safe checkpoints in safetensors (never pickle).

Layout of a run's checkpoint directory::

    <directory>/<tag>/model.safetensors      model.state_dict() (CPU copies; shared tensors stored once)
    <directory>/<tag>/optimizer.safetensors  tensor leaves of optimizer.state_dict(), flattened keys
    <directory>/<tag>/rng.safetensors        RNG states as tensors
    <directory>/<tag>/meta.json              format marker, model name, config, step, epoch, extra state,
                                             the non-tensor optimizer structure and the sha256 of each file
    <directory>/latest                       JSON pointer {"tag": ..., "step": ..., "epoch": ...}

A checkpoint is written into a hidden temporary sibling, fsynced, and renamed into place; an older
checkpoint with the same tag is renamed aside first and deleted only after the new one is in place,
and ``latest`` is replaced atomically last. Loading verifies every file's checksum first, so a torn
or partial file is never loaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save
from torch import nn

from lipdeq import atomic
from lipdeq.checks import check_int
from lipdeq.training.checkpoint_format import (
    CHECKPOINT_FORMAT,
    KNOWN_FILES,
    LATEST_FILE,
    META_FILE,
    MODEL_FILE,
    OPTIMIZER_FILE,
    RNG_FILE,
    TAG_RE,
    Checkpoint,
    CheckpointError,
)
from lipdeq.training.codec import decode, dedup_tensors, encode
from lipdeq.training.rng import capture_rng_state, restore_rng_state
from lipdeq.training.rundir import CHECKPOINT_DIR

__all__ = [
    "CHECKPOINT_FORMAT",
    "Checkpoint",
    "CheckpointError",
    "capture_rng_state",
    "find_latest",
    "load_checkpoint",
    "restore_rng_state",
    "save_checkpoint",
]

# ------------------------------------------------------------------------------------------ helpers


def _remove_leftovers(directory: Path, tag: str) -> None:
    """Delete temporaries of dead writers and set-aside copies of ``tag`` (now superseded)."""
    atomic.remove_dead_temporaries(directory)
    for entry in directory.glob(f".old{atomic.SEP}{tag}{atomic.SEP}*"):
        shutil.rmtree(entry, ignore_errors=True)


def _model_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """CPU copies of the state dict (shared tensors stored once) and the alias map; refuse non-finite."""
    state = model.state_dict()
    bad = []
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"model.state_dict()[{key!r}] is a {type(value).__name__}, not a tensor")
        if (value.is_floating_point() or value.is_complex()) and not bool(torch.isfinite(value).all()):
            bad.append(key)
    if bad:
        shown = ", ".join(bad[:8]) + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
        raise CheckpointError(f"refusing to save a checkpoint: non-finite values (nan/inf) in {shown}")
    return dedup_tensors(state)


def _check_tag(tag: str) -> None:
    if not isinstance(tag, str) or not TAG_RE.match(tag) or tag == LATEST_FILE:
        raise ValueError(
            f"tag={tag!r} is not a valid checkpoint tag: use letters, digits, '_', '.', '-' "
            f"(not starting with '.', and not {LATEST_FILE!r})"
        )


def _model_name(model: nn.Module, config: Mapping[str, Any], model_name: str | None) -> str:
    if model_name is not None:
        return str(model_name)
    section = config.get("model") if isinstance(config, Mapping) else None
    if isinstance(section, Mapping) and isinstance(section.get("name"), str):
        return section["name"]
    name = getattr(getattr(model, "cfg", None), "name", None)  # MultiscaleDEQ keeps its ModelConfig as .cfg
    return name if isinstance(name, str) else type(model).__name__


# ------------------------------------------------------------------------------------------- saving


def save_checkpoint(
    directory: str | os.PathLike[str],
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    config: Mapping[str, Any] | Any,
    step: int,
    epoch: int,
    extra_state: Mapping[str, Any] | None = None,
    rng_state: Mapping[str, torch.Tensor] | None = None,
    tag: str = "last",
    model_name: str | None = None,
) -> Path:
    """Atomically write checkpoint ``<directory>/<tag>/`` and point ``<directory>/latest`` at it.

    ``config`` is a JSON-safe dict (or an object with ``to_dict()``, such as a RunConfig);
    ``extra_state`` (e.g. the scheduler's and data iterator's state) must be JSON-safe (tuples,
    int-keyed dicts and non-finite floats are preserved). The model name stored is ``model_name``,
    else ``config["model"]["name"]``, else ``model.cfg.name``, else the class name. Raises
    :class:`CheckpointError` (and writes nothing) when a model weight or buffer is non-finite.
    Returns the checkpoint's directory.
    """
    _check_tag(tag)
    check_int("step", step, minimum=0)
    check_int("epoch", epoch, minimum=0)
    if hasattr(config, "to_dict") and callable(config.to_dict):
        config = config.to_dict()
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a dict (or have to_dict()), got {type(config).__name__}")
    model_tensors, aliases = _model_tensors(model)
    meta: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "model_name": _model_name(model, config, model_name),
        "tag": tag,
        "step": step,
        "epoch": epoch,
        "config": encode(dict(config), "config", None),
        "extra_state": encode(dict(extra_state or {}), "extra_state", None),
        "optimizer": None,
        "aliases": aliases,
        "torch_version": torch.__version__,
        "files": {},
    }
    payloads: dict[str, bytes] = {MODEL_FILE: _st_save(model_tensors)}
    del model_tensors
    if optimizer is not None:
        opt_tensors: dict[str, torch.Tensor] = {}
        meta["optimizer"] = encode(optimizer.state_dict(), "optimizer", opt_tensors)
        payloads[OPTIMIZER_FILE] = _st_save(opt_tensors)
    if rng_state is not None:
        rng_tensors = {}
        for key, value in rng_state.items():
            if not isinstance(key, str) or not isinstance(value, torch.Tensor):
                raise TypeError(
                    f"rng_state must map str to tensors; entry {key!r} is a {type(value).__name__}"
                )
            rng_tensors[key] = value.detach().to("cpu", copy=True).contiguous()
        payloads[RNG_FILE] = _st_save(rng_tensors)

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / tag
    tmp = atomic.temp_sibling(final)
    old: Path | None = None
    try:
        tmp.mkdir()
        for name, data in payloads.items():
            meta["files"][name] = atomic.write_file(tmp / name, data)
        atomic.write_file(tmp / META_FILE, json.dumps(meta, indent=1, allow_nan=False).encode("utf-8"))
        atomic.fsync_dir(tmp)
        if final.exists():  # set the previous checkpoint aside; find_latest falls back to it after a crash
            old = atomic.aside_name(final)
            os.replace(final, old)
        try:
            os.replace(tmp, final)
        except BaseException:
            if old is not None:
                with contextlib.suppress(OSError):
                    os.replace(old, final)
                    old = None
            raise
        atomic.fsync_dir(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    pointer = {"tag": tag, "step": step, "epoch": epoch}
    atomic.atomic_write(directory / LATEST_FILE, json.dumps(pointer).encode("utf-8"))
    _remove_leftovers(directory, tag)
    return final


# ------------------------------------------------------------------------------------------ loading


def _describe_non_checkpoint(path: Path) -> str:
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError as exc:
        return f"{path} cannot be read: {exc}"
    if head[:1] == b"\x80":
        kind = "a Python pickle (e.g. torch.save); lipdeq never unpickles"
    elif head == b"PK\x03\x04":
        kind = "a zip archive (torch.save writes pickles in zip files); lipdeq never unpickles"
    else:
        kind = "not a checkpoint"
    return (
        f"{path} is {kind}: a lipdeq checkpoint is a directory with {META_FILE} "
        f"(format {CHECKPOINT_FORMAT!r}) and safetensors files"
    )


def _read_pointer(pointer: Path) -> str:
    try:
        data = json.loads(pointer.read_text(encoding="utf-8"))
        tag = data["tag"]
        _check_tag(tag)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"{pointer} is not a valid 'latest' pointer ({exc}); "
            "delete it to fall back to the checkpoints present"
        ) from None
    return tag


def _read_meta_quiet(path: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == CHECKPOINT_FORMAT else None


def find_latest(directory: str | os.PathLike[str]) -> Path | None:
    """Return the newest complete checkpoint directory under ``directory``, or None if there is none.

    Follows the ``latest`` pointer; if a crash left the pointed-to tag renamed aside (between the two
    renames of a save), returns that set-aside previous checkpoint. Without a pointer, returns the
    complete checkpoint with the highest (step, epoch). Hidden temporaries never count.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return None
    pointer = directory / LATEST_FILE
    if pointer.exists():
        tag = _read_pointer(pointer)
        if (directory / tag / META_FILE).is_file():
            return directory / tag
        aside = [p for p in directory.glob(f".old{atomic.SEP}{tag}{atomic.SEP}*") if (p / META_FILE).is_file()]
        if aside:
            return max(aside, key=lambda p: p.stat().st_mtime)
        raise CheckpointError(f"{pointer} points to tag {tag!r} but {directory / tag} is missing")
    best: tuple[tuple[int, int, float], Path] | None = None
    for entry in directory.iterdir():
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        meta = _read_meta_quiet(entry)
        if meta is None:
            continue
        key = (int(meta.get("step", -1)), int(meta.get("epoch", -1)), entry.stat().st_mtime)
        if best is None or key > best[0]:
            best = (key, entry)
    return None if best is None else best[1]


def _resolve(path: Path) -> Path:
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_file():
        if path.name == META_FILE:
            return path.parent
        if path.name == LATEST_FILE:
            found = find_latest(path.parent)
            if found is None:
                raise CheckpointError(f"{path}: no checkpoint found in {path.parent}")
            return found
        raise CheckpointError(_describe_non_checkpoint(path))
    if (path / META_FILE).exists():
        return path
    if (path / CHECKPOINT_DIR).is_dir():  # a run directory
        path = path / CHECKPOINT_DIR
    found = find_latest(path)
    if found is None:
        raise CheckpointError(
            f"{path} holds no lipdeq checkpoint (no {META_FILE}, no '{LATEST_FILE}' pointer)"
        )
    return found


def _read_meta(meta_path: Path) -> dict[str, Any]:
    try:
        text = meta_path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CheckpointError(f"cannot read {meta_path}: {exc}") from None
    except UnicodeDecodeError:
        raise CheckpointError(_describe_non_checkpoint(meta_path)) from None
    try:
        meta = json.loads(text)
    except ValueError as exc:
        raise CheckpointError(f"{meta_path} is not valid JSON ({exc}): not a lipdeq checkpoint") from None
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"{meta_path}: format marker is {found!r}, expected {CHECKPOINT_FORMAT!r}")
    files = meta.get("files")
    ok = (
        isinstance(files, dict)
        and MODEL_FILE in files
        and all(name in KNOWN_FILES for name in files)
        and all(isinstance(v, dict) and isinstance(v.get("sha256"), str) for v in files.values())
        and isinstance(meta.get("model_name"), str)
        and isinstance(meta.get("step"), int)
        and isinstance(meta.get("epoch"), int)
        and isinstance(meta.get("aliases", {}), dict)
    )
    if not ok:
        raise CheckpointError(
            f"{meta_path} is malformed: missing or invalid files/model_name/step/epoch entries"
        )
    # A position that save_checkpoint would refuse (negative, or a bool, which json reads as an int
    # subclass) must be refused here too: a resume from it would train, then die at its first save.
    for key in ("step", "epoch"):
        if isinstance(meta[key], bool) or meta[key] < 0:
            raise CheckpointError(f"{meta_path} is malformed: {key} must be an integer >= 0, got {meta[key]!r}")
    return meta


def _read_verified(path: Path, expected: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path} is missing") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint file {path}: {exc}") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != expected["sha256"] or ("bytes" in expected and len(data) != expected["bytes"]):
        raise CheckpointError(
            f"checksum mismatch in {path} ({len(data)} bytes, sha256 {digest[:12]}..., expected "
            f"{expected.get('bytes')} bytes, {expected['sha256'][:12]}...): the file is torn, partial or "
            "modified; not loaded"
        )
    try:
        return _st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"cannot decode {path}: {exc}") from None


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    expected_model_name: str | None = None,
    map_location: str | torch.device = "cpu",
) -> Checkpoint:
    """Load and verify a checkpoint; ``path`` is a run directory or its checkpoint directory (both use
    ``latest``), a tag directory or its ``meta.json``.

    Every file's sha256 is checked before it is decoded. Model tensors are moved to ``map_location``.
    Raises :class:`CheckpointError`, naming the file, when the path is not a checkpoint (e.g. a pickle),
    a file is missing or its checksum does not match, or the checkpoint belongs to a model other than
    ``expected_model_name``.

    A save may replace the tag directory while it is read (``lipdeq eval`` of a run in progress):
    the files would then come from two checkpoints and fail their checksums. Such a read is retried
    on the new checkpoint; a mismatch in a directory that did not change is reported as it is.
    """
    for attempt in range(5):
        tag_dir = _resolve(Path(path))
        before = _identity(tag_dir)
        try:
            return _load_tag(tag_dir, expected_model_name, map_location)
        except CheckpointError:
            if attempt == 4 or _identity(tag_dir) == before:
                raise
    raise AssertionError("unreachable")


def _identity(directory: Path) -> tuple[int, int, int] | None:
    """(device, inode, ctime) of ``directory``: a save installs a new directory, so this changes. The
    inode alone does not do: ext4 hands a freed inode (the set-aside copy) to the next save at once."""
    try:
        st = directory.stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_ctime_ns)


def _load_tag(tag_dir: Path, expected_model_name: str | None, map_location: str | torch.device) -> Checkpoint:
    meta_path = tag_dir / META_FILE
    meta = _read_meta(meta_path)
    if expected_model_name is not None and meta["model_name"] != expected_model_name:
        raise CheckpointError(
            f"{meta_path} belongs to model {meta['model_name']!r}, "
            f"not to the expected model {expected_model_name!r}"
        )
    files = meta["files"]
    model_state = _read_verified(tag_dir / MODEL_FILE, files[MODEL_FILE])
    for alias, target in meta.get("aliases", {}).items():
        if target not in model_state:
            raise CheckpointError(f"{meta_path}: alias {alias!r} refers to missing tensor {target!r}")
        model_state[alias] = model_state[target]
    model_state = {k: v.to(map_location) for k, v in model_state.items()}
    optimizer_state = None
    if meta.get("optimizer") is not None:
        if OPTIMIZER_FILE not in files:
            raise CheckpointError(f"{meta_path} lists optimizer state but no {OPTIMIZER_FILE}")
        opt_tensors = _read_verified(tag_dir / OPTIMIZER_FILE, files[OPTIMIZER_FILE])
        try:
            optimizer_state = decode(meta["optimizer"], opt_tensors, str(tag_dir / OPTIMIZER_FILE))
        except KeyError as exc:
            raise CheckpointError(exc.args[0]) from None
    rng_state = _read_verified(tag_dir / RNG_FILE, files[RNG_FILE]) if RNG_FILE in files else None
    return Checkpoint(
        model_state=model_state, optimizer_state=optimizer_state, rng_state=rng_state, meta=meta, path=tag_dir
    )
