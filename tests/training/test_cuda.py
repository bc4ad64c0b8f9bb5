"""The large presets on CUDA, in float32 and bf16 autocast: training step (forward, backward, solver
statistics), certificate, agreement with the CPU, checkpoint round trip and resume, compiled f.

Every CUDA case skips with a reason when CUDA is absent; ``lipdeq bench gpu`` runs this file on the
GPU (cheap cases first, the compiled ones last). Batches are small and runs a few steps, so the file
takes seconds of GPU time plus inductor's compilation. The one CPU case checks bf16 autocast on a
tiny preset. None of these have run on a GPU in the session that wrote them (no device was lent).
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch

from lipdeq.configs import load_config
from lipdeq.models import MultiscaleDEQ, create_model
from lipdeq.solvers import SolverWarning
from lipdeq.training import load_checkpoint, train
from lipdeq.training.step import train_step
from lipdeq.training.trainer import build_optimizer

CUDA = pytest.mark.skipif(not torch.cuda.is_available(),
                          reason="needs a CUDA device (torch.cuda.is_available() is False)")
LARGE = ["lipmdeq_large", "mdeq_large", "mdeq_large_reg"]
NARROW = dict(channels=[8, 8], head_channels=[4, 4], final_channels=16, num_groups=4, image_size=16)
SYNTHETIC = ["data.dataset=synthetic", "data.train_subset=32", "data.test_subset=16", "data.augment=false",
             "train.batch_size=8", "train.eval_batch_size=16", "train.log_every=1", "train.num_threads=4"]


def relative_logit_difference(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Largest per-sample ``||other_b - reference_b|| / ||reference_b||`` (l2 over the classes)."""
    ref = reference.detach().double()
    diff = (other.detach().double() - ref).norm(dim=1)
    return float((diff / ref.norm(dim=1).clamp_min(1e-30)).max())


def _batch(n: int, device: str = "cpu", size: int = 32):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, size, size, generator=gen)
    y = torch.randint(0, 10, (n,), generator=gen)
    return x.to(device), y.to(device)


