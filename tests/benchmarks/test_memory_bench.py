"""Memory bench: the saved-tensor meter against known footprints, flat IFT memory, growing unrolled memory."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lipdeq.benchmarks import memory
from lipdeq.configs import load_config
from lipdeq.models import MultiscaleDEQ

pytestmark = pytest.mark.filterwarnings("ignore::lipdeq.solvers.SolverWarning")  # caps bind by design

SMALL = ["model.channels=[4,4]", "model.head_channels=[2,4]", "model.final_channels=8", "model.num_groups=2",
         "model.expansion=2"]
def _model(extra: list[str]) -> MultiscaleDEQ:
    cfg = load_config("mdeq_tiny", [*SMALL, "model.f_tol=1e-12", *extra])
    torch.manual_seed(0)
    return MultiscaleDEQ(cfg.model).train()


def _batch(n: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_meter_counts_known_saved_tensors() -> None:
    x = torch.randn(100, 7, requires_grad=True)
    w = nn.Parameter(torch.randn(7))
    with memory.SavedTensorMeter(exclude=[w]) as m:
        y = torch.exp(x)  # saves its output: 700 floats
        z = (y * w).sum()  # saves y (already counted) and w (excluded)
        s = torch.sin(x)  # saves its input x: 700 floats
    (z + s.sum()).backward()
    assert m.bytes == 2 * 700 * 4
    assert m.count == 2


def test_meter_counts_a_view_once_by_storage() -> None:
    base = torch.randn(10, 10, requires_grad=True) * 1.0  # one 400-byte storage
    with memory.SavedTensorMeter() as m:
        a = base[:5].sin()  # saves a view of base
        b = base[5:].cos()  # saves another view of the same storage
    assert m.bytes == 400
    (a.sum() + b.sum()).backward()


def test_ift_memory_is_flat_in_the_forward_cap() -> None:
    x, y = _batch()
    out = {}
    for cap in (5, 30):
        model = _model([f"model.f_thres={cap}", "model.b_thres=3"])
        rec = memory.measure_training_step(model, x, y)
        assert rec["forward"].n_f_evals == cap  # the tiny tolerance makes the cap bind
        assert rec["backward"] is not None
        out[cap] = rec["saved_tensor_bytes"]
    assert out[5] > 0
    assert abs(out[30] / out[5] - 1.0) <= 0.10


def test_unrolled_memory_grows_linearly_with_depth() -> None:
    """The control that shows the meter can fail the flatness target: saved bytes of an unrolled
    forward are affine in its depth L (one layer's graph per application)."""
    x, y = _batch()
    saved = {}
    for depth in (2, 4, 7):
        model = _model([f"model.pretrain_layers={depth}"])
        saved[depth] = memory.measure_training_step(model, x, y, unrolled=True)["saved_tensor_bytes"]
    per_layer = (saved[4] - saved[2]) / 2
    assert per_layer > 0
    assert saved[7] - saved[2] == pytest.approx(5 * per_layer, rel=1e-9)
    assert saved[7] / saved[2] > 1.5


def test_run_and_report() -> None:
    res = memory.run(device="cpu", f_thres=(2, 6), batch_size=2, overrides=[*SMALL, "model.b_thres=3"])
    assert [r["f_thres"] for r in res["ift"]] == [2, 6]
    assert [r["forward_f_evals"] for r in res["ift"]] == [2, 6]
    assert res["metric"] == "saved_tensor_bytes"
    assert res["ratio_ift"] == pytest.approx(res["ift"][1]["saved_tensor_bytes"] / res["ift"][0]["saved_tensor_bytes"])
    assert res["flat"] is True
    assert res["ratio_unrolled"] > 1.5
    text = memory.format_report(res)
    assert "target: within 10%" in text and "met" in text


def test_run_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="f_thres"):
        memory.run(device="cpu", f_thres=(5,))
    with pytest.raises(ValueError, match="batch_size"):
        memory.run(device="cpu", batch_size=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_peak_is_flat() -> None:
    res = memory.run(device="cuda", f_thres=(5, 30), batch_size=4, unrolled_control=True)
    assert res["metric"] == "cuda_peak_bytes"
    assert res["ratio_ift"] <= 1.10
    assert res["ratio_unrolled"] > 1.5
