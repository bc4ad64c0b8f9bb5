"""Hyperparameters solved for a target: the largest value of one model key whose hyperparameter-only
certificate (``mode="hyper"``, docs/MATH.md section 4.3) stays below a target constant.

How the bound moves with each key (section 4.1, every conv at ``c = conv_cap``, every affine gain
at ``g = gn_cap``): every entry of the nonnegative matrix M is a polynomial with nonnegative
coefficients in ``c``, ``s = relu_slope`` and ``g``, and ``||M||_2`` is nondecreasing in each entry,
so the bound increases with those three keys (strictly: ``L_P = s c`` scales every entry). In
``alpha`` the block bound ``L_B = g s ((1 - alpha) + alpha g^2 s c^2)`` is affine, and in ``beta``
so is each entry ``(1 - beta)`` or ``beta w_ij t_ij``: M is affine in either, so ``||M||_2`` is
convex (a norm of an affine map) and may rise, fall or stay flat over ``(0, 1]``. Its sublevel set
is then an interval, which bisection finds once one point inside it is known.

Every bound, in the search and reported, is the library's own certificate of a narrow copy of the
layer (same branches, caps, norms, fusion and mixes, minimal widths: the hyper certificate reads no
weight), so it is exactly what ``model.lipschitz_bound(mode="hyper")`` gives for the solved
configuration: there is no second copy of the formulas.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from pydantic import ValidationError

from lipdeq.checks import check_real
from lipdeq.errors import LipdeqError
from lipdeq.jsonsafe import json_safe
from lipdeq.models.config import ModelConfig

__all__ = ["KEYS", "HyperparameterSolution", "UnreachableTargetError", "hyper_bound", "solve_hyperparameter"]

KEYS = ("conv_cap", "relu_slope", "alpha", "beta", "gn_cap")
_MIXES = ("alpha", "beta")  # valid range (0, 1], convex bound
_REL_TOL = 1e-13  # bisection stops when the bracket is this narrow relative to its upper end
_MAX_SCALE_STEPS = 200  # halvings / doublings when looking for a bracket on (0, inf): 2**200 ~ 1e60


class UnreachableTargetError(LipdeqError, ValueError):
    """No admissible value of the key keeps the hyperparameter bound below the target."""


@dataclass(frozen=True)
class HyperparameterSolution:
    """Largest ``value`` of ``key`` with hyperparameter bound ``bound < target``.

    ``binding`` is False when the bound stays below the target over the whole valid range (then
    ``value`` is the range's upper end: 1 for alpha and beta, inf for the others); ``iterations``
    counts the bound evaluations of the search.
    """

    key: str
    value: float
    bound: float
    target: float
    binding: bool
    iterations: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (infinite values as the string ``"inf"``)."""
        return json_safe(asdict(self))

    def to_json(self) -> str:
        """One line of strict JSON."""
        return json.dumps(self.to_dict())


# --------------------------------------------------------------------------- the bound of a config
def _narrow(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` with minimal widths and image size: nothing the hyper certificate reads."""
    n = cfg.num_branches
    return cfg.model_copy(update={
        "channels": [cfg.num_groups] * n, "head_channels": [1] * n, "final_channels": 1,
        "image_size": max(4, 2 ** (n - 1)),
    })


class _HyperBound:
    """The library's own hyper certificate (:func:`lipdeq.models.certify.layer_certificate`,
    ``mode="hyper"``) of a narrow copy of the layer, built once: in hyper mode the certificate reads
    the caps, slope, mixes and fusion from ``layer.cfg`` and no weight, so a search swaps the
    configuration instead of building a layer per evaluation (about 4 ms instead of 110 ms)."""

    def __init__(self, cfg: ModelConfig) -> None:
        from lipdeq.models.layer import MultiscaleLayer  # torch-heavy module, only when evaluating

        self.layer = MultiscaleLayer(_narrow(cfg))

    def __call__(self, cfg: ModelConfig) -> float:
        from lipdeq.models.certify import layer_certificate

        self.layer.cfg = _narrow(cfg)
        return layer_certificate(self.layer, mode="hyper").value


def hyper_bound(cfg: ModelConfig) -> float:
    """The hyperparameter-only bound of Lip(f) in z: exactly ``model.lipschitz_bound(mode="hyper")``
    of a model built from ``cfg``, computed on a narrow copy of the layer (``inf`` for standard
    GroupNorm or an absent cap)."""
    return _HyperBound(cfg)(cfg)


# --------------------------------------------------------------------------- the search
def _as_config(config_or_preset: object, overrides: dict[str, Any]) -> ModelConfig:
    from lipdeq.models.registry import model_config

    if isinstance(config_or_preset, str):
        return model_config(config_or_preset, **overrides)
    cfg = getattr(config_or_preset, "model", config_or_preset)  # a RunConfig holds its ModelConfig
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"expected a preset name, a ModelConfig or a RunConfig, got {type(config_or_preset).__name__}")
    return _with(cfg, overrides) if overrides else cfg


def _with(cfg: ModelConfig, updates: dict[str, Any]) -> ModelConfig:
    """``cfg`` with ``updates``, validated like any configuration."""
    unknown = sorted(set(updates) - set(ModelConfig.model_fields))
    if unknown:
        raise UnreachableTargetError(f"unknown model option(s) {unknown}; known: {sorted(ModelConfig.model_fields)}")
    try:
        return ModelConfig.model_validate({**cfg.model_dump(), **updates})
    except ValidationError as err:
        raise UnreachableTargetError(f"invalid model settings {updates}: {err}") from None


def _others(cfg: ModelConfig, key: str) -> str:
    values = ", ".join(f"{k}={getattr(cfg, k)}" for k in KEYS if k != key)
    return (f"{values}, {cfg.num_branches} branches, mixing={cfg.mixing!r}, fusion={cfg.fusion!r}, "
            f"norm={cfg.norm!r}, post_gn_affine={cfg.post_gn_affine}")


def _infinite_reason(cfg: ModelConfig, key: str) -> str | None:
    """The setting that makes the bound infinite whatever the key's value, if any."""
    if cfg.norm == "group":
        return "norm='group' (standard GroupNorm divides by the standard deviation: no finite bound)"
    if cfg.conv_cap is None and key != "conv_cap":
        return "conv_cap=None (unconstrained convolutions have no bound)"
    if cfg.gn_cap is None and key != "gn_cap":
        return "gn_cap=None (unclipped GroupNorm gains have no bound)"
    return None


_LIMITS = {
    ("alpha", "low"): "each block keeps only its residual path (1 - alpha) z, bounded by gn_cap * relu_slope, "
                      "which the post-fusion conv_cap * relu_slope and the fusion multiply",
    ("alpha", "high"): "each block keeps only its conv path, gn_cap^3 * relu_slope^2 * conv_cap^2",
    ("beta", "low"): "each branch alone, without fusion",
    ("beta", "high"): "only the fused paths between branches",
}


def _unreachable(
    cfg: ModelConfig, key: str, target: float, best: float, at: float, where: str
) -> UnreachableTargetError:
    hint = _LIMITS.get((key, where))
    where_text = f"as {key} -> 0" if where == "low" else f"at {key}={at:.6g}"
    return UnreachableTargetError(
        f"target {target:g} is unreachable by {key} alone: with {_others(cfg, key)} the hyperparameter "
        f"bound is at least {best:.6g} ({where_text}{': ' + hint if hint else ''}); lower the other settings "
        "or raise the target"
    )


def _bisect(bound: Callable[[float], float], lo: float, hi: float, target: float) -> tuple[float, int]:
    """Largest feasible point: ``bound(lo) < target <= bound(hi)`` on entry, the sublevel set an interval."""
    count = 0
    while hi - lo > _REL_TOL * hi and count < 400:
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        count += 1
        if bound(mid) < target:
            lo = mid
        else:
            hi = mid
    return lo, count


def _golden_min(bound: Callable[[float], float], a: float, b: float) -> tuple[float, float, int]:
    """Minimum of a convex function on [a, b] (golden-section search, to ~1e-12 of the interval)."""
    r = (math.sqrt(5.0) - 1.0) / 2.0
    x1, x2 = b - r * (b - a), a + r * (b - a)
    f1, f2 = bound(x1), bound(x2)
    count = 2
    while b - a > 1e-12 and count < 200:
        if f1 <= f2:
            b, x2, f2 = x2, x1, f1
            x1 = b - r * (b - a)
            f1 = bound(x1)
        else:
            a, x1, f1 = x1, x2, f2
            x2 = a + r * (b - a)
            f2 = bound(x2)
        count += 1
    return (x1, f1, count) if f1 <= f2 else (x2, f2, count)


def _search(cfg: ModelConfig, key: str, target: float, bound: Callable[[float], float]) -> tuple[float, bool, int]:
    """(value, binding, evaluations) for the largest value of ``key`` with ``bound(value) < target``."""
    evals = 0

    def f(x: float) -> float:
        nonlocal evals
        evals += 1
        return bound(x)

    if key in _MIXES:
        top = f(1.0)
        if top < target:
            return 1.0, False, evals
        low_end = 1e-12  # the range (0, 1] is open at 0; the bound is continuous there
        start = f(low_end)
        if start < target:
            lo = low_end
        else:
            at, best, n = _golden_min(bound, low_end, 1.0)
            evals += n
            if not best < target:
                best, at, where = min((start, low_end, "low"), (best, at, "interior"), (top, 1.0, "high"))
                raise _unreachable(cfg, key, target, best, at, where)
            lo = at
        value, n = _bisect(f, lo, 1.0, target)
        return value, True, evals
    # conv_cap, relu_slope, gn_cap: nondecreasing on (0, inf)
    current = getattr(cfg, key)
    x = 1.0 if current is None else float(current)
    fx = f(x)
    if fx < target:
        lo, hi = x, None
        for _ in range(_MAX_SCALE_STEPS):
            y = lo * 2.0
            if not f(y) < target:
                hi = y
                break
            lo = y
        if hi is None:
            return math.inf, False, evals  # flat: the key does not reach the bound
    else:
        hi, lo = x, None
        for _ in range(_MAX_SCALE_STEPS):
            y = hi / 2.0
            fy = f(y)
            if fy < target:
                lo = y
                break
            hi = y
        if lo is None:
            raise _unreachable(cfg, key, target, fy, y, "low")
    value, _ = _bisect(f, lo, hi, target)
    return value, True, evals


def solve_hyperparameter(config_or_preset: Any, key: str, target: float, **overrides: Any) -> HyperparameterSolution:
    """The largest value of model key ``key`` whose hyperparameter-only bound stays below ``target``.

    Args:
        config_or_preset: a preset name, a :class:`ModelConfig` or a ``RunConfig``.
        key: one of ``conv_cap``, ``relu_slope``, ``alpha``, ``beta``, ``gn_cap``.
        target: the constant the bound must stay below (> 0), e.g. 0.9.
        overrides: other model settings to change first (as in :func:`create_model`).

    The answer's bound is below ``target`` and within about 1e-12 (relative) of it when binding;
    a slightly larger value gives a bound at or above it.

    Raises:
        UnreachableTargetError: no admissible value reaches the target (the message names the other
            settings and the smallest reachable bound), or ``alpha``/``beta`` with ``mixing='sum'``.
    """
    if key not in KEYS:
        raise UnreachableTargetError(f"cannot solve for {key!r}: choose one of {', '.join(KEYS)}")
    target = check_real("target", target, above=0.0)
    cfg = _as_config(config_or_preset, overrides)
    if key in _MIXES and cfg.mixing != "convex":
        raise UnreachableTargetError(f"mixing={cfg.mixing!r} ignores {key}: use mixing='convex' to solve for it")
    reason = _infinite_reason(cfg, key)
    if reason is not None:
        raise UnreachableTargetError(
            f"target {target:g} is unreachable by {key} alone: {reason} keeps the bound infinite "
            f"(other settings: {_others(cfg, key)})"
        )

    def at(value: float) -> ModelConfig:
        return _with(cfg, {key: value})

    bound_of = _HyperBound(cfg)

    def bound_at(value: float) -> float:
        return bound_of(at(value))

    value, binding, evals = _search(cfg, key, target, bound_at)
    if not math.isfinite(value):
        probe = 1.0 if key in _MIXES or getattr(cfg, key) is None else float(getattr(cfg, key))
        return HyperparameterSolution(key, value, bound_at(probe), target, False, evals + 1)  # flat in the key
    bound = bound_at(value)
    evals += 1
    step = _REL_TOL
    while binding and not bound < target and step < 1e-6:  # the bisection's last bracket end, by rounding
        value = value * (1.0 - step)
        bound = bound_at(value)
        step *= 2.0
        evals += 1
    if not bound < target and binding:
        raise AssertionError(f"solve_hyperparameter: {key}={value!r} gives bound {bound!r} >= target {target!r}")
    return HyperparameterSolution(key=key, value=value, bound=bound, target=target, binding=binding, iterations=evals)
