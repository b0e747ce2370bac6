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
TRAIN = REPO / "scripts" / "train.py"
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


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


@pytest.fixture
def train(tmp_path):
    """``train(*args)`` runs scripts/train.py with its run directory under tmp_path and no progress bar."""

    def _train(*args: str, timeout: float = 600, env: dict | None = None) -> Run:
        base = ["--trainer.default_root_dir", str(tmp_path / "runs"), "--trainer.enable_progress_bar", "false"]
        return run_script(TRAIN, *base, *args, timeout=timeout, env=env)

    return _train
