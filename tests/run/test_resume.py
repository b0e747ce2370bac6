"""Never lose a run: a run stopped (or killed with SIGKILL) and resumed with ``--ckpt_path last`` ends exactly
where an uninterrupted run ends (bitwise weights, final_loss, per-epoch record), from epoch-end and mid-epoch
checkpoints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from implicit_em.run.checkpoints import find_last_checkpoint, load_checkpoint
from tests.conftest import DEFAULT_CONFIG, QUIET, REPO, fit_in_process, main_in_process

EPOCHS = 3
STEPS_PER_EPOCH = 11  # digits: 1,293 training samples in batches of 128

#: ``python -c HELD STEP MARKER CONFIG ARGS...``: scripts/train.py's ``main`` in a real process whose Trainer, at the
#: start of the first batch at global step >= STEP, writes MARKER and waits there to be killed (it trains nothing
#: more and changes nothing: the test knows where the run stands when it kills it)
HELD = """
import sys, time
from pathlib import Path

from lightning.pytorch.callbacks import Callback

from implicit_em.run import app

step, marker, config, *args = sys.argv[1:]


class Hold(Callback):
    def on_train_batch_start(self, trainer, *_):
        if trainer.global_step >= int(step):
            Path(marker + ".tmp").write_text(str(trainer.global_step))
            Path(marker + ".tmp").rename(marker)  # whole when it appears
            while True:
                time.sleep(1)


fit = app.fit


def held(cli):
    cli.trainer.callbacks.append(Hold())
    return fit(cli)


app.fit = held
sys.exit(app.main(args, [config]))
"""


def _kill_when_held(root, args: list[str], step: int, marker) -> None:
    """Start the run as a real process, SIGKILL it once it holds at ``step`` (training under way)."""
    env = {**os.environ, "WANDB_MODE": "offline", "MPLBACKEND": "Agg"}
    argv = [sys.executable, "-c", HELD, str(step), str(marker), str(DEFAULT_CONFIG),
            "--trainer.default_root_dir", str(root), *QUIET, *args]  # fmt: skip
    log = marker.with_suffix(".stderr")
    with open(log, "w") as err:
        proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err, env=env)
    deadline = time.time() + 300
    try:
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert proc.poll() is None, f"the run ended before it could be killed: {log.read_text()[-2000:]}"
        assert marker.exists(), "the run never reached the step it should be killed at"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not list(root.rglob("metrics.json")), "the killed run had already written metrics.json"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """One run of EPOCHS epochs, never stopped (in this process): what every stopped and resumed run must end as."""
    return fit_in_process(tmp_path_factory.mktemp("whole"), "--trainer.max_epochs", str(EPOCHS))


def _assert_same_end(resumed, whole) -> None:
    """The resumed run's global step, weights (bitwise) and last training loss are the uninterrupted run's."""
    assert resumed.trainer.global_step == whole.trainer.global_step == EPOCHS * STEPS_PER_EPOCH
    a, b = resumed.model.state_dict(), whole.model.state_dict()
    assert a.keys() == b.keys()
    for k in b:
        assert torch.equal(a[k], b[k]), (k, float((a[k].float() - b[k].float()).abs().max()))
    assert float(resumed.trainer.callback_metrics["train/loss"]) == float(whole.trainer.callback_metrics["train/loss"])


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(tmp_path, uninterrupted):
    """A real process killed with SIGKILL two optimiser steps after a checkpoint saved inside an epoch (steps 16
    and 17 trained, not saved), resumed with --ckpt_path last: the same global step, weights (bitwise), last
    training loss and final_loss as the uninterrupted run, both checkpoints' weights equal too, the killed
    run's finished epoch kept in epoch_seconds, one metrics.json in the same run directory. (Epoch-end
    checkpoints: the in-process test below, which stops at both positions.)"""
    # a checkpoint every 3 optimiser steps: 15 lies inside epoch 1 (steps 12-22); 33 = 3 * 11 ends on one
    extra = ["--trainer.max_epochs", str(EPOCHS), "--checkpoint.every_n_epochs", "0",
             "--checkpoint.every_n_train_steps", "3"]  # fmt: skip
    _kill_when_held(tmp_path / "runs", extra, 17, tmp_path / "held")
    assert (tmp_path / "held").read_text() == "17"
    state = load_checkpoint(find_last_checkpoint(tmp_path / "runs"))
    assert state["global_step"] == 15 and state["global_step"] % STEPS_PER_EPOCH  # saved inside an epoch

    resumed = fit_in_process(tmp_path / "runs", *extra, "--ckpt_path", "last")
    _assert_same_end(resumed, uninterrupted)
    m, whole = json.loads(resumed.metrics_path.read_text()), json.loads(uninterrupted.metrics_path.read_text())
    assert m["final_loss"] == pytest.approx(whole["final_loss"], rel=1e-6)
    a, b = (load_checkpoint(x["checkpoint"])["state_dict"] for x in (m, whole))
    for k in b:
        assert torch.equal(a[k], b[k]), k
    assert len(m["epoch_seconds"]) == EPOCHS  # the killed run's epoch is kept in the record
    assert list((tmp_path / "runs").rglob("metrics.json")) == [resumed.metrics_path]  # the same run directory


@pytest.mark.parametrize(
    "first, extra",
    [
        (["--trainer.max_epochs", "2"], []),  # from the checkpoint at the end of epoch 1
        (["--trainer.max_steps", "15", "--trainer.max_epochs", "-1"],  # from step 12 or 15, inside epoch 1
         ["--checkpoint.every_n_epochs", "0", "--checkpoint.every_n_train_steps", "4"]),
    ],
    ids=["epoch_end", "mid_epoch"],
)  # fmt: skip
def test_stop_then_resume_in_process_is_bitwise_the_uninterrupted_run(tmp_path, uninterrupted, first, extra):
    start = time.perf_counter()
    stopped = fit_in_process(tmp_path, *first, *extra)
    assert 0 < stopped.trainer.global_step < EPOCHS * STEPS_PER_EPOCH
    time.sleep(2)  # a pause between the stop and the resume, which no epoch counts
    # the resume changes the run's length (its max_steps too: every other setting comes back from config.yaml)
    resumed = fit_in_process(tmp_path, "--trainer.max_epochs", str(EPOCHS), "--trainer.max_steps", "-1", *extra,
                             "--ckpt_path", "last")  # fmt: skip
    _assert_same_end(resumed, uninterrupted)
    seconds = json.loads(resumed.metrics_path.read_text())["epoch_seconds"]
    assert len(seconds) == EPOCHS and all(s > 0 for s in seconds)
    assert sum(seconds) < time.perf_counter() - start - 2  # the pause left out


# -- a refused resume changes nothing; a resumed run keeps its settings and its history ----------------------
def _files(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


SHORT = ["--trainer.enable_progress_bar", "false", "--report.kmeans", "false", "--report.probe_method", "torch",
         "--components.every_n_epochs", "0", "--probe.every_n_epochs", "0", "--model.n_components", "16", "--report.sae_metrics", "false"]  # fmt: skip


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 2-epoch run (K = 16), as scripts/train.py leaves it: (root, run directory)."""
    root = tmp_path_factory.mktemp("finished")
    run = main_in_process("--trainer.default_root_dir", str(root), "--trainer.max_epochs", "2", *SHORT)
    assert run.returncode == 0, run.stderr[-2000:]
    return root, run.metrics_path.parent


