"""Shared fixtures: running ``scripts/train.py`` as users do, on small settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing loads from a hub: a test that tries fails at once
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

if os.environ.get("PYTEST_XDIST_WORKER"):  # one thread per worker (its processes too): no oversubscription
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    threadpool_limits(1)  # numpy's BLAS was loaded (by pytest plugins) before OMP_NUM_THREADS was set
#: the test files that take longest, in the order the two workers of ``-n 2 --dist loadfile --no-loadscope-reorder``
#: take them (each takes the next file when it is free): the sweep's and the DDP tests (real processes that also
#: wait: on rendezvous, heartbeats, a held trial) are kept apart, each beside files that compute in this process,
#: and the many short files come last to even out the end. Measured with ``pytest --durations=0`` (each file's test
#: times summed); refresh when a file's cost changes much. Order only: every file runs either way.
LONGEST_FIRST = [
    "tests/sweep/test_study.py",
    "tests/training/test_module.py",
    "tests/experiments/test_frontier.py",
    "tests/run/test_cli.py",
    "tests/core/test_distributed.py",
    "tests/experiments/test_frontier_tokens.py",
    "tests/lm/test_causal_lm.py",
    "tests/training/test_ensemble.py",
    "tests/lm/test_harvest.py",
    "tests/run/test_resume.py",
    "tests/data/test_cifar10.py",
    "tests/test_reproduce.py",
    "tests/run/test_checkpoints.py",
    "tests/lm/dashboard/test_html.py",
    "tests/experiments/test_compare.py",
    "tests/eval/test_probe.py",
]


def pytest_collection_modifyitems(session, config, items) -> None:
    """Run the files of :data:`LONGEST_FIRST` first, in its order; the others after, in collection order."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable: tests keep their order


TRAIN = REPO / "scripts" / "train.py"
DEFAULT_CONFIG = REPO / "configs" / "default.yaml"
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

#: small, quiet settings for in-process fits: no progress bar, no feature images, the fast probe, no KMeans, no
#: SAE numbers (ridge readout, k-sparse probes, density histogram: half a fit's time on digits; a test that reads
#: them passes ``--report.sae_metrics true`` after these)
QUIET = [
    "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false",
    "--report.kmeans", "false",
    "--report.probe_method", "torch",
    "--components.every_n_epochs", "0",
    "--probe.every_n_epochs", "0",
    "--report.sae_metrics", "false",
]  # fmt: skip


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str

    @property
    def metrics_path(self) -> Path:
        return Path(self.stdout.strip().splitlines()[-1])

    @property
    def metrics(self) -> dict:
        return json.loads(self.metrics_path.read_text())


def run_script(script: Path, *args: str, timeout: float = 600, env: dict | None = None) -> Run:
    """Run a project script in a subprocess, offline, the way a user would."""
    full_env = {k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"}
    full_env.update({"WANDB_MODE": "offline", "MPLBACKEND": "Agg", **(env or {})})
    proc = subprocess.run(
        [sys.executable, str(script), *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )
    return Run(proc.returncode, proc.stdout, proc.stderr)


def fit_in_process(root, *args: str, callbacks=(), fit: bool = True):
    """Build the CLI of ``scripts/train.py ARGS`` (default.yaml, quiet settings, run directory ``root``) in this
    process, add ``callbacks`` to its Trainer and, with ``fit``, train and evaluate as ``main`` does (inside
    :func:`~implicit_em.run.runtime.training_process`). Returns the CLI (``.model``, ``.trainer``, ``.datamodule``)."""

    from implicit_em.run import app
    from implicit_em.run.cli import ImplicitEMCLI
    from implicit_em.run.runtime import training_process

    cli = ImplicitEMCLI(["--trainer.default_root_dir", str(root), *QUIET, *map(str, args)], [DEFAULT_CONFIG])
    cli.trainer.callbacks.extend(callbacks)
    if fit:
        with training_process():
            cli.metrics_path = app.fit(cli).metrics_path
    return cli


def model_weights(module) -> dict:
    """The trained weights of a plain module (``model.*`` of its state dict), detached copies."""
    return {k: v.detach().clone() for k, v in module.model.state_dict().items()}


def call_in_process(main, argv: list[str], env: dict | None = None) -> Run:
    """``main(argv)`` in this process, from the project root and offline, as a script would run it: its exit
    code, stdout and stderr (an argument error's ``sys.exit`` and a bug's traceback included). ``env``: more
    environment variables for the call (``None`` unsets one; ``{"WANDB_MODE": None}`` leaves W&B to decide)."""
    import contextlib
    import io
    import traceback

    out, err, cwd = io.StringIO(), io.StringIO(), os.getcwd()
    changes = {"WANDB_MODE": "offline", "WANDB_API_KEY": None, **(env or {})}
    saved = {k: os.environ.get(k) for k in changes}
    for k, v in changes.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    try:
        os.chdir(REPO)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(map(str, argv)))
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            except Exception:
                traceback.print_exc(file=err)
                code = 1
    finally:
        os.chdir(cwd)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return Run(code, out.getvalue(), err.getvalue())


def main_in_process(*args: str, env: dict | None = None) -> Run:
    """``scripts/train.py ARGS`` as its ``main`` runs them, in this process (:func:`call_in_process`, ``env``
    included). What needs a real process (kill -9, DDP, the interpreter's exit) uses :func:`run_script`."""
    from implicit_em.run.app import main

    return call_in_process(lambda argv: main(argv, [DEFAULT_CONFIG]), list(args), env)


def script_in_process(script: Path, *args) -> Run:
    """``python scripts/NAME.py ARGS`` through the script's ``main(argv)`` in this process (its imports are
    already paid for); the scripts' real-process behaviour has its own tests."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"script_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return call_in_process(module.main, list(args))


@pytest.fixture
def train(tmp_path):
    """``train(*args)`` runs scripts/train.py with its run directory under tmp_path and no progress bar: in this
    process (:func:`main_in_process`), or as a real process with ``real=True`` or an ``env``."""

    def _train(*args: str, timeout: float = 600, env: dict | None = None, real: bool = False) -> Run:
        base = ["--trainer.default_root_dir", str(tmp_path / "runs"), "--trainer.enable_progress_bar", "false"]
        if real or env:
            return run_script(TRAIN, *base, *args, timeout=timeout, env=env)
        return main_in_process(*base, *args)

    return _train


def harvest_refusal(*args) -> str:
    """scripts/harvest.py ARGS, offline, expected to refuse: exit code 2 and one ``error:`` line; returns that line."""
    run = script_in_process(REPO / "scripts" / "harvest.py", *args)
    assert run.returncode == 2, run.stderr[-2000:]
    lines = run.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "Traceback" not in run.stderr
    return lines[-1]
