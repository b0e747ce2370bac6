"""Checkpoints are data, not code: every load is ``weights_only=True``; a file carrying a pickled call is refused
with one line and exit 2 (by load_checkpoint, scripts/probe.py and ``--ckpt_path last``) and the call never
runs; our own checkpoints (plain model, SAE, ensemble) load that way; writes are atomic."""

from __future__ import annotations

import os
import runpy
import shutil

import pytest
import torch

from implicit_em.errors import UserError
from implicit_em.files import atomic_write
from implicit_em.run.checkpoints import (
    SafeCheckpointIO,
    UntrustedCheckpointError,
    find_last_checkpoint,
    load_checkpoint,
)
from tests.conftest import QUIET, REPO, call_in_process, fit_in_process, main_in_process
from tests.data.conftest import assert_one_line_error

SMALL = ["--trainer.max_epochs", "1", "--model.n_components", "8", *QUIET]


class Payload:
    """Unpickling this runs ``touch <marker>``: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def carry_code(path, marker) -> None:
    """Add the payload to the checkpoint at ``path`` (read with full trust: we made it), in place."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    state["payload"] = Payload(marker)
    torch.save(state, path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished one-epoch run, trained in this process (the refusals below are real processes): its CLI."""
    return fit_in_process(tmp_path_factory.mktemp("run"), *SMALL)


@pytest.fixture
def run_dir(trained):
    """The run's directory: <root>/implicit_em/version_0 with config.yaml and checkpoints/."""
    return trained.metrics_path.parent


@pytest.fixture
def evil_run(run_dir, tmp_path):
    """A copy of the run whose every checkpoint carries the payload (links followed, as cp -rL does)."""
    root = tmp_path / "evil"
    copy = root / "implicit_em" / "version_0"
    shutil.copytree(run_dir, copy, symlinks=False)
    marker = tmp_path / "PWNED"
    ckpts = sorted((copy / "checkpoints").glob("*.ckpt"))
    assert ckpts and any(p.name == "last.ckpt" for p in ckpts)
    for path in ckpts:
        carry_code(path, marker)
    return root, copy / "checkpoints" / "last.ckpt", marker


def test_load_checkpoint_refuses_a_pickled_call_and_never_runs_it(evil_run):
    _, ckpt, marker = evil_run
    with pytest.raises(UntrustedCheckpointError, match="refusing to load it") as info:
        load_checkpoint(ckpt)
    assert str(ckpt) in str(info.value) and "\n" not in str(info.value)
    assert not marker.exists()
    assert isinstance(info.value, UserError) and info.value.exit_code == 2
    # the same file read with full trust would have run the call: the test's payload is real
    torch.load(ckpt, weights_only=False)
    assert marker.exists()


def test_probe_script_refuses_it_with_one_line(evil_run):
    """scripts/probe.py's ``main`` in this process (a refusal in a real process, its output one line alone:
    test_cli.py's test_a_refused_run_prints_its_error_line_alone)."""
    _, ckpt, marker = evil_run
    main = runpy.run_path(str(REPO / "scripts" / "probe.py"))["main"]
    run = call_in_process(main, [ckpt, "--probe-method", "torch", "--no-kmeans"])
    line = assert_one_line_error(run, str(ckpt), "refusing to load it")
    assert not marker.exists(), line
    assert run.stdout.strip() == ""


def test_resume_refuses_it_with_one_line(evil_run):
    """scripts/train.py's ``main`` in this process (a refusal in a real process, its output one line alone:
    test_cli.py's test_a_refused_run_prints_its_error_line_alone)."""
    root, ckpt, marker = evil_run
    run = main_in_process("--trainer.default_root_dir", root, *SMALL, "--trainer.max_epochs", "2",
                          "--ckpt_path", "last")  # fmt: skip
    assert_one_line_error(run, "refusing to load it", "checkpoints")
    assert not marker.exists()


def test_an_unreadable_or_missing_file_is_a_user_error(tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(UserError, match="not a readable checkpoint"):
        load_checkpoint(bad)
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.ckpt")


@pytest.mark.parametrize(
    "model",
    [
        [],
        ["--model.net", "SparseAutoencoder"],
        ["--model.class_path", "implicit_em.training.ensemble.Ensemble", "--model.init_args.members",
         '[{"seed": 1}, {"seed": 2, "optimizer": "sgd", "lr": 0.01}]'],
    ],
    ids=["implicit_em", "sae", "ensemble"],
)  # fmt: skip
def test_our_own_checkpoints_load_as_weights_only(tmp_path, model, trained):
    cli = fit_in_process(tmp_path, *SMALL, *model) if model else trained  # the plain model: the run above
    path = cli.trainer.checkpoint_callback.last_model_path
    state = torch.load(path, map_location="cpu", weights_only=True)  # torch's own check, not only ours
    assert state["global_step"] == 11 and state["optimizer_states"]
    saved, live = load_checkpoint(path)["state_dict"], cli.model.state_dict()
    assert saved.keys() == live.keys() and all(torch.equal(saved[k], live[k]) for k in live)


def test_find_last_checkpoint_prefers_the_newest_file(tmp_path):
    folder = tmp_path / "implicit_em" / "version_0" / "checkpoints"
    folder.mkdir(parents=True)
    assert find_last_checkpoint(tmp_path) is None
    old = folder / "epoch=0-step=11.ckpt"
    old.write_bytes(b"0")
    (folder / "last.ckpt").symlink_to(old.name)
    assert find_last_checkpoint(tmp_path) == folder / "last.ckpt"
    newer = folder / "epoch=1-step=22.ckpt"  # killed before last.ckpt was relinked
    newer.write_bytes(b"1")
    os.utime(newer, (old.stat().st_mtime + 5, old.stat().st_mtime + 5))
    assert find_last_checkpoint(tmp_path) == newer


# -- atomic writes ---------------------------------------------------------------------------------------


def _crash_inside_save(monkeypatch):
    """torch.save writes part of the file, then fails (a full disk, a killed process)."""

    def crash(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", crash)


def test_a_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    io = SafeCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"epoch": 0, "weight": torch.arange(5.0)}, path)
    _crash_inside_save(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"epoch": 1, "weight": torch.zeros(5)}, path)
    monkeypatch.undo()
    loaded = io.load_checkpoint(path)
    assert loaded["epoch"] == 0 and torch.equal(loaded["weight"], torch.arange(5.0))
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no half-written file left behind


