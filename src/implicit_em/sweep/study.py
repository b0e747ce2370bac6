"""The study and its workers: create or join a study, run trials until it holds N COMPLETE ones, and run W
worker processes on one machine with the cores split between them.

A worker starts a trial only while COMPLETE + RUNNING trials number fewer than N, so the study ends with exactly
N COMPLETE trials however many workers (on however many machines) share it; pruned and failed trials do not
count. A worker killed mid-trial stops beating; after the grace period the next worker that looks marks its trial
FAIL (:mod:`implicit_em.sweep.storage`), so running the same command again finishes the study.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import optuna
from optuna.storages import fail_stale_trials
from optuna.trial import TrialState

from implicit_em.errors import ConfigError, NonFiniteLossError
from implicit_em.sweep.space import SearchSpace
from implicit_em.sweep.trial import TrialPlan, run_trial

SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "none")
#: a median pruner's patience: no pruning before this many COMPLETE trials, nor in a trial's first epoch
STARTUP_TRIALS, WARMUP_EPOCHS = 5, 1
#: the study's user attributes that a later command must match
METRIC_ATTR = "metric"


def make_sampler(name: str, space: SearchSpace, seed: int | None) -> optuna.samplers.BaseSampler:
    """tpe (constant liar: parallel workers do not draw the same point), random, or grid (every combination of
    the discrete values)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if name == "tpe":
            return optuna.samplers.TPESampler(seed=seed, constant_liar=True)
        if name == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        return optuna.samplers.GridSampler(space.grid(), seed=seed)


def make_pruner(name: str) -> optuna.pruners.BasePruner:
    """median: stop a trial whose validation number after an epoch is worse than the median of the earlier
    trials' at the same epoch; none: every trial runs all its epochs."""
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=STARTUP_TRIALS, n_warmup_steps=WARMUP_EPOCHS)
    return optuna.pruners.NopPruner()


def open_study(name: str, storage, direction: str, metric: str, sampler=None, pruner=None) -> optuna.Study:
    """Create the study, or join it when it exists; a study made for another metric or direction is refused."""
    study = optuna.create_study(study_name=name, storage=storage, direction=direction, sampler=sampler,
                                pruner=pruner, load_if_exists=True)  # fmt: skip
    theirs = study.user_attrs.get(METRIC_ATTR)
    if theirs is None:
        study.set_user_attr(METRIC_ATTR, metric)
    elif theirs != metric:
        raise ConfigError(f"--study {name} optimises {theirs}, not {metric}: pass --metric {theirs} or another --study")
    if study.direction.name.lower() != direction:
        raise ConfigError(f"--study {name} is to {study.direction.name.lower()} {metric}, not {direction}: pass "
                          f"--direction {study.direction.name.lower()} or another --study")  # fmt: skip
    return study


def counts(study: optuna.Study) -> dict[str, int]:
    """How many trials are in each state (COMPLETE, RUNNING, FAIL, PRUNED, WAITING)."""
    found = {s.name: 0 for s in TrialState}
    for t in study.get_trials(deepcopy=False):
        found[t.state.name] += 1
    return found


@dataclass
class Worker:
    """Runs trials of ``study`` until it holds ``n_trials`` COMPLETE ones (see the module docstring).

    ``say``: where each finished trial's line goes. ``poll_s``: how often a worker with nothing to start looks
    again (others' trials finishing, or a killed worker's trials going stale)."""

    study: optuna.Study
    plan: TrialPlan
    space: SearchSpace
    n_trials: int
    say: Callable[[str], None] = print
    poll_s: float = 2.0

    def run(self) -> None:
        while True:
            with warnings.catch_warnings():  # Optuna calls heartbeats experimental
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                fail_stale_trials(self.study)
            c = counts(self.study)
            if c["COMPLETE"] >= self.n_trials:
                return
            if isinstance(self.study.sampler, optuna.samplers.GridSampler) and self.grid_exhausted(c):
                self.say(f"the grid is exhausted: {c['COMPLETE']} COMPLETE of {self.n_trials} (the others failed "
                         "or were pruned)")  # fmt: skip
                return
            if c["COMPLETE"] + c["RUNNING"] >= self.n_trials:
                time.sleep(self.poll_s)  # the rest are running elsewhere (or awaiting their grace period)
                continue
            try:
                self.study.optimize(self.objective, n_trials=1, catch=(NonFiniteLossError,), gc_after_trial=True,
                                    callbacks=[self.report])  # fmt: skip
            except optuna.exceptions.UpdateFinishedTrialError:  # its heartbeats were late: another worker failed it
                self.say("a trial of this worker was marked FAIL by another (its heartbeats were late: raise "
                         "--heartbeat on a busy machine); going on")  # fmt: skip

    def grid_exhausted(self, c: dict[str, int]) -> bool:
        return self.study.sampler.is_exhausted(self.study) and c["RUNNING"] == 0

    def objective(self, trial: optuna.Trial) -> float:
        done = counts(self.study)
        ahead = sum(1 for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                    if t.number < trial.number)  # fmt: skip
        if done["COMPLETE"] + ahead >= self.n_trials:  # another worker started the last one at the same moment
            trial.set_user_attr("withdrawn", "the study had its trials complete or running")
            raise optuna.TrialPruned()
        return run_trial(trial, self.plan, self.space.suggest(trial))

    def report(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trial.user_attrs.get("withdrawn"):
            return
        params = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.params.items())
        value = f"{self.plan.metric} {trial.value:.4f}" if trial.value is not None else ""
        if trial.state == TrialState.PRUNED and trial.intermediate_values:
            step = max(trial.intermediate_values)
            value = f"pruned after epoch {step + 1} ({trial.intermediate_values[step]:.4f})"
        self.say(f"trial {trial.number} {trial.state.name}: {value} {params} -> {trial.user_attrs.get('run_dir')}")


def cores() -> int:
    """The CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def worker_command(argv: Sequence[str]) -> list[str]:
    """The command of a worker process of this sweep: ``python -m implicit_em.sweep.cli ARGV``."""
    return [sys.executable, "-m", "implicit_em.sweep.cli", *argv]


def run_workers(commands: Sequence[Sequence[str]], threads: int, own: Callable[[], None]) -> list[int]:
    """Run ``own`` (worker 0, in this process: it has already imported what a trial needs) beside one worker
    process per command (:func:`worker_command`: workers 1, 2, ...), each with ``threads`` torch threads, and
    wait for them all. SIGINT and SIGTERM are passed on to the processes and stop worker 0 here as well
    (KeyboardInterrupt, SystemExit(143)); a worker process ends with its parent. Returns the exit codes of the
    worker processes (negative: killed by that signal), or raises what stopped worker 0 once every process has
    ended."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    procs = [
        subprocess.Popen(
            list(command), env=env, preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None
        )  # fmt: skip
        for command in commands
    ]

    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        own()
    finally:
        try:
            codes = [p.wait() for p in procs]
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)
    return codes


def _die_with_parent() -> None:
    """In a worker, before it starts: SIGTERM when its parent sweep ends (prctl PR_SET_PDEATHSIG)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)
    except OSError:
        pass
