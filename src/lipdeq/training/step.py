"""One optimisation step, shared by the trainer's loop and the bench's sweep.

A step is: forward (unrolled while pretraining, with the Jacobian penalty when it is due), loss,
the non-finite check (loss, fixed point, gradients: agreed by every rank), backward, gradient
clipping, the optimizer update and the schedule. A non-finite step applies no update and puts the
model's buffers back as they were (a forward of a NaN batch would otherwise leave NaN BatchNorm
statistics); counting such steps and deciding when to give up is the caller's business.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from lipdeq.data.loader import derive_seed
from lipdeq.solvers import Solution, Status
from lipdeq.training.distributed import DistContext, all_ranks_true

if TYPE_CHECKING:
    from lipdeq.configs import RunConfig

__all__ = ["StepResult", "train_step", "use_jacobian_penalty"]

_SINGLE = DistContext()  # one process: every all-ranks agreement is the local flag


@dataclass
class StepResult:
    """What one call to :func:`train_step` did.

    Attributes:
        finite: True when the update was applied; False when the step was skipped because the loss,
            the fixed point or a gradient was non-finite on some rank.
        loss: the total loss (cross-entropy plus the weighted Jacobian penalty), detached.
        ce: the cross-entropy part, detached.
        jac: the Jacobian penalty, detached (None when it was not computed).
        logits: the forward's logits, detached.
        solution: the model's forward :class:`Solution` (None while pretraining unrolled); after a
            finite step its ``.backward`` holds the adjoint solve.
    """

    finite: bool
    loss: torch.Tensor
    ce: torch.Tensor
    jac: torch.Tensor | None
    logits: torch.Tensor
    solution: Solution | None


def use_jacobian_penalty(train_cfg: Any, step: int, epoch: int, pretrain: bool) -> bool:
    """Whether step ``step`` adds the Jacobian penalty (Bai et al. 2021).

    With probability ``train_cfg.jac_reg_freq``, from a coin drawn from a generator seeded by the
    step, so that resuming replays the same decisions; never while pretraining, with a zero weight, or
    from ``jac_reg_stop_epoch`` on.
    """
    t = train_cfg
    if pretrain or t.jac_reg_weight <= 0 or (t.jac_reg_stop_epoch is not None and epoch >= t.jac_reg_stop_epoch):
        return False
    coin = torch.rand((), generator=torch.Generator().manual_seed(derive_seed("jac", t.seed, step)))
    return bool(coin < t.jac_reg_freq)


def train_step(
    model: nn.Module,
    net: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    cfg: RunConfig,
    *,
    pretrain: bool,
    use_jac: bool,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    ctx: DistContext | None = None,
    warning_gate: contextlib.AbstractContextManager[Any] | None = None,
) -> StepResult:
    """Run one optimisation step of ``model`` on the batch ``(x, y)`` as ``cfg.train`` says.

    Args:
        model: the :class:`~lipdeq.models.MultiscaleDEQ` (its ``last_solution``, buffers and
            parameters are read here).
        net: what the forward runs through: ``model`` itself, or its DDP wrapper.
        x, y: the batch, already on the model's device.
        optimizer: stepped when the step is finite.
        cfg: the run configuration (``train.amp``, ``train.grad_clip``, ``train.jac_reg_weight``).
        pretrain: run the unrolled (pretraining) forward instead of the fixed-point solve.
        use_jac: add the Jacobian penalty (see :func:`use_jacobian_penalty`).
        scheduler: stepped after the optimizer on a finite step (None: no schedule).
        ctx: the distributed context, so that every rank takes the same branch (None: one process).
        warning_gate: a re-entrant context entered around the forward and the backward (the
            trainer's solver-warning filter); None: warnings pass through.

    Returns:
        A :class:`StepResult`; ``finite`` is False when nothing was updated.
    """
    t = cfg.train
    ctx = _SINGLE if ctx is None else ctx
    gate = contextlib.nullcontext() if warning_gate is None else warning_gate
    use_amp = t.amp == "bf16"
    buffers_before = {n: b.detach().clone() for n, b in model.named_buffers()}  # for a skipped step
    with gate, torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=use_amp):
        out = net(x, unrolled=pretrain, return_jac_loss=bool(use_jac))
    logits, jac = out if use_jac else (out, None)
    ce = F.cross_entropy(logits.float(), y)
    loss = ce + t.jac_reg_weight * jac.float() if jac is not None else ce
    sol = model.last_solution
    bad_fixed_point = sol is not None and bool((sol.status == int(Status.NON_FINITE)).any())
    optimizer.zero_grad(set_to_none=True)
    # Every rank takes the same branch, so DDP's collectives never deadlock.
    finite = all_ranks_true(bool(torch.isfinite(loss)) and not bad_fixed_point, ctx)
    if finite:
        # Only into the parameters: otherwise autograd also computes the gradient of the graph step's
        # input leaf z_in (each block's first conv backward once more), which nothing reads; measured
        # 4-8% of a lipmdeq_tiny step (in-process A/B, docs/RESULTS.md).
        params = [p for p in model.parameters() if p.requires_grad]
        with gate:
            loss.backward(inputs=params or None)
        if t.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        grads_ok = not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())
        finite = all_ranks_true(grads_ok, ctx)
    if finite:
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    else:
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():  # undo the forward's buffer updates (BatchNorm statistics of a NaN)
            for n, b in model.named_buffers():  # by name: a module may rebind a buffer
                b.copy_(buffers_before[n])
    return StepResult(
        finite=finite, loss=loss.detach(), ce=ce.detach(), jac=None if jac is None else jac.detach(),
        logits=logits.detach(), solution=sol,
    )
