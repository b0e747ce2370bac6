"""The per-epoch validation number a trial reports to Optuna's pruner, and the pruner stopping a trial."""

from __future__ import annotations

import math

import pytest

optuna = pytest.importorskip("optuna", reason="sweeps need the optional extra: pip install 'implicit-em[sweep]'")

from implicit_em.sweep.pruning import ReportToPruner, ValidationFVU  # noqa: E402
from tests.conftest import fit_in_process  # noqa: E402

TINY = ["--trainer.max_epochs", "2", "--model.n_components", "8", "--report.sae_metrics", "false"]


def test_every_epoch_reports_the_validation_probe_and_fvu(tmp_path):
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.NopPruner())
    trial = study.ask()
    probe = ReportToPruner(trial, "val/probe_accuracy")
    fvu = ReportToPruner(trial, "val/fvu")  # the same trial takes the probe's steps; this one only records
    fvu.trial = optuna.create_study().ask()
    cli = fit_in_process(tmp_path, *TINY, "--probe.every_n_epochs", "1", callbacks=[ValidationFVU(), probe, fvu])
    assert len(probe.reported) == 2 and all(0.1 < v <= 1 for v in probe.reported)  # 10 classes: above chance
    assert study.trials[0].intermediate_values == {0: probe.reported[0], 1: probe.reported[1]}
    assert len(fvu.reported) == 2 and all(0 < v < 1 for v in fvu.reported) and all(map(math.isfinite, fvu.reported))
    assert cli.metrics_path is not None  # nothing pruned: the run finished and was evaluated


def test_the_pruner_stops_a_trial_after_an_epoch(tmp_path):
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(lower=2.0))
    trial = study.ask()  # any accuracy is below 2: pruned at the first report
    with pytest.raises(optuna.TrialPruned, match="val/probe_accuracy .* after epoch 1"):
        fit_in_process(tmp_path, *TINY, "--probe.every_n_epochs", "1",
                       callbacks=[ReportToPruner(trial, "val/probe_accuracy")])  # fmt: skip
    assert list(study.trials[0].intermediate_values) == [0]
    assert not list(tmp_path.rglob("metrics.json"))  # stopped before the evaluation
