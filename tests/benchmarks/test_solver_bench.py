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