@pytest.fixture
def no_tf32():
    """Full float32 convs and matmuls on CUDA (cuDNN uses TF32 for float32 convs by default)."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def test_bf16_autocast_on_cpu_tiny_preset_is_within_1e_2_of_float32():
    """The CPU form of the bf16 target: eval-mode logits of a fixed batch, and a finite bf16 step. At
    narrow widths: CPUs without native bf16 emulate it (8x slower than float32 here)."""
    torch.manual_seed(0)
    model = create_model("lipmdeq_tiny", **NARROW).eval()
    x, y = _batch(8, size=16)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
    assert low.dtype == torch.bfloat16  # autocast really ran the head in bf16
    assert relative_logit_difference(ref, low) < 1e-2
    assert model.last_solution.all_converged
    cfg = load_config("lipmdeq_tiny", ["train.amp=bf16", "train.batch_size=8"])
    model.train()
    res = train_step(model, model, x, y, build_optimizer(model, cfg), cfg, pretrain=False, use_jac=False)
    assert res.finite and res.solution.backward is not None


@CUDA
@pytest.mark.parametrize("amp", ["none", "bf16"])
@pytest.mark.parametrize("preset", LARGE)
def test_large_preset_training_step_on_cuda(preset: str, amp: str):
    cfg = load_config(preset, [f"train.amp={amp}", "train.batch_size=8"])
    torch.manual_seed(0)
    model = MultiscaleDEQ(cfg.model).cuda()
    opt = build_optimizer(model, cfg)
    x, y = _batch(8, "cuda")
    use_jac = cfg.train.jac_reg_weight > 0  # mdeq_large_reg: the Jacobian penalty's double backward too
    before = [p.detach().clone() for p in model.parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SolverWarning)  # the baselines run at their caps
        res = train_step(model, model, x, y, opt, cfg, pretrain=False, use_jac=use_jac)
    assert res.finite
    assert res.logits.shape == (8, 10) and res.logits.is_cuda
    assert (res.jac is not None and bool(torch.isfinite(res.jac))) == use_jac
    stats = model.solver_stats()
    assert 1 <= stats["forward_nstep_mean"] <= cfg.model.f_thres
    assert 1 <= stats["backward_nstep_mean"] <= cfg.model.b_thres
    if cfg.model.is_lipschitz and amp == "none":
        assert stats["forward_converged_frac"] == 1.0 and stats["backward_converged_frac"] == 1.0
    assert sum(not torch.equal(a, b) for a, b in zip(before, model.parameters())) > len(before) // 2


@CUDA
@pytest.mark.parametrize("preset", ["lipmdeq_large", "mdeq_large"])
def test_cuda_forward_and_certificate_equal_the_cpu(preset: str, no_tf32):
    torch.manual_seed(0)
    cpu = create_model(preset).eval()
    gpu = copy.deepcopy(cpu).cuda()
    x, _ = _batch(4)
    with torch.no_grad():
        a = cpu(x)
        b = gpu(x.cuda())
    assert b.shape == a.shape and bool(torch.isfinite(b).all())
    if cpu.cfg.is_lipschitz:  # MDEQ's unconverged, non-contractive solve may amplify rounding: no tolerance
        assert relative_logit_difference(a, b.cpu()) < 1e-4
        assert torch.equal(cpu.last_solution.nstep, gpu.last_solution.nstep.cpu())
        assert bool(torch.isfinite(gpu.last_solution.error_bound).all())  # certified bounds in eval mode
        for mode in ("weights", "hyper"):
            ca, cb = cpu.lipschitz_bound(mode=mode).value, gpu.lipschitz_bound(mode=mode).value
            assert cb < 1.0 and abs(ca - cb) <= 1e-4 * ca, (mode, ca, cb)
    else:
        assert gpu.lipschitz_bound().value == float("inf")


@CUDA
def test_bf16_logits_within_1e_2_of_float32_on_cuda(no_tf32):
    """The issue's target on a fixed batch (initial weights), for the contraction (MDEQ's solve stops at
    its cap unconverged; ``lipdeq bench gpu`` reports its difference without a bound)."""
    torch.manual_seed(0)
    model = create_model("lipmdeq_large").cuda().eval()
    x, _ = _batch(16, "cuda")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", SolverWarning)
        ref = model(x)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = model(x)
    diff = relative_logit_difference(ref, low)
    assert diff < 1e-2, diff


def _state(model_state: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.detach().double().flatten().cpu() for v in model_state.values() if v.is_floating_point()])


@CUDA
def test_train_checkpoint_round_trip_and_resume_on_cuda(tmp_path: Path):
    """bf16 training of lipmdeq_large on CUDA: 4 steps straight against 2 + resume 2. CUDA kernels are not
    bitwise deterministic, so the resumed weights must follow the straight run to within 1% of what the
    last two steps changed (a resume that lost the optimizer or RNG state misses by about 100%)."""
    def cfg(steps: int):
        return load_config("lipmdeq_large", [*SYNTHETIC, "train.amp=bf16", f"train.max_steps={steps}"])

    full = train(cfg(4), tmp_path / "full", device="cuda", progress=False)
    part = train(cfg(2), tmp_path / "part", device="cuda", progress=False)
    mid = load_checkpoint(tmp_path / "part", map_location="cuda")
    assert mid.step == 2
    for k, v in part.model.state_dict().items():  # the round trip is exact
        assert torch.equal(mid.model_state[k], v), k
    resumed = train(cfg(4), tmp_path / "part", resume=True, device="cuda", progress=False)
    assert resumed.step == full.step == 4 and resumed.stopped_by == "max_steps"
    w_full, w_res, w_mid = (_state(m) for m in (full.model.state_dict(), resumed.model.state_dict(),
                                                mid.model_state))
    assert float((w_res - w_full).norm()) <= 1e-2 * float((w_full - w_mid).norm())
    assert 0.0 <= resumed.final_eval["accuracy"] <= 1.0
    assert resumed.final_eval["certificate"] < 1.0


@CUDA
def test_compiled_f_on_cuda_compiles_once_and_matches_eager(no_tf32):
    """inductor on CUDA: two graphs for the first training step, one for evaluation, none after."""
    from torch._dynamo.testing import CompileCounterWithBackend

    cfg = load_config("lipmdeq_tiny", ["train.batch_size=16"])
    torch.manual_seed(0)
    eager = MultiscaleDEQ(cfg.model).cuda()
    compiled = copy.deepcopy(eager)
    counter = CompileCounterWithBackend("inductor")
    compiled.compile_f(backend=counter)
    opts = [build_optimizer(m, cfg) for m in (eager, compiled)]
    x, y = _batch(16, "cuda")
    counts = []
    for step in range(3):
        out = []
        for model, opt in zip((eager, compiled), opts):
            torch.manual_seed(10 + step)
            model.train()
            out.append(train_step(model, model, x, y, opt, cfg, pretrain=False, use_jac=False))
        counts.append(counter.frame_count)
        assert out[0].finite and out[1].finite
        assert relative_logit_difference(out[0].logits, out[1].logits) < 1e-3
    with torch.no_grad():
        for _ in range(2):
            eager.eval()
            compiled.eval()
            assert relative_logit_difference(eager(x), compiled(x)) < 1e-3
            counts.append(counter.frame_count)
    assert counts == [2, 2, 2, 3, 3], counts


@CUDA
def test_reduce_overhead_mode_on_cuda(no_tf32):
    """CUDA graphs for the graph-free solve: results equal eager, earlier outputs are not overwritten by
    later replays, and a training step (grad path, no CUDA graphs) works."""
    cfg = load_config("lipmdeq_tiny", ["train.batch_size=16"])
    torch.manual_seed(0)
    eager = MultiscaleDEQ(cfg.model).cuda().eval()
    compiled = copy.deepcopy(eager)
    compiled.compile_f("reduce-overhead")
    x, y = _batch(16, "cuda")
    x2 = x.flip(0).contiguous()
    with torch.no_grad():
        first, second, again = compiled(x), compiled(x2), compiled(x)
        assert relative_logit_difference(eager(x), first) < 1e-3
        assert relative_logit_difference(eager(x2), second) < 1e-3
        assert relative_logit_difference(first, again) < 1e-6
    compiled.train()
    res = train_step(compiled, compiled, x, y, build_optimizer(compiled, cfg), cfg, pretrain=False, use_jac=False)
    assert res.finite and res.solution.backward is not None
