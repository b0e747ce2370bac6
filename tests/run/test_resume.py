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

from implicit_em.run.checkpoints import find_last_checkpoint, load_checkpoint
from tests.conftest import REPO, TRAIN, fit_in_process, main_in_process, run_script

EPOCHS = 24
STEPS_PER_EPOCH = 11  # digits: 1,293 training samples in batches of 128
COMMON = ["--trainer.max_epochs", str(EPOCHS), "--trainer.enable_progress_bar", "false", "--seed_everything", "5",
          "--report.kmeans", "false", "--report.probe_method", "torch", "--components.every_n_epochs", "0"]  # fmt: skip


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
    run = main_in_process("--trainer.default_root_dir", tmp_path_factory.mktemp("whole"), *COMMON)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.metrics


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(tmp_path, uninterrupted):
    """Killed with SIGKILL after a checkpoint saved inside an epoch (epoch-end checkpoints: the in-process tests
    below, which stop at both positions)."""
    # a checkpoint every 8 optimiser steps: most land inside an epoch; 264 = 24 * 11 steps ends on one, so the
    # last checkpoint is the end
    extra = ["--checkpoint.every_n_epochs", "0", "--checkpoint.every_n_train_steps", "8"]
    _kill_after_checkpoint(tmp_path, extra, 5 * STEPS_PER_EPOCH, mid_epoch=True)
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
    # the resume changes the run's length (its max_steps too: every other setting comes back from config.yaml)
    resumed = fit_in_process(tmp_path / "resumed", "--trainer.max_epochs", "3", "--trainer.max_steps", "-1", *extra,
                             "--ckpt_path", "last")  # fmt: skip
    assert resumed.trainer.global_step == whole.trainer.global_step == 3 * STEPS_PER_EPOCH
    a, b = resumed.model.state_dict(), whole.model.state_dict()
    for k in b:
        assert torch.equal(a[k], b[k]), (k, float((a[k].float() - b[k].float()).abs().max()))
    assert float(resumed.trainer.callback_metrics["train/loss"]) == float(whole.trainer.callback_metrics["train/loss"])


