"""Explicit (non-equilibrium) parts of the classifier: stem, input injection, HRNet-style head.

These follow the MDEQ reference code (Bai et al. 2020, MDEQ-Vision). By default they are not
constrained: they do not affect convergence (docs/MATH.md section 2.5). For certified robustness
(docs/MATH.md section 9) the whole classifier needs a useful Lipschitz bound: ``explicit_norm``
replaces their BatchNorm layers (``"mean_only"``: a mean-only GroupNorm with one group;
``"none"``: no norm, the convs get biases instead) and :func:`cap_explicit_parts` caps the operator
norm of every conv and of the final linear layer.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.nn.utils import parametrize

from lipdeq.lipschitz import MeanOnlyGroupNorm, OperatorNormCap, apply_operator_norm_cap, conv_module_operator_norm

BN_MOMENTUM = 0.1

ExplicitNorm = Literal["batch", "mean_only", "none"]


def conv3x3(c_in: int, c_out: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    """3x3 convolution with padding 1."""
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=bias)


def make_explicit_norm(kind: ExplicitNorm, channels: int, *, affine: bool = True,
                       gamma_cap: float | None = None) -> nn.Module:
    """The norm of the explicit parts: BatchNorm (MDEQ), mean-only GroupNorm (one group, gains
    clamped to ``gamma_cap``; ``affine`` as the BatchNorm it replaces) or none (identity)."""
    if kind == "batch":
        return nn.BatchNorm2d(channels, momentum=BN_MOMENTUM, affine=affine)
    if kind == "mean_only":
        return MeanOnlyGroupNorm(1, channels, affine=affine, gamma_cap=gamma_cap)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown explicit norm {kind!r}: use 'batch', 'mean_only' or 'none'")


def make_stem(in_channels: int, channels: int, norm: ExplicitNorm = "batch",
              gamma_cap: float | None = None) -> nn.Sequential:
    """Two conv3x3 + norm + ReLU at full resolution (MDEQ's ``downsample`` with 0 downsamplings)."""
    bias = norm == "none"  # without a norm, the conv itself carries the shift the norm's bias gave
    return nn.Sequential(
        conv3x3(in_channels, channels, bias=bias),
        make_explicit_norm(norm, channels, gamma_cap=gamma_cap),
        nn.ReLU(inplace=True),
        conv3x3(channels, channels, bias=bias),
        make_explicit_norm(norm, channels, gamma_cap=gamma_cap),
        nn.ReLU(inplace=True),
    )


def make_injection(channels: int, norm: ExplicitNorm = "batch", gamma_cap: float | None = None) -> nn.Sequential:
    """MDEQ's ``stage0``: conv1x1 + norm + ReLU mapping the stem output to the injection of branch 1."""
    return nn.Sequential(
        nn.Conv2d(channels, channels, kernel_size=1, bias=norm == "none"),
        make_explicit_norm(norm, channels, gamma_cap=gamma_cap),
        nn.ReLU(inplace=False),
    )


class Bottleneck(nn.Module):
    """The head's bottleneck (expansion 4, norms without affine inside, affine norm on the shortcut)."""

    expansion = 4

    def __init__(self, c_in: int, planes: int, norm: ExplicitNorm = "batch", gamma_cap: float | None = None) -> None:
        super().__init__()
        out = planes * self.expansion
        bias = norm == "none"
        self.conv1 = nn.Conv2d(c_in, planes, kernel_size=1, bias=bias)
        self.bn1 = make_explicit_norm(norm, planes, affine=False)
        self.conv2 = conv3x3(planes, planes, bias=bias)
        self.bn2 = make_explicit_norm(norm, planes, affine=False)
        self.conv3 = nn.Conv2d(planes, out, kernel_size=1, bias=bias)
        self.bn3 = make_explicit_norm(norm, out, affine=False)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if c_in != out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, out, kernel_size=1, bias=bias), make_explicit_norm(norm, out, gamma_cap=gamma_cap)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + self.shortcut(x))


