"""Targets, verdicts and the markdown report of ``lipdeq bench gpu`` (the runner: :mod:`.gpu`)."""

from __future__ import annotations

from typing import Any

from lipdeq.benchmarks.memory import FLAT_RATIO

__all__ = ["TARGETS", "format_report", "verdicts"]

MIN_LIP_BF16_IMAGES_PER_S = 2000.0
MIN_SPEED_RATIO = 4.75
MAX_BF16_LOGIT_DIFF = 1e-2
TARGETS = {
    "throughput": f"lipmdeq_large bf16 training >= {MIN_LIP_BF16_IMAGES_PER_S:,.0f} images/s",
    "ratio": f"training throughput lipmdeq_large / mdeq_large >= {MIN_SPEED_RATIO}x",
    "bf16": f"bf16 logits within {MAX_BF16_LOGIT_DIFF:g} relative of float32 (lipmdeq_large, fixed batch)",
    "memory": f"training memory flat in f_thres (peak at 30 within {FLAT_RATIO - 1:.0%} of 5, lipmdeq_large)",
    "outside_f": "time outside f per solver iteration, before (check every iteration) and after (every 4th)",
}


def _rows(results: dict[str, Any], preset: str, amp: str) -> list[dict[str, Any]]:
    return [r for r in results.get("throughput", []) if r.get("preset") == preset and r.get("amp") == amp
            and "train_images_per_s" in r]


