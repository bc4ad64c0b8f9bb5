"""`lipdeq bench solvers`: the figures it reports, and the CLI options it is given reach it."""

from __future__ import annotations

from lipdeq.benchmarks import solvers
from lipdeq.cli import main


def test_solver_bench_reports_each_method_on_a_tiny_run():
    figures = solvers.run(batch_size=2, repeats=1, max_iter=5, device="cpu")
    assert figures["config"]["device"] == "cpu" and figures["config"]["batch_size"] == 2
    report = solvers.format_report(figures)
    for method in ("anderson", "picard", "broyden"):
        m = figures["methods"][method]
        assert m["time_per_solve_s"] > 0 and 1 <= m["f_evals"] <= 5
        assert method in report
    a = figures["methods"]["anderson"]
    assert 0 < a["outside_f_floor_fraction"] < 1 and a["history_bytes"] > 0
    assert "history reads" in report
    # the eager floor adds 4 passes per evaluation and one per step to the history reads
    state = 2 * figures["config"]["dim"] * 4
    assert a["state_pass_bytes"] == (5 * a["f_evals"] - 1) * state
    assert a["outside_f_floor_fraction"] < a["outside_f_eager_floor_fraction"] < 1
    assert "floor of separate tensor operations" in report


def test_cli_passes_device_and_sizes_to_the_solver_bench(monkeypatch, capsys):
    seen = {}

    def fake_run(**kwargs):
        seen.update(kwargs)
        return {}

    monkeypatch.setattr(solvers, "run", fake_run)
    monkeypatch.setattr(solvers, "format_report", lambda figures: "report")
    assert main(["bench", "solvers", "--device", "cpu", "--batch-size", "4", "--repeats", "2"]) == 0
    assert seen == {"batch_size": 4, "repeats": 2, "device": "cpu"}
    assert capsys.readouterr().out.strip() == "report"


def test_anderson_history_bytes_counts_what_the_stepper_reads(monkeypatch):
    """Oracle: the bytes of the history operands the stepper really reads: the residual slice it hands to
    ``torch.bmm`` (Gram row) and the images it mixes with ``torch.mul`` / ``Tensor.addcmul_``."""
    import torch

    from lipdeq.solvers import solve

    gen = torch.Generator().manual_seed(0)
    batch, dim, m, evals = 3, 20, 3, 8
    a = torch.randn(dim, dim, generator=gen, dtype=torch.float64) / dim**0.5
    b = torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    read = []
    bmm = torch.bmm

    mul, addcmul_ = torch.mul, torch.Tensor.addcmul_

    def counting_bmm(x, y):
        read.append(y.numel() * y.element_size())  # the residual slice is the second operand
        return bmm(x, y)

    def counting_mul(x, y, **kw):
        read.append(x.numel() * x.element_size())  # the first image times its weights
        return mul(x, y, **kw)

    def counting_addcmul_(acc, x, y, **kw):
        read.append(x.numel() * x.element_size())  # each further image
        return addcmul_(acc, x, y, **kw)

    monkeypatch.setattr(torch, "bmm", counting_bmm)
    monkeypatch.setattr(torch, "mul", counting_mul)
    monkeypatch.setattr(torch.Tensor, "addcmul_", counting_addcmul_)
    sol = solve(lambda z: 0.5 * torch.tanh(z @ a.T) + b, torch.zeros(batch, dim, dtype=torch.float64),
                "anderson", tol=1e-30, max_iter=evals, m=m)
    assert sol.n_f_evals == evals
    assert sum(read) == solvers.anderson_history_bytes(evals, m, batch * dim * 8)
    assert solvers.anderson_history_bytes(14, 6, 1) == 69 + 62  # by hand: G 1+2+3+4+5+6*9, F 2+3+4+5+6*8


def test_read_bandwidth_is_positive_and_finite():
    import math

    import torch

    bw = solvers.read_bandwidth(torch.device("cpu"), 2**20, repeats=2)
    assert 0 < bw < math.inf
