"""Reference for the tests: the layer certificate as lipdeq computed it before the composable
certificates (docs/MATH.md section 4.1, products of the parts' bounds), kept verbatim.

The library's :func:`lipdeq.models.certify.layer_certificate` must never be above this on the same
weights (eval mode, or training mode with the same dropout factor); the tests compare the two.
The library does not use this module.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from lipdeq.lipschitz import (
    LipschitzCertificate,
    MeanOnlyGroupNorm,
    block_matrix_bound,
    conv_operator_norm,
    effective_weight,
)
from lipdeq.models.config import ModelConfig

Mode = Literal["weights", "hyper"]

_NO_BOUND_REASON = (
    "standard GroupNorm divides by the per-sample standard deviation, which has no global "
    "Lipschitz bound (use norm='mean_only' and a conv_cap for a certificate)"
)


def _mul(*factors: float) -> float:
    """Product where an exact zero wins over infinity (a term that is absent contributes 0)."""
    if any(f == 0.0 for f in factors):
        return 0.0
    return math.prod(factors)


def _norm_constant(norm: nn.Module, cfg: ModelConfig, mode: Mode) -> float:
    if not isinstance(norm, MeanOnlyGroupNorm):
        return math.inf
    if mode == "hyper":
        if not norm.affine:
            return 1.0
        return math.inf if cfg.gn_cap is None else float(cfg.gn_cap)
    return norm.lipschitz_constant()


def _conv_constant(conv: nn.Conv2d, input_size: int, cfg: ModelConfig, mode: Mode) -> float:
    if mode == "hyper":
        return math.inf if cfg.conv_cap is None else float(cfg.conv_cap)
    weight = effective_weight(conv)
    if not bool(torch.isfinite(weight).all()):
        return math.inf  # no finite bound for a weight with NaN/Inf (and the FFT's SVD would fail on it)
    return conv_operator_norm(weight, (input_size, input_size), stride=conv.stride[0])


def reference_layer_certificate(
    layer: nn.Module, *, mode: Mode = "weights", training: bool = False
) -> LipschitzCertificate:
    """Upper bound of Lip(f) in z (l2 over the whole state) for a :class:`MultiscaleLayer`.

    Args:
        layer: the multiscale layer.
        mode: ``"weights"`` certifies the current weights (FFT operator norms of the effective
            weights, clipped gammas); ``"hyper"`` assumes every conv at its cap and every gamma at
            ``gn_cap``: it says from the hyperparameters alone whether convergence is guaranteed.
        training: include the training-time dropout factor (``1/(1-p)`` for rescaled masks).
    """
    cfg: ModelConfig = layer.cfg
    n = cfg.num_branches
    s = cfg.relu_slope
    parts: dict[str, float] = {}
    drop = 1.0 / (1.0 - cfg.dropout) if (training and cfg.dropout_rescale and cfg.dropout > 0) else 1.0
    parts["dropout"] = drop

    block_bounds, post_bounds = [], []
    for i, (blk, post) in enumerate(zip(layer.branches, layer.post_fuse_layers)):
        size = layer.sizes[i]
        c1 = _conv_constant(blk.conv1, size, cfg, mode)
        c2 = _conv_constant(blk.conv2, size, cfg, mode)
        g1, g2, g3 = (_norm_constant(g, cfg, mode) for g in (blk.gn1, blk.gn2, blk.gn3))
        if cfg.mixing == "convex":
            lb = _mul(g3, s, (1.0 - cfg.alpha) + _mul(cfg.alpha, g2, drop, c2, g1, s, c1))
        else:
            lb = _mul(g3, s, 1.0 + _mul(g2, drop, c2, g1, s, c1))
        cp = _conv_constant(post.conv, size, cfg, mode)
        gp = _norm_constant(post.norm, cfg, mode)
        lp = _mul(gp, cp, s)
        parts.update({
            f"branch{i}.conv1": c1, f"branch{i}.conv2": c2, f"branch{i}.gn1": g1, f"branch{i}.gn2": g2,
            f"branch{i}.gn3": g3, f"branch{i}.block": lb, f"branch{i}.post_conv": cp,
            f"branch{i}.post_norm": gp, f"branch{i}.post": lp,
        })
        block_bounds.append(lb)
        post_bounds.append(lp)

    weights = layer.fusion_w.double().cpu()
    matrix = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(n):
            if i == j:
                m = 1.0 if cfg.mixing == "sum" else 1.0 - cfg.beta
            else:
                fuse = layer.fuse_layers[i][j]
                if j > i:
                    # 1x1 conv, norm, nearest upsampling by 2**(j-i) (operator norm exactly 2**(j-i))
                    c = _conv_constant(fuse.conv, layer.sizes[j], cfg, mode)
                    t = _mul(2.0 ** (j - i), c, _norm_constant(fuse.norm, cfg, mode))
                else:
                    convs = [
                        _conv_constant(conv, layer.sizes[j] // 2**k, cfg, mode) for k, conv in enumerate(fuse.convs)
                    ]
                    # (i-j) stride-2 convs, each followed by a norm, scaled ReLU between stages
                    norms = [_norm_constant(g, cfg, mode) for g in fuse.norms]
                    t = _mul(*convs, *norms, s ** (len(convs) - 1))
                parts[f"fuse{i}<-{j}"] = t
                w = float(weights[i, j])
                m = _mul(w, t) if cfg.mixing == "sum" else _mul(cfg.beta, w, t)
            matrix[i][j] = _mul(post_bounds[i], m, block_bounds[j])

    finite = all(math.isfinite(v) for row in matrix for v in row)
    if finite:
        value = block_matrix_bound(torch.tensor(matrix, dtype=torch.float64))
        reason = None
    else:
        value = math.inf
        if cfg.norm == "group":
            reason = _NO_BOUND_REASON
        elif mode == "weights" and cfg.conv_cap is not None:
            reason = "a weight of f contains NaN or Inf"
        else:
            reason = "an unconstrained conv (conv_cap=None) has no bound"
    return LipschitzCertificate(value=value, parts=parts, matrix=matrix, reason=reason, mode=mode)
