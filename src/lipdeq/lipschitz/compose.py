"""Composable Lipschitz bounds: the breakdown tree and the three rules that combine bounds.

A :class:`Bound` is one node of a certificate's derivation: a number that upper-bounds the
Lipschitz constant (l2) of some map, the rule that produced it and the bounds it was made from.
The rules are those of docs/MATH.md section 3.1 and 4.2:

* :func:`compose` (sequential composition): the product of the parts' bounds; an exact zero wins
  over an infinity (a path that is absent contributes nothing, whatever the rest);
* :func:`mix` (a linear combination ``sum_k c_k g_k``): ``sum_k |c_k| Lip(g_k)``, a zero
  coefficient dropping its term;
* :func:`block_matrix` (parallel branches ``y_i = sum_j A_ij(x_j)``): the spectral norm of the
  nonnegative matrix of the blocks' bounds.

Every function accepts floats, :class:`Bound` nodes or :class:`LipschitzCertificate` objects and
returns a :class:`Bound`; :meth:`Bound.certificate` turns a tree into a certificate whose ``parts``
are the tree's named nodes. The tightened bounds of linear chains (folded gains, mean-removed
convolutions, pairs of convolutions around an activation) are produced by
:mod:`lipdeq.lipschitz.chain`, which builds its nodes with the same rules.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lipdeq.lipschitz.certificate import LipschitzCertificate, _json_float, block_matrix_bound

__all__ = ["Bound", "BoundLike", "block_matrix", "compose", "leaf", "mix", "product"]


def product(*factors: float) -> float:
    """Product of nonnegative factors where an exact zero wins over infinity."""
    if any(f == 0.0 for f in factors):
        return 0.0
    return math.prod(factors)


def _check_value(name: str, value: float) -> float:
    value = float(value)
    if math.isnan(value) or value < 0:
        raise ValueError(f"bound {name!r} must be a nonnegative number (a norm bound), got {value!r}")
    return value


@dataclass(frozen=True)
class Bound:
    """An upper bound ``value`` of a Lipschitz constant, with how it was obtained.

    ``rule``: ``"leaf"`` (a bound of one part), ``"chain"`` (product of ``children``), ``"mix"``
    (``sum |coefficients[k]| * children[k]``), ``"matrix"`` (spectral norm of the ``shape`` matrix
    of ``children`` in row-major order) or ``"tight"`` (a chain of linear pieces bounded jointly:
    ``children`` are its pieces, ``value`` may be below their product); ``note`` says how.
    """

    name: str
    value: float
    rule: str = "leaf"
    children: tuple[Bound, ...] = ()
    coefficients: tuple[float, ...] = ()
    shape: tuple[int, int] | None = None
    note: str = ""

    def walk(self) -> Iterable[Bound]:
        """This node and all below it, depth first."""
        yield self
        for child in self.children:
            yield from child.walk()

    def flatten(self) -> dict[str, float]:
        """Name -> value for every node (a name reused with another value gets ``parent/`` in front)."""
        out: dict[str, float] = {}

        def visit(node: Bound, parent: str) -> None:
            key = node.name
            if key in out and out[key] != node.value:
                key = f"{parent}/{node.name}"
            out.setdefault(key, node.value)
            for child in node.children:
                visit(child, key)

        visit(self, "")
        return out

    def to_dict(self) -> dict[str, Any]:
        """A nested, JSON-safe dict (non-finite values as strings)."""
        out: dict[str, Any] = {"name": self.name, "value": _json_float(self.value), "rule": self.rule}
        if self.note:
            out["note"] = self.note
        if self.coefficients:
            out["coefficients"] = [_json_float(c) for c in self.coefficients]
        if self.shape is not None:
            out["shape"] = list(self.shape)
        if self.children:
            out["children"] = [c.to_dict() for c in self.children]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Bound:
        """Inverse of :meth:`to_dict`."""
        return cls(
            name=str(data["name"]), value=float(data["value"]), rule=str(data.get("rule", "leaf")),
            children=tuple(cls.from_dict(c) for c in data.get("children", ())),
            coefficients=tuple(float(c) for c in data.get("coefficients", ())),
            shape=None if data.get("shape") is None else (int(data["shape"][0]), int(data["shape"][1])),
            note=str(data.get("note", "")),
        )

    def certificate(self, *, mode: str = "eval", reason: str | None = None,
                    parts: dict[str, float] | None = None) -> LipschitzCertificate:
        """The certificate of this tree: ``value``, ``parts`` (every named node, then ``parts``),
        ``matrix`` (for a ``"matrix"`` root), ``breakdown`` (the tree) and ``reason``."""
        matrix = None
        if self.rule == "matrix" and self.shape is not None:
            rows, cols = self.shape
            matrix = [[self.children[i * cols + j].value for j in range(cols)] for i in range(rows)]
        flat = self.flatten()
        flat.update(parts or {})
        if reason is None and not math.isfinite(self.value):
            reason = next((n.note for n in self.walk() if n.rule == "leaf" and math.isinf(n.value) and n.note),
                          None)
        return LipschitzCertificate(value=self.value, parts=flat, matrix=matrix, reason=reason, mode=mode,
                                    breakdown=self.to_dict())


BoundLike = float | int | Bound | LipschitzCertificate


def leaf(name: str, value: float, note: str = "") -> Bound:
    """A bound of one part, given directly."""
    return Bound(name, _check_value(name, value), note=note)


def _as_bound(item: BoundLike, default_name: str) -> Bound:
    if isinstance(item, Bound):
        return item
    if isinstance(item, LipschitzCertificate):
        if item.breakdown is not None:
            return Bound.from_dict(item.breakdown)
        return Bound(default_name, _check_value(default_name, item.value), note=item.reason or "")
    if isinstance(item, bool) or not isinstance(item, int | float):
        raise TypeError(f"a bound must be a number, a Bound or a LipschitzCertificate, got {type(item).__name__}")
    return leaf(default_name, float(item))


def compose(*parts: BoundLike, name: str = "compose") -> Bound:
    """Bound of a sequential composition: the product of the parts' bounds (zero beats infinity)."""
    nodes = tuple(_as_bound(p, f"{name}[{k}]") for k, p in enumerate(parts))
    return Bound(name, product(*(n.value for n in nodes)), "chain", nodes)


