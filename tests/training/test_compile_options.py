"""The trainer reads ``train.compile``, ``train.compile_mode`` and ``train.channels_last``."""

from __future__ import annotations

import pytest

from lipdeq.configs import ConfigError, load_config
from lipdeq.models import MultiscaleDEQ
from lipdeq.training import train

TINY = ["model.channels=[8,8]", "model.head_channels=[4,4]", "model.final_channels=16", "model.num_groups=4",
        "model.f_thres=6", "model.b_thres=6", "data.dataset=synthetic", "data.train_subset=8",
        "data.test_subset=4", "train.batch_size=4", "train.eval_batch_size=4", "train.max_steps=2",
        "train.num_threads=1"]


def test_train_compiles_f_in_the_configured_mode_and_uses_channels_last(tmp_path, monkeypatch):
    modes = []
    original = MultiscaleDEQ.compile_f

    def compile_f(self, mode="default", *, backend="inductor"):  # dynamo's "eager" backend: no inductor here
        modes.append(mode)
        original(self, mode, backend="eager")

    monkeypatch.setattr(MultiscaleDEQ, "compile_f", compile_f)
    cfg = load_config("lipmdeq_tiny", [*TINY, "train.compile=true", "train.compile_mode=reduce-overhead",
                                       "train.channels_last=true"])
    result = train(cfg, tmp_path / "run", progress=False)
    assert modes == ["reduce-overhead"]
    model = result.model
    assert model.compiled_step.mode == "reduce-overhead" and model.compiled_step.cudagraphs
    assert model.layer.channels_last
    assert result.step == 2 and 0.0 <= result.final_eval["accuracy"] <= 1.0


def test_compile_mode_is_ignored_without_compile_and_unknown_modes_are_refused(tmp_path):
    cfg = load_config("lipmdeq_tiny", [*TINY, "train.max_steps=1", "train.compile_mode=max-autotune"])
    result = train(cfg, tmp_path / "run", progress=False)
    assert result.model.compiled_step is None and not result.model.layer.channels_last
    with pytest.raises(ConfigError, match="compile_mode"):
        load_config("lipmdeq_tiny", ["train.compile_mode=fast"])
