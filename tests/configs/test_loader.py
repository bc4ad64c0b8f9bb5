"""load_config: presets, user files with base:, overrides, and the error for every kind of mistake."""

from __future__ import annotations

from pathlib import Path

import pytest

from lipdeq.configs import ConfigError, RunConfig, load_config, model_preset


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_overrides_parse_yaml_values() -> None:
    cfg = load_config(
        "mdeq_tiny",
        [
            "train.lr=0.01",
            "model.channels=[16,16]",
            "data.dataset=synthetic",
            "train.max_steps=null",
            "train.grad_clip=1",
            "train.min_lr=1e-7",
            "data.augment=true",
        ],
    )
    assert cfg.train.lr == 0.01 and cfg.model.channels == [16, 16] and cfg.data.dataset == "synthetic"
    assert (
        cfg.train.max_steps is None and cfg.train.grad_clip == 1.0 and isinstance(cfg.train.grad_clip, float)
    )
    assert cfg.train.min_lr == 1e-7 and cfg.data.augment is True
    # untouched keys keep the preset's values
    assert cfg.model.head_channels == [8, 16] and cfg.train.epochs == 50
    assert load_config("mdeq_tiny", ["train.max_steps=7", "train.max_steps=3"]).train.max_steps == 3


def test_user_file_with_base_deep_merges(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "run.yaml", "base: lipmdeq_tiny\ntrain:\n  epochs: 2\n  lr: 5.0e-4\nmodel:\n  f_thres: 9\n"
    )
    cfg = load_config(str(path))
    assert cfg.preset == "lipmdeq_tiny"
    assert cfg.train.epochs == 2 and cfg.train.lr == 5e-4 and cfg.model.f_thres == 9
    assert cfg.train.batch_size == 128 and cfg.model.norm == "mean_only" and cfg.model.b_thres == 20
    assert load_config(path, ["train.epochs=3"]).train.epochs == 3


def test_user_file_without_base_and_chained_base(tmp_path: Path) -> None:
    full = _write(
        tmp_path / "full.yaml",
        "model: {channels: [16, 16]}\ndata: {}\ntrain: {epochs: 1, batch_size: 4, lr: 1}\n",
    )
    cfg = load_config(str(full))
    assert cfg.preset is None and cfg.model.channels == [16, 16] and cfg.train.lr == 1.0
    child = _write(tmp_path / "child.yaml", "base: full.yaml\ntrain: {epochs: 5}\n")
    assert load_config(str(child)).train.epochs == 5
    loop = _write(tmp_path / "loop.yaml", "base: loop.yaml\n")
    with pytest.raises(ConfigError, match="loops"):
        load_config(str(loop))


def test_saved_to_dict_reloads_as_a_file(tmp_path: Path) -> None:
    import yaml

    cfg = load_config("mdeq_large_reg", ["train.seed=3"])
    path = _write(tmp_path / "config.yaml", yaml.safe_dump(cfg.to_dict()))
    assert load_config(str(path)) == cfg


def test_unknown_preset_lists_valid_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown preset 'mdeq_tny'.*mdeq_tiny"):
        load_config("mdeq_tny")
    with pytest.raises(ConfigError, match=r"unknown preset 'nope'.*lipmdeq_large"):
        model_preset("nope")


def test_missing_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError, match=r"not found: .*absent\.yaml"):
        load_config(str(missing))


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "bad.yaml", "base: mdeq_tiny\ntrain:\n  lr: [0.1\n  epochs: 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    message = str(info.value)
    assert "bad.yaml" in message and "line " in message


