"""Sequential chains of Lipschitz pieces and their bound, tightened where linear pieces meet.

A chain is a list of :class:`Atom` in forward order (what :func:`lipdeq.lipschitz.blocks.module_atoms`
makes of a module). The bound of the chain is a product of factors, and the factors are chosen by
one left-to-right scan (docs/MATH.md section 10):

* a per-channel gain (a mean-only GroupNorm's gamma) waits, past elementwise maps (scaled ReLU,
  dropout masks, scalars) and per-channel spatial maps (nearest upsampling, average pooling), and
  is folded into the input channels of the next convolution: ``||C Gamma||`` (exact FFT norm of
  the kernel ``W * gamma``) instead of ``||C|| max|gamma|``. Lip = sup of the Jacobian's norm, and
  the Jacobians of those maps are diagonal (or per-channel) matrices, which commute with Gamma;
  anything else (a mean subtraction, a sum with another path, a linear layer) stops it;
* a convolution followed (up to scalars) by a mean subtraction is bounded by ``||P_N C_N||``
  (the zero-frequency block with the group means removed, section 10.3);
* two stride-1 convolutions with only a mean subtraction, gains and elementwise maps between them
  (``C2 S P1 C1``, S diagonal with entries in [lo, hi]) are bounded jointly (section 10.4), which
  sees the misalignment of C1's output and C2's input directions that a product of norms ignores.

Every joint bound is taken as the minimum with the product of the separate factors, so it is never
above it. Atoms without weights (the hyperparameter certificate) are multiplied as they are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lipdeq.lipschitz.chain_norms import conv_mean_norms, conv_pair_norms
from lipdeq.lipschitz.compose import Bound, product
from lipdeq.lipschitz.operator_norm import conv_operator_norm

__all__ = ["Atom", "ConvSpec", "chain_bound"]


@dataclass
class ConvSpec:
    """Geometry and effective weight (float64, detached; None without weights) of a convolution."""

    weight: Tensor | None
    input_size: tuple[int, int]
    output_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    in_channels: int
    out_channels: int

    def norm(self, weight: Tensor | None = None) -> float:
        """FFT certificate of the operator norm (section 5) of ``weight`` (default: its own)."""
        w = self.weight if weight is None else weight
        return conv_operator_norm(w, self.input_size, stride=self.stride, padding=self.padding,
                                  dilation=self.dilation, groups=self.groups)


@dataclass
class Atom:
    """One piece of a chain.

    ``kind``: ``"conv"`` (``conv`` holds it), ``"mean"`` (a group-mean subtraction over ``channels``
    in ``groups`` groups, norm 1), ``"gain"`` (per-channel ``gamma``, norm ``max|gamma|``),
    ``"elementwise"`` (a map whose Jacobian is diagonal with entries in ``[lo, hi]``: activations,
    dropout masks, scalars), ``"spatial"`` (a per-channel linear map of the pixels: upsampling,
    pooling), ``"barrier"`` (anything a gain cannot cross: linear layers, reshapes, ``bound``
    subtrees of mixes and block matrices). ``value`` is the piece's own bound (None: computed from
    ``conv`` when needed).
    """

    name: str
    kind: str
    value: float | None = None
    note: str = ""
    conv: ConvSpec | None = None
    channels: int | None = None
    groups: int | None = None
    gamma: Tensor | None = None
    lo: float = 0.0
    hi: float = 0.0
    bound: Bound | None = None

    def own_bound(self) -> float:
        if self.value is None:
            self.value = self.conv.norm() if self.conv is not None and self.conv.weight is not None else math.inf
        return self.value

    def leaf(self) -> Bound:
        if self.bound is not None:
            return self.bound
        return Bound(self.name, self.own_bound(), note=self.note)

    @property
    def is_scalar(self) -> bool:
        return self.kind == "elementwise" and self.lo == self.hi


def _joint_name(names: list[str]) -> str:
    """``a.b.x+y+z`` for ``a.b.x, a.b.y, a.b.z`` (the common dotted prefix written once)."""
    if len(names) == 1:
        return names[0]
    parts = [n.split(".") for n in names]
    k = 0
    while all(len(p) > k + 1 for p in parts) and len({p[k] for p in parts}) == 1:
        k += 1
    prefix = ".".join(parts[0][:k])
    rest = "+".join(".".join(p[k:]) for p in parts)
    return f"{prefix}.{rest}" if prefix else rest


def _fold(conv: ConvSpec, gains: list[Atom]) -> Tensor:
    """The kernel of ``C Gamma``: input channels scaled by the product of the pending gains."""
    gamma = gains[0].gamma
    for g in gains[1:]:
        gamma = gamma * g.gamma
    w = conv.weight
    co, ci_g = w.shape[:2]
    per_out = gamma.to(w).view(conv.groups, ci_g).repeat_interleave(co // conv.groups, dim=0)
    return w * per_out[:, :, None, None]


class _Scan:
    """The left-to-right scan of module docstring; ``factors`` multiply to the chain's bound."""

    def __init__(self, atoms: list[Atom], tighten: bool) -> None:
        self.atoms, self.tighten = atoms, tighten
        self.factors: list[Bound] = []
        self.pending: list[Atom] = []

    def flush(self) -> None:
        self.factors += [g.leaf() for g in self.pending]
        self.pending = []

    def run(self) -> list[Bound]:
        i = 0
        while i < len(self.atoms):
            a = self.atoms[i]
            if a.kind == "gain":
                foldable = self.tighten and a.gamma is not None and bool(torch.isfinite(a.gamma).all())
                if foldable and (not self.pending or self.pending[0].channels == a.channels):
                    self.pending.append(a)
                else:
                    self.flush()
                    self.factors.append(a.leaf())
            elif a.kind in ("elementwise", "spatial"):
                self.factors.append(a.leaf())  # commutes with the pending per-channel gains
            elif a.kind == "conv":
                i = self.conv(i)
                continue
            else:
                self.flush()
                self.factors.append(a.leaf())
            i += 1
        self.flush()
        return self.factors

    def _scalars_then(self, j: int, kind: str, channels: int) -> tuple[list[Atom], int | None]:
        """Scalar atoms from j on, and the index of a following ``kind`` atom over ``channels``."""
        scalars = []
        while j < len(self.atoms) and self.atoms[j].is_scalar:
            scalars.append(self.atoms[j])
            j += 1
        if j < len(self.atoms) and self.atoms[j].kind == kind and self.atoms[j].channels in (None, channels):
            return scalars, j
        return scalars, None

    def conv(self, i: int) -> int:
        """Emit the factor of the conv at i (with what it absorbs); return the next index."""
        a = self.atoms[i]
        spec = a.conv
        if not self.tighten or spec is None or spec.weight is None or not bool(torch.isfinite(spec.weight).all()):
            self.flush()
            self.factors.append(a.leaf())
            return i + 1
        gains = self.pending if self.pending and self.pending[0].channels == spec.in_channels else []
        if gains is not self.pending:
            self.flush()
        self.pending = []
        weight = _fold(spec, gains) if gains else spec.weight
        if spec.groups == 1:
            pair = self._pair(i, weight, gains)
            if pair is not None:
                return pair
        scalars, m = self._scalars_then(i + 1, "mean", spec.out_channels)
        covered = [*gains, a]
        if m is not None and spec.groups == 1:
            with_mean, plain = conv_mean_norms(weight, spec.input_size, spec.stride, spec.padding, spec.dilation,
                                               self.atoms[m].groups)
            if not gains:
                a.value = plain  # a by-product: the conv's own norm, for the breakdown
            covered += [*scalars, self.atoms[m]]
            value = product(min(with_mean, plain), *(abs(s.lo) for s in scalars))
            self.factors.append(_tight(covered, value, "FFT norm of P_N C_N (group means removed at zero "
                                       "frequency), section 10.3"))
            return m + 1
        if gains:
            self.factors.append(_tight(covered, spec.norm(weight), "FFT norm of the conv with the gains folded "
                                       "into its input channels, section 10.2"))
        else:
            self.factors.append(a.leaf())
        return i + 1

    def _pair(self, i: int, w1: Tensor, gains1: list[Atom]) -> int | None:
        """The pair bound of section 10.4 if the atoms from i form ``C1 [P1] (gains|elementwise)* C2``."""
        c1 = self.atoms[i].conv
        scal1, m1 = self._scalars_then(i + 1, "mean", c1.out_channels)
        if m1 is None:  # no mean after C1: its scalars are read as elementwise maps below
            scal1, j = [], i + 1
        else:
            j = m1 + 1
        between, gains2 = [], []
        while j < len(self.atoms) and self.atoms[j].kind in ("gain", "elementwise"):
            b = self.atoms[j]
            if b.kind == "gain":
                if b.gamma is None or b.channels != c1.out_channels or not bool(torch.isfinite(b.gamma).all()):
                    return None
                gains2.append(b)
            else:
                between.append(b)
            j += 1
        if j >= len(self.atoms) or self.atoms[j].kind != "conv":
            return None
        second = self.atoms[j]
        c2 = second.conv
        if (c2 is None or c2.weight is None or c2.groups != 1 or c1.stride != (1, 1) or c2.stride != (1, 1)
                or c2.in_channels != c1.out_channels or c2.input_size != c1.output_size
                or not bool(torch.isfinite(c2.weight).all())):
            return None
        w2 = _fold(c2, gains2) if gains2 else c2.weight
        scal2, m2 = self._scalars_then(j + 1, "mean", c2.out_channels)
        if m2 is None:
            scal2 = []
        lo, hi = 1.0, 1.0  # the range of the diagonal between (elementwise maps multiply)
        for e in [*scal1, *between, *scal2]:
            cands = (lo * e.lo, lo * e.hi, hi * e.lo, hi * e.hi)
            lo, hi = min(cands), max(cands)
        mean1 = self.atoms[m1].groups if m1 is not None else None
        mean2 = self.atoms[m2].groups if m2 is not None else None
        pn = conv_pair_norms(w1, w2, c1.input_size, c1.padding, c2.padding, c1.dilation, c2.dilation, mean1, mean2)
        separate = product(pn.b, max(abs(lo), abs(hi)), pn.a)
        if mean1 is None:
            lo, hi = min(lo, 0.0), max(hi, 0.0)  # the window mask between the convs is a 0 entry
            ab = pn.x
        else:  # Q = (P_N + (2Q - P_N)) / 2 with ||2Q - P_N|| <= 1 on the range of P_N
            ab = 0.5 * (pn.x + pn.a_mean * pn.b)
        centre, radius = 0.5 * (lo + hi), 0.5 * (hi - lo)
        joint = abs(centre) * ab + radius * pn.a * pn.b
        covered = [*gains1, self.atoms[i], *scal1, *([self.atoms[m1]] if m1 is not None else []),
                   *between, *gains2, second, *scal2, *([self.atoms[m2]] if m2 is not None else [])]
        note = (f"pair bound of section 10.4: |c| ||A Q B|| + r ||A|| ||Q B|| with the diagonal in "
                f"[{lo:.4g}, {hi:.4g}]; ||A||={pn.a:.6g}, ||Q B||<={pn.b:.6g}, ||A B||-part={ab:.6g}")
        if not gains1:
            self.atoms[i].value = pn.b_plain  # by-products: the plain norms, for the breakdown
        if not gains2:
            second.value = pn.a_plain
        self.factors.append(_tight(covered, min(joint, separate), note))
        return (m2 if m2 is not None else j + len(scal2)) + 1


def _tight(covered: list[Atom], value: float, note: str) -> Bound:
    """A factor bounding the pieces ``covered`` jointly; its children are the pieces whose own
    bounds are known (a conv whose kernel was folded has none of its own here)."""
    children = tuple(c.leaf() for c in covered if c.value is not None or c.bound is not None)
    return Bound(_joint_name([c.name for c in covered]), value, "tight", children, note=note)


def chain_bound(atoms: list[Atom], name: str, *, tighten: bool = True) -> Bound:
    """The bound of the chain ``atoms`` (forward order) as a ``"chain"`` :class:`Bound`."""
    factors = _Scan(list(atoms), tighten).run()
    return Bound(name, product(*(f.value for f in factors)), "chain", tuple(factors))
