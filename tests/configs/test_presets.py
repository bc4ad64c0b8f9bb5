"""Every shipped preset loads and equals the reference configurations' table of the design brief (values typed
in from that table: the MDEQ and Lipschitz MDEQ papers' settings)."""

from __future__ import annotations

from importlib import resources

import pytest
import yaml

from lipdeq.configs import DataConfig, RunConfig, TrainConfig, list_presets, load_config, model_preset
from lipdeq.models.config import ModelConfig

TINY = {"channels": [24, 24], "head_channels": [8, 16], "final_channels": 200}
LARGE = {"channels": [32, 64, 128, 256], "head_channels": [14, 28, 56, 112], "final_channels": 1680}
LAYOUT = {
    "in_channels": 3,
    "image_size": 32,
    "num_classes": 10,
    "expansion": 5,
    "num_groups": 8,
    "weight_norm": True,
    "post_gn_affine": False,
    "explicit_norm": "batch",
    "explicit_cap": None,
    "conv_init_std": 0.01,
}
MDEQ = {
    "norm": "group",
    "mixing": "sum",
    "relu_slope": 1.0,
    "alpha": 1.0,
    "beta": 1.0,
    "fusion": "sum",
    "gn_cap": None,
    "conv_cap": None,
    "dropout_rescale": True,
    "solver": "anderson",
    "stop_mode": "rel",
    "f_tol": 1e-3,
    "b_tol": 1e-3,
    "backward": "ift",
}
LIP = {
    "norm": "mean_only",
    "mixing": "convex",
    "relu_slope": 0.4,
    "alpha": 0.5,
    "beta": 0.3,
    "fusion": "softmax",
    "gn_cap": 1.0,
    "conv_cap": 2.0,
    "dropout_rescale": False,
    "solver": "anderson",
    "f_thres": 18,
    "b_thres": 20,
    "f_tol": 1e-3,
    "b_tol": 1e-3,
    "stop_mode": "rel",
    "backward": "ift",
}
ADAM = {"optimizer": "adam", "lr": 1e-3, "schedule": "cosine", "min_lr": 1e-6, "seed": 42}

EXPECTED = {
    "mdeq_tiny": (
        {**LAYOUT, **MDEQ, **TINY, "dropout": 0.25, "f_thres": 22, "b_thres": 24, "pretrain_layers": 10},
        {
            **ADAM,
            "weight_decay": 2.5e-6,
            "batch_size": 128,
            "epochs": 50,
            "pretrain_steps": 3000,
            "jac_reg_weight": 0.0,
        },
        {"dataset": "cifar10", "augment": False},
    ),
    "mdeq_large": (
        {**LAYOUT, **MDEQ, **LARGE, "dropout": 0.3, "f_thres": 18, "b_thres": 20, "pretrain_layers": 10},
        {
            **ADAM,
            "weight_decay": 0.0,
            "batch_size": 128,
            "epochs": 220,
            "pretrain_steps": 20000,
            "jac_reg_weight": 0.0,
        },
        {"dataset": "cifar10", "augment": True},
    ),
    "mdeq_large_reg": (
        {**LAYOUT, **MDEQ, **LARGE, "dropout": 0.22, "f_thres": 7, "b_thres": 8, "pretrain_layers": 8},
        {
            **ADAM,
            "weight_decay": 0.0,
            "batch_size": 96,
            "epochs": 200,
            "pretrain_steps": 0,
            "jac_reg_weight": 0.5,
            "jac_reg_freq": 0.05,
            "jac_reg_stop_epoch": 90,
        },
        {"dataset": "cifar10", "augment": True},
    ),
    "lipmdeq_large": (
        {**LAYOUT, **LIP, **LARGE, "dropout": 0.3},
        {**ADAM, "batch_size": 128, "epochs": 200, "pretrain_steps": 0, "jac_reg_weight": 0.0},
        {"dataset": "cifar10", "augment": True},
    ),
    "lipmdeq_tiny": (
        {**LAYOUT, **LIP, **TINY, "dropout": 0.25},
        {
            **ADAM,
            "weight_decay": 2.5e-6,
            "batch_size": 128,
            "epochs": 50,
            "pretrain_steps": 0,
            "jac_reg_weight": 0.0,
        },
        {"dataset": "cifar10", "augment": False},
    ),
    # ours: lipmdeq_tiny with the stem and head constrained (docs/MATH.md section 9)
    "lipmdeq_tiny_robust": (
        {**LAYOUT, **LIP, **TINY, "dropout": 0.25, "explicit_norm": "mean_only", "explicit_cap": 1.0,
         "conv_init_std": 0.05},
        {
            **ADAM,
            "weight_decay": 2.5e-6,
            "batch_size": 128,
            "epochs": 50,
            "pretrain_steps": 0,
            "jac_reg_weight": 0.0,
        },
        {"dataset": "cifar10", "augment": False},
    ),
}


def test_the_presets_are_shipped() -> None:
    assert list_presets() == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preset_matches_design_table(name: str) -> None:
    cfg = load_config(name)
    assert isinstance(cfg, RunConfig)
    assert cfg.preset == name and cfg.model.name == name
    model_exp, train_exp, data_exp = EXPECTED[name]
    for section, expected in (("model", model_exp), ("train", train_exp), ("data", data_exp)):
        got = getattr(cfg, section)
        for key, value in expected.items():
            assert getattr(got, key) == value, f"{name}: {section}.{key} = {getattr(got, key)!r} != {value!r}"
    assert cfg.train.max_steps is None and cfg.train.warmup_steps == 0


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preset_files_are_fully_explicit(name: str) -> None:
    """Each YAML names every field of every section: nothing relies on a code default (pitfall 10)."""
    text = resources.files("lipdeq.presets").joinpath(f"{name}.yaml").read_text()
    header = " ".join(line.lstrip("# ") for line in text.splitlines() if line.startswith("#"))
    assert text.lstrip().startswith("#") and f"reference configuration '{name}'" in header
    raw = yaml.safe_load(text)
    assert set(raw) == {"model", "data", "train"}
    for section, cls in (("model", ModelConfig), ("data", DataConfig), ("train", TrainConfig)):
        assert set(raw[section]) == set(cls.model_fields), f"{name}.{section}"


def test_lipschitz_presets_are_lipschitz_and_baselines_are_not() -> None:
    assert load_config("lipmdeq_tiny").model.is_lipschitz
    assert load_config("lipmdeq_large").model.is_lipschitz
    assert not load_config("mdeq_tiny").model.is_lipschitz


def test_model_preset_returns_the_model_section_as_a_fresh_dict() -> None:
    section = model_preset("lipmdeq_tiny")
    assert ModelConfig(**section) == load_config("lipmdeq_tiny").model
    section["channels"].append(99)
    assert model_preset("lipmdeq_tiny")["channels"] == [24, 24]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_to_dict_round_trips(name: str) -> None:
    import json

    cfg = load_config(name)
    assert RunConfig.model_validate(json.loads(json.dumps(cfg.to_dict()))) == cfg