def test_duplicate_keys_are_rejected(tmp_path: Path) -> None:
    path = _write(tmp_path / "dup.yaml", "base: mdeq_tiny\ntrain:\n  lr: 0.1\n  lr: 0.2\n")
    with pytest.raises(ConfigError, match=r"dup\.yaml, line 4.*duplicate key 'lr'"):
        load_config(str(path))


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        (
            "train.learning_rate=0.1",
            r"train\.learning_rate is not a known key; known keys in train: .*\blr\b",
        ),
        (
            "model.chanels=[8,8]",
            r"model\.chanels is not a known key; known keys in model: .*did you mean 'channels'",
        ),
        (
            "optim.lr=0.1",
            r"optim is not a known key; known keys in the top level: data, model, preset, train",
        ),
        ("train.batch_size=12x", r"train\.batch_size: expected int, got str '12x'"),
        ("train.batch_size=12.0", r"train\.batch_size: expected int, got float 12\.0"),
        ("train.lr=fast", r"train\.lr: expected float, got str 'fast'"),
        ("data.augment=1", r"data\.augment: expected bool, got int 1"),
        ("model.channels=[16,x]", r"model\.channels\[1\]: expected int, got str 'x'"),
        ("data.dataset=mnist", r"data\.dataset: expected one of 'synthetic' or 'cifar10', got str 'mnist'"),
        ("train.batch_size=0", r"train\.batch_size: input should be greater than or equal to 1"),
        ("train.lr=.inf", r"train\.lr: input should be a finite number"),
        ("model.channels=[20,20]", r"model: channel width 20 is not divisible"),
    ],
)
def test_bad_override_is_named(override: str, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern) as info:
        load_config("mdeq_tiny", [override])
    assert f"[from override '{override}']" in str(info.value) or pattern.startswith("model:")


def test_error_in_user_file_names_the_file(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "typo.yaml", "base: mdeq_tiny\ntrain:\n  batch_size: 12x\n  learning_rate: 0.1\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    message = str(info.value)
    assert "train.batch_size: expected int, got str '12x'" in message
    assert "train.learning_rate is not a known key" in message
    assert str(path) in message


@pytest.mark.parametrize("override", ["train.lr", "=3", "train..lr=1", "train.lr.x=1"])
def test_malformed_overrides(override: str) -> None:
    with pytest.raises(ConfigError, match="override"):
        load_config("mdeq_tiny", [override])


def test_overrides_must_be_a_sequence_not_a_string() -> None:
    with pytest.raises(ConfigError, match="sequence"):
        load_config("mdeq_tiny", "train.lr=0.1")  # type: ignore[arg-type]


def test_file_shapes_that_are_not_configs(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="empty"):
        load_config(str(_write(tmp_path / "empty.yaml", "")))
    with pytest.raises(ConfigError, match="mapping"):
        load_config(str(_write(tmp_path / "list.yaml", "- 1\n- 2\n")))
    with pytest.raises(ConfigError, match="not a known preset"):
        load_config(str(_write(tmp_path / "b.yaml", "base: nothing_here\n")))
    with pytest.raises(ConfigError, match=r"train is required"):
        load_config(str(_write(tmp_path / "partial.yaml", "model: {}\ndata: {}\n")))


def test_config_is_frozen_and_strict() -> None:
    cfg = load_config("mdeq_tiny")
    with pytest.raises(Exception, match="frozen"):
        cfg.train.lr = 0.5  # type: ignore[misc]
    assert isinstance(cfg, RunConfig)
    assert issubclass(ConfigError, ValueError)


def test_retired_keys_are_dropped_from_stored_configs_only(tmp_path: Path) -> None:
    """Checkpoints of earlier versions stored data.synthetic_*_size (never read): they still load,
    while a user file that sets one is told the key is unknown."""
    from lipdeq.configs import RETIRED_KEYS, config_from_dict

    cfg = load_config("lipmdeq_tiny")
    old = cfg.to_dict()
    old["data"] = {**old["data"], "synthetic_train_size": 10000, "synthetic_test_size": 2000}
    assert {f"data.{k}" for k in ("synthetic_train_size", "synthetic_test_size")} == RETIRED_KEYS
    assert config_from_dict(old, what="checkpoint") == cfg
    assert "synthetic_train_size" in old["data"]  # the caller's mapping is not changed
    path = _write(tmp_path / "user.yaml", "base: lipmdeq_tiny\ndata: {synthetic_train_size: 64}\n")
    with pytest.raises(ConfigError, match=r"data\.synthetic_train_size is not a known key"):
        load_config(path)
