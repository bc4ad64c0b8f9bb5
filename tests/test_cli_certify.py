"""``lipdeq certify PRESET``: the certificates, ``--json``, ``--solve KEY --target L`` and its refusals."""

from __future__ import annotations

import json

import pytest

from lipdeq.cli import main
from lipdeq.models import model_config, solve_hyperparameter
from lipdeq.models.hyperparameters import hyper_bound


def test_solve_json_is_the_api_result(capsys):
    assert main(["certify", "lipmdeq_tiny", "--solve", "conv_cap", "--target", "0.9", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data == solve_hyperparameter("lipmdeq_tiny", "conv_cap", 0.9).to_dict()
    assert data["binding"] and 0.9 - 1e-6 <= data["bound"] < 0.9


def test_solve_text_prints_the_value_and_its_bound(capsys):
    assert main(["certify", "lipmdeq_tiny", "--solve", "alpha", "--target", "0.9"]) == 0
    out = capsys.readouterr().out
    sol = solve_hyperparameter("lipmdeq_tiny", "alpha", 0.9)
    assert f"largest alpha = {sol.value!r}" in out and f"Lip(f) <= {sol.bound!r}" in out
    assert "not binding" in out  # alpha = 1 keeps lipmdeq_tiny's bound at 0.85 < 0.9


def test_an_impossible_target_is_one_line_naming_the_settings(capsys):
    assert main(["certify", "lipmdeq_tiny", "--solve", "alpha", "--target", "0.5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unreachable by alpha" in err
    assert "relu_slope=0.4" in err and "conv_cap=2.0" in err and "at least 0.5317" in err


def test_preset_json_holds_both_certificates(capsys):
    assert main(["certify", "lipmdeq_tiny", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["model"] == "lipmdeq_tiny"
    # docs/MATH.md section 4.3 (the same products in another order: equal up to rounding)
    assert data["hyper"]["value"] == pytest.approx(hyper_bound(model_config("lipmdeq_tiny")), rel=1e-12)
    assert data["hyper"]["mode"] == "hyper" and data["weights"]["mode"] == "weights"


@pytest.mark.parametrize("argv,message", [
    (["certify"], "a preset name or --checkpoint"),
    (["certify", "lipmdeq_tiny", "--checkpoint", "x"], "a preset name or --checkpoint"),
    (["certify", "lipmdeq_tiny", "--solve", "alpha"], "--solve KEY and --target L go together"),
    (["certify", "lipmdeq_tiny", "--target", "0.9"], "--solve KEY and --target L go together"),
    (["certify", "--checkpoint", "x", "--solve", "alpha", "--target", "0.9"], "not on --checkpoint"),
    (["certify", "lipmdeq_tiny", "--images", "4"], "go with --checkpoint"),
])
def test_argument_combinations_that_cannot_run_exit_2(capsys, argv, message):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["certify", "lipmdeq_tiny", "--solve", "dropout", "--target", "0.9"], "invalid choice: 'dropout'"),
    (["certify", "lipmdeq_tiny", "--solve", "alpha", "--target", "-1"], "--target: value must be > 0.0"),
])
def test_bad_solve_arguments_are_usage_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
