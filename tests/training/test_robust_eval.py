"""Certified accuracy in evaluation: ``evaluate(..., robust=True)`` and ``lipdeq eval --robust``."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lipdeq.cli import main
from lipdeq.data import make_synthetic, to_float_normalized
from lipdeq.models import create_model
from lipdeq.models.robustness import certified_accuracy
from lipdeq.training.evaluate import evaluate
from lipdeq.training.robust_eval import RobustEvaluationError

SMALL = dict(channels=[8, 8], head_channels=[4, 4], final_channels=16, num_groups=4, image_size=16)
TINY = ["--set", "model.channels=[8,8]", "--set", "model.head_channels=[4,4]", "--set", "model.final_channels=16",
        "--set", "model.num_groups=4", "--set", "data.dataset=synthetic", "--set", "data.train_subset=64",
        "--set", "data.test_subset=8", "--set", "train.batch_size=16", "--set", "train.max_steps=2",
        "--set", "train.num_threads=1"]


def test_evaluate_robust_matches_the_models_certified_radii():
    """Batched evaluation (batches of 3) against the model's own radii on the whole set at once."""
    torch.manual_seed(0)
    model = create_model("lipmdeq_tiny_robust", **SMALL).eval()
    images, labels = make_synthetic(8, "test", seed=3)
    images = images[:, :, 8:24, 8:24].contiguous()  # 16x16 crops: a 16x16 model
    out = evaluate(model, images, labels, batch_size=3, robust=True)
    x = to_float_normalized(images)
    with torch.no_grad():
        correct = model(x).argmax(dim=1) == labels
    expected = certified_accuracy(model.certified_radius(x), correct)
    assert out["certified_accuracy"] == pytest.approx(expected)
    assert math.isfinite(out["network_lipschitz"]) and out["network_lipschitz_reason"] is None
    with pytest.raises(RobustEvaluationError, match="bfloat16"):
        evaluate(model, images, labels, robust=True, amp=True)


def test_eval_robust_json_reports_certified_accuracy(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--config", "lipmdeq_tiny_robust", "--out", str(out), "--no-progress", *TINY]) == 0
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out), "--robust", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    acc = metrics["certified_accuracy"]
    assert list(acc) == ["36/255", "72/255", "108/255"]
    values = list(acc.values())
    assert all(0.0 <= v <= metrics["accuracy"] for v in values) and values == sorted(values, reverse=True)
    assert metrics["num_images"] == 8 and 0.0 < metrics["network_lipschitz"] < math.inf
    assert metrics["certified_radius_median"] >= 0.0
