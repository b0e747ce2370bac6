"""Where a study lives: URL forms, SQLite that waits out another process's lock, heartbeats in the journal
file. (Two workers on a real PostgreSQL server, one killed mid-trial: tests/sweep/test_study.py.)"""

from __future__ import annotations

import sqlite3
import threading
import time

import pytest

optuna = pytest.importorskip("optuna", reason="sweeps need the optional extra: pip install 'implicit-em[sweep]'")

from optuna.storages import fail_stale_trials  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from implicit_em.errors import ConfigError  # noqa: E402
from implicit_em.sweep import storage as storages  # noqa: E402


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
