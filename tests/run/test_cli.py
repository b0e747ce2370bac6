"""The main job end to end: scripts/train.py, metrics.json, composition of configs, clear errors."""

import json
import math
from pathlib import Path

import pytest

from implicit_em.run.checkpoints import find_last_checkpoint
from tests.conftest import REPO, Run, call_in_process

REQUIRED = [
    "probe_accuracy", "dead_components", "redundancy", "responsibility_entropy", "l0_density",
    "n_parameters", "final_loss", "epoch_seconds", "cluster_accuracy", "nmi",
    "kmeans_cluster_accuracy", "kmeans_nmi", "probe_method",
]  # fmt: skip


def test_one_epoch_smoke_writes_metrics_json(train, tmp_path):
    """The main job's defaults for one epoch, through scripts/train.py's ``main`` in this process (its real
    processes: the refused run below, the SIGKILL resume in test_resume.py, the DDP runs in test_distributed.py)."""
    run = train("--trainer.max_epochs", "1", "--components.every_n_epochs", "10")  # drawn at the end
    assert run.returncode == 0, run.stderr[-2000:]
    path = run.metrics_path
    assert path.is_absolute() and path.name == "metrics.json" and path.is_relative_to(tmp_path)
    m = run.metrics
    for key in REQUIRED:
        assert key in m, key
    assert 0.5 < m["probe_accuracy"] <= 1.0
    assert m["n_parameters"] == 64 * 64 + 64
    assert len(m["epoch_seconds"]) == 1 and m["epoch_seconds"][0] > 0
    assert (path.parent / "metrics.csv").is_file() and (path.parent / "components.png").is_file()
    assert find_last_checkpoint(tmp_path) is not None


def test_overrides_and_composed_configs_reach_the_model(train):
    run = train(
        "--config", "configs/model/sae.yaml", "--trainer.max_epochs", "2",
        "--model.n_components", "16", "--seed_everything", "7", "--report.kmeans", "false",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    m = run.metrics
    assert m["model"] == "sae" and m["n_components"] == 16 and m["seed"] == 7
    assert m["n_parameters"] == 64 * 16 + 16 + 16 * 64 + 64
    assert len(m["epoch_seconds"]) == 2 and "final_mse" in m and "kmeans_nmi" not in m


def test_help_documents_options():
    from tests.conftest import main_in_process

    run = main_in_process("--help")
    assert run.returncode == 0, run.stderr[-2000:]
    for option in (
        "--model",
        "--data",
        "--trainer.max_epochs",
        "--ckpt_path",
        "--report.probe_method",
        "--components.every_n_epochs",
    ):
        assert option in run.stdout, option
    assert "<function" not in run.stdout  # the optimiser's default by its import path
    assert "'optimizer': implicit_em.training.module.adam" in " ".join(run.stdout.split())


@pytest.mark.parametrize(
    "args, key",
    [
        (["--data.batch_size", "1"], "data.batch_size"),
        (["--model.n_components", "1"], "model.n_components"),
        (["--model.net.lambda_var", "-1"], "model.net.lambda_var"),
        (["--model.net.eps", "0"], "model.net.eps"),
        (["--model.net.activation", "tanhh"], "model.net.activation"),
        (["--model.optimizer", "adagradx"], "optimizer"),
        (["--data.val_fraction", "1.5"], "data.val_fraction"),
        (["--model.no_such_key", "3"], "no_such_key"),
        (["--trainer.devices", "3", "--trainer.accelerator", "cpu"], "data.batch_size"),
        (["--report.probe_method", "svm"], "report.probe_method"),
        (["--model.members", '[{"seed": 1}]'], "members"),  # members belong to implicit_em.training.ensemble.Ensemble
        (["--trainer.max_epochs", "-3"], "trainer.max_epochs must be an integer >= -1"),
        (["--trainer.max_steps", "-2"], "trainer.max_steps"),
        (["--trainer.val_check_interval", "-1"], "trainer: You have passed invalid value -1 for val_check_interval"),
    ],
)
def test_invalid_settings_fail_fast_with_one_line(train, args, key):
    run = train(*args, timeout=120)
    assert run.returncode == 2, (run.returncode, run.stderr[-1500:])
    assert "Traceback" not in run.stderr
    lines = [ln for ln in run.stderr.splitlines() if ln.strip()]
    assert lines and key in lines[-1], run.stderr[-1500:]
    assert run.stdout.strip() == "" or "metrics.json" not in run.stdout


def probe_in_process(*args) -> Run:
    """``python scripts/probe.py ARGS`` through its ``main`` (which reads sys.argv) in this process; probe.py's
    real process: tests/run/test_checkpoints.py."""
    import runpy
    import sys

    main = runpy.run_path(str(REPO / "scripts" / "probe.py"))["main"]

    def with_argv(argv):
        saved, sys.argv = sys.argv, ["probe.py", *argv]
        try:
            return main()
        finally:
            sys.argv = saved

    return call_in_process(with_argv, list(args))


def test_probe_script_reproduces_the_runs_metrics_from_its_checkpoint(train, tmp_path):
    run = train("--trainer.max_epochs", "2", "--report.kmeans", "false")
    assert run.returncode == 0, run.stderr[-2000:]
    m = run.metrics
    probe = probe_in_process(m["checkpoint"], "--no-kmeans", "--out", tmp_path / "p.json")
    assert probe.returncode == 0, probe.stderr[-2000:]
    again = json.loads((tmp_path / "p.json").read_text())
    assert probe.stdout.strip() == (tmp_path / "p.json").read_text().strip()  # printed and written alike
    for key in ("probe_accuracy", "dead_components", "redundancy", "cluster_accuracy"):
        assert again[key] == pytest.approx(m[key], rel=1e-6), key
    assert again["global_step"] == 2 * 11 and again["checkpoint"] == str(Path(m["checkpoint"]).resolve())
    missing = probe_in_process(tmp_path / "nope.ckpt")
    assert missing.returncode == 2 and missing.stdout == ""
    err = missing.stderr
    assert "nope.ckpt" in err and "Traceback" not in err and err.count("\n") == 1


def test_bf16_mixed_precision_trains_with_a_float32_objective(train):
    run = train("--trainer.precision", "bf16-mixed", "--trainer.max_epochs", "2", "--report.kmeans", "false")
    assert run.returncode == 0, run.stderr[-2000:]
    m = run.metrics
    assert math.isfinite(m["final_loss"]) and m["probe_accuracy"] > 0.5


def test_more_components_than_training_samples_skips_kmeans_with_a_note(train):
    # test_fraction 0.9 leaves 180 of digits' 1,797 samples, about 160 of them for training
    run = train("--trainer.max_epochs", "1", "--data.test_fraction", "0.9", "--model.n_components", "200",
                "--report.probe_method", "torch")  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    m = run.metrics
    assert m["n_train"] < 200 and m["n_components"] == 200
    assert m["kmeans_skipped"] == f"K = 200 exceeds the {m['n_train']} training samples"
    assert "kmeans_nmi" not in m and "kmeans_cluster_accuracy" not in m
    assert 0 <= m["probe_accuracy"] <= 1 and "nmi" in m  # the rest of the evaluation is there


def test_a_ddp_worker_leaves_without_the_interpreters_shutdown(monkeypatch):
    """A worker rank ends through os._exit(0) once its fit returns (gloo's threads abort a normal shutdown at
    random while rank 0 still evaluates); rank 0 returns normally and prints metrics.json's path."""
    from types import SimpleNamespace

    from implicit_em.run import app

    exits = []

    def fake_cli(global_zero):
        trainer = SimpleNamespace(is_global_zero=global_zero)
        return lambda *a: SimpleNamespace(trainer=trainer, global_zero=global_zero)

    monkeypatch.setattr(app.os, "_exit", lambda code: exits.append(code))
    monkeypatch.setattr(
        app, "fit", lambda cli: SimpleNamespace(metrics_path=Path("m.json")) if cli.global_zero else None
    )
    monkeypatch.setattr(app, "ImplicitEMCLI", fake_cli(False))
    assert app.main([]) == 0 and exits == [0]
    monkeypatch.setattr(app, "ImplicitEMCLI", fake_cli(True))
    assert app.main([]) == 0 and exits == [0]


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "configs" / "model").glob("*.yaml")))
def test_a_model_config_gets_its_own_nets_defaults_and_nothing_from_default_yaml(config, tmp_path):
    """default.yaml's net is the paper's model; a model config switching the class must get the new class's own
    defaults (overridden only by its yaml), not a same-named setting carried over from the paper's model (the
    BatchTopK SAE once got the sparse model's theta momentum 0.9 instead of its own 0.99)."""
    import inspect

    import yaml

    from implicit_em.models.registry import MODELS
    from tests.conftest import fit_in_process

    path = REPO / "configs" / "model" / config
    own = yaml.safe_load(path.read_text())["model"]["init_args"]["net"]
    cli = fit_in_process(tmp_path, "--config", str(path), fit=False)
    net = cli.config["model"]["init_args"]["net"]
    cls = next(c for c in MODELS.values() if f"{c.__module__}.{c.__name__}" == own["class_path"])
    expected = {n: p.default for n, p in inspect.signature(cls).parameters.items()
                if p.default is not inspect.Parameter.empty and n not in ("k", "seed")}  # fmt: skip
    expected.update(own.get("init_args") or {})
    got = {n: v for n, v in dict(net["init_args"]).items() if n in expected}
    assert got == {n: v for n, v in expected.items() if n in got}, config


