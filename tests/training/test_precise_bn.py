"""Precise BN (``train.eval_precise_bn``, ``lipdeq eval --precise-bn N``): BatchNorm statistics re-estimated
on fixed training images before an evaluation lift eval-mode accuracy off chance early in training, and
change nothing else: not the model's buffers or parameters, not the RNG, not the checkpoints, not the
training trajectory, not bitwise resume."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import pytest
import torch

from lipdeq.cli import main
from lipdeq.configs import load_config
from lipdeq.data import CIFAR10_MEAN, CIFAR10_STD, load_dataset, to_float_normalized
from lipdeq.models import MultiscaleDEQ
from lipdeq.training import evaluate, load_checkpoint, precise_batchnorm, precise_bn_batches, train
from lipdeq.training.compat import RESUME_SAFE, ConfigMismatchError, check_compatible
from lipdeq.training.step import train_step
from lipdeq.training.trainer import build_optimizer

SMALL_MODEL = [
    "model.channels=[8,8]", "model.head_channels=[4,4]", "model.final_channels=16", "model.num_groups=4",
    "model.f_thres=8", "model.b_thres=8",
]
STEPS = 3  # steps of the constructed two-class run


def _two_class_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced dark (class 0, grey level 70) and bright (class 1, 180) images with +-15 pixel noise:
    separable by mean brightness, which any network that keeps the input's mean can read."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    level = torch.where(labels == 1, 180.0, 70.0)[:, None, None, None]
    noise = 30.0 * (torch.rand(n, 3, 32, 32, generator=gen) - 0.5)
    return (level + noise).round().clamp(0, 255).to(torch.uint8), labels


@pytest.fixture(scope="module")
def few_steps() -> dict:
    """lipmdeq_tiny (small widths, two classes) after ``STEPS`` trainer steps (batch 16, Adam 1e-3) on
    the two-class images, with the BatchNorm statistics those steps left."""
    cfg = load_config("lipmdeq_tiny", [*SMALL_MODEL, "model.num_classes=2", "train.batch_size=16"])
    train_x, train_y = _two_class_images(128, seed=1)
    test_x, test_y = _two_class_images(100, seed=2)
    torch.manual_seed(0)
    model = MultiscaleDEQ(cfg.model)
    optimizer = build_optimizer(model, cfg)
    model.train()
    for s in range(STEPS):
        idx = torch.arange(16 * s, 16 * s + 16)
        result = train_step(model, model, to_float_normalized(train_x[idx]), train_y[idx], optimizer, cfg,
                            pretrain=False, use_jac=False)
        assert result.finite
    calib = precise_bn_batches(train_x, 64, batch_size=16, seed=0)
    return {"model": model, "test_x": test_x, "test_y": test_y, "calib": calib}


def test_precise_bn_lifts_eval_accuracy_from_chance(few_steps: dict) -> None:
    """Why this must hold: the convolutions start at N(0, 0.01), so the activations entering each
    BatchNorm vary little across images (variance 0.02 at the stem, below 1e-3 in the head), while the
    running variance, which starts at 1 and moves 10% of the way per step (momentum 0.1), is still
    above 0.9**STEPS. In eval mode each of the model's 12 BatchNorms in a row therefore shrinks the
    image-dependent part of its output by the square root of that ratio (checked below: at least
    sqrt(30)) and the logits are the same for every image to float precision: every image gets the
    same class, which is exactly chance (0.5) on the balanced two-class set. Re-estimated on training
    images, the statistics are the images' own, eval mode normalises as the training steps did, and the
    brightness that separates the classes (learnt within the first steps) reaches the classifier."""
    model, test_x, test_y = few_steps["model"], few_steps["test_x"], few_steps["test_y"]
    bns = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    stale = {n: m.running_var.clone() for n, m in bns.items()}
    with precise_batchnorm(model, few_steps["calib"]):  # the premise: stale variances against the images' own
        ratios = {n: float(stale[n].min() / m.running_var.max()) for n, m in bns.items()}
    assert len(ratios) == 12 and all(float(v.min()) >= 0.999 * 0.9**STEPS for v in stale.values())  # float32
    assert min(ratios.values()) > 30, ratios

    chance = evaluate(model, test_x, test_y, batch_size=100)
    with torch.no_grad():
        model.eval()
        predictions = model(to_float_normalized(test_x)).argmax(dim=1)
    assert predictions.unique().numel() == 1  # one class for every image
    assert chance["accuracy"] == 0.5 and chance["precise_bn_images"] == 0

    precise = evaluate(model, test_x, test_y, batch_size=100, precise_bn=few_steps["calib"])
    assert precise["precise_bn_images"] == 64
    assert precise["accuracy"] >= 0.95  # 100 images: chance would exceed 0.65 with probability < 0.2%


def test_an_evaluation_with_precise_bn_changes_nothing(few_steps: dict) -> None:
    """Parameters and every buffer (BatchNorm statistics, the caps' power-iteration vectors) after an
    evaluation with precise BN are bitwise those after a plain evaluation (the oracle: a copy evaluated
    without it), the BatchNorm statistics are bitwise those before, the module modes are restored and no
    random number was drawn."""
    model = few_steps["model"]
    model.train()
    oracle = copy.deepcopy(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    ev = evaluate(model, few_steps["test_x"], few_steps["test_y"], batch_size=100, precise_bn=few_steps["calib"])
    assert ev["precise_bn_images"] == 64
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(m.training for m in model.modules())
    evaluate(oracle, few_steps["test_x"], few_steps["test_y"], batch_size=100)
    after, expected = dict(model.named_buffers()), dict(oracle.named_buffers())
    assert after.keys() == expected.keys() and len(after) > 20
    for k in after:
        assert torch.equal(after[k], expected[k]), f"buffer {k} differs from a plain evaluation's"
    for (k, p), (_, q) in zip(model.named_parameters(), oracle.named_parameters()):
        assert torch.equal(p, q), f"parameter {k} changed"
    bn_keys = [k for k in before if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert len(bn_keys) == 3 * sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    for k in bn_keys:
        assert torch.equal(model.state_dict()[k], before[k]), f"{k} changed"


def test_precise_bn_batches_are_a_fixed_selection_in_equal_batches() -> None:
    images = torch.arange(200, dtype=torch.uint8)[:, None, None, None].expand(200, 3, 2, 2).contiguous()
    rng = torch.get_rng_state()
    batches = precise_bn_batches(images, 50, batch_size=16, seed=3)
    assert torch.equal(torch.get_rng_state(), rng)  # a private generator
    assert [b.shape[0] for b in batches] == [13, 13, 12, 12]  # no small remainder batch
    x = torch.cat(batches)
    ids = torch.round((x[:, 0, 0, 0] * CIFAR10_STD[0] + CIFAR10_MEAN[0]) * 255.0)  # undo the normalisation
    picked = [int(i) for i in ids]
    assert len(set(picked)) == 50  # distinct images, without replacement
    assert torch.equal(x, to_float_normalized(images[torch.tensor(picked)]))
    again = precise_bn_batches(images, 50, batch_size=16, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(batches, again))
    assert not torch.equal(torch.cat(precise_bn_batches(images, 50, batch_size=16, seed=4)), x)
    assert sum(b.shape[0] for b in precise_bn_batches(images, 10_000, batch_size=64, seed=3)) == 200  # all
    assert precise_bn_batches(images, 0, batch_size=16, seed=3) == []


# ---------------------------------------------------------------- the trainer and `lipdeq eval`

RUN_STEPS = 8  # 96 images / batch 16: an epoch of 6 steps, so a run of 8 evaluates at steps 6 and 8


def _overrides(steps: int, precise: int) -> list[str]:
    """The tiny synthetic run of tests/reliability (96 images, 6 steps per epoch), with precise BN and a
    checkpoint after every step (:func:`_train` keeps each one)."""
    return [
        *SMALL_MODEL, "data.dataset=synthetic", "data.train_subset=96", "data.test_subset=32",
        "train.batch_size=16", "train.eval_batch_size=32", f"train.max_steps={steps}", "train.log_every=1",
        "train.num_threads=1", "train.checkpoint_every_steps=1", f"train.eval_precise_bn={precise}",
    ]


def _train(run: Path, steps: int, precise: int, states: dict[int, dict[str, torch.Tensor]], **kw):
    """Train into ``run``, adding to ``states`` the weights and buffers checkpointed at every step (the
    trainer checkpoints a step before it logs it): a final checkpoint's buffers are re-estimated by
    nothing, so an evaluation that left its statistics behind would show at the next step's."""

    def keep(record: dict) -> None:
        ck = load_checkpoint(run / "checkpoints")
        assert ck.step == record["step"]
        states[ck.step] = ck.model_state

    return train(load_config("lipmdeq_tiny", _overrides(steps, precise)), run, progress=False, on_step=keep, **kw)


def _records(run: Path, kind: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"tensor {k} differs"


def _assert_same_states(a: dict[int, dict[str, torch.Tensor]], b: dict[int, dict[str, torch.Tensor]]) -> None:
    assert sorted(a) == sorted(b) == list(range(1, RUN_STEPS + 1))
    for step in a:
        _assert_same(a[step], b[step])


@pytest.fixture(scope="module")
def run_on(tmp_path_factory) -> tuple[Path, dict[int, dict[str, torch.Tensor]]]:
    """An uninterrupted run of ``RUN_STEPS`` steps with precise BN on 32 images, and its state at every step."""
    run = tmp_path_factory.mktemp("precise") / "on"
    states: dict[int, dict[str, torch.Tensor]] = {}
    result = _train(run, RUN_STEPS, 32, states)
    assert result.step == RUN_STEPS and result.final_eval["precise_bn_images"] == 32
    return run, states


def test_training_with_precise_bn_equals_training_without(tmp_path: Path, run_on) -> None:
    """The loss trajectory, the weights and buffers at every step, the final checkpoint and its RNG state are
    bitwise those of the same run with precise BN off; only the evaluations differ (they used the 32 images)."""
    run, states = run_on
    off, off_states = tmp_path / "off", {}
    _train(off, RUN_STEPS, 0, off_states)
    _assert_same_states(states, off_states)
    on_train, off_train = _records(run, "train"), _records(off, "train")
    assert [r["step"] for r in on_train] == list(range(1, RUN_STEPS + 1))
    assert [r["loss"] for r in on_train] == [r["loss"] for r in off_train]
    assert [r["accuracy"] for r in on_train] == [r["accuracy"] for r in off_train]
    ck_on, ck_off = load_checkpoint(run / "checkpoints"), load_checkpoint(off / "checkpoints")
    _assert_same(ck_on.model_state, ck_off.model_state)
    _assert_same(ck_on.rng_state, ck_off.rng_state)
    assert [(r["step"], r["precise_bn_images"]) for r in _records(run, "eval")] == [(6, 32), (8, 32)]
    assert [r["precise_bn_images"] for r in _records(off, "eval")] == [0, 0]


def test_interrupted_run_with_precise_bn_resumes_bitwise(tmp_path: Path, run_on) -> None:
    """Stopped at step 4 (a final evaluation with precise BN, then the final checkpoint, which the resumed
    run starts from) and resumed to step 8 across the epoch boundary's evaluation: bitwise the uninterrupted
    run at every step, and in the final checkpoint's RNG state, logged losses and final evaluation."""
    run, states = run_on
    part, part_states = tmp_path / "part", {}
    assert _train(part, 4, 32, part_states).step == 4
    resumed = _train(part, RUN_STEPS, 32, part_states, resume=True)
    assert resumed.step == RUN_STEPS
    _assert_same_states(part_states, states)
    ck, ref = load_checkpoint(part / "checkpoints"), load_checkpoint(run / "checkpoints")
    _assert_same(ck.model_state, ref.model_state)
    _assert_same(ck.rng_state, ref.rng_state)
    assert [r["loss"] for r in _records(part, "train")] == [r["loss"] for r in _records(run, "train")]
    final, ref_final = _records(part, "eval")[-1], _records(run, "eval")[-1]
    assert (final["step"], final["accuracy"], final["loss"]) == (ref_final["step"], ref_final["accuracy"],
                                                                 ref_final["loss"])


def test_resume_may_change_the_precise_bn_images() -> None:
    """Changing ``train.eval_precise_bn`` on resume is allowed (the two tests above show it does not change
    training); a change of a key that does, the batch size, is still refused."""
    stored = load_config("lipmdeq_tiny", _overrides(4, 32)).to_dict()
    check_compatible(stored, load_config("lipmdeq_tiny", _overrides(RUN_STEPS, 0)).to_dict(), allowed=RESUME_SAFE,
                     what="resuming", source="run")
    with pytest.raises(ConfigMismatchError, match="train.batch_size"):
        check_compatible(stored, load_config("lipmdeq_tiny", [*_overrides(4, 0), "train.batch_size=8"]).to_dict(),
                         allowed=RESUME_SAFE, what="resuming", source="run")


def _sha(run: Path) -> dict[str, str]:
    folder = run / "checkpoints"
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_eval_precise_bn_option(run_on, capsys: pytest.CaptureFixture[str]) -> None:
    """``lipdeq eval --precise-bn N``: N images (0: the stored statistics); without the option the run's
    ``train.eval_precise_bn``, which reproduces the trainer's final evaluation exactly; the checkpoint's
    files are unchanged; a negative N is a usage error."""
    run_on = run_on[0]
    files = _sha(run_on)
    final = _records(run_on, "eval")[-1]

    def eval_json(*flags: str) -> dict:
        assert main(["eval", "--checkpoint", str(run_on), "--json", *flags]) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    default, other, off = eval_json(), eval_json("--precise-bn", "16"), eval_json("--precise-bn", "0")
    assert (default["precise_bn_images"], other["precise_bn_images"], off["precise_bn_images"]) == (32, 16, 0)
    assert (default["accuracy"], default["loss"]) == (final["accuracy"], final["loss"])
    # the oracle of "off": a plain evaluation of the stored weights
    ck = load_checkpoint(run_on / "checkpoints")
    model = MultiscaleDEQ(load_config("lipmdeq_tiny", _overrides(RUN_STEPS, 0)).model)
    model.load_state_dict(ck.model_state)
    test_x, test_y = load_dataset("synthetic", "test", subset=32, seed=42)
    assert off["loss"] == evaluate(model, test_x, test_y, batch_size=32)["loss"]
    assert len({off["loss"], other["loss"], default["loss"]}) == 3
    assert _sha(run_on) == files
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--checkpoint", str(run_on), "--precise-bn", "-1"])
    assert exit_.value.code == 2
    assert "--precise-bn" in capsys.readouterr().err
