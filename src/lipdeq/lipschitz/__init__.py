"""Lipschitz building blocks, operator-norm certificates and the certificate arithmetic."""

from __future__ import annotations

from lipdeq.lipschitz.activations import ScaledReLU
from lipdeq.lipschitz.certificate import (
    LipschitzCertificate,
    block_matrix_bound,
    downsample_fusion_bound,
    post_fusion_bound,
    residual_block_bound,
    upsample_fusion_bound,
)
from lipdeq.lipschitz.conv_cap import (
    OperatorNormCap,
    apply_operator_norm_cap,
    effective_weight,
    find_operator_norm_cap,
)
from lipdeq.lipschitz.dropout import VariationalDropout2d
from lipdeq.lipschitz.groupnorm import MeanOnlyGroupNorm
from lipdeq.lipschitz.operator_norm import (
    circular_conv_operator_norm,
    circular_grid_size,
    conv_module_operator_norm,
    conv_operator_norm,
    polyphase_dft_blocks,
    power_iteration_conv_norm,
)

__all__ = [
    "LipschitzCertificate",
    "MeanOnlyGroupNorm",
    "OperatorNormCap",
    "ScaledReLU",
    "VariationalDropout2d",
    "apply_operator_norm_cap",
    "block_matrix_bound",
    "circular_conv_operator_norm",
    "circular_grid_size",
    "conv_module_operator_norm",
    "conv_operator_norm",
    "downsample_fusion_bound",
    "effective_weight",
    "find_operator_norm_cap",
    "polyphase_dft_blocks",
    "post_fusion_bound",
    "power_iteration_conv_norm",
    "residual_block_bound",
    "upsample_fusion_bound",
]
