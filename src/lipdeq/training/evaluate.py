"""Evaluation: accuracy, loss, per-sample solver statistics and inference throughput."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lipdeq.configs import config_from_dict
from lipdeq.data import load_dataset, to_float_normalized
from lipdeq.models import MultiscaleDEQ
from lipdeq.solvers import sample_summary, status_counts
from lipdeq.training.checkpoint import CheckpointError, load_checkpoint
from lipdeq.training.compat import EVAL_SAFE, EVAL_SAFE_PREFIXES, check_compatible
from lipdeq.training.device import resolve_device
from lipdeq.training.precise_bn import (
    precise_batchnorm,
    precise_bn_batches,
    recalibrate_batchnorm,  # noqa: F401  (re-exported from its earlier home)
)
from lipdeq.training.robust_eval import RobustTally


@torch.no_grad()
def evaluate(
    model: nn.Module,
    images_uint8: torch.Tensor,
    labels: torch.Tensor,
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    amp: bool = False,
    should_stop: Callable[[], bool] | None = None,
    precise_bn: Sequence[torch.Tensor] = (),
    robust: bool = False,
) -> dict[str, Any]:
    """Evaluate ``model`` (eval mode, no augmentation) on uint8 images.

    ``robust``: also report ``certified_accuracy``, a mapping from ``"36/255"``, ``"72/255"``,
    ``"108/255"`` to the fraction of images classified correctly with a certified l2 radius (pixel
    units, docs/MATH.md section 9) of at least that eps, with ``certified_radius_median`` and
    ``network_lipschitz`` (:class:`~lipdeq.training.robust_eval.RobustTally`).

    ``precise_bn``: normalised training batches (:func:`~lipdeq.training.precise_bn.precise_bn_batches`)
    to re-estimate the BatchNorm statistics from before evaluating; the model's statistics are put
    back afterwards (:func:`~lipdeq.training.precise_bn.precise_batchnorm`), so the evaluation
    changes nothing that training or a checkpoint reads. The result's ``precise_bn_images`` says how
    many images were used (0: the stored running statistics).

    ``should_stop`` is asked before every batch; when it returns True the evaluation ends early and
    the result has ``interrupted=True`` (and covers only ``num_images`` images): a stop request
    (SIGINT during a long evaluation) is honoured within one batch instead of after the whole set.

    Returns a JSON-safe dict: ``accuracy``, ``loss``, ``num_images``, ``images_per_s``,
    ``seconds_per_image``, and, for equilibrium models, the per-sample forward statistics over the
    whole set: the keys of :meth:`lipdeq.Solution.summary` with prefix ``forward``
    (``forward_nstep_mean``, ``forward_nstep_p95``, ``forward_rel_residual_max``, ...),
    ``status_counts`` and, for certified Lipschitz models, ``error_bound_max`` (the same value as
    ``forward_error_bound_max``, under the name earlier releases used).
    """
    if images_uint8.shape[0] != labels.shape[0]:
        raise ValueError(f"{images_uint8.shape[0]} images but {labels.shape[0]} labels")
    if precise_bn:
        with precise_batchnorm(getattr(model, "module", model), precise_bn, amp=amp, should_stop=should_stop) as used:
            out = evaluate(model, images_uint8, labels, batch_size=batch_size, device=device, amp=amp,
                           should_stop=should_stop, robust=robust)
        return {**out, "precise_bn_images": used}
    device = torch.device(device)
    was_training = model.training
    model.eval()
    inner = getattr(model, "module", model)
    tally = RobustTally(inner, amp=amp) if robust else None  # after eval(): the bound is of eval mode
    total_loss, correct, n = 0.0, 0, 0
    # Per-sample statistics only: keeping each batch's Solution would keep its fixed points too.
    nsteps, rels, abss, statuses, bounds = [], [], [], [], []
    elapsed = 0.0
    interrupted = False
    try:
        for start in range(0, images_uint8.shape[0], batch_size):
            if should_stop is not None and should_stop():
                interrupted = True
                break
            x = to_float_normalized(images_uint8[start : start + batch_size]).to(device)
            y = labels[start : start + batch_size].to(device)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = model(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            elapsed += time.perf_counter() - t0
            total_loss += float(F.cross_entropy(logits.float(), y, reduction="sum"))
            correct += int((logits.argmax(dim=1) == y).sum())
            n += y.shape[0]
            sol = getattr(inner, "last_solution", None)
            if tally is not None:
                tally.add(logits, y, sol)
            if sol is not None:
                nsteps.append(sol.nstep.cpu())
                rels.append(sol.rel_residual.cpu())
                abss.append(sol.abs_residual.cpu())
                statuses.append(sol.status.cpu())
                if sol.error_bound is not None:
                    bounds.append(sol.error_bound.cpu())
    finally:
        model.train(was_training)
    out: dict[str, Any] = {
        "accuracy": correct / max(n, 1),
        "loss": total_loss / max(n, 1),
        "num_images": n,
        "images_per_s": n / elapsed if elapsed > 0 else float("nan"),
        "seconds_per_image": elapsed / max(n, 1),
        "precise_bn_images": 0,
    }
    if interrupted:
        out["interrupted"] = True
    if tally is not None:
        out.update(tally.summary())
    if nsteps:
        status = torch.cat(statuses)
        # A bound exists only if every batch had one (the certificate is the same for all batches).
        bound = torch.cat(bounds) if len(bounds) == len(nsteps) else None
        summary = sample_summary("forward", nstep=torch.cat(nsteps), rel_residual=torch.cat(rels),
                                 abs_residual=torch.cat(abss), status=status, error_bound=bound)
        out.update(summary, status_counts=status_counts(status))
        if bound is not None:
            out["error_bound_max"] = summary["forward_error_bound_max"]
    return out


def evaluate_checkpoint(
    path: str | Path, *, overrides: Sequence[str] = (), device: str | None = None, robust: bool = False
) -> dict[str, Any]:
    """Load a checkpoint (run directory, checkpoint directory or meta.json), rebuild its model from
    the stored configuration, and evaluate it on the test split. ``overrides`` may change ``data.*``,
    ``train.*`` (evaluation batch size, precision) and the forward solver's settings (``model.solver``,
    ``model.f_thres``, ``model.f_tol``, ...); an override of any other ``model.*`` key would evaluate
    another network and raises :class:`~lipdeq.training.compat.ConfigMismatchError` naming the key.

    Returns the metrics of :func:`evaluate` plus ``model``, ``step``, ``certificate`` (the certified
    Lipschitz bound, ``inf`` for the baseline) and ``checkpoint``; with ``robust=True`` also the
    certified accuracy of :func:`evaluate`.
    """
    ck = load_checkpoint(path)
    what = f"configuration stored in {ck.path}"
    stored = config_from_dict(ck.config, what=what)
    cfg = config_from_dict(ck.config, overrides, what=what)
    # The weights are evaluated as the network they were trained as: only the data, the evaluation
    # settings and the forward solver's precision may change, never the architecture.
    check_compatible(stored.to_dict(), cfg.to_dict(), allowed=EVAL_SAFE, allowed_prefixes=EVAL_SAFE_PREFIXES,
                     what="evaluation overrides", source=str(ck.path))
    dev = resolve_device(device)
    model = MultiscaleDEQ(cfg.model)
    try:
        model.load_state_dict(ck.model_state)
    except RuntimeError as err:
        raise CheckpointError(f"{ck.path}: weights do not fit model {cfg.model.name!r}: {err}") from None
    model.to(dev)
    d = cfg.data
    images, labels = load_dataset(d.dataset, "test", data_dir=d.data_dir, subset=d.test_subset, seed=cfg.train.seed)
    # Precise BN (train.eval_precise_bn, of the stored configuration unless overridden: the trainer's
    # evaluations use the same images) on the model built here: nothing is written back to the checkpoint.
    calib: list[torch.Tensor] = []
    if cfg.train.eval_precise_bn:
        train_x, _ = load_dataset(d.dataset, "train", data_dir=d.data_dir, subset=d.train_subset, seed=cfg.train.seed)
        calib = precise_bn_batches(train_x, cfg.train.eval_precise_bn, batch_size=cfg.train.batch_size,
                                   seed=cfg.train.seed, device=dev)
    metrics = evaluate(model, images, labels, batch_size=cfg.train.eval_batch_size, device=dev,
                       amp=cfg.train.amp == "bf16", precise_bn=calib, robust=robust)
    cert = model.lipschitz_bound()
    return {"model": cfg.model.name, "step": ck.step, "checkpoint": str(ck.path), **metrics,
            "certificate": cert.value, "certificate_reason": cert.reason}