def mix(terms: Sequence[tuple[float, BoundLike]], *, name: str = "mix") -> Bound:
    """Bound ``sum_k |c_k| L_k`` of ``x -> sum_k c_k g_k(x)`` for ``terms = [(c_k, L_k), ...]``."""
    nodes, coefs = [], []
    for k, term in enumerate(terms):
        if not (isinstance(term, tuple | list) and len(term) == 2):
            raise TypeError(f"mix terms must be (coefficient, bound) pairs, got {term!r}")
        c = float(term[0])
        if not math.isfinite(c):
            raise ValueError(f"mix coefficient {k} must be finite, got {c!r}")
        coefs.append(c)
        nodes.append(_as_bound(term[1], f"{name}[{k}]"))
    value = math.fsum(product(abs(c), n.value) for c, n in zip(coefs, nodes))
    return Bound(name, value, "mix", tuple(nodes), tuple(coefs))


def block_matrix(entries: Sequence[Sequence[BoundLike]], *, name: str = "block_matrix") -> Bound:
    """Bound of ``y_i = sum_j A_ij(x_j)`` (l2 over all branches): the spectral norm of
    ``[Lip(A_ij)]`` (docs/MATH.md section 4.2; rectangular allowed, 0 for an absent block)."""
    rows = [list(r) for r in entries]
    if not rows or not rows[0] or any(len(r) != len(rows[0]) for r in rows):
        raise ValueError("entries must be a non-empty rectangular matrix of bounds")
    nodes = tuple(_as_bound(x, f"{name}[{i},{j}]") for i, r in enumerate(rows) for j, x in enumerate(r))
    shape = (len(rows), len(rows[0]))
    values = torch.tensor([n.value for n in nodes], dtype=torch.float64).reshape(shape)
    if torch.isinf(values).any():
        value = math.inf
    elif shape[0] == shape[1]:
        value = block_matrix_bound(values)
    else:
        value = float(torch.linalg.matrix_norm(values, ord=2))
    return Bound(name, value, "matrix", nodes, shape=shape)
