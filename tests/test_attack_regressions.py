"""Faults found by benchmarks/attacks/run_attacks.py (issue 20's attacks, rebuilt), each pinned by a test."""

import math

import pytest

from capi_backbones.cli.main import main


@pytest.mark.parametrize("option", ["--learning-rates", "--weight-decays"])
@pytest.mark.parametrize("bad", ["inf", "nan", "-0.1", "0.001,-inf"])
def test_eval_refuses_a_grid_that_is_not_finite_or_negative(tmp_path, capsys, option, bad):
    """`--learning-rates inf` used to train for minutes and report scores of diverged probes with exit 0."""
    out = tmp_path / "out"
    code = main(["eval", "classify", str(tmp_path), "--out", str(out), "--random-init", option, bad])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1, err
    assert option in err[0] and "finite" in err[0]
    assert not out.exists()


def test_a_zero_learning_rate_is_refused_but_a_zero_weight_decay_is_not(tmp_path, capsys):
    assert main(["eval", "classify", str(tmp_path), "--out", str(tmp_path / "o"), "--random-init",
                 "--learning-rates", "0"]) == 2  # fmt: skip
    assert "--learning-rates" in capsys.readouterr().err


@pytest.mark.parametrize("field", ["learning_rates", "weight_decays"])
def test_the_probe_config_refuses_non_finite_grids(field):
    from capi_backbones.evals.probe_grid import ProbeTrainingConfig

    with pytest.raises(ValueError, match="finite"):
        ProbeTrainingConfig(**{field: (1e-3, math.inf)})
    with pytest.raises(ValueError, match="finite"):
        ProbeTrainingConfig(**{field: (math.nan,)})
