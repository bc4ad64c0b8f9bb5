"""``lipdeq certify --checkpoint``: the layer certificate of trained weights against empirical
estimates of Lip(f) in z.

The certificate (``model.lipschitz_bound()``, an upper bound) is compared with the largest of three
lower bounds from :func:`lipdeq.lipschitz.empirical.empirical_lipschitz`, all in float64 and in
eval mode (dropout off, so f is batch-separable): power iteration on the Jacobian of f at the fixed
points z* of N test images and at as many Gaussian points of the same per-sample scale, and
gradient ascent on ``||f(a) - f(b)|| / ||a - b||`` from pairs near the fixed points. Their ratio,
certificate / largest estimate, is at least 1 and says how loose the certificate is.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from lipdeq.checks import check_int
from lipdeq.configs import config_from_dict
from lipdeq.data import load_dataset, to_float_normalized
from lipdeq.lipschitz.empirical import empirical_lipschitz
from lipdeq.models import MultiscaleDEQ
from lipdeq.solvers import solve
from lipdeq.training import CheckpointError, load_checkpoint
from lipdeq.training.device import resolve_device

__all__ = ["certify_checkpoint", "format_report"]


def _load_model(path: str | Path, data_dir: str | None) -> tuple[MultiscaleDEQ, Any, Any]:
    """The checkpoint's model (its stored configuration, trained weights), the run configuration
    and the checkpoint (:func:`lipdeq.training.evaluate_checkpoint` loads them the same way)."""
    ck = load_checkpoint(path)  # a missing path or a non-checkpoint is a CheckpointError naming it
    overrides = [f"data.data_dir={json.dumps(str(data_dir))}"] if data_dir else []
    cfg = config_from_dict(ck.config, overrides, what=f"configuration stored in {ck.path}")
    model = MultiscaleDEQ(cfg.model)
    try:
        model.load_state_dict(ck.model_state)
    except RuntimeError as err:
        raise CheckpointError(f"{ck.path}: weights do not fit model {cfg.model.name!r}: {err}") from None
    return model, cfg, ck


def certify_checkpoint(
    path: str | Path,
    *,
    data_dir: str | None = None,
    images: int = 16,
    device: str | None = None,
    iters: int = 50,
    seed: int = 0,
) -> dict[str, Any]:
    """Certificate, empirical estimates and their ratio for the weights of a checkpoint.

    Args:
        path: run directory, checkpoint directory or ``meta.json``.
        data_dir: CIFAR-10 directory (default: the one stored in the checkpoint's data config, or
            ``$LIPDEQ_DATA_DIR``); a synthetic-data run uses its synthetic test split.
        images: number of test images whose fixed points are the data points (and as many random
            points and pairs).
        device: ``cpu`` or ``cuda`` (default: cuda when available); the check runs in float64.
        iters: power iterations per point and ascent steps per pair.
        seed: seed of the random points, the start vectors and the pair perturbations.

    Returns a JSON-ready dict (through :func:`lipdeq.jsonsafe.json_safe`): ``model``, ``step``,
    ``checkpoint``, ``images``, ``certificate`` (the certificate's dict), ``empirical``
    (``value`` and the per-method figures), ``ratio`` (``inf`` for an infinite certificate), and
    ``fixed_point_residual_max`` (how exactly the data points are fixed points).
    """
    check_int("images", images, minimum=1)
    check_int("iters", iters, minimum=1)
    model, cfg, ck = _load_model(path, data_dir)
    dev = resolve_device(device)
    # float64: the ratio compares an upper and a lower bound, and round-off must not fake either
    model = model.double().to(dev).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    d = cfg.data
    x_u8, _ = load_dataset(d.dataset, "test", data_dir=d.data_dir, subset=images, seed=cfg.train.seed)
    x = to_float_normalized(x_u8).to(device=dev, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    with model.cached_weights():
        cert = model.lipschitz_bound()
        f, z0 = model.fixed_point_problem(x)
        with torch.no_grad():
            sol = solve(f, z0, method="anderson", tol=1e-10, stop_mode="abs", max_iter=200)
        z_star = sol.value.detach()
        emp = empirical_lipschitz(f, z_star, iters=iters, ascent_steps=iters, generator=gen)
    if math.isinf(cert.value):
        ratio = math.inf
    else:
        ratio = cert.value / emp.value if emp.value > 0 else math.inf
    return {
        "model": cfg.model.name,
        "step": ck.step,
        "checkpoint": str(ck.path),
        "images": int(x.shape[0]),
        "certificate": cert.to_dict(),
        "empirical": emp.to_dict(),
        "ratio": ratio,
        "fixed_point_residual_max": float(sol.abs_residual.max()),
    }


def format_report(result: dict[str, Any]) -> str:
    """The figures of :func:`certify_checkpoint` as a few lines of text."""
    cert = result["certificate"]
    value = float(cert["value"])
    emp = result["empirical"]
    n = result["images"]
    lines = [
        f"{result['model']} at step {result['step']} ({result['checkpoint']})",
        f"  certificate  Lip(f) <= {value:.6g}" + (f"  ({cert['reason']})" if cert.get("reason") else ""),
        f"  empirical    Lip(f) >= {emp['value']:.6g}  (largest of: Jacobian power iteration at {n} fixed points "
        f"{emp['jacobian_data']:.6g}, at {n} random points {emp['jacobian_random']:.6g}; "
        f"pair ascent {emp['pairs']:.6g})",
        f"  ratio        {float(result['ratio']):.4g}  (certificate / largest empirical estimate)",
    ]
    return "\n".join(lines)
