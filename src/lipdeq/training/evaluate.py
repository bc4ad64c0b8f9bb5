"""Evaluation: accuracy, loss, per-sample solver statistics and inference throughput."""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lipdeq.data import to_float_normalized
from lipdeq.solvers import Status


def _percentile(x: torch.Tensor, q: float) -> float:
    return float(torch.quantile(x.double(), q)) if x.numel() else float("nan")


@torch.no_grad()
def evaluate(
    model: nn.Module,
    images_uint8: torch.Tensor,
    labels: torch.Tensor,
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    amp: bool = False,
) -> dict[str, Any]:
    """Evaluate ``model`` (eval mode, no augmentation) on uint8 images.

    Returns a JSON-safe dict: ``accuracy``, ``loss``, ``num_images``, ``images_per_s``,
    ``seconds_per_image``, and, for equilibrium models, the per-sample forward statistics over the
    whole set: ``forward_nstep_mean``, ``forward_nstep_p95``, ``forward_nstep_max``,
    ``forward_rel_residual_max`` / ``_mean``, ``status_counts`` and ``error_bound_max`` (certified,
    for Lipschitz models).
    """
    if images_uint8.shape[0] != labels.shape[0]:
        raise ValueError(f"{images_uint8.shape[0]} images but {labels.shape[0]} labels")
    device = torch.device(device)
    was_training = model.training
    model.eval()
    inner = getattr(model, "module", model)
    total_loss, correct, n = 0.0, 0, 0
    nsteps, rels, statuses, bounds = [], [], [], []
    elapsed = 0.0
    try:
        for start in range(0, images_uint8.shape[0], batch_size):
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
            if sol is not None:
                nsteps.append(sol.nstep.cpu())
                rels.append(sol.rel_residual.cpu())
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
    }
    if nsteps:
        ns, rs, st = torch.cat(nsteps).double(), torch.cat(rels).double(), torch.cat(statuses)
        out.update(
            forward_nstep_mean=float(ns.mean()),
            forward_nstep_p95=_percentile(ns, 0.95),
            forward_nstep_max=float(ns.max()),
            forward_rel_residual_mean=float(rs.mean()),
            forward_rel_residual_max=float(rs.max()),
            status_counts={s.name.lower(): int((st == int(s)).sum()) for s in Status},
        )
        if bounds:
            out["error_bound_max"] = float(torch.cat(bounds).max())
    return out