def verdicts(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One entry per target: ``target``, ``measured`` (text) and ``verdict`` (met / not met / not measured)."""
    out = []

    def add(key: str, measured: str | None, ok: bool | None) -> None:
        verdict = "not measured" if ok is None else "met" if ok else "not met"
        out.append({"target": TARGETS[key], "key": key, "measured": measured or "-", "verdict": verdict})

    lip = _rows(results, "lipmdeq_large", "bf16")
    if lip:
        best = max(lip, key=lambda r: r["train_images_per_s"])
        how = "compiled" if best["compile"] else "eager"
        add("throughput", f"{best['train_images_per_s']:,.0f} images/s ({how})",
            best["train_images_per_s"] >= MIN_LIP_BF16_IMAGES_PER_S)
    else:
        add("throughput", None, None)
    ratios = []
    for amp in ("bf16", "none"):
        for compiled in (False, True):
            a = [r for r in _rows(results, "lipmdeq_large", amp) if r["compile"] == compiled]
            b = [r for r in _rows(results, "mdeq_large", amp) if r["compile"] == compiled]
            if a and b:
                ratios.append((f"{'bf16' if amp == 'bf16' else 'float32'}, {'compiled' if compiled else 'eager'}",
                               a[0]["train_images_per_s"] / b[0]["train_images_per_s"]))
    if ratios:  # the verdict is the first configuration measured: bf16 eager, else the next one
        add("ratio", "; ".join(f"{r:.2f}x ({how})" for how, r in ratios), ratios[0][1] >= MIN_SPEED_RATIO)
    else:
        add("ratio", None, None)
    diff = results.get("bf16_logits", {}).get("lipmdeq_large")
    add("bf16", None if diff is None else f"{diff:.2e}", None if diff is None else diff < MAX_BF16_LOGIT_DIFF)
    mem = results.get("memory") or {}
    ratio = mem.get("ratio")
    add("memory", None if ratio is None else f"{ratio:.3f}x ({mem.get('metric')})",
        None if ratio is None else ratio <= FLAT_RATIO)
    of = results.get("outside_f") or {}
    lip_of = of.get("lipmdeq_large") or {}
    before, after = lip_of.get("check_every_1"), lip_of.get("check_every_4")
    if before and after:
        add("outside_f", f"{100 * before['outside_f_fraction']:.0f}% -> {100 * after['outside_f_fraction']:.0f}% "
            f"({1e3 * before['outside_f_per_iter_s']:.2f} -> {1e3 * after['outside_f_per_iter_s']:.2f} ms/iter)",
            after["outside_f_per_iter_s"] <= before["outside_f_per_iter_s"])
    else:
        add("outside_f", None, None)
    return out


def _mib(v: float | None) -> str:
    return "-" if v is None else f"{v / 2**20:,.0f}"


def format_report(results: dict[str, Any]) -> str:
    """The markdown report (results.md) of a ``lipdeq bench gpu`` result."""
    env = results["environment"]
    lines = [f"# lipdeq bench gpu{' (DRY RUN)' if results['dry_run'] else ''}", ""]
    if results["dry_run"]:
        lines += ["Dry run: narrow widths, a few steps, synthetic data, on the CPU. It checks that the command "
                  "works; none of its figures is a GPU figure.", ""]
    lines += [f"Device {env['device']} ({env['device_name']}), torch {env['torch']}, started {results['started']}, "
              f"{results['elapsed_s']:.0f} s of a {results['budget_s']:.0f} s budget.", ""]
    t = results.get("tests") or {}
    lines += ["## CUDA tests", "", f"`{t.get('command', '-')}`: " + (
        ", ".join(f"{k} {t[k]}" for k in ("passed", "failed", "skipped", "errors") if k in t) or t.get("note", "-")),
        ""]
    lines += ["## Throughput", "", f"Batch {results['batch_size']}; median step; peak = "
              "torch.cuda.max_memory_allocated.", "",
              "| preset | precision | compile | train img/s | infer img/s | train peak MiB | infer peak MiB | "
              "fwd / bwd iters | first step s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results.get("throughput", []):
        head = f"| {r['preset']} | {'bf16' if r['amp'] == 'bf16' else 'float32'} | {'on' if r['compile'] else 'off'} |"
        if "train_images_per_s" not in r:
            lines.append(f"{head} {r.get('note', 'skipped')} | | | | | |")
            continue
        lines.append(f"{head} {r['train_images_per_s']:,.0f} | {r['infer_images_per_s']:,.0f} | "
                     f"{_mib(r['train_peak_bytes'])} | {_mib(r['infer_peak_bytes'])} | "
                     f"{r['forward_iters']:.1f} / {r['backward_iters']:.1f} | {r['first_step_s']:.1f} |")
    lines += ["", "## Precision, memory, solver overhead", ""]
    for preset, diff in (results.get("bf16_logits") or {}).items():
        lines.append(f"- bf16 vs float32 logits, {preset}: largest per-sample relative difference "
                     + (f"{diff:.2e}" if isinstance(diff, float) else str(diff)))
    mem = results.get("memory") or {}
    if "ratio" in mem:
        lines.append(f"- training peak memory, {mem['preset']}, f_thres {mem['f_thres'][0]} -> {mem['f_thres'][-1]}: "
                     f"{_mib(mem['values'][0])} -> {_mib(mem['values'][-1])} MiB ({mem['ratio']:.3f}x, "
                     f"{mem['metric']})")
    elif mem:
        lines.append(f"- memory check: {mem.get('note')}")
    for preset, rec in (results.get("outside_f") or {}).items():
        if "note" in rec:
            lines.append(f"- time outside f, {preset}: {rec['note']}")
            continue
        for k in sorted(r for r in rec if r.startswith("check_every_")):
            v = rec[k]
            lines.append(f"- time outside f, {preset}, {k.replace('_', ' ')}: {1e3 * v['outside_f_per_iter_s']:.2f} "
                         f"ms per iteration ({100 * v['outside_f_fraction']:.0f}% of {1e3 * v['solve_s']:.1f} ms "
                         f"per solve, {v['f_evals']} f evaluations of {1e3 * v['f_s']:.2f} ms)")
    lines += ["", "## Equal wall-clock training", ""]
    tr = results.get("training") or {}
    if tr:
        lines += ["| preset | budget s | steps | images/s | test accuracy | test images |", "|---|---|---|---|---|---|"]
        for preset, r in tr.items():
            if "accuracy" not in r:
                lines.append(f"| {preset} | {r.get('note', 'skipped')} | | | | |")
                continue
            lines.append(f"| {preset} | {r['budget_s']:.0f} | {r['steps']} | {r['images_per_s']:,.0f} | "
                         f"{r['accuracy']:.4f} | {r['test_images']} |")
    lines += ["", "## Targets", "", "| target | measured | verdict |", "|---|---|---|"]
    lines += [f"| {v['target']} | {v['measured']} | {v['verdict']} |" for v in results.get("targets", [])]
    if results.get("skipped"):
        lines += ["", "Skipped: " + "; ".join(results["skipped"])]
    return "\n".join(lines) + "\n"
