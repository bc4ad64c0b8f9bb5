"""Which configuration changes a resumed run or a checkpoint evaluation may make, and which it may not.

A checkpoint stores the resolved configuration of its run. Resuming with another model, another data
order or another batch size would continue a different run under the same name (the saved data
position counts batches of the old size); evaluating with another architecture would report another
network's accuracy as the checkpoint's. Both are refused with the keys named; changes that only
extend or observe the run stay allowed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from lipdeq.errors import LipdeqError

__all__ = ["ConfigMismatchError", "EVAL_SAFE", "EVAL_SAFE_PREFIXES", "RESUME_SAFE", "changed_keys", "check_compatible"]

# Keys a resumed run may change: budgets, cadences, precision and throughput settings, the data's
# location, and the evaluation subset and its precise-BN images (evaluations put the BatchNorm statistics
# and the RNG back: tests/training/test_precise_bn.py). Everything else (the model, the training data and
# its order, the batch size, the optimiser and the schedule horizon) must equal the stored configuration.
RESUME_SAFE = frozenset({
    "preset",
    "train.max_steps", "train.max_seconds", "train.log_every", "train.eval_every_epochs", "train.eval_precise_bn",
    "train.checkpoint_every_epochs", "train.checkpoint_every_steps", "train.eval_batch_size",
    "train.num_threads", "train.max_nonfinite_in_row", "train.compile", "train.compile_mode",
    "train.channels_last", "train.amp",
    "data.data_dir", "data.test_subset",
})

# Keys an evaluation of stored weights may change: everything about the data and the evaluation run,
# and the forward solver's settings (they change how precisely the same network is solved, not the
# network); never the architecture.
EVAL_SAFE_PREFIXES = ("data.", "train.")
EVAL_SAFE = frozenset({"preset", "model.solver", "model.f_thres", "model.f_tol", "model.stop_mode",
                       "model.b_thres", "model.b_tol", "model.backward", "model.budget",
                       "model.certificate_refresh"})


class ConfigMismatchError(LipdeqError, ValueError):
    """A configuration differs from the one stored with a run in a key that may not change."""


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


class _Missing:
    def __repr__(self) -> str:
        return "absent"


_MISSING = _Missing()


def changed_keys(stored: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose values differ between two nested configuration dicts: key -> (stored, new)."""
    a, b = _flatten(stored), _flatten(new)
    return {k: (a.get(k, _MISSING), b.get(k, _MISSING)) for k in sorted(a.keys() | b.keys())
            if a.get(k, _MISSING) != b.get(k, _MISSING)}


def check_compatible(
    stored: Mapping[str, Any],
    new: Mapping[str, Any],
    *,
    allowed: Iterable[str],
    allowed_prefixes: tuple[str, ...] = (),
    what: str,
    source: str,
) -> None:
    """Raise :class:`ConfigMismatchError` naming every key outside ``allowed`` that differs between
    ``stored`` (the configuration saved in ``source``) and ``new``."""
    allowed = frozenset(allowed)
    changes = changed_keys(stored, new)
    bad = {k: v for k, v in changes.items() if k not in allowed and not k.startswith(allowed_prefixes)}
    if bad:
        listed = "; ".join(f"{k}: stored {_show(s)}, given {_show(n)}" for k, (s, n) in bad.items())
        raise ConfigMismatchError(
            f"{what} may not change {', '.join(bad)} of the run stored in {source} ({listed}); "
            "use the stored values or start a new run in another directory"
        )


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
