"""Loggers that never hang a run (W&B offline by itself), the CSV log's columns. (Atomic checkpoint writes:
tests/test_checkpoints.py.)"""

import csv
import os
import time

import pytest

from implicit_em.run import loggers
from tests.conftest import QUIET, Run, main_in_process

SMALL = ["--trainer.max_epochs", "1", *QUIET]


def no_wandb_env(tmp_path) -> dict:
    """No API key anywhere, no WANDB_MODE, and W&B's server address unreachable (a closed local port): the
    changes to this process's environment (None: unset) for :func:`~tests.conftest.main_in_process`."""
    env = {k: None for k in [*os.environ, "WANDB_MODE", "WANDB_API_KEY"] if k.startswith("WANDB_") or k == "NETRC"}
    env.update(
        NETRC=str(tmp_path / "no-netrc"),
        WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"),
        WANDB_CACHE_DIR=str(tmp_path / "wandb-cache"),
        WANDB_BASE_URL="http://127.0.0.1:9",
        MPLBACKEND="Agg",
    )
    return env


def timed_train(root, *args, env) -> tuple[Run, float]:
    """scripts/train.py's ``main`` in this process, and then what the process's exit does for W&B (finish its
    run: the files of an offline run are complete); the seconds both took."""
    import wandb

    start = time.perf_counter()
    run = main_in_process("--trainer.default_root_dir", str(root), *SMALL, *args, env=env)
    wandb.finish()  # a no-op without a W&B run
    return run, time.perf_counter() - start


@pytest.fixture(scope="module")
def csv_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("csv")
    return timed_train(tmp / "runs", env=no_wandb_env(tmp))


def test_wandb_without_key_or_network_logs_offline_quickly_and_a_resume_continues_the_run(csv_run, tmp_path):
    """With no API key, no WANDB_MODE and no network, a run with the W&B logger says once that it logs offline,
    keeps its records in <root>/wandb/offline-run-* (a *.wandb file), its W&B id in the run folder and its CSV
    alongside, and costs at most 30 s more than the same run with the CSV log alone; resumed, it goes on in the
    same run directory and the same W&B run (a second offline run under the same id)."""
    csv_only, csv_seconds = csv_run
    assert csv_only.returncode == 0, csv_only.stderr[-2000:]
    root, env = tmp_path / "runs", no_wandb_env(tmp_path)
    run, seconds = timed_train(root, "--config", "configs/logger/wandb.yaml", env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stderr.count("W&B: no API key; logging offline") == 1, run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    offline = list((root / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and offline[0].is_dir(), list(root.rglob("*"))[:50]
    assert any(offline[0].glob("*.wandb"))  # the run's records, for a later `wandb sync`
    assert run.metrics_path.is_file() and (run.metrics_path.parent / "wandb_id").is_file()
    assert (run.metrics_path.parent / "metrics.csv").is_file()  # CSV alongside
    # W&B should add about 10 s at most; timings on a shared machine are noisy, so the bound is generous
    assert seconds - csv_seconds < 30, (seconds, csv_seconds)

    # resumed, the run goes on in the same run directory and the same W&B run (its id)
    run_id = (run.metrics_path.parent / "wandb_id").read_text().strip()
    resumed, _ = timed_train(
        root, "--config", "configs/logger/wandb.yaml", "--trainer.max_epochs", "2", "--ckpt_path", "last", env=env
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert resumed.metrics_path == run.metrics_path
    runs = sorted(p.name for p in (root / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(name.endswith(run_id) for name in runs), (runs, run_id)


def test_wandb_logger_goes_offline_when_unreachable(monkeypatch, tmp_path, capsys):
    # a key is present but api.wandb.ai cannot be reached: offline too, without waiting for the network
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    start = time.perf_counter()
    assert not loggers.reachable(("127.0.0.1", 9), timeout=2.0)
    assert time.perf_counter() - start < 3
    monkeypatch.setattr(loggers, "reachable", lambda *a, **k: False)
    logger = loggers.WandbLogger(project="test", save_dir=str(tmp_path))
    assert "api.wandb.ai unreachable; logging offline" in capsys.readouterr().err
    assert logger._offline


def test_wandb_api_key_detection(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert not loggers.wandb_api_key_available()
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password abc\n")
    assert loggers.wandb_api_key_available()
    monkeypatch.setenv("NETRC", str(tmp_path / "missing"))
    monkeypatch.setenv("WANDB_API_KEY", "abc")
    assert loggers.wandb_api_key_available()


def test_csv_log_has_the_validation_diagnostics(csv_run):
    run, _ = csv_run
    assert run.returncode == 0, run.stderr[-2000:]
    with open(run.metrics_path.parent / "metrics.csv") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames
        rows = list(reader)
    for column in ("val/responsibility_entropy", "val/dead_components", "val/redundancy"):
        assert column in header, header
        assert any(row[column] not in ("", None) for row in rows), column


def test_every_new_run_gets_its_own_wandb_id_and_a_resume_keeps_its_own():
    """The end-to-end version (two roots, a resume) is ../shared/checks/runfiles; here the rule itself."""
    from jsonargparse import Namespace

    from implicit_em.run.cli import ImplicitEMCLI

    def config(**init_args):
        logger = Namespace(class_path="implicit_em.run.loggers.WandbLogger", init_args=Namespace(**init_args))
        return Namespace(trainer=Namespace(logger=[Namespace(class_path="implicit_em.run.loggers.CSVLogger"), logger]))

    a, b, resumed = config(project="p"), config(project="p"), config(project="p", id="kept1234")
    for cfg in (a, b, resumed):
        ImplicitEMCLI._new_wandb_ids(cfg)
    ids = [cfg.trainer.logger[1].init_args.id for cfg in (a, b)]
    assert ids[0] != ids[1] and all(len(i) == 12 for i in ids)
    assert resumed.trainer.logger[1].init_args.id == "kept1234"


def test_a_resumed_csv_logger_keeps_the_rows_before_the_checkpoint(tmp_path):
    first = loggers.CSVLogger(str(tmp_path), version="version_0")
    for step in (10, 21, 32):
        first.log_metrics({"train/loss": float(step)}, step)
    first.save()
    resumed = loggers.CSVLogger(str(tmp_path), version="version_0")
    resumed.resume_from(22)  # the checkpoint was at step 22: step 32 is trained again, and logged once
    resumed.log_metrics({"train/loss": 1.0}, 32)
    resumed.save()
    with open(tmp_path / "implicit_em" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["step"], r["train/loss"]) for r in rows] == [("10", "10.0"), ("21", "21.0"), ("32", "1.0")]


def test_a_resumed_tensorboard_logger_purges_events_from_the_checkpoints_step(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = loggers.TensorBoardLogger(str(tmp_path), version="version_0")
    for step in (10, 21, 32):
        first.log_metrics({"train/loss": float(step)}, step)
    first.finalize("success")
    resumed = loggers.TensorBoardLogger(str(tmp_path), version="version_0")
    resumed.resume_from(22)  # events at step 22 and after, from the first process, are dropped by readers
    resumed.log_metrics({"train/loss": 1.0}, 32)
    resumed.finalize("success")
    events = EventAccumulator(str(tmp_path / "implicit_em" / "version_0"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(10, 10.0), (21, 21.0), (32, 1.0)]
