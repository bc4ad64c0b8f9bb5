"""Explicit (non-equilibrium) parts of the classifier: stem, input injection, HRNet-style head.

These follow the MDEQ reference code (Bai et al. 2020, MDEQ-Vision) and are never constrained:
they do not affect convergence (docs/MATH.md section 2.5).
"""

from __future__ import annotations

import torch
from torch import nn

BN_MOMENTUM = 0.1


def conv3x3(c_in: int, c_out: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    """3x3 convolution with padding 1."""
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=bias)


def make_stem(in_channels: int, channels: int) -> nn.Sequential:
    """Two conv3x3 + BN + ReLU at full resolution (MDEQ's ``downsample`` with 0 downsamplings)."""
    return nn.Sequential(
        conv3x3(in_channels, channels),
        nn.BatchNorm2d(channels, momentum=BN_MOMENTUM),
        nn.ReLU(inplace=True),
        conv3x3(channels, channels),
        nn.BatchNorm2d(channels, momentum=BN_MOMENTUM),
        nn.ReLU(inplace=True),
    )


def make_injection(channels: int) -> nn.Sequential:
    """MDEQ's ``stage0``: conv1x1 + BN + ReLU mapping the stem output to the injection of branch 1."""
    return nn.Sequential(
        nn.Conv2d(channels, channels, kernel_size=1, bias=False),
        nn.BatchNorm2d(channels, momentum=BN_MOMENTUM),
        nn.ReLU(inplace=False),
    )


class Bottleneck(nn.Module):
    """The head's bottleneck (expansion 4, BN without affine inside, affine BN on the shortcut)."""

    expansion = 4

    def __init__(self, c_in: int, planes: int) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(c_in, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes, momentum=BN_MOMENTUM, affine=False)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes, momentum=BN_MOMENTUM, affine=False)
        self.conv3 = nn.Conv2d(planes, out, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out, momentum=BN_MOMENTUM, affine=False)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if c_in != out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, out, kernel_size=1, bias=False), nn.BatchNorm2d(out, momentum=BN_MOMENTUM)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + self.shortcut(x))


class ClassificationHead(nn.Module):
    """HRNet-style head: a bottleneck per branch, stride-2 merges from fine to coarse, conv1x1 to
    ``final_channels`` + BN + ReLU, global average pooling, linear classifier."""

    def __init__(
        self, channels: list[int], head_channels: list[int], final_channels: int, num_classes: int
    ) -> None:
        super().__init__()
        e = Bottleneck.expansion
        self.incre_modules = nn.ModuleList(Bottleneck(c, h) for c, h in zip(channels, head_channels))
        self.downsamp_modules = nn.ModuleList(
            nn.Sequential(
                conv3x3(head_channels[i] * e, head_channels[i + 1] * e, stride=2, bias=True),
                nn.BatchNorm2d(head_channels[i + 1] * e, momentum=BN_MOMENTUM),
                nn.ReLU(inplace=True),
            )
            for i in range(len(channels) - 1)
        )
        self.final_layer = nn.Sequential(
            nn.Conv2d(head_channels[-1] * e, final_channels, kernel_size=1),
            nn.BatchNorm2d(final_channels, momentum=BN_MOMENTUM),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Linear(final_channels, num_classes)

    def forward(self, zs: list[torch.Tensor]) -> torch.Tensor:
        y = self.incre_modules[0](zs[0])
        for i, down in enumerate(self.downsamp_modules):
            y = self.incre_modules[i + 1](zs[i + 1]) + down(y)
        y = self.final_layer(y).mean(dim=(2, 3))
        return self.classifier(y)
