"""Where a study lives: URL forms, SQLite that waits out another process's lock, heartbeats in the journal
file, and a two-worker study on a real PostgreSQL server (started and stopped here where one can be)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna", reason="sweeps need the optional extra: pip install 'implicit-em[sweep]'")

from optuna.storages import fail_stale_trials  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from implicit_em.errors import ConfigError  # noqa: E402
from implicit_em.sweep import storage as storages  # noqa: E402
from tests.conftest import REPO, run_script  # noqa: E402

#: Debian's and Ubuntu's PostgreSQL server binaries (the newest installed version)
PG_BIN = max(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name) if p.parent.name.isdigit()
             else 0, default=Path("/usr/lib/postgresql/15/bin"))  # fmt: skip


def test_storage_urls_normalise(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storages.normalize("journal:s.log") == f"journal:{tmp_path / 's.log'}"
    assert storages.normalize("shared/s.log") == f"journal:{tmp_path / 'shared/s.log'}"
    assert storages.normalize("study.db") == f"sqlite:///{tmp_path / 'study.db'}"
    assert storages.normalize("sqlite:///rel/s.db") == f"sqlite:///{tmp_path / 'rel/s.db'}"
    url = "postgresql+psycopg2://me:secret@db.example:5432/optuna"
    assert storages.normalize(url) == url and storages.local_file(url) is None
    assert storages.masked(url) == "postgresql+psycopg2://me:***@db.example:5432/optuna"
    assert storages.default_storage("runs", "s") == f"sqlite:///{tmp_path / 'runs' / 's.db'}"
    with pytest.raises(ConfigError, match="not a storage"):
        storages.normalize("somewhere")


def test_a_database_that_does_not_open_is_one_line():
    with pytest.raises(ConfigError, match=r"cannot open the study's database|needs the Python package") as caught:
        storages.open_storage("postgresql+psycopg2://me:secret@127.0.0.1:1/none")
    assert "secret" not in str(caught.value)


def test_sqlite_waits_out_another_process_holding_the_lock(tmp_path, monkeypatch):
    """SQLite gives up on a lock after its timeout; the storage tries again until the holder lets go."""
    monkeypatch.setattr(storages, "SQLITE_TIMEOUT_S", 0.05)
    monkeypatch.setattr(storages, "LOCK_RETRY_S", 30)
    path = tmp_path / "s.db"
    storage = storages.open_storage(f"sqlite:///{path}", heartbeat_s=5)
    study = optuna.create_study(study_name="s", storage=storage)
    holder = sqlite3.connect(path, timeout=0.05, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")
    release = threading.Timer(1.0, lambda: holder.execute("COMMIT"))
    release.start()
    start = time.monotonic()
    trial = study.ask()  # would raise "database is locked" after 0.05 s without the retries
    waited = time.monotonic() - start
    release.join()
    holder.close()
    assert waited >= 0.8 and trial.number == 0
    assert [t.state for t in study.get_trials()] == [TrialState.RUNNING]


def test_the_journal_file_fails_a_trial_whose_heartbeats_stopped(tmp_path):
    from optuna.storages.journal import JournalFileBackend

    storage = storages.HeartbeatJournalStorage(JournalFileBackend(str(tmp_path / "s.log")), heartbeat_s=1, grace_s=1)
    study = optuna.create_study(study_name="s", storage=storage)
    silent, beating = study.ask(), study.ask()
    time.sleep(1.5)
    storage.record_heartbeat(beating._trial_id)
    fail_stale_trials(study)
    states = {t.number: t.state for t in study.get_trials()}
    assert states == {silent.number: TrialState.FAIL, beating.number: TrialState.RUNNING}
    # a second process reading the same file sees the same
    again = optuna.load_study(
        study_name="s", storage=storages.open_storage(storages.normalize(str(tmp_path / "s.log")))
    )
    assert [t.state for t in again.get_trials()] == [TrialState.FAIL, TrialState.RUNNING]


# -- a real PostgreSQL server --------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    """A PostgreSQL server of Debian's postgresql package in a temporary folder on a free port (as the user
    postgres when this runs as root), stopped at the end; skipped with its reason where none can start."""
    pytest.importorskip("psycopg2", reason="PostgreSQL needs psycopg2-binary (the sweep extra)")
    if not (PG_BIN / "initdb").is_file():
        pytest.skip(f"no PostgreSQL server binaries in {PG_BIN} (apt-get install postgresql)")
    as_postgres = []
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            pytest.skip("running as root and no runuser to start PostgreSQL as the user postgres")
        as_postgres = ["runuser", "-u", "postgres", "--"]
    folder = Path(tempfile.mkdtemp(prefix="iem-pg-"))
    if as_postgres:
        shutil.chown(folder, "postgres")
    data, port = folder / "data", _free_port()
    init = subprocess.run([*as_postgres, str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust"],
                          capture_output=True, text=True)  # fmt: skip
    if init.returncode:
        shutil.rmtree(folder, ignore_errors=True)
        pytest.skip(f"initdb failed: {init.stderr.strip().splitlines()[-1:]}")
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1"
    start = subprocess.run([*as_postgres, str(PG_BIN / "pg_ctl"), "-D", str(data), "-o", options, "-l",
                            str(folder / "log"), "-w", "-t", "60", "start"], capture_output=True, text=True)  # fmt: skip
    if start.returncode:
        log = (folder / "log").read_text().strip().splitlines()[-1:] if (folder / "log").is_file() else []
        shutil.rmtree(folder, ignore_errors=True)
        pytest.skip(f"PostgreSQL did not start: {start.stderr.strip()} {log}")
    try:
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_postgres, str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True)  # fmt: skip
        shutil.rmtree(folder, ignore_errors=True)


def test_two_workers_share_a_study_on_postgresql(postgres_url, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("params:\n  model.net.lambda_tc: {type: float, low: 0.1, high: 10.0, log: true}\n")
    run = run_script(
        REPO / "scripts" / "sweep.py", "--space", space, "--study", "pg", "--storage", postgres_url, "--trials", "2",
        "--workers", "2", "--root", tmp_path / "runs", "--pruner", "none", "--no-wandb", "--",
        "--trainer.max_epochs", "1", "--model.n_components", "8", "--report.kmeans", "false",
        "--report.probe_method", "torch", "--report.sae_metrics", "false", "--components.every_n_epochs", "0",
        timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    study = optuna.load_study(study_name="pg", storage=postgres_url)
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(done) == 2 and len({t.user_attrs["run_dir"] for t in done}) == 2
    for t in done:
        metrics = json.loads((Path(t.user_attrs["run_dir"]) / "metrics.json").read_text())
        assert metrics["val_probe_accuracy"] == t.value and metrics["scored_on"] == "val"
    # no file storage: the table goes under --root
    assert (tmp_path / "runs" / "pg_trials.csv").is_file()
    assert f"best val_probe_accuracy {study.best_value:.6g}" in run.stdout
