"""Strict, typed run configuration: model, data and training settings of one run.

Every record rejects unknown keys and wrong types (``extra="forbid"``, ``strict=True``) and is
immutable (``frozen=True``); an int is accepted where a float is expected, nothing else is coerced.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from lipdeq.models.config import ModelConfig

__all__ = ["DataConfig", "TrainConfig", "RunConfig", "ModelConfig"]

_STRICT = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


class DataConfig(BaseModel):
    """Where the images come from and how they are sampled and augmented.

    ``train_subset`` / ``test_subset`` take the first N images of a split; for ``synthetic`` they
    are its size (default 10,000 train / 2,000 test, ``lipdeq.data.SYNTHETIC_DEFAULT_SIZES``).
    """

    model_config = _STRICT

    dataset: Literal["synthetic", "cifar10"] = "synthetic"
    data_dir: str | None = None
    train_subset: int | None = Field(None, ge=1)
    test_subset: int | None = Field(None, ge=1)
    augment: bool = False


class TrainConfig(BaseModel):
    """Optimisation, schedule, regularisation, precision, logging and checkpoint cadence."""

    model_config = _STRICT

    epochs: int = Field(ge=1)
    max_steps: int | None = Field(None, ge=1)
    max_seconds: float | None = Field(None, gt=0.0)
    batch_size: int = Field(ge=1)
    eval_batch_size: int = Field(256, ge=1)
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = Field(gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr: float = Field(1e-6, ge=0.0)
    warmup_steps: int = Field(0, ge=0)
    pretrain_steps: int = Field(0, ge=0)
    jac_reg_weight: float = Field(0.0, ge=0.0)
    jac_reg_freq: float = Field(0.0, ge=0.0, le=1.0)
    jac_reg_stop_epoch: int | None = Field(None, ge=0)
    grad_clip: float | None = Field(None, gt=0.0)
    seed: int = Field(42, ge=0)
    amp: Literal["none", "bf16"] = "none"
    compile: bool = False
    # torch.compile mode of f when compile is on; CUDA-graph modes (reduce-overhead, max-autotune) need
    # static shapes and apply to the graph-free forward solve only (lipdeq.models.compiled)
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    channels_last: bool = False  # convs in channels-last memory format (model.use_channels_last)
    log_every: int = Field(10, ge=1)
    eval_every_epochs: int = Field(1, ge=1)
    # Precise BN: training images to re-estimate BatchNorm statistics from before each evaluation
    # (0: off). Without it eval-mode accuracy is at chance for the first ~100 steps (N(0, 0.01) init
    # against the running statistics); 512 images cost ~5% of a full CIFAR-10 test evaluation.
    eval_precise_bn: int = Field(512, ge=0)
    checkpoint_every_epochs: int = Field(1, ge=1)
    checkpoint_every_steps: int | None = Field(None, ge=1)
    max_nonfinite_in_row: int = Field(5, ge=1)
    num_threads: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _check_schedule(self) -> TrainConfig:
        if self.schedule == "cosine" and self.min_lr > self.lr:
            raise ValueError(
                f"min_lr={self.min_lr} exceeds lr={self.lr}: a cosine schedule decays lr to min_lr"
            )
        return self


class RunConfig(BaseModel):
    """One complete run: the model, the data and the training settings, and the preset it came from."""

    model_config = _STRICT

    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    preset: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-safe nested dict that ``RunConfig.model_validate`` turns back into ``self``."""
        return self.model_dump(mode="json")
