"""Models: the multiscale DEQ family (MDEQ baseline and Lipschitz MDEQ) and its registry."""

from lipdeq.models.config import ModelConfig
from lipdeq.models.mdeq import MultiscaleDEQ, NotAContractionError
from lipdeq.models.registry import create_model, list_models, model_config

__all__ = ["ModelConfig", "MultiscaleDEQ", "NotAContractionError", "create_model", "list_models", "model_config"]
