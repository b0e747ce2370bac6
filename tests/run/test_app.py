"""What scripts/train.py does with the built objects: fit and evaluate, refuse a resume that does not fit, log the
final numbers, and read a finished run back (evaluate a checkpoint, rebuild, load for the dashboard)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml

from implicit_em.errors import ConfigError, DataError
from implicit_em.run import app
from implicit_em.run.checkpoints import load_checkpoint
from implicit_em.run.rundir import RunDir
from tests.conftest import DEFAULT_CONFIG, QUIET

K = 8


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> RunDir:
    """A 1-epoch run (K = 8, digits) fitted in this process through fit_run."""
    root = tmp_path_factory.mktemp("app")
    args = ["--trainer.default_root_dir", str(root), "--trainer.max_epochs", "1", "--model.n_components", str(K),
            *QUIET, "--report.sae_metrics", "true"]  # fmt: skip
    return RunDir(app.fit_run(args, [DEFAULT_CONFIG]).parent)


def test_fit_run_writes_the_run_and_its_metrics(run):
    m = run.metrics()
    assert run.metrics_path.is_absolute() and run.config_path.is_file() and run.metrics_csv_path.is_file()
    assert m["model"] == "implicit_em" and m["data"] == "digits" and m["n_components"] == K and m["epochs"] == 1
    assert m["n_train"] + m["n_test"] < 1797 and m["n_train"] > m["n_test"] > 0
    assert m["run_dir"] == str(run.path.resolve()) and len(m["epoch_seconds"]) == 1
    assert load_checkpoint(m["checkpoint"])["global_step"] == 11  # 1,293 training digits in batches of 128
    assert m["device"] == "cpu" and m["peak_memory_mb"] > 0


def test_rows_trained_are_the_rows_of_the_optimiser_steps_taken(run, tmp_path):
    assert run.metrics()["rows_trained"] == run.metrics()["train_rows"] == 1293  # a full epoch: every row once
    args = ["--trainer.default_root_dir", str(tmp_path), "--trainer.max_epochs", "5", "--trainer.max_steps", "13",
            "--model.n_components", str(K), "--report.sae_metrics", "false", *QUIET]  # fmt: skip
    m = app.fit_module(args, [DEFAULT_CONFIG]).metrics
    # epoch 1's 10 full batches and its last of 13 rows, then 2 more (not train_rows x the epoch counter)
    assert m["rows_trained"] == 1293 + 2 * 128 != m["train_rows"] * m["epochs"]


def test_fit_module_keeps_lightnings_noise_out_and_restores_the_callers_warning_filters(tmp_path):
    """A library fit checkpointing every n steps (as the frontier's rows do) warns nothing of app.QUIET, and the
    caller's warning filters are as they were after it."""
    import re
    import warnings

    args = ["--trainer.default_root_dir", str(tmp_path), "--trainer.max_steps", "4", "--model.n_components", str(K),
            "--checkpoint.every_n_train_steps", "2", "--checkpoint.every_n_epochs", "0", *QUIET]  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        before = list(warnings.filters)
        app.fit_module(args, [DEFAULT_CONFIG])
        after = list(warnings.filters)
    said = [str(w.message) for w in caught]
    assert not [m for m in said if any(re.match(p, m) for p in app.QUIET)], said
    assert after == before


def test_evaluate_checkpoint_gives_the_runs_own_numbers(run):
    m = run.metrics()
    again = app.evaluate_checkpoint(m["checkpoint"], overrides=["--report.probe_method", "torch"])
    assert again["probe_accuracy"] == pytest.approx(m["probe_accuracy"], abs=1e-6)
    assert again["l0_density"] == pytest.approx(m["l0_density"], abs=1e-6)
    assert again["global_step"] == 11 and again["checkpoint"].endswith(".ckpt")


def test_rebuild_gives_the_start_or_the_trained_weights(run):
    trained, dm = app.rebuild(run)
    start, _ = app.rebuild(run, trained=False)
    saved = load_checkpoint(run.last_checkpoint())["state_dict"]
    assert torch.equal(trained.model.linear.weight, saved["model.linear.weight"])
    assert not torch.equal(start.model.linear.weight, trained.model.linear.weight)
    assert trained.model.n_components == K and type(dm).__name__ == "DigitsDataModule"


def test_a_run_saved_with_the_old_features_section_still_rebuilds(run, tmp_path):
    copy = RunDir(tmp_path / "old")
    shutil.copytree(run.path, copy.path, symlinks=True)
    config = yaml.safe_load(copy.config_path.read_text())
    config["features"] = config.pop("components")  # as config.yaml was saved before the rename
    copy.config_path.write_text(yaml.safe_dump(config))
    module, _ = app.rebuild(copy, trained=False)
    assert module.model.n_components == K


def test_load_run_names_a_lone_checkpoint_as_such(run, tmp_path):
    lone = tmp_path / "model.ckpt"
    shutil.copy(run.last_checkpoint(), lone)
    with pytest.raises(DataError) as e:
        app.load_run(lone)
    assert str(e.value).startswith(f"{lone} is a checkpoint outside a run directory")
    loaded = app.load_run(run.path)
    assert loaded.run_dir == run.path and loaded.readout is not None and not loaded.module.training


def test_check_resumable_names_the_first_mismatch(run):
    module, _ = app.rebuild(run, trained=False)
    state = load_checkpoint(run.last_checkpoint())
    app.check_resumable(module, state, "last.ckpt")  # the run's own settings fit
    state["state_dict"]["model.linear.weight"] = torch.zeros(K + 1, 64)
    with pytest.raises(ConfigError) as e:
        app.check_resumable(module, state, "last.ckpt")
    assert f"model.linear.weight: [{K + 1}, 64] in the checkpoint, [{K}, 64] here" in str(e.value)


class _Logger:
    """What log_final talks to: log_metrics and save (no images, no histograms)."""

    def __init__(self):
        self.logged, self.saved = [], 0

    def log_metrics(self, metrics, step):
        self.logged.append((metrics, step))

    def save(self):
        self.saved += 1


def test_log_final_sends_the_numbers_under_final_with_each_k_of_the_sparse_probe():
    logger = _Logger()
    trainer = type("T", (), {"loggers": [logger], "global_step": 42})()
    metrics = {"probe_accuracy": 0.9, "dead_components": 2, "sparse_probe_accuracy": {"1": 0.4, "5": 0.7},
               "model": "sae", "kmeans": True, "epoch_seconds": [1.0]}  # fmt: skip
    app.log_final(trainer, metrics)
    ((sent, step),) = logger.logged
    assert step == 42 and logger.saved == 1
    assert sent == {"final/probe_accuracy": 0.9, "final/dead_components": 2,
                    "final/sparse_probe_accuracy_k1": 0.4, "final/sparse_probe_accuracy_k5": 0.7}  # fmt: skip


def test_main_refuses_bad_settings_with_one_line_and_exit_2(tmp_path, capsys):
    code = app.main(["--trainer.default_root_dir", str(tmp_path), "--model.n_components", "1"], [DEFAULT_CONFIG])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["error: model.n_components must be an integer >= 2 (got 1)"]
    assert not any(tmp_path.iterdir())


def test_the_runs_config_has_no_resume_bookkeeping(run):
    config = yaml.safe_load(run.config_path.read_text())
    assert config["ckpt_path"] is None and config["trainer"]["logger"]["init_args"]["resume_step"] is None
    assert json.loads(run.metrics_path.read_text())["n_components"] == K
