"""Training and evaluation: the loop, checkpoints, run directories and distributed setup.

Inside: ``codec`` (metadata encoding), ``rng`` (RNG state) and ``rundir`` (the run-directory
layout and lock) sit below ``checkpoint``, which ``evaluate`` and ``trainer`` use; the crash-safe
file helpers are ``lipdeq.atomic``.
"""

from lipdeq.training.checkpoint import (
    Checkpoint,
    CheckpointError,
    capture_rng_state,
    find_latest,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from lipdeq.training.evaluate import evaluate, evaluate_checkpoint
from lipdeq.training.precise_bn import precise_batchnorm, precise_bn_batches, recalibrate_batchnorm
from lipdeq.training.rundir import RunDirError, prepare_run_dir, write_config
from lipdeq.training.trainer import NonFiniteTrainingError, TrainResult, train

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "NonFiniteTrainingError",
    "RunDirError",
    "TrainResult",
    "capture_rng_state",
    "evaluate",
    "evaluate_checkpoint",
    "find_latest",
    "load_checkpoint",
    "precise_batchnorm",
    "precise_bn_batches",
    "prepare_run_dir",
    "recalibrate_batchnorm",
    "restore_rng_state",
    "save_checkpoint",
    "train",
    "write_config",
]
