"""The certified bound of each Lipschitz building block, and of any module made of them.

:func:`lipschitz_bound` certifies a module (l2, per sample): a block on its own, or a
``nn.Sequential`` / :class:`~lipdeq.lipschitz.LipschitzSequential` / :class:`~lipdeq.lipschitz.Mix`
/ :class:`~lipdeq.lipschitz.BlockMatrix` of them, nested freely. Each block becomes one or more
:class:`~lipdeq.lipschitz.chain.Atom` (:func:`module_atoms`), a sequence of atoms is bounded by
:func:`~lipdeq.lipschitz.chain.chain_bound` (products, tightened where linear pieces meet), mixes
by ``sum |c_k| L_k`` and block matrices by the spectral norm of their bounds (docs/MATH.md
sections 3 and 10). The rules per block:

======================================  =====================================================
``nn.Conv2d`` (zero padding)            FFT norm of the effective weight (after weight norm and
                                        an operator-norm cap) on its input size (a cap knows it)
``nn.Linear``                           spectral norm of the effective weight
:class:`MeanOnlyGroupNorm`              a mean subtraction (1) and the clipped gains (max |gamma|;
                                        no gains without affine)
``nn.BatchNorm2d`` in eval mode         per-channel gains ``gamma / sqrt(running_var + eps)``
:class:`ScaledReLU`, ``nn.ReLU``,       their slope range (``|s|``, 1, ``max(1, |a|)``, 1, 1/4)
``nn.LeakyReLU``, ``nn.Tanh``,
``nn.Sigmoid``
:class:`VariationalDropout2d`           training: 1 (``1/(1-p)`` if rescaled); eval: ``1 - p``
``nn.Dropout`` / ``nn.Dropout2d``       unless rescaled (then 1); torch's dropouts rescale
nearest ``nn.Upsample`` by r            exactly r
``nn.AvgPool2d``                        1/k for k x k windows with stride k; otherwise the FFT
                                        norm of the equivalent depthwise convolution
``nn.AdaptiveAvgPool2d``                1/sqrt(HW) for global pooling (windows that tile)
``nn.Identity``, ``nn.Flatten``         1
a module with ``lipschitz_bound``       what it returns (``input_size=``, ``training=``)
======================================  =====================================================

Anything else (standard GroupNorm, BatchNorm in training mode, softmax, attention) has no rule:
its bound is infinite, with the reason in the certificate.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.nn.utils import parametrize

from lipdeq.errors import LipdeqError
from lipdeq.lipschitz.activations import ScaledReLU
from lipdeq.lipschitz.certificate import LipschitzCertificate
from lipdeq.lipschitz.chain import Atom, ConvSpec, chain_bound
from lipdeq.lipschitz.chain_norms import conv_output_size
from lipdeq.lipschitz.compose import Bound
from lipdeq.lipschitz.conv_cap import OperatorNormCap, find_operator_norm_cap
from lipdeq.lipschitz.dropout import VariationalDropout2d
from lipdeq.lipschitz.groupnorm import MeanOnlyGroupNorm
from lipdeq.lipschitz.operator_norm import _pair, conv_operator_norm, conv_padding

__all__ = ["BoundOptions", "CertificateError", "lipschitz_bound", "module_atoms"]

Size = tuple[int, int] | None


class CertificateError(LipdeqError, ValueError):
    """A module cannot be certified as given (an input size is missing or does not fit)."""


@dataclass(frozen=True)
class BoundOptions:
    """What a bound certifies.

    ``mode="weights"``: the current weights. ``mode="hyper"``: the worst case the caps allow (every
    capped conv at its cap, or ``conv_cap``; every affine gain at its gamma cap, or ``gn_cap``;
    every :class:`ScaledReLU` at its slope, or ``relu_slope``), reading no weight; dropout then
    counts 1 in eval mode, so that the bound also covers the training-time map of unrescaled masks
    (docs/MATH.md section 4.3). ``training``: certify the training-time map (dropout masks, batch
    statistics) instead of the eval-mode one. ``tighten=False``: plain products of the blocks'
    bounds (no chain tightening of section 10), for comparison. ``conv_norm`` (mode
    ``"weights"``): a caller's certified upper bound of each convolution's operator norm, called
    as ``conv_norm(conv, spec)`` instead of computing its FFT norm (the running certificate of
    training steps, :mod:`lipdeq.models.running_certificate`); such convs are not tightened jointly.
    """

    mode: Literal["weights", "hyper"] = "weights"
    training: bool = False
    tighten: bool = True
    conv_cap: float | None = None
    gn_cap: float | None = None
    relu_slope: float | None = None
    conv_norm: Callable[[nn.Conv2d, ConvSpec], float] | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("weights", "hyper"):
            raise ValueError(f"unknown certificate mode {self.mode!r}: use 'weights' or 'hyper'")

    @property
    def hyper(self) -> bool:
        return self.mode == "hyper"


def _infinite(name: str, why: str) -> Atom:
    return Atom(name, "barrier", math.inf, note=why)


def _size_of(size: Size, name: str, what: str) -> tuple[int, int]:
    if size is None:
        raise CertificateError(f"{name}: the input size of {what} is needed for its bound: pass input_size=(H, W)")
    return size


def _matrix_cap(module: nn.Module) -> float | None:
    """The max_norm of an :class:`OperatorNormCap` anywhere in ``module.weight``'s parametrisations."""
    if not parametrize.is_parametrized(module, "weight"):
        return None
    for p in module.parametrizations["weight"]:
        for m in p.modules():
            if isinstance(m, OperatorNormCap):
                return m.max_norm
    return None