class ClassificationHead(nn.Module):
    """HRNet-style head: a bottleneck per branch, stride-2 merges from fine to coarse, conv1x1 to
    ``final_channels`` + norm + ReLU, global average pooling, linear classifier."""

    def __init__(
        self, channels: list[int], head_channels: list[int], final_channels: int, num_classes: int,
        norm: ExplicitNorm = "batch", gamma_cap: float | None = None,
    ) -> None:
        super().__init__()
        e = Bottleneck.expansion
        self.incre_modules = nn.ModuleList(Bottleneck(c, h, norm, gamma_cap) for c, h in zip(channels, head_channels))
        self.downsamp_modules = nn.ModuleList(
            nn.Sequential(
                conv3x3(head_channels[i] * e, head_channels[i + 1] * e, stride=2, bias=True),
                make_explicit_norm(norm, head_channels[i + 1] * e, gamma_cap=gamma_cap),
                nn.ReLU(inplace=True),
            )
            for i in range(len(channels) - 1)
        )
        self.final_layer = nn.Sequential(
            nn.Conv2d(head_channels[-1] * e, final_channels, kernel_size=1),
            make_explicit_norm(norm, final_channels, gamma_cap=gamma_cap),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Linear(final_channels, num_classes)

    def features(self, zs: list[torch.Tensor]) -> torch.Tensor:
        """The penultimate features (B, final_channels): everything but the linear classifier."""
        y = self.incre_modules[0](zs[0])
        for i, down in enumerate(self.downsamp_modules):
            y = self.incre_modules[i + 1](zs[i + 1]) + down(y)
        return self.final_layer(y).mean(dim=(2, 3))

    def forward(self, zs: list[torch.Tensor]) -> torch.Tensor:
        return self.classifier(self.features(zs))


class _MatrixNormCap(nn.Module):
    """Parametrisation of a linear layer's weight: the :class:`OperatorNormCap` of the same matrix
    seen as a 1x1 convolution (whose operator norm is the matrix 2-norm)."""

    def __init__(self, cap: OperatorNormCap) -> None:
        super().__init__()
        self.cap = cap

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return self.cap(weight[:, :, None, None])[:, :, 0, 0]


def cap_linear(linear: nn.Linear, max_norm: float, n_power_iterations: int = 1) -> nn.Linear:
    """Cap the spectral norm of ``linear``'s weight at ``max_norm`` (a parametrisation, exact at the
    first forward; the power iteration follows the weight during training). Returns ``linear``."""
    w = linear.weight
    cap = OperatorNormCap(max_norm, 1, linear.in_features, 1, n_power_iterations=n_power_iterations,
                          device=w.device, dtype=w.dtype)
    with torch.no_grad():
        cap.warm_up(w.detach()[:, :, None, None])
    parametrize.register_parametrization(linear, "weight", _MatrixNormCap(cap))
    return linear


def explicit_conv_sizes(stem: nn.Module, injection: nn.Module | None, head: ClassificationHead,
                        sizes: list[int]) -> list[tuple[nn.Conv2d, int]]:
    """Every conv of the explicit parts with the side of its (square) input; ``sizes`` are the
    branch resolutions (``sizes[0]`` the image's)."""
    out = [(m, sizes[0]) for part in (stem, injection) if part is not None
           for m in part.modules() if isinstance(m, nn.Conv2d)]
    for i, block in enumerate(head.incre_modules):
        out += [(m, sizes[i]) for m in block.modules() if isinstance(m, nn.Conv2d)]
    for i, down in enumerate(head.downsamp_modules):
        out += [(m, sizes[i]) for m in down.modules() if isinstance(m, nn.Conv2d)]
    out += [(m, sizes[-1]) for m in head.final_layer.modules() if isinstance(m, nn.Conv2d)]
    return out


def cap_explicit_parts(stem: nn.Module, injection: nn.Module | None, head: ClassificationHead,
                       sizes: list[int], max_norm: float, n_power_iterations: int = 1) -> None:
    """Cap the operator norm of every conv of the stem, injection and head (for its input size) and
    of the classifier's weight at ``max_norm`` (docs/MATH.md sections 6 and 9).

    Each starts *at* its cap (N(0, 1) weights scaled to operator norm ``max_norm``, zero bias): with
    every factor of the network bounded, a smaller start only shrinks the signal, layer after layer.
    """
    with torch.no_grad():
        for conv, size in explicit_conv_sizes(stem, injection, head, sizes):
            nn.init.normal_(conv.weight)
            conv.weight.mul_(max_norm / conv_module_operator_norm(conv, (size, size)))
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)
        w = head.classifier.weight
        nn.init.normal_(w)
        w.mul_(max_norm / float(torch.linalg.matrix_norm(w.double(), ord=2)))
        nn.init.zeros_(head.classifier.bias)
    for conv, size in explicit_conv_sizes(stem, injection, head, sizes):
        apply_operator_norm_cap(conv, max_norm, (size, size), n_power_iterations)
    cap_linear(head.classifier, max_norm, n_power_iterations)
