"""Certificates for the multiscale layer: the block-matrix bound of docs/MATH.md sections 4 and 10.

The layer is described to the composition machinery of :mod:`lipdeq.lipschitz` (one set of
formulas in the package): each residual block is a mix of the identity and the chain
``C1, N1, s relu, C2, dropout, N2``, followed by ``s relu, N3``; each fusion path and post-fusion is
a chain of its convs, norms, activations and upsampling. Entry ``(i, j)`` of the block matrix is
the *one* chain ``block_j, T_ij, mix weight, post_i`` (section 10.5), so that the gains of ``N3`` and
of the fusion norms are folded into the next convolution, a conv followed by a mean-only GroupNorm
is bounded with its zero-frequency group means removed, and ``C2 . relu . N1 . C1`` is bounded as
a pair (section 10.4). Every such bound is at most the product of the separate ones, so the
certificate is never above the product form of section 4.1 on the same weights; ``tighten=False``
gives that product form.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

from torch import nn

from lipdeq.lipschitz import BoundOptions, LipschitzCertificate, block_matrix, chain_bound, mix, module_atoms
from lipdeq.lipschitz.chain import Atom, ConvSpec
from lipdeq.lipschitz.compose import Bound
from lipdeq.models.config import ModelConfig

Mode = Literal["weights", "hyper"]

__all__ = ["Mode", "injection_bounds", "layer_certificate"]

_NO_BOUND_REASON = (
    "standard GroupNorm divides by the per-sample standard deviation, which has no global "
    "Lipschitz bound (use norm='mean_only' and a conv_cap for a certificate)"
)


def _scalar(name: str, value: float) -> Atom:
    return Atom(name, "elementwise", abs(value), note="mix weight", lo=value, hi=value)


def _identity() -> Bound:
    return Bound("identity", 1.0, note="the residual path")


class _Layer:
    """The atoms of one MultiscaleLayer, built once and shared by the matrix entries."""

    def __init__(self, layer: nn.Module, opts: BoundOptions) -> None:
        self.layer, self.opts, self.cfg = layer, opts, layer.cfg

    def atoms(self, module: nn.Module, size: int, name: str) -> list[Atom]:
        return module_atoms(module, (size, size), self.opts, name)[0]

    def block(self, i: int) -> list[Atom]:
        """``b_i = N3(s relu((1 - alpha) z_i + alpha N2(D(C2 s relu(N1 C1 z_i)) + u_i)))``."""
        blk, n, p = self.layer.branches[i], self.layer.sizes[i], f"branch{i}"
        inner = [*self.atoms(blk.conv1, n, f"{p}.conv1"), *self.atoms(blk.gn1, n, f"{p}.gn1"),
                 *self.atoms(blk.act, n, f"{p}.act"), *self.atoms(blk.conv2, n, f"{p}.conv2"),
                 *self.atoms(blk.drop, n, f"{p}.dropout"), *self.atoms(blk.gn2, n, f"{p}.gn2")]
        h2 = chain_bound(inner, f"{p}.h2", tighten=self.opts.tighten)
        a = self.cfg.alpha if self.cfg.mixing == "convex" else 1.0
        res = mix([(1.0 - a if self.cfg.mixing == "convex" else 1.0, _identity()), (a, h2)], name=f"{p}.residual")
        return [Atom(res.name, "barrier", res.value, bound=res), *self.atoms(blk.act, n, f"{p}.act"),
                *self.atoms(blk.gn3, n, f"{p}.gn3")]

    def post(self, i: int) -> list[Atom]:
        """``f_i = N_post(C_post s relu(y_i))``."""
        post, n, p = self.layer.post_fuse_layers[i], self.layer.sizes[i], f"branch{i}"
        return [*self.atoms(post.act, n, f"{p}.post_act"), *self.atoms(post.conv, n, f"{p}.post_conv"),
                *self.atoms(post.norm, n, f"{p}.post_norm")]

    def fuse(self, i: int, j: int) -> list[Atom]:
        """T_ij: 1x1 conv, norm, nearest upsampling (j > i); stride-2 stages (j < i)."""
        fuse, sizes, p = self.layer.fuse_layers[i][j], self.layer.sizes, f"fuse{i}<-{j}"
        if j > i:
            r = 2 ** (j - i)
            return [*self.atoms(fuse.conv, sizes[j], f"{p}.conv"), *self.atoms(fuse.norm, sizes[j], f"{p}.norm"),
                    Atom(f"{p}.upsample", "spatial", float(r), note="nearest upsampling: exactly r")]
        out: list[Atom] = []
        for k, (conv, norm) in enumerate(zip(fuse.convs, fuse.norms)):
            size = sizes[j] // 2**k
            if k:
                out += self.atoms(fuse.act, size, f"{p}.act{k}")
            out += [*self.atoms(conv, size, f"{p}.conv{k}"), *self.atoms(norm, size // 2, f"{p}.norm{k}")]
        return out

    def weight(self, i: int, j: int) -> float:
        cfg = self.cfg
        if i == j:
            return 1.0 if cfg.mixing == "sum" else 1.0 - cfg.beta
        w = float(self.layer.fusion_w[i, j])
        return w if cfg.mixing == "sum" else cfg.beta * w


def _options(cfg: ModelConfig, mode: Mode, training: bool, tighten: bool, conv_norm=None) -> BoundOptions:
    if mode not in ("weights", "hyper"):
        raise ValueError(f"unknown certificate mode {mode!r}: use 'weights' or 'hyper'")
    hyper = mode == "hyper"
    return BoundOptions(
        mode=mode, training=training, tighten=tighten and not hyper,
        conv_cap=(math.inf if cfg.conv_cap is None else float(cfg.conv_cap)) if hyper else None,
        gn_cap=(math.inf if cfg.gn_cap is None else float(cfg.gn_cap)) if hyper else None,
        relu_slope=cfg.relu_slope if hyper else None,
        conv_norm=None if hyper else conv_norm,
    )


def injection_bounds(layer: nn.Module, *, mode: Mode = "weights", tighten: bool = True) -> list[float]:
    """``v[i]`` bounds ``||f_i(z, u) - f_i(z, u')||`` per unit ``||u - u'||`` (eval mode; docs/MATH.md
    section 9.3), by the same chains as :func:`layer_certificate`.

    The injection enters branch 1 inside its residual block, ``h2 = N2(D(C2 h1) + u)``, so it reaches
    branch i through ``N2``, the mix weight alpha, ``s relu``, ``N3``, the fusion path ``T_i1`` with its
    mix weight, and the post-fusion of branch i.
    """
    cfg: ModelConfig = layer.cfg
    opts = _options(cfg, mode, False, tighten)
    lay = _Layer(layer, opts)
    blk, n = layer.branches[0], layer.sizes[0]
    a = cfg.alpha if cfg.mixing == "convex" else 1.0
    to_block = [*lay.atoms(blk.gn2, n, "branch0.gn2"), _scalar("branch0.alpha", a),
                *lay.atoms(blk.act, n, "branch0.act"), *lay.atoms(blk.gn3, n, "branch0.gn3")]
    out = []
    for i in range(cfg.num_branches):
        path = [] if i == 0 else lay.fuse(i, 0)
        atoms = [*to_block, *path, _scalar(f"mix{i}<-0", lay.weight(i, 0)), *lay.post(i)]
        out.append(chain_bound(atoms, f"u->branch{i}", tighten=opts.tighten).value)
    return out


def layer_certificate(
    layer: nn.Module, *, mode: Mode = "weights", training: bool = False, tighten: bool = True,
    conv_norm: Callable[[nn.Conv2d, ConvSpec], float] | None = None,
) -> LipschitzCertificate:
    """Upper bound of Lip(f) in z (l2 over the whole state) for a :class:`MultiscaleLayer`.

    Args:
        layer: the multiscale layer.
        mode: ``"weights"`` certifies the current weights (FFT operator norms of the effective
            weights, clipped gammas, chains tightened as in docs/MATH.md section 10); ``"hyper"``
            assumes every conv at its cap and every gamma at ``gn_cap``: it says from the
            hyperparameters alone whether convergence is guaranteed (section 4.3).
        training: certify the training-time map (dropout factor ``1/(1-p)`` for rescaled masks, 1
            otherwise); the default certifies the eval-mode map, whose unrescaled dropout
            multiplies by ``1 - p`` (in mode ``"weights"``; ``"hyper"`` counts 1, section 8).
        tighten: ``False`` gives the plain products of section 4.1 (for comparison).
        conv_norm: mode ``"weights"`` with each conv's operator norm bounded by
            ``conv_norm(conv, spec)`` instead of its FFT norm (see :class:`BoundOptions`).
    """
    cfg: ModelConfig = layer.cfg
    opts = _options(cfg, mode, training, tighten, conv_norm)
    lay = _Layer(layer, opts)
    n = cfg.num_branches
    blocks = [lay.block(i) for i in range(n)]
    posts = [lay.post(i) for i in range(n)]
    parts: dict[str, float] = {}
    for i in range(n):
        # the parts on their own (each a valid bound of that module; the entries bound them jointly)
        parts[f"branch{i}.block"] = chain_bound(blocks[i], f"branch{i}.block", tighten=opts.tighten).value
        parts[f"branch{i}.post"] = chain_bound(posts[i], f"branch{i}.post", tighten=opts.tighten).value
    entries = []
    for i in range(n):
        row = []
        for j in range(n):
            path = [] if i == j else lay.fuse(i, j)
            if path:
                parts[f"fuse{i}<-{j}"] = chain_bound(path, f"fuse{i}<-{j}", tighten=False).value
            atoms = [*blocks[j], *path, _scalar(f"mix{i}<-{j}", lay.weight(i, j)), *posts[i]]
            row.append(chain_bound(atoms, f"M[{i},{j}]", tighten=opts.tighten))
        entries.append(row)
    root = block_matrix(entries, name="layer")
    parts["dropout"] = next((a.value for a in blocks[0][0].bound.walk() if a.name == "branch0.dropout"), 1.0)
    reason = None
    if not math.isfinite(root.value):
        if cfg.norm == "group":
            reason = _NO_BOUND_REASON
        elif mode == "weights" and cfg.conv_cap is not None:
            reason = "a weight of f contains NaN or Inf"
        else:
            reason = "an unconstrained conv (conv_cap=None) has no bound"
    cert = root.certificate(mode=mode, reason=reason, parts=parts)
    cert.reason = reason
    return cert
