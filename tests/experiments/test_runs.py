"""Launching the experiments' training runs: the flags, one fit per named run, the training log."""

from __future__ import annotations

import json

import pytest

from implicit_em.experiments.runs import Runs, Settings, cli_args, loss_curves, with_names
from tests.experiments.conftest import REPO


def test_cli_args_are_the_flags_a_user_would_type():
    s = Settings(REPO / "configs", data="digits", out=REPO / "never", epochs=2, seeds=[3, 4], components=8,
                 batch_size=32, data_root="/data")  # fmt: skip
    args = cli_args(s, "ablation", "ablation", "--x", "1", kmeans=True)
    value = lambda flag: args[args.index(flag) + 1]  # noqa: E731
    assert value("--trainer.default_root_dir") == str(REPO / "never" / "digits" / "runs" / "ablation")
    assert value("--seed_everything") == "3" and json.loads(value("--model.init_args.seeds")) == [3, 4]
    assert value("--report.kmeans") == "true" and value("--report.sae_metrics") == "false"
    assert value("--data.batch_size") == "32" and value("--data.root") == "/data" and value("--x") == "1"
    assert [a for a in args if a == "--config"] and args[args.index("--config") + 1].endswith("default.yaml")


def test_each_named_run_is_fitted_once_and_handed_back(monkeypatch, tmp_path):
    from implicit_em.run import app

    calls = []
    monkeypatch.setattr(app, "fit_module", lambda args: calls.append(args) or f"fitted {len(calls)}")
    runs = Runs(Settings(REPO / "configs", out=tmp_path, seeds=[1]), log=lambda line: None)
    assert runs.model("implicit_em") == "fitted 1" and runs.model("implicit_em") == "fitted 1"
    assert runs.model("sae", start="paper") == "fitted 2" and len(calls) == 2
    assert "--model.init_args.defaults" in calls[1] and json.loads(
        calls[1][calls[1].index("--model.init_args.defaults") + 1]
    ) == {"data_init": False}


def test_loss_curves_read_each_members_epochs_from_the_training_log(tmp_path):
    log = tmp_path / "metrics.csv"
    log.write_text("epoch,step,train/loss/m0,train/loss/m1,val/x\n0,5,2.0,3.0,\n0,5,,,0.1\n1,10,1.5,2.5,\n")
    assert loss_curves(log, 2) == [[2.0, 1.5], [3.0, 2.5]]
    with pytest.raises(KeyError):
        loss_curves(log, 3)


def test_with_names():
    assert with_names([{"name": "lse", "x": 1}]) == [{"name": "lse", "x": 1, "config": "lse"}]
