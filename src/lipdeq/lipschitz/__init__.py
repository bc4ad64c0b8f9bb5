"""Lipschitz building blocks, operator-norm certificates and composable certificates.

Every block reports a certified bound of itself and compositions of blocks are certified with a
per-part breakdown: :func:`lipschitz_bound` (any module), the containers :class:`LipschitzSequential`,
:class:`Mix` (:func:`convex_residual`) and :class:`BlockMatrix`, and the pure combinators
:func:`compose`, :func:`mix` and :func:`block_matrix` on numbers, :class:`Bound` trees and
certificates (docs/MATH.md sections 3, 4 and 10).
"""

from __future__ import annotations

from lipdeq.lipschitz.activations import ScaledReLU
from lipdeq.lipschitz.blocks import BoundOptions, CertificateError, lipschitz_bound, module_atoms
from lipdeq.lipschitz.certificate import LipschitzCertificate, block_matrix_bound
from lipdeq.lipschitz.chain import chain_bound
from lipdeq.lipschitz.compose import Bound, block_matrix, compose, mix
from lipdeq.lipschitz.containers import BlockMatrix, LipschitzSequential, Mix, convex_residual
from lipdeq.lipschitz.conv_cap import (
    OperatorNormCap,
    apply_operator_norm_cap,
    effective_weight,
    find_operator_norm_cap,
)
from lipdeq.lipschitz.dropout import VariationalDropout2d
from lipdeq.lipschitz.formulas import (
    downsample_fusion_bound,
    post_fusion_bound,
    residual_block_bound,
    upsample_fusion_bound,
)
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
    "BlockMatrix",
    "Bound",
    "BoundOptions",
    "CertificateError",
    "LipschitzCertificate",
    "LipschitzSequential",
    "MeanOnlyGroupNorm",
    "Mix",
    "OperatorNormCap",
    "ScaledReLU",
    "VariationalDropout2d",
    "apply_operator_norm_cap",
    "block_matrix",
    "block_matrix_bound",
    "chain_bound",
    "circular_conv_operator_norm",
    "circular_grid_size",
    "compose",
    "conv_module_operator_norm",
    "conv_operator_norm",
    "convex_residual",
    "downsample_fusion_bound",
    "effective_weight",
    "find_operator_norm_cap",
    "lipschitz_bound",
    "mix",
    "module_atoms",
    "polyphase_dft_blocks",
    "post_fusion_bound",
    "power_iteration_conv_norm",
    "residual_block_bound",
    "upsample_fusion_bound",
]
