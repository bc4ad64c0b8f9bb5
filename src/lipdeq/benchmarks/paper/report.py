"""results.md: the bench's tables, each with what its numbers are.

The headline's thresholds are the ones its verdicts were judged by (``threshold`` in each entry of
results.json's ``targets``, taken from :data:`~lipdeq.benchmarks.paper.profiles.TARGETS`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from lipdeq.benchmarks.paper.compare import points

__all__ = ["format_markdown"]


def _f(v: Any, spec: str = ".3f") -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float) and math.isnan(v):
        return "n/a"
    if isinstance(v, float) and math.isinf(v):
        return "inf (none)"
    return format(v, spec)


def _bytes(v: int | None) -> str:
    return "n/a" if v is None else f"{v / 2**20:.1f} MiB"


def format_markdown(results: dict[str, Any]) -> str:
    """results.md: the tables, with what each number is."""
    s, models, t = results["summary"], results["models"], results["targets"]
    train_t, infer_t, steps_t, mem_t = (t[k] for k in ("train_step_speedup", "inference_speedup",
                                                          "accuracy_equal_steps", "memory_flat"))
    names = list(models)
    hw = results["hardware"]
    st = results["settings"]
    lines = [
        f"# lipdeq bench — {results['profile']} profile",
        "",
        f"- command: `{results['command']}`",
        f"- date: {results['date']}; wall time {results['wall_seconds']:.0f} s",
        f"- data: {results['dataset']} ({results['data_source']}); {st['train_images']} training images, "
        f"test subset of {st['test_images']} images (accuracy standard error about "
        f"{100 * math.sqrt(0.25 / max(st['test_images'], 1)):.1f} points); batch {st['batch_size']}",
        f"- device: {results['device']}; {hw['processor']}, {hw['cpu_count']} CPUs, {hw['torch_threads']} torch "
        f"threads, torch {hw['torch']}" + (f", GPU {hw['gpu']}" if "gpu" in hw else "")
        + (f"; load average at start {hw['load_average_at_start'][0]:.2f}" if "load_average_at_start" in hw else ""),
        "",
        f"## Headline: {s['lipschitz']} against {s['baseline']}",
        "",
        "| target | measured | met |",
        "|---|---|---|",
        f"| train-step speed-up >= {train_t['threshold']:g}x | {_f(train_t['measured'], '.2f')}x | {train_t['met']} |",
        f"| inference speed-up >= {infer_t['threshold']:g}x | {_f(infer_t['measured'], '.2f')}x | {infer_t['met']} |",
        f"| accuracy higher at equal wall-clock | {_f(s['accuracy_lipschitz'])} vs {_f(s['accuracy_baseline'])} "
        f"({s['accuracy_basis']}; difference {_f(t['accuracy_equal_wallclock']['z'], '+.1f')} standard errors) | "
        f"{t['accuracy_equal_wallclock']['met']} |",
        f"| accuracy within {points(steps_t['threshold'])} at equal steps ({s['equal_steps']}) | "
        f"{_f(s['accuracy_lipschitz_equal_steps'])} vs {_f(s['accuracy_baseline_equal_steps'])} (difference "
        f"{_f(steps_t['z'], '+.1f')} standard errors) | {steps_t['met']} |",
        f"| training memory flat in f_thres (<= {mem_t['threshold']:.2f}) | {_f(mem_t['measured'], '.3f')}x | "
        f"{mem_t['met']} |",
        "",
        "Speed-ups are baseline time / Lipschitz time. Train step: median step time over the second half of "
        "each model's own run (weights trained as far as this profile goes). Inference: seconds per test "
        "image of each model's final weights (eval mode). Accuracy at equal wall-clock: each model's last "
        "evaluated snapshot within the shorter run's training time (plus one step). Standard errors: binomial, "
        "from the test subset size; a difference within about 2 of them is not resolved by this test set."
        + (f" Before every evaluation the BatchNorm running statistics (stem and head) are re-estimated on "
           f"{st['bn_recalibration_images']} fixed training images (precise BN, same for every model): with "
           "the N(0, 0.01) init the activations' variances are about 1e-4, and running variances initialised "
           "to 1 with momentum 0.1 need hundreds of steps to forget that start, so eval-mode accuracy is near "
           "chance for the first ~100 steps without it." if st.get("bn_recalibration_images") else ""),
        "",
        "## Per model",
        "",
        "| | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]

    def row(label: str, fn: Callable[[dict[str, Any]], str]) -> None:
        lines.append(f"| {label} | " + " | ".join(fn(models[n]) for n in names) + " |")

    row("parameters (all / in f)", lambda m: f"{m['parameters']:,} / {m['parameters_f']:,}")
    row("hyperparameter bound on Lip(f) (every conv at its cap)", lambda m: _f(m["hyper_bound"]))
    row("certified Lip(f) bound, weights: init / trained",
        lambda m: f"{_f(m['certificate_init'])} / {_f(m.get('certificate_final'))}")
    row("training steps / training seconds", lambda m: f"{m['steps']} / {m['train_seconds']:.1f}")
    row("train step time, median of 2nd half (s)", lambda m: _f(m["step_time_trained"]))
    row("inference per image, final weights (ms)", lambda m: _f(1e3 * m["inference_s_per_image"], ".2f"))
    row("test accuracy, final weights", lambda m: _f(m["accuracy_final"]))
    for phase in ("init", "middle", "end"):
        row(f"probe at {phase}: step", lambda m, p=phase: str(m["probes"][p]["step"]))
        row(f"  forward iterations mean / p95 ({phase})",
            lambda m, p=phase: f"{_f(m['probes'][p].get('forward_nstep_mean'), '.1f')} / "
                               f"{_f(m['probes'][p].get('forward_nstep_p95'), '.1f')}")
        row(f"  backward iterations mean / p95 ({phase})",
            lambda m, p=phase: f"{_f(m['probes'][p].get('backward_nstep_mean'), '.1f')} / "
                               f"{_f(m['probes'][p].get('backward_nstep_p95'), '.1f')}")
        row(f"  final rel. residual fwd / bwd, max over batch ({phase})",
            lambda m, p=phase: f"{_f(m['probes'][p].get('forward_rel_residual_max'), '.1e')} / "
                               f"{_f(m['probes'][p].get('backward_rel_residual_max'), '.1e')}")
        row(f"  converged fraction fwd / bwd ({phase})",
            lambda m, p=phase: f"{_f(m['probes'][p].get('forward_converged_frac'), '.2f')} / "
                               f"{_f(m['probes'][p].get('backward_converged_frac'), '.2f')}")
    row("peak memory of a training step: CUDA allocator", lambda m: _bytes(m["peak_memory"]["cuda_peak_bytes"])
        if m["peak_memory"]["cuda_peak_bytes"] is not None else "n/a (CPU)")
    row("saved-for-backward tensors of a training step", lambda m: _bytes(m["peak_memory"]["saved_tensor_bytes"]))
    lines += [
        "",
        "Probes: one forward + backward pass (no update) on a fixed training batch with fixed dropout masks, "
        "at the initial weights, the snapshot nearest the middle of training and the final weights; "
        "iterations are per-sample counts of f evaluations (mean, 95th percentile over the batch). "
        "Saved-for-backward: bytes of the distinct tensors autograd keeps for backward (parameters "
        "excluded), an honest proxy of activation memory on CPU, where no allocator peak is available.",
        "",
        "## Speed-ups and accuracy, each Lipschitz model against each baseline",
        "",
        "| Lipschitz | baseline | train step speed-up (trained / equal steps) | inference speed-up (final / equal "
        "steps) | accuracy at equal steps (steps): Lipschitz vs baseline | accuracy at equal wall-clock (s): "
        "Lipschitz vs baseline |",
        "|---|---|---|---|---|---|",
    ]
    for p in results["pairs"]:
        es, wc = p["equal_steps"], p["equal_wallclock"]
        lines.append(
            f"| {p['lipschitz']} | {p['baseline']} | {_f(p['train_step_speedup'], '.2f')}x / "
            f"{_f(p['train_step_speedup_equal_steps'], '.2f')}x | {_f(p['inference_speedup'], '.2f')}x / "
            f"{_f(p['inference_speedup_equal_steps'], '.2f')}x | {_f(es['lipschitz']['accuracy'])} (step "
            f"{es['lipschitz'].get('step', '-')}) vs {_f(es['baseline']['accuracy'])} (step "
            f"{es['baseline'].get('step', '-')}) | {_f(wc['lipschitz']['accuracy'])} (step "
            f"{wc['lipschitz'].get('step', '-')}, {_f(wc['lipschitz'].get('elapsed'), '.0f')} s) vs "
            f"{_f(wc['baseline']['accuracy'])} (step {wc['baseline'].get('step', '-')}, "
            f"{_f(wc['baseline'].get('elapsed'), '.0f')} s) |"
        )
    lines += ["", "## Evaluations along training", "",
              "| model | step | training s | accuracy | ms / image | forward iterations mean / p95 | certificate |",
              "|---|---|---|---|---|---|---|"]
    for n in names:
        for e in models[n]["evals"]:
            lines.append(
                f"| {n} | {e['step']} | {e['elapsed']:.1f} | {_f(e['accuracy'])} | "
                f"{_f(1e3 * e['seconds_per_image'], '.2f')} | {_f(e.get('forward_nstep_mean'), '.1f')} / "
                f"{_f(e.get('forward_nstep_p95'), '.1f')} | {_f(e['certificate'])} |"
            )
    sw = results["sweep"]
    lines += [
        "",
        f"## Sweep of the Lipschitz layer ({sw['preset']}, one knob at a time around {sw['reference']})",
        "",
        f"Each point: {sw['steps']} training steps from the same initial seed on the same batches; step time is "
        f"the median over steps 2..{sw['steps']}; speed-up against {sw['baseline']}'s median over its own steps "
        f"2..{sw['steps']} ({_f(sw['baseline_step_time'])} s); accuracy on {sw['test_images']} test images after "
        "these few steps is indicative only. Inference speed-up: against the final weights of "
        f"{sw['baseline']} ({_f(1e3 * sw.get('baseline_inference_s_per_image', float('nan')), '.2f')} ms / image). "
        "A hyperparameter bound >= 1 means the layer is not certified a priori (its current weights may still be).",
        "",
        "| point | hyper bound | certified a priori | weights bound init / trained | fwd iters first / last step "
        "(mean) | bwd iters first / last | step s | train speed-up | inference speed-up | accuracy |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sw["points"]:
        fs, ls = r["first_step"], r["last_step"]
        lines.append(
            f"| {r['point']} | {_f(r['hyper_bound'])} | {'yes' if r['hyper_certified'] else 'not certified'} | "
            f"{_f(r['certificate_init'])} / {_f(r['certificate_trained'])} | "
            f"{_f(fs.get('forward_nstep_mean'), '.1f')} / {_f(ls.get('forward_nstep_mean'), '.1f')} | "
            f"{_f(fs.get('backward_nstep_mean'), '.1f')} / {_f(ls.get('backward_nstep_mean'), '.1f')} | "
            f"{_f(r['step_time'], '.2f')} | {_f(r['train_step_speedup'], '.2f')}x | "
            f"{_f(r.get('inference_speedup', float('nan')), '.2f')}x | {_f(r['accuracy'])} |"
        )
    mem = results["memory"]
    lines += [
        "",
        f"## Training memory against the forward cap ({mem['preset']}, batch {mem['batch_size']}, f_tol 1e-12)",
        "",
        "| backward | f_thres | saved-for-backward | CUDA peak | step s |",
        "|---|---|---|---|---|",
    ]
    for mode in ("ift", "unrolled"):
        for r in mem.get(mode, []):
            lines.append(f"| {'implicit (IFT)' if mode == 'ift' else 'unrolled (pretrain_layers = f_thres)'} | "
                         f"{r['f_thres']} | {_bytes(r['saved_tensor_bytes'])} | {_bytes(r['cuda_peak_bytes'])} | "
                         f"{r['seconds']:.2f} |")
    lines += [
        "",
        f"Ratio f_thres {mem['f_thres'][-1]} / {mem['f_thres'][0]}: implicit {_f(mem['ratio_ift'], '.3f')}x"
        + (f", unrolled control {_f(mem['ratio_unrolled'], '.2f')}x" if "ratio_unrolled" in mem else "")
        + f" ({mem['metric']}).",
        "",
        "Plots: `residuals.png` (forward and backward relative residual against iteration, trained models), "
        "`accuracy_vs_time.png`, `iterations.png` (solver iterations along training), `sweep.png` (speed-up and "
        "accuracy against the certified bound).",
    ]
    if results["profile"] == "quick":
        lines += [
            "",
            "What this does not show: a CPU, a few minutes, batch 32, no MDEQ pretraining, a test subset; "
            "accuracies are early-training figures with the standard error above, not converged ones; "
            "timings depend on the machine's load from other processes.",
        ]
    return "\n".join(lines) + "\n"