def test_a_refused_run_prints_its_error_line_alone():
    """A real process: no LightningCLI warning about its args parameter, no "Seed set to", one line, exit 2."""
    from tests.conftest import TRAIN, run_script

    run = run_script(TRAIN, "--model.n_components", "0", timeout=300)
    lines = [ln for ln in (run.stdout + run.stderr).splitlines() if ln.strip()]
    assert run.returncode == 2 and lines == ["error: model.n_components must be an integer >= 2 (got 0)"], lines


def test_a_causal_harvest_missing_a_token_file_is_refused_before_training(train, tmp_path):
    """The end-of-run CE evaluation reads the harvest's window files: their absence is found before any epoch."""
    import numpy as np

    root = tmp_path / "harvest"
    (root / "tokens").mkdir(parents=True)
    np.save(root / "shard-00000.npy", np.random.default_rng(0).standard_normal((400, 8)).astype(np.float32))
    np.save(root / "doc_ids.npy", np.repeat(np.arange(40), 10))
    (root / "manifest.json").write_text(json.dumps({"model_kind": "causal_lm", "model": "/nowhere", "layer": 1}))
    for name in ("windows.npy", "positions.npy", "window_doc_ids.npy"):  # no window_tokens.npy
        np.save(root / "tokens" / name, np.zeros(40, dtype=np.int64))
    run = train("--config", "configs/data/activations.yaml", "--data.root", str(root), "--trainer.max_epochs", "1",
                "--data.batch_size", "64")  # fmt: skip
    assert run.returncode == 2 and "Traceback" not in run.stderr
    (line,) = [ln for ln in run.stderr.splitlines() if ln.strip()]
    assert "window_tokens.npy" in line and "--report.lm_windows 0" in line
    assert not (tmp_path / "runs").exists()  # nothing trained, no run folder
