"""One trial: its train.py options, its run directory, its W&B run in the study's group, and its value."""

from __future__ import annotations

import json
import math

import pytest

optuna = pytest.importorskip("optuna", reason="sweeps need the optional extra: pip install 'implicit-em[sweep]'")

from implicit_em.errors import ConfigError  # noqa: E402
from implicit_em.sweep.trial import (  # noqa: E402
    TrialCLI,
    TrialPlan,
    add_wandb,
    claim_run_dir,
    finish_wandb,
    metric_value,
    option,
    parse_only,
    run_trial,
)
from tests.conftest import DEFAULT_CONFIG, QUIET  # noqa: E402


def plan(tmp_path, *train: str, **kw) -> TrialPlan:
    return TrialPlan("s", tmp_path / "runs", list(train), [str(DEFAULT_CONFIG)], **kw)


def test_a_trial_is_scored_on_validation_and_refuses_what_the_sweep_sets(tmp_path):
    p = plan(tmp_path, "--trainer.max_epochs", "2", "--probe.every_n_epochs", "0", threads=3)
    args = p.args({"model.net.lambda_tc": 0.5})
    assert option(args, "--report.split") == "val"
    assert option(args, "--probe.every_n_epochs") == "1"  # the pruner's number every epoch, whatever was given
    assert option(args, "--threads") == "3"
    assert args.index("--trainer.max_epochs") < args.index("--model.net.lambda_tc")
    assert p.command({"model.net.lambda_tc": 0.5}) == (
        "python scripts/train.py --trainer.max_epochs 2 --probe.every_n_epochs 0 --model.net.lambda_tc 0.5 "
        "--report.split val --threads 3"
    )
    unpruned = plan(tmp_path, prune=False).args({})
    assert option(unpruned, "--probe.every_n_epochs") is None
    for refused in (["--report.split", "test"], ["--ckpt_path", "last"], ["--trainer.default_root_dir", "x"]):
        with pytest.raises(ConfigError, match=refused[0]):
            plan(tmp_path, *refused)


def test_run_directories_are_never_reused(tmp_path):
    assert claim_run_dir(tmp_path, "s", 7) == "trial_0007"
    assert claim_run_dir(tmp_path, "s", 7) == "trial_0007-2"
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["trial_0007", "trial_0007-2"]


def test_options_train_py_refuses_stop_before_any_trial(tmp_path, capsys):
    config = parse_only(plan(tmp_path), {"model.net.lambda_tc": 0.5})
    assert config.data.class_path.endswith("DigitsDataModule")
    with pytest.raises(SystemExit) as caught:
        parse_only(plan(tmp_path), {"model.net.lamda_tc": 0.5})
    assert caught.value.code == 2 and "lamda_tc" in capsys.readouterr().err


def test_the_trial_writes_into_its_own_run_directory_and_w_and_b_group(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    p = plan(tmp_path, *QUIET, "--config", "configs/logger/wandb.yaml")
    cli = TrialCLI(p.args({}), p.default_config_files, "s", "trial_0003")
    assert cli.trainer.log_dir == str(p.root / "s" / "trial_0003")
    assert not any(type(lg).__name__ == "WandbLogger" for lg in cli.trainer.loggers)  # the config's gives way
    trial = optuna.create_study().ask()
    add_wandb(cli, p, trial, {"model.net.lambda_tc": 0.5})
    wandb_logger = cli.trainer.loggers[-1]
    settings = wandb_logger._wandb_init
    assert settings["group"] == "s" and settings["job_type"] == "trial" and settings["name"] == "s/trial_0003"
    assert settings["config"]["sweep/model.net.lambda_tc"] == 0.5 and settings["project"] == "implicit-em"
    finish_wandb("complete")


def test_a_trial_returns_its_metric_from_metrics_json(tmp_path):
    p = plan(tmp_path, *QUIET, "--trainer.max_epochs", "1", "--model.n_components", "8", "--report.sae_metrics",
             "false", wandb_project=None, metric="val_probe_accuracy")  # fmt: skip
    study = optuna.create_study(direction="maximize")
    trial = study.ask()
    value = run_trial(trial, p, {"model.net.lambda_tc": 0.5})
    run_dir = study.trials[0].user_attrs["run_dir"]
    metrics = json.loads((p.root / "s" / "trial_0000" / "metrics.json").read_text())
    assert run_dir == str(p.root / "s" / "trial_0000")
    assert value == metrics["val_probe_accuracy"] == metrics["probe_accuracy"] and metrics["scored_on"] == "val"
    assert metrics["lambda_tc"] == 0.5
    assert "val/probe_accuracy" in (p.root / "s" / "trial_0000" / "metrics.csv").read_text()


def test_the_metric_must_be_a_number_of_metrics_json():
    assert metric_value({"val_fvu": 0.25}, "val_fvu", "m.json") == 0.25
    assert math.isnan(metric_value({"val_fvu": None}, "val_fvu", "m.json"))  # non-finite: Optuna marks FAIL
    with pytest.raises(ConfigError, match="has no such number .*--metric val_fvu.* it has fvu, l0"):
        metric_value({"fvu": 0.3, "l0": 4, "model": "x"}, "val_probe_accuracy", "m.json")
