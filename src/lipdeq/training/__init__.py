"""Training and evaluation: the loop, checkpoints, run directories and distributed setup."""

from lipdeq.training.checkpoint import Checkpoint, CheckpointError, find_latest, load_checkpoint, save_checkpoint
from lipdeq.training.evaluate import evaluate, evaluate_checkpoint, recalibrate_batchnorm
from lipdeq.training.rundir import RunDirError, prepare_run_dir
from lipdeq.training.trainer import NonFiniteTrainingError, TrainResult, train

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "NonFiniteTrainingError",
    "RunDirError",
    "TrainResult",
    "evaluate",
    "evaluate_checkpoint",
    "find_latest",
    "load_checkpoint",
    "prepare_run_dir",
    "recalibrate_batchnorm",
    "save_checkpoint",
    "train",
]
