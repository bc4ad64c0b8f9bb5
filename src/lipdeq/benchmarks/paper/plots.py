"""The bench's figures (matplotlib, an optional extra, imported only here and only when called)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from lipdeq.optional import pyplot

__all__ = ["write_plots"]


def write_plots(results: dict[str, Any], out_dir: Path) -> None:
    """Write residuals.png, accuracy_vs_time.png, iterations.png and sweep.png into ``out_dir``.

    Raises :class:`~lipdeq.optional.MissingExtraError` (naming ``lipdeq[plots]``) without matplotlib.
    """
    plt = pyplot()

    models = results["models"]
    # residual against iteration
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, m in models.items():
        for ax, key in zip(axes, ("forward", "backward")):
            tr = torch.tensor(m.get("traces", {}).get(key) or [[float("nan")]], dtype=torch.float64)
            it = torch.arange(1, tr.shape[0] + 1)
            med = tr.median(dim=1).values
            (line,) = ax.semilogy(it, med, label=f"{name} (median)")
            ax.fill_between(it, tr.min(dim=1).values, tr.max(dim=1).values, color=line.get_color(), alpha=0.2)
    for ax, key in zip(axes, ("forward", "backward (adjoint)")):
        ax.set(xlabel="solver iteration (f evaluations)", ylabel="relative residual", title=f"{key}, trained weights")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    _save(plt, fig, out_dir / "residuals.png")
    # accuracy against wall-clock
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, m in models.items():
        ev = m["evals"]
        ax.plot([e["elapsed"] for e in ev], [e["accuracy"] for e in ev], "o-", label=name)
    for p in results["pairs"]:
        ax.axvline(p["equal_wallclock"]["seconds"], color="gray", ls=":", lw=1)
    ax.set(xlabel="training time (s, sum of step times)", ylabel="test accuracy", title="accuracy against wall-clock")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(plt, fig, out_dir / "accuracy_vs_time.png")
    # iterations along training
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, m in models.items():
        recs = [r for r in m["records"] if "forward_nstep_mean" in r]
        ax.plot([r["step"] for r in recs], [r["forward_nstep_mean"] for r in recs], label=f"{name} forward")
        ax.plot([r["step"] for r in recs], [r.get("backward_nstep_mean", float("nan")) for r in recs], ls="--",
                label=f"{name} backward")
    ax.set(xlabel="training step", ylabel="solver iterations (batch mean)", title="iterations along training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(plt, fig, out_dir / "iterations.png")
    # sweep
    pts = results["sweep"]["points"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in pts:
        x = r["certificate_trained"]
        face = "C0" if r["hyper_certified"] else "none"
        for ax, key in zip(axes, ("train_step_speedup", "accuracy")):
            y = r[key]
            if math.isfinite(x) and math.isfinite(y):
                ax.scatter([x], [y], facecolors=face, edgecolors="C0")
                ax.annotate(r["point"], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    axes[0].set(xlabel="certified Lip(f) bound of the weights",
                ylabel=f"train-step speed-up vs {results['sweep']['baseline']}",
                title="speed-up against the certificate")
    axes[1].set(xlabel="certified Lip(f) bound of the weights", ylabel="test accuracy (few steps: indicative)",
                title="accuracy against the certificate (hollow: not certified a priori)")
    for ax in axes:
        ax.axvline(1.0, color="gray", ls=":", lw=1)
        ax.grid(alpha=0.3)
    _save(plt, fig, out_dir / "sweep.png")


def _save(plt: Any, fig: Any, path: Path) -> None:
    """Lay out ``fig``, write it to ``path`` and free it."""
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