def test_a_resume_whose_settings_do_not_fit_changes_no_file_and_says_so_in_one_line(finished_run):
    root, _ = finished_run
    before = _files(root)
    run = main_in_process("--trainer.default_root_dir", str(root), "--trainer.max_epochs", "4",
                          "--model.n_components", "32", "--ckpt_path", "last")  # fmt: skip
    assert run.returncode == 2 and "Traceback" not in run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert "does not fit these settings (model.linear.bias: [16] in the checkpoint, [32] here)" in last
    assert _files(root) == before


def test_a_resume_from_a_checkpoint_carrying_code_changes_no_file(finished_run, tmp_path):
    import shutil

    root, run_dir = finished_run
    evil = tmp_path / "copy"
    shutil.copytree(root, evil, symlinks=True)
    ckpt = evil / run_dir.relative_to(root) / "checkpoints" / "last.ckpt"
    target = ckpt.resolve()
    torch.save({"state_dict": {}, "payload": os.system}, target)  # a global: loading it would need code
    before = _files(evil)
    run = main_in_process("--trainer.default_root_dir", str(evil), "--ckpt_path", "last", "--trainer.max_epochs", "4")
    assert run.returncode == 2 and "refusing to load it" in run.stderr and "Traceback" not in run.stderr
    assert _files(evil) == before


def _max_epoch(run_dir) -> int:
    import csv

    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    return max(int(float(r["epoch"])) for r in rows if r.get("epoch"))


def test_a_copied_run_resumed_without_its_settings_goes_on_in_the_copy_with_its_history(finished_run, tmp_path):
    """The README's command (--ckpt_path last and nothing about the model) on a copy of a run whose saved config
    names the original's folder: the resume goes on where the checkpoint is (metrics.json in the copy), with the
    run's saved settings (K = 16 from its config.yaml, not default.yaml's 64); metrics.csv keeps epochs 0-1 and
    adds 2, each epoch's training loss once; the original is left byte for byte."""
    import csv
    import shutil

    root, run_dir = finished_run
    before = _files(root)
    copy = tmp_path / "copy"
    shutil.copytree(root, copy, symlinks=True)
    run = main_in_process("--trainer.default_root_dir", str(copy), "--ckpt_path", "last", "--trainer.max_epochs", "3")
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.metrics_path == copy / run_dir.relative_to(root) / "metrics.json" and run.metrics["epochs"] == 3
    assert run.metrics["n_components"] == 16
    rows = [r for r in csv.DictReader(open(run.metrics_path.parent / "metrics.csv")) if r.get("train/loss")]
    assert sorted(int(float(r["epoch"])) for r in rows) == [0, 1, 2]
    assert _max_epoch(run.metrics_path.parent) == 2
    assert _files(root) == before


def test_a_resume_keeps_every_setting_and_config_yaml_unless_the_command_changes_one(tmp_path):
    """The README's command, --ckpt_path last, from the start: with no checkpoint yet it says so and starts a new
    run; after the run stopped (here: finished), every setting comes back from config.yaml, the Trainer's
    included, and config.yaml is left byte for byte; a resume that trains longer saves that one change and no
    resume bookkeeping (the checkpoint, the step the logs go on from)."""
    import yaml

    root = tmp_path / "runs"
    first = main_in_process("--trainer.default_root_dir", str(root), "--trainer.max_epochs", "2", *SHORT,
                            "--ckpt_path", "last")  # fmt: skip
    assert first.returncode == 0, first.stderr[-2000:]
    assert "starting a new run" in first.stderr
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
    run = main_in_process("--trainer.default_root_dir", str(tmp_path), "--config", "configs/data/fashion_mnist.yaml",
                          "--data.root", str(tmp_path / "nowhere"))  # fmt: skip
    assert run.returncode == 2 and "fashion_mnist" in run.stderr
    assert not (tmp_path / "implicit_em").exists()
