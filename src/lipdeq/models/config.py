"""Model configuration: one strict, typed record that spans MDEQ and the Lipschitz MDEQ."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ModelConfig(BaseModel):
    """Every architectural and solver setting of the multiscale DEQ family.

    The same class builds the MDEQ baseline (``norm="group"``, ``relu_slope=1``, ``mixing="sum"``,
    ``fusion="sum"``, no operator-norm cap) and the Lipschitz MDEQ (``norm="mean_only"``,
    ``relu_slope=0.4``, ``mixing="convex"`` with ``alpha=0.5``, ``beta=0.3``, ``fusion="softmax"``,
    ``gn_cap=1``, ``conv_cap=2.0``, ``dropout_rescale=False``), and every point in between.
    Unknown keys and wrong types are rejected (strict validation).

    ``explicit_norm`` and ``explicit_cap`` concern the parts outside f (stem, injection, head),
    which never affect convergence but bound the whole classifier (certified robustness):
    ``explicit_norm="batch"`` keeps MDEQ's BatchNorm layers (a finite but data-dependent bound in
    eval mode), ``"mean_only"`` uses a one-group mean-only GroupNorm (gains clamped to ``gn_cap``),
    ``"none"`` no norm (the convs get biases); ``explicit_cap`` caps the operator norm of every
    conv there and of the linear classifier (``None``: unconstrained, MDEQ's N(0, 0.01) conv init;
    with a cap each of them starts at the cap: a Gaussian kernel scaled to operator norm
    ``explicit_cap``, zero bias, so that the signal is not lost before training starts). The
    defaults leave every reference preset unchanged. ``conv_init_std`` is the std of the N(0, std^2)
    init of every conv of f (MDEQ's 0.01, which makes f nearly zero at init: harmless when BatchNorm
    in the head rescales its output, fatal to the signal without it).

    ``budget="certified"`` sets both solves' iteration counts from the certified Lipschitz constant
    (:mod:`lipdeq.gradients.budgeted`: Picard forward whose last step carries the graph, Neumann
    backward, no residual checks; ``solver`` is then used only when the certificate is not below 1,
    and for a configuration without a certificate, which solves with residual checks);
    in training the constant is the running certificate, refreshed exactly every
    ``certificate_refresh`` steps (:mod:`lipdeq.models.running_certificate`).

    ``injection="auto"`` follows the executed reference code: the 1x1 conv + BN + ReLU injection
    module exists only for more than two branches (with two, the stem output is injected as is).
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    name: str = "custom"
    # --- layout (Bai et al. 2020, MDEQ-Vision) ---
    in_channels: int = Field(3, ge=1)
    image_size: int = Field(32, ge=4)
    num_classes: int = Field(10, ge=2)
    channels: list[int] = Field(default_factory=lambda: [24, 24], min_length=1)
    head_channels: list[int] = Field(default_factory=lambda: [8, 16], min_length=1)
    final_channels: int = Field(200, ge=1)
    expansion: int = Field(5, ge=1)
    num_groups: int = Field(8, ge=1)
    weight_norm: bool = True
    dropout: float = Field(0.25, ge=0.0, lt=1.0)
    injection: Literal["auto", "conv", "none"] = "auto"
    # --- the Lipschitz knobs (docs/MATH.md sections 2 to 4) ---
    norm: Literal["group", "mean_only"] = "group"
    mixing: Literal["sum", "convex"] = "sum"
    relu_slope: float = Field(1.0, gt=0.0)
    alpha: float = Field(1.0, gt=0.0, le=1.0)
    beta: float = Field(1.0, gt=0.0, le=1.0)
    fusion: Literal["sum", "softmax"] = "sum"
    gn_cap: float | None = Field(None, gt=0.0)
    conv_cap: float | None = Field(None, gt=0.0)
    conv_init_std: float = Field(0.01, gt=0.0)  # N(0, std^2) init of f's convs (MDEQ: 0.01)
    cap_power_iterations: int = Field(1, ge=1)
    dropout_rescale: bool = True
    post_gn_affine: bool = False
    # --- the explicit parts: stem, injection and head (docs/MATH.md section 9) ---
    explicit_norm: Literal["batch", "mean_only", "none"] = "batch"
    explicit_cap: float | None = Field(None, gt=0.0)
    # --- solver (f_thres / b_thres as in MDEQ) ---
    solver: Literal["anderson", "picard", "broyden"] = "anderson"
    f_thres: int = Field(22, ge=1)
    b_thres: int = Field(24, ge=1)
    f_tol: float = Field(1e-3, gt=0.0)
    b_tol: float = Field(1e-3, gt=0.0)
    stop_mode: Literal["rel", "abs"] = "rel"
    backward: Literal["ift", "phantom", "jfb"] = "ift"
    # "certified": iteration counts of both passes from the running certificate (Lipschitz models)
    budget: Literal["residual", "certified"] = "residual"
    certificate_refresh: int = Field(20, ge=1)  # training steps between exact FFT norms of the running bound
    # --- MDEQ pretraining (weight-tied unrolled layers) ---
    pretrain_layers: int = Field(10, ge=1)

    @property
    def num_branches(self) -> int:
        """Number of resolutions (branches) of the multiscale state."""
        return len(self.channels)

    @model_validator(mode="after")
    def _check_layout(self) -> ModelConfig:
        if self.mixing == "sum" and (self.alpha != 1.0 or self.beta != 1.0):
            raise ValueError(
                f"mixing='sum' (MDEQ: z + block, b_i + sum of fused) ignores alpha and beta; got "
                f"alpha={self.alpha}, beta={self.beta}: use mixing='convex' to mix with them"
            )
        if len(self.head_channels) != len(self.channels):
            raise ValueError(
                f"head_channels has {len(self.head_channels)} entries but channels has "
                f"{len(self.channels)}: one head width per branch is required"
            )
        if self.image_size % (2 ** (len(self.channels) - 1)) != 0:
            raise ValueError(
                f"image_size={self.image_size} is not divisible by 2**(branches-1)="
                f"{2 ** (len(self.channels) - 1)}"
            )
        if self.budget == "certified" and self.backward == "phantom":
            raise ValueError("budget='certified' supports backward 'ift' or 'jfb', not 'phantom'")
        for c in self.channels:
            if c % self.num_groups or (c * self.expansion) % self.num_groups or c % max(self.num_groups // 2, 1):
                raise ValueError(f"channel width {c} is not divisible by num_groups={self.num_groups}")
        return self

    @property
    def is_lipschitz(self) -> bool:
        """True when the configuration admits a finite certificate (mean-only norm and conv caps)."""
        return self.norm == "mean_only" and self.conv_cap is not None