def _conv_atoms(conv: nn.Conv2d, size: Size, opts: BoundOptions, name: str) -> tuple[list[Atom], Size]:
    if conv.padding_mode != "zeros":
        return [_infinite(name, f"padding_mode={conv.padding_mode!r}: only zero padding is certified")], None
    cap = find_operator_norm_cap(conv)
    if size is None and cap is not None:
        size = cap.input_size
    if size is None and opts.hyper:  # the bound is the cap, whatever the input
        value = opts.conv_cap if opts.conv_cap is not None else math.inf
        return [Atom(name, "conv", float(value), note="the cap" if math.isfinite(value) else
                     "a convolution without an operator-norm cap")], None
    size = _size_of(size, name, "a convolution")
    pad, st, dil = conv_padding(conv), tuple(conv.stride), tuple(conv.dilation)
    out = tuple(conv_output_size(size[i], conv.kernel_size[i], st[i], pad[i], dil[i]) for i in range(2))
    if min(out) < 1:
        raise CertificateError(f"{name}: input size {size} is too small for kernel {conv.kernel_size}")
    spec = ConvSpec(None, size, out, st, pad, dil, conv.groups, conv.in_channels, conv.out_channels)
    if opts.hyper:
        value = opts.conv_cap if opts.conv_cap is not None else (cap.max_norm if cap is not None else None)
        if value is None or not math.isfinite(value):
            return [Atom(name, "conv", math.inf, note="a convolution without an operator-norm cap", conv=spec)], out
        return [Atom(name, "conv", float(value), note="the cap", conv=spec)], out
    if opts.conv_norm is not None:
        return [Atom(name, "conv", float(opts.conv_norm(conv, spec)), note="the caller's certified bound",
                     conv=spec)], out
    w = conv.weight.detach().to(torch.float64)
    if not bool(torch.isfinite(w).all()):
        return [Atom(name, "conv", math.inf, note="a weight contains NaN or Inf", conv=spec)], out
    spec.weight = w
    return [Atom(name, "conv", note="FFT operator norm (section 5)", conv=spec)], out


def _gain_atom(name: str, gamma: torch.Tensor, channels: int, note: str) -> Atom:
    g = gamma.detach().to(torch.float64)
    if not bool(torch.isfinite(g).all()):
        return Atom(name, "gain", math.inf, note="a gain contains NaN or Inf", channels=channels)
    return Atom(name, "gain", float(g.abs().max()), note=note, channels=channels, gamma=g)


def _norm_atoms(norm: nn.Module, opts: BoundOptions, name: str) -> list[Atom]:
    if isinstance(norm, MeanOnlyGroupNorm):
        atoms = [Atom(f"{name}.mean", "mean", 1.0, note="orthogonal projection", channels=norm.num_channels,
                      groups=norm.num_groups)]
        if not norm.affine:
            return atoms
        if opts.hyper:
            cap = opts.gn_cap if opts.gn_cap is not None else norm.gamma_cap
            value = math.inf if cap is None else float(cap)
            note = "the gain cap" if cap is not None else "affine gains without a cap (gn_cap=None)"
            return [*atoms, Atom(f"{name}.gain", "gain", value, note=note, channels=norm.num_channels)]
        return [*atoms, _gain_atom(f"{name}.gain", norm.clamped_weight(), norm.num_channels, "max |clamped gamma|")]
    if isinstance(norm, nn.modules.batchnorm._BatchNorm):
        if opts.training or not norm.track_running_stats or norm.running_var is None:
            return [_infinite(name, "BatchNorm with batch statistics has no global Lipschitz bound")]
        if opts.hyper:
            return [_infinite(name, "BatchNorm gains have no cap")]
        scale = (norm.running_var.detach().double() + norm.eps).rsqrt()
        if norm.weight is not None:
            scale = scale * norm.weight.detach().double()
        return [_gain_atom(name, scale, norm.num_features, "eval-mode BatchNorm: gamma / sqrt(var + eps)")]
    return [_infinite(name, f"{type(norm).__name__} divides by a per-sample statistic: no global Lipschitz bound "
                            "(use MeanOnlyGroupNorm)")]


