"""torch.compile of f (``train.compile``): compiled once per run, equal to the eager path.

The compile counts use dynamo's test backends (``"eager"``: dynamo's capture and guards without
inductor, so these tests check recompilation and graph capture, not code generation, and stay fast
on a CPU). The exact bound asserted: a training step compiles two graphs (the forward solve runs
without grad, the IFT re-evaluation with grad) and evaluation one more (eval mode, no grad); every
later step and evaluation at the same batch size compiles nothing.
"""

from __future__ import annotations

import copy
import os
import tempfile
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend
from torch.nn.parallel import DistributedDataParallel

from lipdeq.configs import load_config
from lipdeq.errors import LipdeqError
from lipdeq.models import MultiscaleDEQ
from lipdeq.models.compiled import CompiledStep
from lipdeq.solvers import SolverWarning
from lipdeq.training.distributed import DistContext
from lipdeq.training.step import train_step

TINY = ["model.channels=[8,8]", "model.head_channels=[4,4]", "model.final_channels=16", "model.num_groups=4",
        "model.image_size=16", "model.f_thres=6", "model.b_thres=6", "train.batch_size=4"]


def _pair(preset: str, extra: list[str] = ()):
    cfg = load_config(preset, [*TINY, *extra])
    torch.manual_seed(0)
    eager = MultiscaleDEQ(cfg.model)
    return cfg, eager, copy.deepcopy(eager)


def _batch(n: int = 4):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 16, 16, generator=gen), torch.randint(0, 10, (n,), generator=gen)


@pytest.fixture
def world_of_one():
    """A one-process gloo group, so that DDP wraps the model as under torchrun (no spawn)."""
    with tempfile.TemporaryDirectory() as d:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(d, 'store')}", rank=0, world_size=1)
        try:
            yield DistContext(rank=0, world_size=1)
        finally:
            dist.destroy_process_group()


def test_compiled_f_compiles_once_and_trains_like_eager(world_of_one):
    """Three DDP training steps (IFT hook, caps' cached parametrizations, dropout masks) and two
    evaluations: the graph count stops growing after the first step / evaluation, and weights, logits
    and solver iterations equal the eager run's (stale cached weights or masks baked into the graph
    as constants would make steps 2 and 3 differ)."""
    cfg, eager, compiled = _pair("lipmdeq_tiny")
    counter = CompileCounterWithBackend("eager")
    compiled.compile_f(backend=counter)
    net = DistributedDataParallel(compiled)
    opts = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in (eager, compiled)]
    x, y = _batch()
    counts = []
    for step in range(3):
        results = []
        for model, front, opt in ((eager, eager, opts[0]), (compiled, net, opts[1])):
            torch.manual_seed(100 + step)  # the same dropout masks for both
            model.train()
            results.append(train_step(model, front, x, y, opt, cfg, pretrain=False, use_jac=False,
                                      ctx=world_of_one))
        counts.append(counter.frame_count)
        assert all(r.finite for r in results)
        assert torch.equal(results[0].solution.nstep, results[1].solution.nstep)
        assert results[0].solution.backward.n_f_evals == results[1].solution.backward.n_f_evals
        torch.testing.assert_close(results[1].logits, results[0].logits, rtol=1e-5, atol=1e-6)
    for a, b in zip(eager.parameters(), compiled.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        for model in (eager, compiled):
            model.eval()
        for _ in range(2):
            torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-6)
            counts.append(counter.frame_count)
    assert counts == [2, 2, 2, 3, 3], counts


def test_jacobian_penalty_runs_f_eagerly_under_aot_autograd():
    """The penalty differentiates f twice, which AOTAutograd refuses ("does not currently support
    double backward"): it must use the eager layer, with the compiled one everywhere else."""
    one_branch = ["model.channels=[8]", "model.head_channels=[4]", "model.f_thres=3", "model.b_thres=3"]
    cfg, eager, compiled = _pair("mdeq_tiny", one_branch)
    compiled.compile_f(backend="aot_eager")
    x, y = _batch(2)
    grads = []
    for model in (eager, compiled):
        torch.manual_seed(7)
        model.train()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SolverWarning)  # the baseline does not converge in 3 steps
            logits, jac = model(x, return_jac_loss=True)
            (F.cross_entropy(logits, y) + jac).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-7)


def test_cuda_graph_mode_keeps_the_grad_path_without_cuda_graphs():
    """reduce-overhead: CUDA graphs only for the graph-free calls; outputs are copies (a CUDA graph's
    output buffer is overwritten by its next replay). On a CPU the path runs without CUDA graphs."""
    step = CompiledStep("reduce-overhead", backend="eager")
    assert step.cudagraphs and step._grad is not step._nograd
    cfg, eager, compiled = _pair("lipmdeq_tiny")
    compiled.compiled_step = step
    x, _ = _batch(2)
    eager.eval()
    compiled.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x))
    default = CompiledStep("default", backend="eager")
    assert not default.cudagraphs and default._grad is default._nograd


def test_unknown_compile_mode_is_refused():
    with pytest.raises(LipdeqError, match="unknown compile mode 'fast'") as info:
        CompiledStep("fast")
    assert isinstance(info.value, ValueError)
