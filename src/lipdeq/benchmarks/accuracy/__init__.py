"""``lipdeq bench accuracy``: time to accuracy on real CIFAR-10, a Lipschitz MDEQ against MDEQ.

Both models (default ``lipmdeq_tiny`` and ``mdeq_tiny``) train on the full CIFAR-10 training set as
their presets say (batch size, augmentation, optimizer, seed) for the same wall-clock budget
(default 40 minutes each; the clock is the sum of training-step times, so evaluation and snapshot
writing never count). Choices, and why:

- **Schedule horizon: time.** The preset's cosine runs over the budget's training seconds, so it
  reaches ``min_lr`` when the budget ends, whatever the step time does; a step-count horizon would
  need a step-time estimate beforehand. MDEQ pretrains (unrolled) for the preset's fraction of its
  schedule (``pretrain_steps`` over the epochs' steps: about 15% for ``mdeq_tiny``), as time.
  See :mod:`.training`.
- **Load: both runs at once** (default on a CPU): two processes, one torch thread each, started
  together, so that both see the same machine (the same other jobs, the same memory bandwidth and
  thermal state) for the whole budget; run one after the other with all threads, a slow change in
  the machine's load would land on one model only. ``mode="sequential"`` (all cores per run; the
  default on CUDA, one device) is the option for an otherwise idle machine.
- **Evaluations after both trainings**: snapshots are saved along training (outside the clock)
  and evaluated once both runs have ended, so one model's evaluation never slows the other's
  training. Curve points: ``evals`` (default 10) snapshots per run, spaced geometrically in time
  from budget/32 to the budget (a time *ratio* is then resolved equally well at every accuracy),
  each on the first ``eval_images`` (default 1,000) test images; the last snapshot of each run also
  on the first ``final_images`` (default 10,000: all). Every evaluation is of a fresh copy of the
  snapshot whose BatchNorm statistics are re-estimated from the same ``bn_images`` fixed training
  images (precise BN), in eval mode, with the certificate of its weights.

Reported (results.json's ``summary``): ``time_to_threshold`` (per model, threshold -> the training
seconds of the first evaluation at or above it, no interpolation, or null) with its bracket
``(previous evaluation, first evaluation]``; ``speedup_to_threshold`` (baseline time / Lipschitz
time, for thresholds both reach); ``final_accuracy``; the accuracies at equal wall-clock (the end of
both budgets) and at equal epochs (the run with fewer epochs at its end sets the epoch; the other
run's snapshot nearest that epoch, among ``match_snapshots`` kept along it, on the same images),
each with binomial standard errors ``sqrt(p (1 - p) / n)`` and the difference with its standard
error. ``targets``: the verdicts (see :mod:`.summary`). The arithmetic is in :mod:`.summary`, the
processes in :mod:`.running`, the text and figure in :mod:`.report`, the whole in :mod:`.pipeline`.
"""

from __future__ import annotations

from lipdeq.benchmarks.accuracy.pipeline import DEFAULT_MODELS, run
from lipdeq.benchmarks.accuracy.report import format_report, write_plot
from lipdeq.benchmarks.accuracy.summary import TARGETS, THRESHOLDS, summarize

__all__ = ["DEFAULT_MODELS", "TARGETS", "THRESHOLDS", "format_report", "run", "summarize", "write_plot"]