# -- a refused resume changes nothing; a resumed run keeps its history ---------------------------------------
def _files(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


SHORT = ["--trainer.enable_progress_bar", "false", "--report.kmeans", "false", "--report.probe_method", "torch",
         "--components.every_n_epochs", "0", "--probe.every_n_epochs", "0", "--model.n_components", "16"]  # fmt: skip


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 2-epoch run (K = 16), as scripts/train.py leaves it."""
    from tests.conftest import main_in_process

    root = tmp_path_factory.mktemp("finished")
    run = main_in_process("--trainer.default_root_dir", str(root), "--trainer.max_epochs", "2", *SHORT)
    assert run.returncode == 0, run.stderr[-2000:]
    return root, run.metrics_path.parent


def test_a_resume_whose_settings_do_not_fit_changes_no_file_and_says_so_in_one_line(finished_run):
    from tests.conftest import main_in_process

    root, _ = finished_run
    before = _files(root)
    run = main_in_process("--trainer.default_root_dir", str(root), "--trainer.max_epochs", "4",
                          "--model.n_components", "32", "--ckpt_path", "last")  # fmt: skip
    assert run.returncode == 2 and "Traceback" not in run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert "does not fit these settings (model.linear.bias: [16] in the checkpoint, [32] here)" in last
    assert _files(root) == before


def test_a_resume_from_a_checkpoint_carrying_code_changes_no_file(finished_run, tmp_path):
    from tests.conftest import main_in_process

    root, run_dir = finished_run
    evil = tmp_path / "copy"
    import shutil

    shutil.copytree(root, evil, symlinks=True)
    ckpt = evil / run_dir.relative_to(root) / "checkpoints" / "last.ckpt"
    target = ckpt.resolve()
    torch.save({"state_dict": {}, "payload": os.system}, target)  # a global: loading it would need code
    before = _files(evil)
    run = main_in_process("--trainer.default_root_dir", str(evil), "--ckpt_path", "last", "--trainer.max_epochs", "4")
    assert run.returncode == 2 and "refusing to load it" in run.stderr and "Traceback" not in run.stderr
    assert _files(evil) == before


def test_resuming_without_the_runs_settings_uses_its_saved_config_and_keeps_its_history(finished_run, tmp_path):
    """The README's command: --ckpt_path last and nothing about the model; metrics.csv keeps epochs 0-1 and adds
    2-3, each epoch's training loss once."""
    import csv
    import shutil

    from tests.conftest import main_in_process

    root, _ = finished_run
    copy = tmp_path / "copy"
    shutil.copytree(root, copy, symlinks=True)
    run = main_in_process("--trainer.default_root_dir", str(copy), "--trainer.max_epochs", "4", "--ckpt_path", "last")
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.metrics["n_components"] == 16  # from the run's config.yaml, not default.yaml's 64
    rows = [r for r in csv.DictReader(open(run.metrics_path.parent / "metrics.csv")) if r.get("train/loss")]
    assert sorted(int(float(r["epoch"])) for r in rows) == [0, 1, 2, 3]


def _max_epoch(run_dir) -> int:
    import csv

    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    return max(int(float(r["epoch"])) for r in rows if r.get("epoch"))


def test_a_resume_keeps_every_setting_and_config_yaml_unless_the_command_changes_one(tmp_path):
    """The README's command after a run stopped (here: finished): every setting comes back from config.yaml, the
    Trainer's included, and config.yaml is left byte for byte; a resume that trains longer saves that one change
    and no resume bookkeeping (the checkpoint, the step the logs go on from)."""
    import yaml

    from tests.conftest import main_in_process

    root = tmp_path / "runs"
    first = main_in_process("--trainer.default_root_dir", str(root), "--trainer.max_epochs", "2", *SHORT)
    assert first.returncode == 0, first.stderr[-2000:]
    run_dir = first.metrics_path.parent
    config = run_dir / "config.yaml"
    before = config.read_bytes()
    again = main_in_process("--trainer.default_root_dir", str(root), "--ckpt_path", "last")
    assert again.returncode == 0, again.stderr[-2000:]
    assert config.read_bytes() == before and again.metrics_path == first.metrics_path
    assert again.metrics["epochs"] == 2 and again.metrics["n_components"] == 16  # not default.yaml's 100 and 64
    assert _max_epoch(run_dir) == 1

    longer = main_in_process(
        "--trainer.default_root_dir", str(root), "--ckpt_path", "last", "--trainer.max_epochs", "3"
    )
    assert longer.returncode == 0, longer.stderr[-2000:]
    saved, now = yaml.safe_load(before), yaml.safe_load(config.read_text())
    assert now["trainer"].pop("max_epochs") == 3 and saved["trainer"].pop("max_epochs") == 2
    assert now == saved  # the one setting the command changed, nothing else
    assert now["ckpt_path"] is None and now["trainer"]["logger"]["init_args"]["resume_step"] is None
    assert _max_epoch(run_dir) == 2 and longer.metrics["epochs"] == 3


def test_a_copied_run_resumes_in_the_copy_and_leaves_the_original_alone(finished_run, tmp_path):
    """Its saved config names the original's folder; the resume goes on where the checkpoint is."""
    import shutil

    from tests.conftest import main_in_process

    root, run_dir = finished_run
    before = _files(root)
    copy = tmp_path / "copy"
    shutil.copytree(root, copy, symlinks=True)
    run = main_in_process("--trainer.default_root_dir", str(copy), "--ckpt_path", "last", "--trainer.max_epochs", "3")
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.metrics_path == copy / run_dir.relative_to(root) / "metrics.json" and run.metrics["epochs"] == 3
    assert _max_epoch(run.metrics_path.parent) == 2
    assert _files(root) == before


def test_rows_logged_after_the_last_checkpoint_are_dropped_once_on_resume(tmp_path):
    from implicit_em.run.loggers import RunMetricsCSV

    first = RunMetricsCSV(tmp_path)
    for step in (10, 21, 32):
        first.log_metrics({"train/loss": float(step)}, step)
    first.save()
    resumed = RunMetricsCSV(tmp_path, resume_step=22)  # the checkpoint was at step 22: step 32 is trained again
    resumed.log_metrics({"train/loss": 1.0, "val/new": 2.0}, 32)
    resumed.save()
    text = (tmp_path / "metrics.csv").read_text().splitlines()
    assert text[0] == "step,train/loss,val/new" and [ln.split(",")[0] for ln in text[1:]] == ["10", "21", "32"]


def test_a_new_run_that_fails_leaves_no_empty_folder(tmp_path):
    from tests.conftest import main_in_process

    run = main_in_process("--trainer.default_root_dir", str(tmp_path), "--config", "configs/data/fashion_mnist.yaml",
                          "--data.root", str(tmp_path / "nowhere"))  # fmt: skip
    assert run.returncode == 2 and "fashion_mnist" in run.stderr
    assert not (tmp_path / "implicit_em").exists()
