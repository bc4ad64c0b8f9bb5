"""The Lipschitz bound of the whole classifier, from images in [0, 1] to logits (docs/MATH.md section 9).

The classifier is ``x -> normalise -> stem (-> injection) = u -> z*(u) -> head -> logits``. Each
explicit linear map followed by an eval-mode BatchNorm is one convolution whose output channels are
scaled by ``gamma / sqrt(var + eps)`` (and, for the first conv, whose input channels are scaled by
``1 / std`` of the normalisation): its bound is the exact FFT norm of that folded kernel, never
above the product of the separate norms. The equilibrium contributes through the injection:
per branch, ``e <= M e + v ||du||`` with M the layer's block matrix in z and v the bound of f's
dependence on u, so ``e <= (I - M)^(-1) v ||du||`` (section 9.3). The head is bounded branch by
branch (bottleneck: product of its three folded convs plus its shortcut; stride-2 merges) and the
branches are combined with the vector of section 9.4, then the final 1x1 conv, the average pooling
(``1 / sqrt(H W)``) and the linear layer.

Every figure is an upper bound in eval mode (BatchNorm running statistics, dropout factor 1). A part
without a finite bound (NaN weights, a BatchNorm without running statistics, a conv without a cap
in ``mode="hyper"``, a layer certificate not below 1) makes the value infinite, with a reason.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from lipdeq.data.transforms import CIFAR10_STD
from lipdeq.lipschitz import LipschitzCertificate, MeanOnlyGroupNorm, conv_operator_norm, effective_weight
from lipdeq.lipschitz.operator_norm import conv_padding
from lipdeq.models.certify import injection_bounds, layer_certificate

Mode = Literal["weights", "hyper"]

__all__ = ["NetworkBound", "folded_conv_bound", "network_bound"]


@dataclass(frozen=True)
class NetworkBound:
    """The whole classifier's bound and what the pairwise certified radius needs.

    ``certificate.value`` bounds Lip(x -> logits) for images x in [0, 1] (l2, eval mode);
    ``features`` bounds Lip(x -> penultimate features) (the input of the linear layer);
    ``state_to_features`` bounds Lip(z -> penultimate features) in the equilibrium state z (l2 over
    all branches), which converts a solver's error bound into a change of the features;
    ``classifier`` is the linear layer's weight (K, F) in float64 (None where not finite).
    """

    certificate: LipschitzCertificate
    features: float
    state_to_features: float
    classifier: Tensor | None


def _mul(*factors: float) -> float:
    """Product where an exact zero wins over infinity (an absent path contributes nothing)."""
    if any(f == 0.0 for f in factors):
        return 0.0
    return math.prod(factors)


class _Reasons:
    """Collects why parts have no finite bound: each reason once, with the parts it concerns."""

    def __init__(self) -> None:
        self.items: dict[str, list[str]] = {}

    def add(self, why: str, what: str | None = None) -> float:
        parts = self.items.setdefault(why, [])
        if what is not None and what not in parts:
            parts.append(what)
        return math.inf

    def text(self) -> str | None:
        return "; ".join(f"{why} ({', '.join(parts)})" if parts else why
                         for why, parts in self.items.items()) or None


def _norm_scale(norm: nn.Module, what: str, reasons: _Reasons) -> tuple[Tensor | None, float]:
    """(per-channel diagonal to fold into the conv, or None; a scalar factor to multiply instead)."""
    if isinstance(norm, nn.Identity):
        return None, 1.0
    if isinstance(norm, nn.BatchNorm2d):
        if norm.running_var is None:
            return None, reasons.add("BatchNorm without running statistics has no eval-mode bound", what)
        scale = 1.0 / torch.sqrt(norm.running_var.detach().double() + norm.eps)
        if norm.weight is not None:
            scale = scale * norm.weight.detach().double()
        return scale, 1.0
    if isinstance(norm, MeanOnlyGroupNorm):
        # projection (norm 1), then the clamped gains: max |gamma| (docs/MATH.md section 3.2)
        return None, norm.lipschitz_constant()
    return None, reasons.add(f"no Lipschitz bound for a {type(norm).__name__}", what)


def folded_conv_bound(
    conv: nn.Conv2d,
    norm: nn.Module,
    input_size: int,
    *,
    input_scale: Sequence[float] | Tensor | None = None,
    mode: Mode = "weights",
    cap: float | None = None,
    gn_cap: float | None = None,
    what: str = "conv",
    reasons: _Reasons | None = None,
) -> float:
    """Upper bound of the l2 operator norm of ``x -> norm(conv(diag(input_scale) x))`` (biases and
    shifts dropped: they do not change a Lipschitz constant), eval mode, on square inputs of side
    ``input_size``.

    ``mode="weights"``: an eval-mode BatchNorm scales output channel c by ``gamma_c /
    sqrt(var_c + eps)``, which is folded into the kernel with ``input_scale`` (per input channel);
    the bound is the exact FFT norm of the folded kernel (docs/MATH.md section 5), at most the
    product of the parts' norms. A mean-only GroupNorm multiplies by ``max |gamma|``.
    ``mode="hyper"``: ``cap`` for the conv (``None``: no bound), ``gn_cap`` for a mean-only norm's
    gains, ``max |input_scale|``; a BatchNorm has no hyperparameter bound.
    """
    reasons = reasons if reasons is not None else _Reasons()
    scale_in = None if input_scale is None else torch.as_tensor(input_scale, dtype=torch.float64).flatten()
    if mode == "hyper":
        c = reasons.add("no operator-norm cap (explicit_cap=None)", what) if cap is None else float(cap)
        if isinstance(norm, nn.BatchNorm2d):
            g = reasons.add("an eval-mode BatchNorm's gain gamma/sqrt(var+eps) is not bounded by "
                            "any hyperparameter (use explicit_norm='mean_only' or 'none')", what)
        elif isinstance(norm, MeanOnlyGroupNorm) and norm.affine:
            g = reasons.add("mean-only GroupNorm gains without gn_cap", what) if gn_cap is None else float(gn_cap)
        else:
            g = 1.0
        s = 1.0 if scale_in is None else float(scale_in.abs().max())
        return _mul(c, g, s)
    weight = effective_weight(conv).to(torch.float64)
    out_scale, factor = _norm_scale(norm, what, reasons)
    if out_scale is not None:
        weight = weight * out_scale.to(weight.device).view(-1, 1, 1, 1)
    if scale_in is not None:
        if scale_in.numel() != weight.shape[1] or conv.groups != 1:
            raise ValueError(f"{what}: input_scale has {scale_in.numel()} entries for {weight.shape[1]} input "
                             f"channels (groups={conv.groups})")
        weight = weight * scale_in.to(weight.device).view(1, -1, 1, 1)
    if not bool(torch.isfinite(weight).all()) or not math.isfinite(factor):
        return reasons.add("a weight or a norm statistic is NaN or Inf", what)
    norm_value = conv_operator_norm(weight, (input_size, input_size), stride=conv.stride,
                                    padding=conv_padding(conv), dilation=conv.dilation, groups=conv.groups)
    return _mul(norm_value, factor)


def layer_injection_bounds(layer: nn.Module, mode: Mode = "weights") -> tuple[np.ndarray, np.ndarray]:
    """``(M, v)``: M[i, j] bounds ``||f_i(z) - f_i(z')||`` per unit ``||z_j - z'_j||`` (the layer
    certificate's block matrix, docs/MATH.md sections 4.2 and 10) and v[i] bounds
    ``||f_i(z, u) - f_i(z, u')||`` per unit ``||u - u'||`` (section 9.3), eval mode. Both come from
    :mod:`lipdeq.models.certify`: one set of formulas for the layer."""
    cert = layer_certificate(layer, mode=mode)
    m = np.array(cert.matrix, dtype=np.float64)
    return m, np.array(injection_bounds(layer, mode=mode), dtype=np.float64)


def _equilibrium_gain(head_vec: np.ndarray, m: np.ndarray, v: np.ndarray, lip: float) -> float:
    """Bound of ``sum_i a_i ||z*_i(u) - z*_i(u')||`` per unit ``||u - u'||`` (docs/MATH.md section 9.3):
    the smaller of ``a . (I - M)^(-1) v`` (when the spectral radius of M is below 1) and
    ``||a|| ||v|| / (1 - L)``."""
    if not (np.all(np.isfinite(head_vec)) and np.all(np.isfinite(v))):
        return math.inf
    scalar = float(np.linalg.norm(head_vec) * np.linalg.norm(v)) / (1.0 - lip)
    if not np.all(np.isfinite(m)) or float(np.max(np.abs(np.linalg.eigvals(m)))) >= 1.0:
        return scalar
    # (I - M)^(-1) = sum_k M^k is entrywise nonnegative; clip the round-off of a solve
    w = np.clip(np.linalg.solve(np.eye(len(v)) - m, v), 0.0, None)
    return min(scalar, float(head_vec @ w))


def _head_vector(model: nn.Module, mode: Mode, reasons: _Reasons, parts: dict[str, float]) -> np.ndarray:
    """a[i] bounds the change of the head's merged map (before the final 1x1 conv) per unit change
    of branch i of the state (docs/MATH.md section 9.4)."""
    cfg, head, sizes = model.cfg, model.head, model.layer.sizes
    kw = dict(mode=mode, cap=cfg.explicit_cap, gn_cap=cfg.gn_cap, reasons=reasons)
    n = cfg.num_branches
    bneck = []
    for i, b in enumerate(head.incre_modules):
        convs = ((b.conv1, b.bn1, "conv1"), (b.conv2, b.bn2, "conv2"), (b.conv3, b.bn3, "conv3"))
        chain = [folded_conv_bound(conv, bn, sizes[i], what=f"head.branch{i}.{name}", **kw) for conv, bn, name in convs]
        if isinstance(b.shortcut, nn.Identity):
            short = 1.0
        else:
            short = folded_conv_bound(b.shortcut[0], b.shortcut[1], sizes[i], what=f"head.branch{i}.shortcut", **kw)
        # out = relu(chain(x) + shortcut(x)): triangle inequality, ReLU 1
        bneck.append(_mul(*chain) + short)
        parts[f"head.branch{i}.bottleneck"] = bneck[-1]
    downs = []
    for k, d in enumerate(head.downsamp_modules):
        downs.append(folded_conv_bound(d[0], d[1], sizes[k], what=f"head.merge{k}", **kw))
        parts[f"head.merge{k}->{k + 1}"] = downs[-1]
    vec = np.array([_mul(bneck[i], *downs[i:]) for i in range(n)])
    for i in range(n):
        parts[f"head.branch{i}"] = float(vec[i])
    return vec


_CACHE_ATTR = "_network_bound_cache"


def _state(model: nn.Module) -> list[Tensor]:
    return [t.detach() for t in (*model.parameters(), *model.buffers())]


def network_bound(model: nn.Module, *, mode: Mode = "weights",
                  input_std: Sequence[float] | None = None) -> NetworkBound:
    """The bound of the whole classifier ``model`` (a :class:`~lipdeq.models.MultiscaleDEQ`) from images in
    [0, 1] to logits (l2, eval mode).

    ``input_std``: the per-channel standard deviations of the normalisation the images go through
    before ``model(x)`` (default: lipdeq's CIFAR-10 normalisation, ``lipdeq.data.CIFAR10_STD``).
    The default bound of the weights is cached on the model until any parameter or buffer changes
    (compared by content, as the layer certificate's cache).
    """
    if mode not in ("weights", "hyper"):
        raise ValueError(f"unknown certificate mode {mode!r}: use 'weights' or 'hyper'")
    if mode != "weights" or input_std is not None:
        return _network_bound(model, mode, input_std)
    now = _state(model)
    cached = getattr(model, _CACHE_ATTR, None)
    if cached is not None and len(cached[0]) == len(now) and all(
        a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)
        for a, b in zip(cached[0], now)
    ):
        return cached[1]
    result = _network_bound(model, mode, None)
    # snapshot after the computation: in training mode, reading a capped weight advances its cap
    object.__setattr__(model, _CACHE_ATTR, ([t.clone() for t in _state(model)], result))
    return result


def _network_bound(model: nn.Module, mode: Mode, input_std: Sequence[float] | None) -> NetworkBound:
    cfg = model.cfg
    std = tuple(CIFAR10_STD if input_std is None else input_std)
    if len(std) != cfg.in_channels or not all(math.isfinite(s) and s > 0 for s in std):
        raise ValueError(f"input_std must hold {cfg.in_channels} positive numbers (one per input channel), got {std}")
    reasons = _Reasons()
    parts: dict[str, float] = {"normalisation": 1.0 / min(std)}
    kw = dict(mode=mode, cap=cfg.explicit_cap, gn_cap=cfg.gn_cap, reasons=reasons)
    size = cfg.image_size
    with torch.no_grad():
        # the normalisation (x - mean) / std is folded into the first conv's input channels
        parts["stem.conv1"] = folded_conv_bound(model.stem[0], model.stem[1], size,
                                                input_scale=[1.0 / s for s in std], what="stem.conv1", **kw)
        parts["stem.conv2"] = folded_conv_bound(model.stem[3], model.stem[4], size, what="stem.conv2", **kw)
        k_in = _mul(parts["stem.conv1"], parts["stem.conv2"])
        if model.injection is not None:
            parts["injection"] = folded_conv_bound(model.injection[0], model.injection[1], size,
                                                   what="injection", **kw)
            k_in = _mul(k_in, parts["injection"])
        parts["input"] = k_in  # Lip(pixels -> u)

        layer_cert = model.lipschitz_bound(mode=mode)
        lip = layer_cert.value
        parts["layer"] = lip
        # the same block matrix as the (cached) layer certificate; v by the same chains
        m = np.array(layer_cert.matrix, dtype=np.float64)
        v = np.array(injection_bounds(model.layer, mode=mode), dtype=np.float64)
        for i, vi in enumerate(v):
            parts[f"layer.u->branch{i}"] = float(vi)

        head_vec = _head_vector(model, mode, reasons, parts)
        head = model.head
        final = folded_conv_bound(head.final_layer[0], head.final_layer[1], model.layer.sizes[-1],
                                  what="head.final", **kw)
        pool = 1.0 / model.layer.sizes[-1]  # mean over H*W pixels: 1 / sqrt(H W)
        parts["head.final"], parts["head.pool"] = final, pool
        w = effective_weight(head.classifier).to(torch.float64).cpu()
        if not bool(torch.isfinite(w).all()):
            classifier, w = reasons.add("a weight or a norm statistic is NaN or Inf", "head.classifier"), None
        elif mode == "hyper" and cfg.explicit_cap is None:
            classifier = reasons.add("no operator-norm cap (explicit_cap=None)", "head.classifier")
        elif mode == "hyper":
            classifier = float(cfg.explicit_cap)
        else:
            classifier = float(torch.linalg.matrix_norm(w, ord=2))
        parts["head.classifier"] = classifier

    if not lip < 1.0:
        why = f" ({layer_cert.reason})" if layer_cert.reason else ""
        reasons.add(f"the layer certificate {lip:.4g} is not below 1{why}: the equilibrium z*(x) is not "
                    "certified to exist, be unique and depend continuously on x")
        gain = math.inf
    else:
        gain = _equilibrium_gain(head_vec, m, v, lip)
    parts["equilibrium"] = gain  # Lip(u -> merged head map), through z*
    state_to_features = _mul(float(np.linalg.norm(head_vec)), final, pool)
    features = _mul(k_in, gain, final, pool)
    value = _mul(features, classifier)
    parts["state->features"], parts["features"], parts["network"] = state_to_features, features, value
    if reasons.items or not math.isfinite(value):
        # a part without a finite bound: no finite figure, even where a zero factor would hide it
        value = features = math.inf
    cert = LipschitzCertificate(value=value, parts=parts, matrix=m.tolist(), reason=reasons.text(),
                                mode=mode)
    return NetworkBound(certificate=cert, features=features, state_to_features=state_to_features,
                        classifier=w)
