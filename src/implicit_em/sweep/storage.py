"""Where a study lives: an SQLite file (the default), any database URL Optuna takes (PostgreSQL for several
machines), or Optuna's journal file on a shared filesystem; all with heartbeats, so the trials of a worker that
was killed (SIGKILL, pre-emption) are marked FAIL by the next worker that looks, never left RUNNING."""

from __future__ import annotations

import functools
import random
import re
import time
import warnings
from collections.abc import Callable
from pathlib import Path

from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError
from optuna.storages import RDBStorage
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import TrialState

from implicit_em.errors import ConfigError

#: seconds between a running trial's heartbeats; a trial whose last one is GRACE_BEATS beats old is failed
HEARTBEAT_S = 10
GRACE_BEATS = 6
#: how long SQLite waits for another process's lock before an operation is retried, and for how long in all
SQLITE_TIMEOUT_S = 60
LOCK_RETRY_S = 600
JOURNAL = "journal:"
SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")


def default_storage(root: str | Path, study: str) -> str:
    """``sqlite:///<root>/<study>.db`` (absolute)."""
    return f"sqlite:///{(Path(root) / f'{study}.db').resolve()}"


def normalize(url: str) -> str:
    """The storage as given (``journal:PATH``, a ``.log`` path, a database URL, or an SQLite file's path) spelt
    as this module reads it: ``journal:/abs/path``, ``sqlite:////abs/path`` or the URL itself."""
    if url.startswith(JOURNAL) or ("://" not in url and url.endswith(".log")):
        path = url[len(JOURNAL) :] if url.startswith(JOURNAL) else url
        if not path:
            raise ConfigError("--storage journal:PATH needs a file path (e.g. journal:/shared/study.log)")
        return JOURNAL + str(Path(path).resolve())
    if "://" not in url:
        if url.endswith(SQLITE_SUFFIXES):
            return f"sqlite:///{Path(url).resolve()}"
        raise ConfigError(
            f"--storage {url}: not a storage; give sqlite:///FILE.db, a database URL "
            "(postgresql+psycopg2://user:password@host/db), or journal:FILE.log"
        )
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        return f"sqlite:///{Path(url[len('sqlite:///') :]).resolve()}"
    return url


def local_file(url: str) -> Path | None:
    """The file a normalised storage URL lives in (SQLite, journal), or None for a database server."""
    if url.startswith(JOURNAL):
        return Path(url[len(JOURNAL) :])
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        return Path(url[len("sqlite:///") :])
    return None


def masked(url: str) -> str:
    """The URL with its password replaced by ``***`` (for messages and tables)."""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)


def open_storage(url: str, heartbeat_s: int = HEARTBEAT_S):
    """The Optuna storage of a normalised URL (:func:`normalize`), with heartbeats every ``heartbeat_s`` seconds
    and a grace of ``GRACE_BEATS`` beats. Problems a user can fix (a missing driver, no connection) are a
    :class:`ConfigError` naming the storage."""
    with warnings.catch_warnings():  # Optuna calls heartbeats experimental
        warnings.simplefilter("ignore", ExperimentalWarning)
        return _open(url, heartbeat_s, GRACE_BEATS * heartbeat_s)


