"""Models: the multiscale DEQ family (MDEQ baseline and Lipschitz MDEQ) and its registry."""

from lipdeq.models.config import ModelConfig
from lipdeq.models.hyperparameters import HyperparameterSolution, UnreachableTargetError, solve_hyperparameter
from lipdeq.models.mdeq import MultiscaleDEQ, NotAContractionError
from lipdeq.models.registry import create_model, list_models, model_config

__all__ = [
    "HyperparameterSolution",
    "ModelConfig",
    "MultiscaleDEQ",
    "NotAContractionError",
    "UnreachableTargetError",
    "create_model",
    "list_models",
    "model_config",
    "solve_hyperparameter",
]
