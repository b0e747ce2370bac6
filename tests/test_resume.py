"""Never lose a run: a run stopped (or killed with SIGKILL) and resumed with ``--ckpt_path last`` ends exactly
where an uninterrupted run ends (bitwise weights, final_loss, per-epoch record), from epoch-end and mid-epoch
checkpoints."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from implicit_em.checkpoints import find_last_checkpoint, load_checkpoint
from tests.conftest import REPO, TRAIN, fit_in_process, run_script

EPOCHS = 40
STEPS_PER_EPOCH = 11  # digits: 1,293 training samples in batches of 128
COMMON = ["--trainer.max_epochs", str(EPOCHS), "--trainer.enable_progress_bar", "false", "--seed_everything", "5",
          "--report.kmeans", "false", "--report.probe_method", "torch", "--features.every_n_epochs", "0"]  # fmt: skip


def _weights(metrics: dict) -> dict[str, torch.Tensor]:
    state = load_checkpoint(metrics["checkpoint"])["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("model.")}


def _kill_after_checkpoint(root, extra: list[str], min_step: int, mid_epoch: bool) -> None:
    """Start a run, SIGKILL it once a checkpoint past ``min_step`` exists (one saved inside an epoch when
    ``mid_epoch``), while training goes on."""
    env = {**os.environ, "WANDB_MODE": "offline"}
    proc = subprocess.Popen(
        [sys.executable, str(TRAIN), "--trainer.default_root_dir", str(root), *COMMON, *extra],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )  # fmt: skip
    deadline = time.time() + 300
    while time.time() < deadline:
        ckpt = find_last_checkpoint(root)
        try:  # the file may be replaced while we read it
            step = load_checkpoint(ckpt)["global_step"] if ckpt is not None else -1
        except Exception:
            step = -1
        if step >= min_step and (not mid_epoch or step % STEPS_PER_EPOCH):
            break
        time.sleep(0.2)
        assert proc.poll() is None, "the run ended before it could be killed"
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not list(root.rglob("metrics.json")), "the killed run had already written metrics.json"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run = run_script(TRAIN, "--trainer.default_root_dir", tmp_path_factory.mktemp("whole"), *COMMON)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.metrics


@pytest.mark.parametrize(
    "extra, mid_epoch",
    [
        ([], False),  # epoch-end checkpoints, killed after epoch 5
        # a checkpoint every 8 optimiser steps: most land inside an epoch; 440 = 40 * 11 steps ends on one,
        # so the last checkpoint is the end
        (["--checkpoint.every_n_epochs", "0", "--checkpoint.every_n_train_steps", "8"], True),
    ],
    ids=["epoch_end", "mid_epoch"],
)
def test_sigkill_then_resume_equals_uninterrupted(tmp_path, uninterrupted, extra, mid_epoch):
    _kill_after_checkpoint(tmp_path, extra, 5 * STEPS_PER_EPOCH, mid_epoch)
    resumed = run_script(TRAIN, "--trainer.default_root_dir", tmp_path, *COMMON, *extra, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    m = resumed.metrics
    assert m["final_loss"] == pytest.approx(uninterrupted["final_loss"], rel=1e-6)
    a, b = _weights(m), _weights(uninterrupted)
    for k in a:
        assert torch.equal(a[k], b[k]), (k, float((a[k] - b[k]).abs().max()))
    assert len(m["epoch_seconds"]) == EPOCHS  # the killed run's epochs are kept in the record
    assert len(list(tmp_path.rglob("metrics.json"))) == 1  # resumed into the same run directory


def test_ckpt_path_last_without_a_checkpoint_starts_a_new_run(train, tmp_path):
    run = train("--trainer.max_epochs", "1", "--ckpt_path", "last", "--report.kmeans", "false")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "starting a new run" in run.stderr


@pytest.mark.parametrize(
    "first, extra",
    [
        (["--trainer.max_epochs", "2"], []),  # from the checkpoint at the end of epoch 1
        (["--trainer.max_steps", "15", "--trainer.max_epochs", "-1"],  # from step 12 or 15, inside epoch 1
         ["--checkpoint.every_n_epochs", "0", "--checkpoint.every_n_train_steps", "4"]),
    ],
    ids=["epoch_end", "mid_epoch"],
)  # fmt: skip
def test_stop_then_resume_in_process_is_bitwise_the_uninterrupted_run(tmp_path, first, extra):
    whole = fit_in_process(tmp_path / "whole", "--trainer.max_epochs", "3", *extra)
    stopped = fit_in_process(tmp_path / "resumed", *first, *extra)
    assert 0 < stopped.trainer.global_step < 3 * STEPS_PER_EPOCH
    resumed = fit_in_process(tmp_path / "resumed", "--trainer.max_epochs", "3", *extra, "--ckpt_path", "last")
    assert resumed.trainer.global_step == whole.trainer.global_step == 3 * STEPS_PER_EPOCH
    a, b = resumed.model.state_dict(), whole.model.state_dict()
    for k in b:
        assert torch.equal(a[k], b[k]), (k, float((a[k].float() - b[k].float()).abs().max()))
    assert float(resumed.trainer.callback_metrics["train/loss"]) == float(whole.trainer.callback_metrics["train/loss"])
