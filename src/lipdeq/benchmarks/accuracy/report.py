"""The profile's short text report and its figure (matplotlib: the optional extra ``lipdeq[plots]``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from lipdeq.optional import pyplot

__all__ = ["format_report", "write_plot"]


def _f(v: Any, spec: str = ".3f") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return format(v, spec)


def _acc(e: dict[str, Any]) -> str:
    return f"{_f(e['accuracy'])} +- {_f(e.get('accuracy_se'))} ({e['num_images']} images)"


def _verdict(met: bool | None) -> str:
    return "not assessed" if met is None else ("met" if met else "NOT met")


def format_report(results: dict[str, Any]) -> str:
    """A short plain-text report: per model, the time to each threshold, the comparisons, the targets."""
    s, t, m, st = results["summary"], results["targets"], results["models"], results["settings"]
    lip, base = s["lipschitz"], s["baseline"]
    names = (lip, base)
    w = max(len(lip), len(base), 12) + 2
    lines = [
        f"lipdeq bench accuracy: {lip} against {base}, {st['budget_seconds']:.0f} s of training each "
        f"({results['mode']}, {st['threads_per_run']} thread(s) per run), {results['dataset']}, {results['device']}",
        f"curve points on {st['eval_images']} test images, final on {st['final_images']}; precise BN on "
        f"{st['bn_images']} training images; wall time {results.get('wall_seconds', float('nan')):.0f} s",
        "",
        f"{'':<34}" + "".join(f"{n:>{w}}" for n in names),
    ]

    def row(label: str, fn: Any) -> None:
        lines.append(f"{label:<34}" + "".join(f"{fn(m[n]):>{w}}" for n in names))

    row("steps / epochs", lambda e: f"{e['steps']} / {e['epochs']:.3f}")
    row("training seconds", lambda e: f"{e['train_seconds']:.1f}")
    row("median step time (s)", lambda e: _f(e["step_time_median"], ".2f"))
    row("final accuracy", lambda e: _f(s["final_accuracy"][e["preset"]]))
    row("  standard error", lambda e: _f(s["final_accuracy_se"][e["preset"]]))
    row("train fwd / bwd iterations (end)", lambda e: f"{_f(e['curve'][-1]['train_forward_nstep_mean'], '.1f')} / "
                                                       f"{_f(e['curve'][-1]['train_backward_nstep_mean'], '.1f')}")
    row("certificate Lip(f) (end)", lambda e: _f(e["curve"][-1]["certificate"]))
    lines += ["", "time to threshold, seconds of training (first evaluation at or above it; no interpolation)",
              f"{'threshold':<12}" + "".join(f"{n:>{w}}" for n in names) + "   speed-up [bracket]"]
    per = t["time_to_threshold_speedup"]["per_threshold"]
    for k in s["thresholds"]:
        times = [s["time_to_threshold"][n][k] for n in names]
        if all(x is None for x in times):
            continue
        if k in per:
            v = per[k]
            note = (f"   {_f(v['speedup'], '.2f')}x [{_f(v['bracket'][0], '.2f')}, {_f(v['bracket'][1], '.2f')}]"
                    if v["speedup"] is not None else f"   {v.get('note', '')}")
        elif k in t["time_to_threshold_speedup"]["not_measured"]:
            note = "   not measured (both at their first evaluation)"
        else:
            note = ""
        lines.append(f"{k:<12}" + "".join(f"{_f(x, '.0f'):>{w}}" for x in times) + note)
    wc, ep = s["equal_wallclock"], s["equal_epochs"]
    lines += [
        "",
        f"equal wall-clock (end of both budgets): {lip} {_acc(wc['lipschitz'])} vs {base} {_acc(wc['baseline'])}; "
        f"difference {_f(wc['difference'], '+.3f')} +- {_f(wc['difference_se'])} (z {_f(wc['z'], '+.1f')})",
        f"equal epochs ({ep['epoch']:.3f}, set by {ep['set_by']}; {lip} at epoch {ep['lipschitz']['epoch']:.3f}, "
        f"{base} at {ep['baseline']['epoch']:.3f}): {_f(ep['lipschitz']['accuracy'])} vs "
        f"{_f(ep['baseline']['accuracy'])}; difference {_f(ep['difference'], '+.3f')} +- {_f(ep['difference_se'])} "
        f"(z {_f(ep['z'], '+.1f')})",
        "",
        "targets:",
    ]
    tt = t["time_to_threshold_speedup"]
    lines.append(f"  {tt['target']}: {_verdict(tt['met'])}"
                 + ("" if tt["met"] is None else " (decided by the brackets)" if tt["decided"]
                    else " (not decided by the evaluation grid: see the brackets)"))
    aw = t["accuracy_equal_wallclock"]
    lines.append(f"  {aw['target']}: {_verdict(aw['met'])} (z {_f(aw['z'], '+.1f')})")
    ae = t["accuracy_equal_epochs"]
    lines.append(f"  {ae['target']}: {_f(ae['measured'], '+.3f')} +- {_f(ae['se'])}")
    return "\n".join(lines) + "\n"


def write_plot(results: dict[str, Any], path: Path) -> None:
    """accuracy.png: accuracy against training time and against epochs (both models, with standard
    errors), solver iterations along training, and the certificate along training.

    Raises :class:`~lipdeq.optional.MissingExtraError` (naming ``lipdeq[plots]``) without matplotlib.
    """
    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    (a_time, a_epoch), (a_iter, a_cert) = axes
    for name, e in results["models"].items():
        c = e["curve"]
        acc, se = [p["accuracy"] for p in c], [p["accuracy_se"] for p in c]
        a_time.errorbar([p["elapsed"] for p in c], acc, yerr=se, fmt="o-", ms=3, capsize=2, label=name)
        a_epoch.errorbar([p["epoch"] for p in c], acc, yerr=se, fmt="o-", ms=3, capsize=2, label=name)
        recs = [r for r in e["records"] if "forward_nstep_mean" in r]
        (line,) = a_iter.plot([r["elapsed"] for r in recs], [r["forward_nstep_mean"] for r in recs], lw=1,
                              label=f"{name} forward")
        a_iter.plot([r["elapsed"] for r in recs], [r.get("backward_nstep_mean", math.nan) for r in recs], lw=1,
                    ls="--", color=line.get_color(), label=f"{name} backward")
        cert = [(p["elapsed"], p["certificate"]) for p in c if math.isfinite(p["certificate"])]
        if cert:
            a_cert.plot(*zip(*cert), "o-", ms=3, label=name)
    a_time.set(xlabel="training time (s, sum of step times)", ylabel="test accuracy (precise BN)",
               title="accuracy against wall-clock")
    a_epoch.set(xlabel="epochs", ylabel="test accuracy (precise BN)", title="accuracy against epochs")
    a_iter.set(xlabel="training time (s)", ylabel="solver iterations (batch mean)",
               title="iterations along training")
    a_cert.set(xlabel="training time (s)", ylabel="certified bound on Lip(f)",
               title="certificate along training (finite only)")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
