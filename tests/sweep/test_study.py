"""Studies with worker processes: two workers on a real PostgreSQL server (SQLite where none can start), one of
them killed mid-trial; a whole sweep on SQLite killed and the same command run again; exactly N COMPLETE trials,
the killed ones FAIL."""

from __future__ import annotations

import json
import os
import runpy
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna", reason="sweeps need the optional extra: pip install 'implicit-em[sweep]'")

from optuna.trial import TrialState  # noqa: E402

from implicit_em.sweep.study import Worker, counts  # noqa: E402
from tests.conftest import REPO  # noqa: E402
from tests.sweep.postgres import NoServer, postgres_server  # noqa: E402

#: a trial of a few seconds: digits, one epoch, 8 components, the fast probe, no KMeans or SAE numbers
FAST = ["--trainer.max_epochs", "1", "--model.n_components", "8", "--report.kmeans", "false",
        "--report.probe_method", "torch", "--report.sae_metrics", "false", "--components.every_n_epochs", "0"]  # fmt: skip


def sqlite(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'study.db'}"


def sweep_command(tmp_path: Path, url: str, study: str, trials: int, workers: int, *extra: str) -> list[str]:
    space = tmp_path / "space.yaml"
    space.write_text("params:\n  model.net.lambda_tc: {type: float, low: 0.1, high: 10.0, log: true}\n")
    return [sys.executable, str(REPO / "scripts" / "sweep.py"), "--space", str(space), "--study", study,
            "--storage", url, "--trials", str(trials), "--workers", str(workers),
            "--root", str(tmp_path / "runs"), "--pruner", "none", "--no-wandb", "--heartbeat", "1", *extra,
            "--", *FAST, "--trainer.callbacks+=tests.sweep.hold.HoldUntilReleased"]  # fmt: skip


