"""The checkpoint format: file names, the tag rule, the error type and the verified :class:`Checkpoint`.

The writer and reader live in :mod:`lipdeq.training.checkpoint`; this module holds what both share.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lipdeq.errors import LipdeqError
from lipdeq.training.codec import decode

__all__ = ["CHECKPOINT_FORMAT", "Checkpoint", "CheckpointError", "LATEST_FILE", "META_FILE", "MODEL_FILE",
           "OPTIMIZER_FILE", "RNG_FILE", "KNOWN_FILES", "TAG_RE"]

CHECKPOINT_FORMAT = "lipdeq-checkpoint-v1"
META_FILE = "meta.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
LATEST_FILE = "latest"
KNOWN_FILES = (MODEL_FILE, OPTIMIZER_FILE, RNG_FILE)
TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # never '@', the separator of lipdeq.atomic's hidden names


class CheckpointError(LipdeqError, ValueError):
    """A checkpoint cannot be written or read: not a checkpoint, corrupt, wrong model, missing file."""


@dataclass(frozen=True)
class Checkpoint:
    """A verified checkpoint: tensors ready for ``load_state_dict`` plus the metadata of ``meta.json``.

    ``optimizer_state`` is reassembled for ``optimizer.load_state_dict`` (its tensors stay on CPU;
    the optimizer moves them to each parameter's device). ``rng_state`` is for
    :func:`restore_rng_state`.
    """

    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any] | None
    rng_state: dict[str, torch.Tensor] | None
    meta: dict[str, Any]
    path: Path

    @property
    def step(self) -> int:
        """Optimizer steps taken when the checkpoint was written."""
        return int(self.meta["step"])

    @property
    def epoch(self) -> int:
        """Epoch counter when the checkpoint was written."""
        return int(self.meta["epoch"])

    @property
    def model_name(self) -> str:
        """Name of the model the weights belong to."""
        return str(self.meta["model_name"])

    @property
    def config(self) -> dict[str, Any]:
        """The full run configuration saved with the checkpoint."""
        return self.meta["config"]

    @property
    def extra_state(self) -> dict[str, Any]:
        """The JSON-safe extra state (data iterator position etc.)."""
        try:
            return decode(self.meta["extra_state"], None, "extra_state")
        except KeyError as exc:  # a tensor marker: extra_state never holds tensors
            raise CheckpointError(f"{self.path / META_FILE}: {exc.args[0]}") from None
