"""The accuracy profile end to end on a tiny budget (the real code path: two training processes at once, two
evaluation processes, real CIFAR-10 subsets): results.json's fields recomputed from its own curves, the
figure, the report, and the refusal without data."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from lipdeq.benchmarks import accuracy
from lipdeq.benchmarks.accuracy import summary as S
from lipdeq.cli import main

TINY = ["model.channels=[4,4]", "model.head_channels=[2,4]", "model.final_channels=8", "model.num_groups=2",
        "model.expansion=2", "model.f_thres=6", "model.b_thres=6", "model.pretrain_layers=2",
        "train.eval_batch_size=40"]
CURVE_KEYS = {"step", "epoch", "elapsed", "accuracy", "accuracy_se", "num_images", "seconds_per_image",
              "certificate", "train_forward_nstep_mean", "train_backward_nstep_mean", "forward_nstep_mean"}


@pytest.fixture(scope="module")
def profile(tmp_path_factory: pytest.TempPathFactory, real_cifar_dir: Path) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("accuracy")
    res = accuracy.run(out, minutes=1.5 / 60, eval_images=40, final_images=60, evals=6, data_dir=real_cifar_dir,
                       batch_size=8, bn_images=16, overrides=TINY, train_subset=256, match_snapshots=10,
                       pretrain_fraction=0.25, verbose=False)
    return out, res


def _strict_json(path: Path) -> dict[str, Any]:
    def refuse(name: str) -> None:
        raise AssertionError(f"non-standard JSON constant {name} in {path}")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)


def test_results_fields_recomputed_from_the_curves(profile: tuple[Path, dict[str, Any]]) -> None:
    out, res = profile
    data = _strict_json(out / "results.json")
    assert data["profile"] == "accuracy" and data["dataset"] == "cifar10" and data["mode"] == "parallel"
    assert "lipdeq bench accuracy" in data["command"] and data["settings"]["budget_seconds"] == pytest.approx(1.5)
    s, models = res["summary"], res["models"]
    assert (s["lipschitz"], s["baseline"]) == ("lipmdeq_tiny", "mdeq_tiny")
    for name, m in models.items():
        assert m["train_seconds"] >= 1.5 and m["threads"] == 1 and m["train_images"] == 256
        curve = m["curve"]
        assert 1 <= len(curve) <= 6 and curve[-1]["step"] == m["steps"]
        assert [p["step"] for p in curve] == sorted({p["step"] for p in curve})
        for p in curve:
            assert CURVE_KEYS <= set(p) and p["num_images"] == 40
            assert p["accuracy_se"] == pytest.approx(math.sqrt(p["accuracy"] * (1 - p["accuracy"]) / 40))
        assert m["final"]["num_images"] == 60 and m["final"]["step"] == m["steps"]
        assert s["final_accuracy"][name] == m["final"]["accuracy"]
        # time to threshold: the first curve point at or above, recomputed here
        for k in s["thresholds"]:
            hits = [p["elapsed"] for p in curve if p["accuracy"] >= float(k)]
            assert s["time_to_threshold"][name][k] == (hits[0] if hits else None)
    lip_t, base_t = s["time_to_threshold"]["lipmdeq_tiny"], s["time_to_threshold"]["mdeq_tiny"]
    both = {k for k in s["thresholds"] if lip_t[k] is not None and base_t[k] is not None}
    assert set(s["speedup_to_threshold"]) == both
    for k in both:
        assert s["speedup_to_threshold"][k] == pytest.approx(base_t[k] / lip_t[k])
    # certificates: the Lipschitz model's finite and below 1 at every point, none for MDEQ
    assert all(p["certificate"] < 1 for p in models["lipmdeq_tiny"]["curve"])
    assert all(math.isinf(p["certificate"]) for p in models["mdeq_tiny"]["curve"])
    # MDEQ pretrains for the first quarter of its time (no solver statistics in those steps); the Lipschitz
    # preset has no pretraining, and the option does not give it one
    assert all(("forward_nstep_mean" in r) != r["pretrain"] for r in models["mdeq_tiny"]["records"])
    assert models["mdeq_tiny"]["pretrain_seconds"] == pytest.approx(0.25 * 1.5)
    assert models["lipmdeq_tiny"]["pretrain_seconds"] == 0.0
    assert not any(r["pretrain"] for r in models["lipmdeq_tiny"]["records"])
    # equal wall-clock: the two final evaluations; equal epochs: the slower run's end, the other's nearest snapshot
    wc, ep = s["equal_wallclock"], s["equal_epochs"]
    assert wc["lipschitz"]["accuracy"] == models["lipmdeq_tiny"]["final"]["accuracy"]
    assert wc["difference"] == pytest.approx(wc["lipschitz"]["accuracy"] - wc["baseline"]["accuracy"])
    slow = min(models, key=lambda n: models[n]["epochs"])
    assert ep["set_by"] == slow and ep["epoch"] == pytest.approx(models[slow]["epochs"])
    fast = next(n for n in models if n != slow)
    snaps = json.loads((out / "runs" / fast / "run.json").read_text(encoding="utf-8"))["snapshots"]
    best = min(abs(x["epoch"] - ep["epoch"]) for x in snaps)  # among every snapshot kept along the faster run
    role = {"lipmdeq_tiny": "lipschitz", "mdeq_tiny": "baseline"}
    assert abs(ep[role[fast]]["epoch"] - ep["epoch"]) == best and ep[role[slow]]["step"] == models[slow]["steps"]
    assert ep["lipschitz"]["num_images"] == ep["baseline"]["num_images"] == 60
    t = res["targets"]
    assert set(t) == {"time_to_threshold_speedup", "accuracy_equal_wallclock", "accuracy_equal_epochs"}
    assert t["accuracy_equal_wallclock"]["met"] == (wc["z"] > S.TARGETS["equal_wallclock_z"])
    assert data["summary"]["final_accuracy"] == {n: models[n]["final"]["accuracy"] for n in models}


def test_plot_report_and_tidy_run_dirs(profile: tuple[Path, dict[str, Any]]) -> None:
    out, res = profile
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (out / "report.txt").read_text(encoding="utf-8")
    assert "time to threshold" in text and "equal wall-clock" in text and "equal epochs" in text
    for name, m in res["models"].items():
        kept = {p.name for p in (out / "runs" / name / "snapshots").iterdir()}
        used = {f"step_{p['step']:08d}.safetensors" for p in m["curve"]}
        assert used <= kept and len(kept) <= len(used) + 1  # + the equal-epochs pick; the other candidates gone


def test_refuses_without_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.delenv("LIPDEQ_DATA_DIR", raising=False)
    assert main(["bench", "accuracy", "--minutes", "0.1", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "real CIFAR-10" in err and "LIPDEQ_DATA_DIR" in err
    assert not (tmp_path / "results.json").exists()