def _elementwise(name: str, lo: float, hi: float, note: str) -> Atom:
    return Atom(name, "elementwise", max(abs(lo), abs(hi)), note=note, lo=lo, hi=hi)


def _dropout_atom(drop: nn.Module, opts: BoundOptions, name: str) -> Atom:
    p = float(drop.p)
    rescale = getattr(drop, "rescale", True)  # torch's dropouts rescale by 1 / (1 - p)
    if p == 0:
        return _elementwise(name, 1.0, 1.0, "p = 0")
    if opts.training:
        hi = 1.0 / (1.0 - p) if rescale else 1.0
        return _elementwise(name, 0.0, hi, "training-time mask" + (" / (1 - p)" if rescale else ""))
    if rescale or opts.hyper:
        return _elementwise(name, 1.0, 1.0, "eval mode: identity" if rescale else "eval mode, counted as 1")
    return _elementwise(name, 1.0 - p, 1.0 - p, "eval mode: x * (1 - p)")


def _pool_atoms(pool: nn.Module, size: Size, name: str) -> tuple[list[Atom], Size]:
    if isinstance(pool, nn.AdaptiveAvgPool2d):
        size = _size_of(size, name, "an adaptive pooling")
        target = pool.output_size if isinstance(pool.output_size, tuple) else (pool.output_size,) * 2
        target = tuple(size[i] if target[i] is None else int(target[i]) for i in range(2))
        if any(size[i] % target[i] for i in range(2)):
            return [_infinite(name, f"adaptive pooling of {size} to {target}: windows that do not tile")], target
        k = (size[0] // target[0], size[1] // target[1])
        return [Atom(name, "spatial", 1.0 / math.sqrt(k[0] * k[1]), note="mean of k pixels: 1/sqrt(k)")], target
    k, s, p = _pair(pool.kernel_size, "kernel_size", 1), _pair(pool.stride or pool.kernel_size, "stride", 1), \
        _pair(pool.padding, "padding", 0)
    if pool.ceil_mode or pool.divisor_override is not None or (p != (0, 0) and not pool.count_include_pad):
        return [_infinite(name, "average pooling with ceil_mode, divisor_override or count_include_pad=False")], None
    size = _size_of(size, name, "an average pooling")
    out = tuple(conv_output_size(size[i], k[i], s[i], p[i]) for i in range(2))
    if s == k and p == (0, 0):
        return [Atom(name, "spatial", 1.0 / math.sqrt(k[0] * k[1]), note="disjoint windows: 1/sqrt(k_h k_w)")], out
    kernel = torch.full((1, 1, *k), 1.0 / (k[0] * k[1]), dtype=torch.float64)
    value = conv_operator_norm(kernel, size, stride=s, padding=p)
    return [Atom(name, "spatial", value, note="FFT norm of the equivalent depthwise convolution")], out


def module_atoms(module: nn.Module, size: Size, opts: BoundOptions, name: str) -> tuple[list[Atom], Size]:
    """The atoms of ``module`` on inputs of spatial ``size`` (None: unknown) and its output size."""
    if isinstance(module, nn.Sequential):
        atoms: list[Atom] = []
        for child_name, child in module.named_children():
            more, size = module_atoms(child, size, opts, f"{name}.{child_name}" if name else child_name)
            atoms += more
        return atoms, size
    if isinstance(module, nn.Identity):
        return [], size
    name = name or type(module).__name__
    if isinstance(module, nn.Flatten):
        return [Atom(name, "barrier", 1.0, note="a reshape")], None
    if isinstance(module, nn.Conv2d):
        return _conv_atoms(module, size, opts, name)
    if isinstance(module, nn.Linear):
        if opts.hyper:
            cap = _matrix_cap(module)
            value, note = (math.inf, "a linear layer without a cap") if cap is None else (cap, "the cap")
        else:
            w = module.weight.detach().to(torch.float64)
            finite = bool(torch.isfinite(w).all())
            value = float(torch.linalg.matrix_norm(w, ord=2)) if finite else math.inf
            note = "spectral norm of the weight" if finite else "a weight contains NaN or Inf"
        return [Atom(name, "barrier", value, note=note)], None
    if isinstance(module, (MeanOnlyGroupNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.batchnorm._BatchNorm,
                           nn.InstanceNorm2d)):
        return _norm_atoms(module, opts, name), size
    if isinstance(module, ScaledReLU):
        s = module.slope if opts.relu_slope is None or not opts.hyper else float(opts.relu_slope)
        return [_elementwise(name, min(0.0, s), max(0.0, s), "slope")], size
    if isinstance(module, nn.ReLU):
        return [_elementwise(name, 0.0, 1.0, "ReLU")], size
    if isinstance(module, nn.LeakyReLU):
        a = float(module.negative_slope)
        return [_elementwise(name, min(a, 1.0), max(a, 1.0), "leaky ReLU")], size
    if isinstance(module, nn.Tanh):
        return [_elementwise(name, 0.0, 1.0, "tanh")], size
    if isinstance(module, nn.Sigmoid):
        return [_elementwise(name, 0.0, 0.25, "sigmoid")], size
    if isinstance(module, (VariationalDropout2d, nn.Dropout, nn.Dropout2d)):
        return [_dropout_atom(module, opts, name)], size
    if isinstance(module, nn.Upsample) and module.mode == "nearest" and module.scale_factor is not None:
        r = module.scale_factor if isinstance(module.scale_factor, tuple) else (module.scale_factor,) * 2
        if not all(float(x).is_integer() and x >= 1 for x in r):
            return [_infinite(name, f"nearest upsampling by a non-integer factor {r}")], None
        r = (int(r[0]), int(r[1]))
        out = None if size is None else (size[0] * r[0], size[1] * r[1])
        return [Atom(name, "spatial", math.sqrt(r[0] * r[1]), note="pixel replication: exactly r")], out
    if isinstance(module, (nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
        return _pool_atoms(module, size, name)
    node = getattr(module, "_lipschitz_node", None)  # lipdeq's containers (Mix, BlockMatrix)
    if callable(node):
        bound, out = node(size, opts, name)
        return [Atom(name, "barrier", bound.value, bound=bound)], out
    if callable(getattr(module, "lipschitz_bound", None)):
        cert = module.lipschitz_bound(input_size=size, training=opts.training)
        if isinstance(cert, LipschitzCertificate):
            bound = (Bound.from_dict(cert.breakdown) if cert.breakdown
                     else Bound(name, cert.value, note=cert.reason or ""))
            return [Atom(name, "barrier", cert.value, bound=bound)], None
        return [Atom(name, "barrier", float(cert), note="its lipschitz_bound()")], None
    return [_infinite(name, f"no Lipschitz rule for {type(module).__name__} (give it a lipschitz_bound method)")], size


def lipschitz_bound(
    module: nn.Module,
    input_size: int | tuple[int, int] | None = None,
    *,
    training: bool | None = None,
    mode: Literal["weights", "hyper"] = "weights",
    tighten: bool = True,
    name: str | None = None,
) -> LipschitzCertificate:
    """Certified upper bound of the Lipschitz constant (l2, per sample) of ``module``.

    ``input_size``: spatial size ``(H, W)`` of the input (needed by convolutions without a cap,
    pooling and :class:`~lipdeq.lipschitz.BlockMatrix` takes one per input branch); ``training``:
    certify the training-time map (default: the module's mode); ``mode``/``tighten``: see
    :class:`BoundOptions`. The certificate's ``parts`` name every factor, ``breakdown`` holds the
    derivation tree; an infinite value comes with the ``reason``.
    """
    training = module.training if training is None else bool(training)
    opts = BoundOptions(mode=mode, training=training, tighten=tighten)
    label = name if name is not None else type(module).__name__
    if callable(getattr(module, "_lipschitz_node", None)):
        bound, _ = module._lipschitz_node(input_size, opts, label)
    else:
        size = None if input_size is None else _pair(input_size, "input_size", 1)
        atoms, _ = module_atoms(module, size, opts, label if name is not None else "")
        bound = chain_bound(atoms, label, tighten=tighten)
    return bound.certificate(mode="hyper" if opts.hyper else ("train" if training else "eval"))
