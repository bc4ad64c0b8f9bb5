"""solve_hyperparameter: the largest value of one key whose hyperparameter bound stays below a target.

The oracle is the model's own certificate, ``create_model(...).lipschitz_bound(mode="hyper")``, of the
solved configuration and of a slightly larger value; for alpha, whose bound is affine, also the
closed-form root of the line through two certified points.
"""

from __future__ import annotations

import json
import math
import re

import pytest

from lipdeq.configs import load_config
from lipdeq.errors import LipdeqError
from lipdeq.models import MultiscaleDEQ, UnreachableTargetError, create_model, model_config, solve_hyperparameter
from lipdeq.models import hyperparameters as hp

SMALL = dict(channels=[8, 8], head_channels=[4, 4], final_channels=16, num_groups=4, image_size=16)
# Non-tiny: three branches of different widths, post-fusion gains, caps off the preset values.
WIDE = dict(channels=[16, 32, 48], head_channels=[4, 4, 4], final_channels=16, num_groups=8, image_size=16,
            post_gn_affine=True, gn_cap=0.8, conv_cap=1.5)
FOUR = dict(channels=[8, 8, 8, 8], head_channels=[4, 4, 4, 4], final_channels=16, num_groups=4, image_size=16)


def model_bound(base: dict, **settings) -> float:
    """The oracle: the hyper certificate of a real model with these settings."""
    return create_model("lipmdeq_tiny", **{**base, **settings}).lipschitz_bound(mode="hyper").value


def larger(key: str, value: float) -> float:
    return value + 1e-5 if key in ("alpha", "beta") else value * (1 + 1e-5)


CASES = [
    (SMALL, "conv_cap", 0.9), (SMALL, "relu_slope", 0.5), (SMALL, "beta", 0.6), (SMALL, "gn_cap", 0.3),
    (WIDE, "conv_cap", 0.7), (WIDE, "beta", 0.2), (FOUR, "relu_slope", 0.99),
]


@pytest.mark.parametrize("base,key,target", CASES)
def test_solved_value_is_just_below_the_target_and_a_larger_one_is_above(base, key, target):
    sol = solve_hyperparameter(model_config("lipmdeq_tiny", **base), key, target)
    assert sol.key == key and sol.target == target and sol.binding
    exact = model_bound(base, **{key: sol.value})
    assert sol.bound == exact  # exactly the model's certificate of the solved configuration
    assert target - 1e-6 <= exact < target
    assert model_bound(base, **{key: larger(key, sol.value)}) > target
    assert sol.iterations > 0


def test_alpha_matches_the_closed_form_root_of_its_affine_bound():
    # In the hyper certificate every block bound is affine in alpha with one slope, so the bound is
    # a line: the root through two certified points is an independent answer.
    a1, a2 = 0.2, 0.8
    b1, b2 = model_bound(FOUR, alpha=a1), model_bound(FOUR, alpha=a2)
    target = 0.9
    root = a1 + (target - b1) * (a2 - a1) / (b2 - b1)
    assert 0 < root < 1
    sol = solve_hyperparameter(model_config("lipmdeq_tiny", **FOUR), "alpha", target)
    assert sol.binding and sol.value == pytest.approx(root, rel=1e-9)
    assert sol.bound == model_bound(FOUR, alpha=sol.value) and target - 1e-6 <= sol.bound < target


def test_the_search_bound_is_the_models_certificate():
    configs = [model_config("lipmdeq_tiny", **SMALL), model_config("lipmdeq_tiny", **WIDE),
               model_config("lipmdeq_tiny", **FOUR, alpha=0.9, beta=0.7, relu_slope=0.6),
               model_config("mdeq_tiny", **SMALL)]
    for cfg in configs:
        # the same certificate on a narrow copy of the layer: equal, not only up to rounding
        assert hp.hyper_bound(cfg) == MultiscaleDEQ(cfg).lipschitz_bound(mode="hyper").value
    assert math.isinf(hp.hyper_bound(configs[-1]))


def test_preset_name_run_config_and_model_config_agree():
    by_name = solve_hyperparameter("lipmdeq_tiny", "conv_cap", 0.8)
    by_run = solve_hyperparameter(load_config("lipmdeq_tiny"), "conv_cap", 0.8)
    by_model = solve_hyperparameter(model_config("lipmdeq_tiny"), "conv_cap", 0.8)
    assert by_name == by_run == by_model
    # overrides change the other settings first
    assert solve_hyperparameter("lipmdeq_tiny", "conv_cap", 0.8, relu_slope=0.3).value > by_name.value


