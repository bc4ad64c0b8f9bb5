"""``lipdeq demo``: train lipmdeq_tiny and mdeq_tiny briefly on the same data and compare them."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

from lipdeq.checks import check_int, check_real
from lipdeq.configs import load_config
from lipdeq.errors import LipdeqError
from lipdeq.jsonsafe import json_safe
from lipdeq.optional import MissingExtraError, pyplot
from lipdeq.training import train

DEMO_MODELS = ("lipmdeq_tiny", "mdeq_tiny")


def demo_overrides(data_dir: str | None, seconds: float | None, steps: int | None) -> list[str]:
    """The changes to the presets that make a few-minute CPU run: batch 32, a 5,000-image training
    subset, a 300-image test subset, no MDEQ pretraining (its 3,000 steps would eat the budget),
    BatchNorm statistics re-estimated on 128 fixed training images before the evaluation (precise BN,
    the same for both models: after a minute of training eval-mode predictions are still at chance
    without it), and a time or step budget."""
    out = [
        "train.batch_size=32",
        "train.pretrain_steps=0",
        "train.log_every=1",
        "train.eval_every_epochs=1000",
        "train.eval_precise_bn=128",
        "train.checkpoint_every_epochs=1000",
        "data.train_subset=5000",
        "data.test_subset=300",
        "data.augment=false",
    ]
    out.append(f"train.max_steps={steps}" if steps else "train.max_steps=null")
    out.append(f"train.max_seconds={seconds}" if seconds and not steps else "train.max_seconds=null")
    if data_dir:
        out += ["data.dataset=cifar10", f"data.data_dir={json.dumps(str(data_dir))}"]
    else:
        out += ["data.dataset=synthetic"]
    return out


def _summarise(name: str, records: list[dict[str, Any]], result: Any) -> dict[str, Any]:
    steady = records[1:] or records  # the first logged step includes one-off start-up costs

    def mean(key: str) -> float:
        values = [r[key] for r in steady if key in r]
        return statistics.fmean(values) if values else float("nan")

    ev = result.final_eval
    return {
        "model": name,
        "steps": result.step,
        "train_seconds": result.train_seconds,
        "step_time_s": mean("step_time"),
        "forward_iters": mean("forward_nstep_mean"),
        "backward_iters": mean("backward_nstep_mean"),
        "forward_rel_residual": mean("forward_rel_residual_max"),
        "accuracy": ev.get("accuracy", float("nan")),
        "inference_s_per_image": ev.get("seconds_per_image", float("nan")),
        "certificate": ev.get("certificate", float("inf")),
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    """The side-by-side comparison printed by the demo."""
    lip, base = rows[0], rows[1]
    lines = [
        f"{'':<30}{lip['model']:>16}{base['model']:>16}",
        f"{'certified Lip(f) bound':<30}{lip['certificate']:>16.3f}{base['certificate']:>16}",
        f"{'forward iterations (mean)':<30}{lip['forward_iters']:>16.1f}{base['forward_iters']:>16.1f}",
        f"{'backward iterations (mean)':<30}{lip['backward_iters']:>16.1f}{base['backward_iters']:>16.1f}",
        f"{'final forward rel. residual':<30}{lip['forward_rel_residual']:>16.2e}{base['forward_rel_residual']:>16.2e}",
        f"{'train step time (s)':<30}{lip['step_time_s']:>16.3f}{base['step_time_s']:>16.3f}",
        f"{'steps trained':<30}{lip['steps']:>16d}{base['steps']:>16d}",
        f"{'inference (ms / image)':<30}{1e3 * lip['inference_s_per_image']:>16.2f}"
        f"{1e3 * base['inference_s_per_image']:>16.2f}",
        f"{'test accuracy (precise BN)':<30}{lip['accuracy']:>16.3f}{base['accuracy']:>16.3f}",
        "",
        f"train-step speed-up of {lip['model']} over {base['model']}: {base['step_time_s'] / lip['step_time_s']:.2f}x",
        f"inference speed-up: {base['inference_s_per_image'] / lip['inference_s_per_image']:.2f}x",
    ]
    return "\n".join(lines)


def plot(histories: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """Training loss and forward iterations against wall-clock for both models, saved to ``path``.

    Raises :class:`lipdeq.optional.MissingExtraError` (naming ``lipdeq[plots]``) without matplotlib.
    """
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, recs in histories.items():
        t, elapsed = [], 0.0
        for r in recs:
            elapsed += r["step_time"]
            t.append(elapsed)
        axes[0].plot(t, [r["loss"] for r in recs], label=name)
        axes[1].plot(t, [r.get("forward_nstep_mean", float("nan")) for r in recs], label=name)
    axes[0].set(xlabel="training time of logged steps (s)", ylabel="training loss", title="loss")
    axes[1].set(xlabel="training time of logged steps (s)", ylabel="forward solver iterations", title="solver")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


DEMO_MARKER = ".lipdeq-demo"  # in the demo's --out: the run directories beside it are the demo's own


class DemoError(LipdeqError, ValueError):
    """A demo budget or output directory that cannot be used."""


def check_budget(seconds_per_model: float | None, steps: int | None) -> None:
    """Refuse budgets that are not budgets: zero, negative, NaN or infinite seconds; zero or negative steps.

    (``train.max_seconds=null`` means *no* limit, so a zero that fell through would train the whole
    preset: thousands of steps, hours for mdeq_tiny.)
    """
    if steps is not None:
        try:
            check_int("--steps", steps, minimum=1)
        except (TypeError, ValueError):
            raise DemoError(f"--steps must be a positive number of training steps per model, got {steps!r}") from None
        return
    if seconds_per_model is None:
        raise DemoError("the demo needs a budget: --seconds S (per model) or --steps N")
    try:
        check_real("--seconds", seconds_per_model, above=0.0)
    except (TypeError, ValueError):
        raise DemoError("--seconds must be a positive, finite number of seconds per model, "
                        f"got {seconds_per_model!r}") from None


def _claim_out_dir(out_dir: Path) -> None:
    """Make sure the demo only ever overwrites run directories that an earlier demo wrote.

    The demo trains into ``out_dir/<preset>`` with overwrite on; without this check
    ``lipdeq demo --out runs`` would wipe a user's ``lipdeq train --out runs/lipmdeq_tiny``.
    """
    ours = (out_dir / DEMO_MARKER).is_file()
    for name in DEMO_MODELS:
        run = out_dir / name
        if run.exists() and (not run.is_dir() or any(run.iterdir())) and not ours:
            raise DemoError(f"{run} exists and was not written by the demo (no {out_dir / DEMO_MARKER}); "
                            "the demo will not overwrite it: choose another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / DEMO_MARKER).write_text(json.dumps({"models": list(DEMO_MODELS)}) + "\n", encoding="utf-8")
    for stale in (SUMMARY_FILE, PLOT_FILE):  # an interrupted demo must not leave an old result beside it
        (out_dir / stale).unlink(missing_ok=True)


SUMMARY_FILE, PLOT_FILE = "summary.json", "demo.png"


def run_demo(
    out_dir: Path,
    data_dir: str | None = None,
    seconds_per_model: float | None = 60.0,
    steps: int | None = None,
    extra_overrides: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Train both tiny models on the same data and budget, print the comparison, save a plot and
    ``summary.json`` in ``out_dir``. Returns the per-model summaries. ``extra_overrides`` (config
    ``key=value`` strings) are applied to both models after the demo's own.

    ``steps`` (when given) wins over ``seconds_per_model``; both must be positive. The demo writes
    only into ``out_dir`` and its ``<preset>`` subdirectories, and refuses to overwrite a run
    directory it did not write itself. SIGINT/SIGTERM stops the whole demo: the interrupted model
    keeps its checkpoint, no second model is trained, no comparison is written, and
    ``KeyboardInterrupt`` is raised (the command exits 130).
    """
    check_budget(seconds_per_model, steps)
    out_dir = Path(out_dir)
    configs = {name: load_config(name, [*demo_overrides(data_dir, seconds_per_model, steps),
                                        *(extra_overrides or [])]) for name in DEMO_MODELS}
    _claim_out_dir(out_dir)
    rows, histories = [], {}
    for name, cfg in configs.items():
        records: list[dict[str, Any]] = []
        result = train(cfg, out_dir / name, overwrite=True, progress=True, on_step=records.append)
        if result.stopped_by.startswith("signal"):
            print(f"\ndemo stopped by {result.stopped_by.split(':', 1)[-1]} while training {name} "
                  f"(step {result.step}, checkpoint in {out_dir / name}); no comparison written", file=sys.stderr)
            raise KeyboardInterrupt
        rows.append(_summarise(name, records, result))
        histories[name] = records
    print()
    print(format_table(rows))
    (out_dir / SUMMARY_FILE).write_text(json.dumps(json_safe(rows), indent=2), encoding="utf-8")
    try:  # the comparison is the result; the figure is optional (matplotlib is the `plots` extra)
        plot(histories, out_dir / PLOT_FILE)
        print(f"\nplot: {out_dir / PLOT_FILE}   summary: {out_dir / SUMMARY_FILE}")
    except MissingExtraError as err:
        print(f"\nsummary: {out_dir / SUMMARY_FILE}   (plot skipped: {err})")
    return rows