def start(command: list[str], log: Path) -> subprocess.Popen:
    """The sweep as a process of its own; every trial holds at its start until ``release(tmp_path)``."""
    env = {k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"}
    # the repository (tests.sweep.hold), then the caller's path (a clone's src)
    path = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.update(WANDB_MODE="offline", MPLBACKEND="Agg", OMP_NUM_THREADS="1", PYTHONPATH=path,
               IMPLICIT_EM_TEST_RELEASE=str(log.parent / "release"))  # fmt: skip
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip


def release(tmp_path: Path) -> None:
    (tmp_path / "release").touch()


def load(url: str, study: str) -> optuna.Study:
    """The study, through the sweep's own opener (it waits out a sweep that is making a file's tables)."""
    from implicit_em.sweep.storage import open_storage

    return optuna.load_study(study_name=study, storage=open_storage(url, 60))


def wait_for_running(url: str, study: str, n: int, proc: subprocess.Popen, log: Path, limit: float = 300):
    """Wait until ``n`` trials are RUNNING with their run directory known (they hold until released)."""
    from sqlalchemy.exc import SQLAlchemyError

    from implicit_em.sweep.storage import open_storage

    deadline, storage = time.monotonic() + limit, None
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the sweep ended early: {log.read_text()[-2000:]}"
        if not url.startswith("sqlite:///") or Path(url.removeprefix("sqlite:///")).is_file():
            try:  # opened once: each opening reads Optuna's schema migrations, a tenth of a second of CPU
                storage = storage or open_storage(url, 60)
                running = optuna.load_study(study_name=study, storage=storage).get_trials(states=(TrialState.RUNNING,))
            except (KeyError, SQLAlchemyError):  # the study or its tables are not made yet
                running = []
            if len([t for t in running if "run_dir" in t.user_attrs]) >= n:
                return running
        time.sleep(0.5)
    raise AssertionError(f"{n} trials were not running within {limit} s: {log.read_text()[-2000:]}")


def check_finished(study: optuna.Study, n: int) -> list[optuna.trial.FrozenTrial]:
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(done) == n, [t.state.name for t in study.trials]
    assert TrialState.RUNNING not in [t.state for t in study.trials]
    dirs = [t.user_attrs["run_dir"] for t in done]
    assert len(set(dirs)) == n
    for t in done:
        metrics = json.loads((Path(t.user_attrs["run_dir"]) / "metrics.json").read_text())
        assert metrics["val_probe_accuracy"] == t.value and metrics["scored_on"] == "val"
        assert t.user_attrs["command"].startswith("python scripts/train.py --trainer.max_epochs 1")
    return done


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


@pytest.fixture(scope="module")
def shared_url():
    """A real PostgreSQL server where one can start (Debian's postgresql), else an SQLite file, with a warning
    that says why PostgreSQL went untested."""
    try:
        with postgres_server() as url:
            yield url
    except NoServer as reason:
        warnings.warn(f"two workers ran on SQLite, not PostgreSQL: {reason}", stacklevel=1)
        yield None


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the worker processes through /proc (Linux)")
def test_two_workers_finish_the_study_when_one_is_killed_mid_trial(tmp_path, shared_url):
    """Two workers share one study (on PostgreSQL where a server starts): worker 0 in the sweep's own process,
    worker 1 in a process of its own, SIGKILLed mid-trial: the sweep exits 0 with exactly 2 COMPLETE trials in
    distinct run folders (each metrics.json holding the trial's value, scored on val), the killed trial FAILs, the
    note, the best value and the reproduce command are printed, and the table (beside an SQLite file, else under
    --root) and the history plot are written."""
    url = shared_url or sqlite(tmp_path)
    log = tmp_path / "sweep.log"
    proc = start(sweep_command(tmp_path, url, "two", 2, 2), log)
    try:
        running = wait_for_running(url, "two", 2, proc, log)
        workers = children(proc.pid)
        assert len(workers) == 1  # worker 1; worker 0 is the sweep's process
        os.kill(workers[0], signal.SIGKILL)
        release(tmp_path)
        assert proc.wait(timeout=600) == 0, log.read_text()[-2000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    study = load(url, "two")
    check_finished(study, 2)
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    assert len(failed) == 1 and failed[0].number in [t.number for t in running]
    out = log.read_text()
    assert f"note: worker 1 was killed (signal {signal.SIGKILL.value})" in out
    assert "reproduce: python scripts/train.py" in out and f"best val_probe_accuracy {study.best_value:.6g}" in out
    files = tmp_path if url.startswith("sqlite") else tmp_path / "runs"
    table = (files / "two_trials.csv").read_text().splitlines()
    assert table[0].startswith("trial,state,value") and len(table) == 1 + len(study.trials)
    assert (files / "two_history.png").is_file()


def test_the_same_command_finishes_a_killed_sweep(tmp_path, monkeypatch, capsys):
    """The sweep process SIGKILLed mid-trial; the same command again (in this process: the kill is the real
    process's) waits out the killed trial's heartbeat, marks it FAIL and completes the study in a new folder."""
    log = tmp_path / "first.log"
    command = sweep_command(tmp_path, sqlite(tmp_path), "again", 1, 1)
    proc = start(command, log)
    try:
        killed = wait_for_running(sqlite(tmp_path), "again", 1, proc, log)[0]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    release(tmp_path)
    monkeypatch.setenv("IMPLICIT_EM_TEST_RELEASE", str(tmp_path / "release"))
    monkeypatch.setattr("implicit_em.sweep.study.cores", lambda: 1)  # one torch thread, as this test worker has
    main = runpy.run_path(command[1])["main"]
    assert main(command[2:]) == 0, capsys.readouterr()
    study = load(sqlite(tmp_path), "again")
    done = check_finished(study, 1)
    assert study.trials[killed.number].state == TrialState.FAIL
    assert killed.user_attrs["run_dir"] not in [t.user_attrs["run_dir"] for t in done]  # never reused


def test_a_worker_starts_no_trial_beyond_n(tmp_path, monkeypatch):
    """Trials RUNNING elsewhere count toward N: with N - 1 COMPLETE and one RUNNING (fresh heartbeat), a worker
    waits instead of starting another, and ends once the study holds N."""
    from implicit_em.sweep import study as studies

    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 's.db'}", heartbeat_interval=60)
    study = optuna.create_study(study_name="s", storage=storage)
    study.add_trial(optuna.trial.create_trial(value=0.5))
    elsewhere = study.ask()
    storage.record_heartbeat(elsewhere._trial_id)
    waits = []

    def finish_elsewhere(seconds):
        waits.append(seconds)
        study.tell(elsewhere, 0.7)

    monkeypatch.setattr(studies.time, "sleep", finish_elsewhere)
    Worker(study, plan=None, space=None, n_trials=2, poll_s=0.01).run()  # starting a trial would fail: no plan
    assert waits == [0.01] and counts(study)["COMPLETE"] == 2 and len(study.trials) == 2


def test_a_study_made_for_another_metric_or_direction_is_refused(tmp_path):
    from implicit_em.errors import ConfigError
    from implicit_em.sweep.study import open_study

    url = f"sqlite:///{tmp_path / 's.db'}"
    open_study("s", url, "maximize", "val_probe_accuracy")
    assert open_study("s", url, "maximize", "val_probe_accuracy").user_attrs["metric"] == "val_probe_accuracy"
    with pytest.raises(ConfigError, match="optimises val_probe_accuracy, not val_fvu"):
        open_study("s", url, "minimize", "val_fvu")
    with pytest.raises(ConfigError, match="pass --direction maximize"):
        open_study("s", url, "minimize", "val_probe_accuracy")


#: a stand-in worker process: notes that it is ready, then writes which signal ended it
STAND_IN = """import pathlib, signal, sys, time
out = pathlib.Path(sys.argv[1])
def stop(signum, frame):
    out.write_text(signal.Signals(signum).name)
    sys.exit(0)
signal.signal(signal.SIGINT, stop)
signal.signal(signal.SIGTERM, stop)
out.with_suffix(".ready").touch()
time.sleep(120)
"""


@pytest.mark.parametrize("sent, stops", [(signal.SIGTERM, SystemExit), (signal.SIGINT, KeyboardInterrupt)])
def test_a_signal_stops_worker_0_here_and_reaches_every_worker_process(tmp_path, sent, stops):
    """SIGTERM or SIGINT to the sweep's process while its worker 0 runs: each worker process gets the signal and
    is waited for, worker 0 stops (SystemExit 143, KeyboardInterrupt), and the handlers are restored."""
    from implicit_em.sweep.study import run_workers

    outs = [tmp_path / f"w{i}.txt" for i in (1, 2)]
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def own():
        deadline = time.monotonic() + 60
        while not all(o.with_suffix(".ready").exists() for o in outs) and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), sent)
        time.sleep(60)  # the handler stops this
        raise AssertionError("worker 0 was not stopped")

    started = time.monotonic()
    with pytest.raises(stops) as e:
        run_workers([[sys.executable, "-c", STAND_IN, str(o)] for o in outs], 1, own)
    assert time.monotonic() - started < 50
    assert stops is not SystemExit or e.value.code == 128 + signal.SIGTERM
    assert [o.read_text() for o in outs] == [sent.name] * 2  # every process got it, and had ended by the return
    assert {s: signal.getsignal(s) for s in before} == before