def test_atomic_write_leaves_the_target_untouched_on_any_failure(tmp_path):
    target = tmp_path / "metrics.json"
    atomic_write(target, lambda f: f.write(b"first"))

    def interrupted(f):
        f.write(b"sec")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, interrupted)
    assert target.read_bytes() == b"first" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_a_crash_while_checkpointing_a_run_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from implicit_em.run.app import fit, rebuild
    from implicit_em.run.rundir import RunDir

    real_save, saves = torch.save, []

    def save_then_crash(obj, f, *args, **kwargs):
        saves.append(1)
        if len(saves) == 2:  # the end of epoch 1
            f.write(b"half")
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    cli = fit_in_process(tmp_path, *SMALL, "--trainer.max_epochs", "3", fit=False)
    monkeypatch.setattr(torch, "save", save_then_crash)
    with pytest.raises(OSError, match="No space left"):
        fit(cli)
    monkeypatch.undo()
    ckpt = find_last_checkpoint(tmp_path)
    assert ckpt is not None
    last = ckpt.parent / "last.ckpt"
    for path in (ckpt, last):  # the newest checkpoint, and last.ckpt, are epoch 0's, whole and loadable
        state = load_checkpoint(path)
        assert state["epoch"] == 0 and state["global_step"] == 11
        restored, _ = rebuild(RunDir.of(path)[0], checkpoint=path)
        assert restored.model.component_weights().shape == (8, 64)
    assert not [p for p in ckpt.parent.iterdir() if p.name.endswith(".tmp")]  # no half-written file left
