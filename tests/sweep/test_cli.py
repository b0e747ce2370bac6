"""The sweep's command line: its options, train.py's after `--`, and the direction a metric's name implies."""

from __future__ import annotations

import pytest

pytest.importorskip("optuna", reason="sweeps need the optional extra: pip install 'implicit-em[sweep]'")

from implicit_em.errors import ConfigError  # noqa: E402
from implicit_em.sweep.cli import direction_of, main, split_argv  # noqa: E402


def test_options_after_the_separator_go_to_train_py():
    own, train = split_argv(["--study", "s", "--", "--trainer.max_epochs", "2", "--", "x"])
    assert own == ["--study", "s"] and train == ["--trainer.max_epochs", "2", "--", "x"]
    assert split_argv(["--study", "s"]) == (["--study", "s"], [])


@pytest.mark.parametrize(
    "metric, direction",
    [("val_probe_accuracy", "maximize"), ("val_fvu", "minimize"), ("val_ce_loss_recovered", "maximize"),
     ("val_kl_div", "minimize"), ("final_loss", "minimize"), ("val_explained_variance", "maximize")],
)  # fmt: skip
def test_the_direction_follows_the_metric_name(metric, direction):
    assert direction_of(metric) == direction


def test_a_metric_of_unknown_sense_needs_a_direction():
    with pytest.raises(ConfigError, match="pass --direction"):
        direction_of("l0")


def test_counts_below_one_are_refused_before_anything_runs(tmp_path, capsys):
    space = tmp_path / "space.yaml"
    space.write_text("params:\n  model.net.lambda_tc: {type: float, low: 0.1, high: 10.0}\n")
    common = ["--space", str(space), "--study", "s", "--root", str(tmp_path / "runs")]
    assert main([*common, "--trials", "0"]) == 2
    assert main([*common, "--trials", "2", "--workers", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: --trials must be an integer >= 1 (got 0)",
        "error: --workers must be an integer >= 1 (got 0)",
    ]
    assert not (tmp_path / "runs").exists()