def _open(url: str, heartbeat_s: int, grace: int):
    path = local_file(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    if url.startswith(JOURNAL):
        return HeartbeatJournalStorage(JournalFileBackend(str(path)), heartbeat_s, grace)
    try:
        if url.startswith("sqlite"):  # two processes making a new file's tables at once: one retries
            return _retry_startup(lambda: SQLiteStorage(url, engine_kwargs={"connect_args": {"timeout": SQLITE_TIMEOUT_S}},
                                                        heartbeat_interval=heartbeat_s, grace_period=grace))  # fmt: skip
        return _retry_startup(lambda: _rdb_storage(url, heartbeat_s, grace))
    except ModuleNotFoundError as e:
        raise ConfigError(f"--storage {masked(url)} needs the Python package {e.name}: pip install "
                          "'implicit-em[sweep]' (psycopg2-binary for PostgreSQL)") from None  # fmt: skip
    except Exception as e:  # sqlalchemy's errors: a server that does not answer, a wrong password or database
        cause = e.__cause__ or e
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise ConfigError(f"--storage {masked(url)}: cannot open the study's database ({first})") from None


def _rdb_storage(url: str, heartbeat_s: int, grace: int):
    return RDBStorage(url, engine_kwargs={"pool_pre_ping": True}, heartbeat_interval=heartbeat_s, grace_period=grace)


def _retry_startup(make: Callable, tries: int = 4):
    """Several machines creating the same tables at once may collide once; the next try finds them made."""
    for i in range(tries):
        try:
            return make()
        except ModuleNotFoundError:
            raise
        except Exception as e:
            if i == tries - 1 or "connect" in str(e).lower():
                raise
            time.sleep(1 + random.random() * 2)


# -- SQLite: several processes, one file --------------------------------------------------------------------
def is_lock_error(e: BaseException) -> bool:
    """Whether ``e`` (or its cause) is SQLite's "database is locked" / busy (another process held the file)."""
    text = f"{e} {e.__cause__}".lower()
    return "database is locked" in text or "database table is locked" in text or "busy" in text


def waits_out_locks(method: Callable) -> Callable:
    """``method`` retried with growing random pauses while SQLite reports a lock, up to ``LOCK_RETRY_S`` in all.
    A failed SQLite operation is rolled back whole, so trying it again is safe."""

    @functools.wraps(method)
    def retried(self, *args, **kwargs):
        start, pause = time.monotonic(), 0.05
        while True:
            try:
                return method(self, *args, **kwargs)
            except Exception as e:
                if not is_lock_error(e) or time.monotonic() - start > LOCK_RETRY_S:
                    raise
                time.sleep(pause * (1 + random.random()))
                pause = min(pause * 2, 2.0)

    return retried


class SQLiteStorage(RDBStorage):
    """Optuna's RDBStorage on an SQLite file, every operation retried while another process holds the lock."""


#: the private operations Optuna's caching layer calls on the storage directly
CACHED_CALLS = ("_get_stale_trial_ids", "_get_trials", "_create_new_trial", "_set_trial_param", "_get_best_trial_id")
for _name in dir(RDBStorage):
    if (_name.startswith(("get_", "set_", "create_", "delete_", "record_")) or _name in CACHED_CALLS) and (
        _name not in ("get_heartbeat_interval", "get_heartbeat_stale_trial_callback", "get_failed_trial_callback")
    ):
        setattr(SQLiteStorage, _name, waits_out_locks(getattr(RDBStorage, _name)))


# -- the journal file: heartbeats kept in the journal itself ------------------------------------------------
HEARTBEAT_ATTR = "implicit_em:heartbeat"


class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """Optuna's journal storage with heartbeats: each beat is the trial's system attribute
    ``implicit_em:heartbeat`` (the wall time), so every machine sharing the file sees it; a RUNNING trial
    whose last beat (or start) is older than the grace period is stale. The machines' clocks must agree
    to within the grace period (NTP)."""

    def __init__(self, backend, heartbeat_s: int, grace_s: int):
        super().__init__(backend)
        self.heartbeat_s, self.grace_s = heartbeat_s, grace_s

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            self.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())
        except UpdateFinishedTrialError:
            pass

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now = time.time()
        stale = []
        for t in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            beat = t.system_attrs.get(HEARTBEAT_ATTR)
            if beat is None and t.datetime_start is not None:
                beat = t.datetime_start.timestamp()
            if beat is not None and now - beat > self.grace_s:
                stale.append(t._trial_id)
        return stale

    def get_heartbeat_interval(self) -> int | None:
        return self.heartbeat_s

    def get_heartbeat_stale_trial_callback(self):
        return None