def test_not_binding_returns_the_upper_end_of_the_range():
    sol = solve_hyperparameter(model_config("lipmdeq_tiny", **SMALL), "alpha", 0.9)
    assert sol.value == 1.0 and not sol.binding
    assert sol.bound == model_bound(SMALL, alpha=1.0) < 0.9
    # with small convolutions the bound decreases in alpha: alpha = 1 is again the answer
    sol = solve_hyperparameter(model_config("lipmdeq_tiny", **SMALL, conv_cap=1.0), "alpha", 0.3)
    assert sol.value == 1.0 and not sol.binding and model_bound(SMALL, conv_cap=1.0, alpha=1e-3) > sol.bound


def test_impossible_alpha_names_the_settings_and_the_smallest_bound():
    cfg = model_config("lipmdeq_tiny", **SMALL)
    with pytest.raises(UnreachableTargetError) as info:
        solve_hyperparameter(cfg, "alpha", 0.5)
    err = info.value
    assert isinstance(err, LipdeqError) and isinstance(err, ValueError)
    message = str(err)
    for setting in ("conv_cap=2.0", "relu_slope=0.4", "gn_cap=1.0", "beta=0.3", "alpha -> 0", "residual"):
        assert setting in message
    smallest = float(re.search(r"at least ([0-9.e+-]+)", message).group(1))
    # the infimum over alpha in (0, 1] is the limit alpha -> 0 (the bound increases in alpha here)
    assert smallest == pytest.approx(model_bound(SMALL, alpha=1e-9), rel=1e-5)
    assert smallest > 0.5


def test_impossible_when_the_bound_decreases_in_alpha_names_alpha_one():
    with pytest.raises(UnreachableTargetError, match=r"at alpha=1\b") as info:
        solve_hyperparameter(model_config("lipmdeq_tiny", **SMALL, conv_cap=1.0), "alpha", 0.05)
    smallest = float(re.search(r"at least ([0-9.e+-]+)", str(info.value)).group(1))
    assert smallest == pytest.approx(model_bound(SMALL, conv_cap=1.0, alpha=1.0), rel=1e-5)


@pytest.mark.parametrize("preset,settings,key,names", [
    ("mdeq_tiny", {}, "conv_cap", "norm='group'"),
    ("mdeq_tiny", {}, "alpha", "mixing='sum'"),
    ("lipmdeq_tiny", {"conv_cap": None}, "relu_slope", "conv_cap=None"),
    ("lipmdeq_tiny", {"gn_cap": None}, "beta", "gn_cap=None"),
])
def test_infinite_bounds_name_the_setting(preset, settings, key, names):
    with pytest.raises(UnreachableTargetError, match=re.escape(names)):
        solve_hyperparameter(model_config(preset, **SMALL, **settings), key, 0.9)


def test_bad_arguments_are_refused():
    with pytest.raises(UnreachableTargetError, match="conv_cap, relu_slope, alpha, beta, gn_cap"):
        solve_hyperparameter("lipmdeq_tiny", "dropout", 0.9)
    with pytest.raises(ValueError, match="target"):
        solve_hyperparameter("lipmdeq_tiny", "alpha", 0.0)
    with pytest.raises(TypeError, match="preset name"):
        solve_hyperparameter(3, "alpha", 0.9)


def test_solution_renders_as_json():
    sol = solve_hyperparameter("lipmdeq_tiny", "beta", 0.8)
    data = json.loads(sol.to_json())
    assert data == {"key": "beta", "value": sol.value, "bound": sol.bound, "target": 0.8, "binding": True,
                    "iterations": sol.iterations}


def test_convex_search_finds_the_upper_end_of_an_interior_dip():
    # A convex bound that is above the target at both ends of (0, 1]: the answer is the upper root.
    cfg = model_config("lipmdeq_tiny", **SMALL)
    value, binding, _ = hp._search(cfg, "beta", 0.2, lambda x: (x - 0.5) ** 2 + 0.1)
    assert binding and value == pytest.approx(0.5 + math.sqrt(0.1), rel=1e-10)
    assert value < 0.5 + math.sqrt(0.1)
    with pytest.raises(UnreachableTargetError, match=r"at least 0\.1\b"):
        hp._search(cfg, "beta", 0.05, lambda x: (x - 0.5) ** 2 + 0.1)
