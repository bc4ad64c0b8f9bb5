"""``lipdeq bench``: the paper's claim (speed-up at a minor accuracy cost) measured side by side.

Every model is trained by :func:`lipdeq.training.train` on the same data, seed and batch size.
Each training step is logged (``train.log_every=1``), so the elapsed training time (the sum of step
times, without evaluation or checkpoint writes: the clock of ``train.max_seconds``) is known at
every step; snapshots of the weights are taken along training from the trainer's checkpoints.
Then, per snapshot:

- **evaluation** (eval mode, no dropout) on a test subset: accuracy, inference time per image,
  forward iterations; the certificate is computed (and cached) before timing, as it is a one-off
  per set of weights, not a per-batch cost;
- **probe** at init, middle and end of training: one forward + backward pass on a fixed training
  batch (training mode, fixed dropout masks), giving per-sample forward and backward iterations
  (mean, 95th percentile), final residuals, and the step's memory (see
  :mod:`lipdeq.benchmarks.memory`).

Quick profile (2 CPU cores, < 10 minutes): ``mdeq_tiny`` and ``lipmdeq_tiny`` at batch 32 without
MDEQ pretraining; the baseline trains a fixed number of steps, the Lipschitz model trains for the
baseline's elapsed training time (equal wall-clock) and is also snapshotted at the baseline's step
count (equal steps). Full profile (GPU): ``mdeq_large``, ``mdeq_large_reg`` and ``lipmdeq_large``,
each trained as its preset says. Both profiles add a one-at-a-time sweep of the Lipschitz layer's
knobs (ReLU slope, conv cap, alpha, beta): each point's certified bounds and a few training steps,
taken by the trainer's own step (:func:`lipdeq.training.step.train_step`).

Data: ``data_dir`` (``--data-dir``), else ``$LIPDEQ_DATA_DIR``, else the embedded synthetic set
(the bench says so in its log and in results.json's ``data_source``).

The package, one idea per module: :mod:`.profiles` (what each profile runs, the one table of
``TARGETS``), :mod:`.running` (training with snapshots, evaluations, probes), :mod:`.sweep`,
:mod:`.compare` (ratios, z-scores, medians, the verdicts), :mod:`.report` (results.md),
:mod:`.plots` (figures; matplotlib is the optional extra ``lipdeq[plots]``) and
:mod:`.pipeline` (:func:`run`, from data to outputs).
"""


from __future__ import annotations

from lipdeq.benchmarks.paper.pipeline import resolve_data, run
from lipdeq.benchmarks.paper.profiles import FULL, PROFILES, QUICK, TARGETS, Profile
from lipdeq.benchmarks.paper.report import format_markdown

__all__ = ["FULL", "PROFILES", "QUICK", "TARGETS", "Profile", "format_markdown", "resolve_data", "run"]
