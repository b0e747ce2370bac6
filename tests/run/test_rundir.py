"""The run directory: finding a run from what a user passes, its files by name, and one-line refusals."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
import yaml

from implicit_em.errors import DataError
from implicit_em.models.sae import SparseAutoencoder
from implicit_em.run import rundir
from implicit_em.run.rundir import RunDir


def _run(tmp_path, name="implicit_em", version="version_0", checkpoints=("epoch=0-step=11.ckpt",)) -> RunDir:
    run = RunDir(tmp_path / name / version)
    run.checkpoint_dir.mkdir(parents=True)
    for i, ckpt in enumerate(checkpoints):
        (run.checkpoint_dir / ckpt).write_bytes(b"x")
        os.utime(run.checkpoint_dir / ckpt, (time.time() - 100 + i, time.time() - 100 + i))
    return run


def _config(run: RunDir, config: dict) -> None:
    run.config_path.write_text(yaml.safe_dump(config))


def test_the_layout_names_the_component_images_and_keeps_density_in_the_histograms_name():
    assert rundir.COMPONENTS_PNG == "components.png" and rundir.COMPONENTS_DIR == "components"
    assert "density" in rundir.DENSITY_PNG and rundir.DENSITY_PNG.endswith(".png")
    run = RunDir("r")
    assert run.config_path.name == rundir.CONFIG and run.metrics_path.name == rundir.METRICS_JSON
    assert run / "x" == run.path / "x" and run.checkpoint_dir == run.path / rundir.CHECKPOINTS


def test_a_run_directory_gives_its_newest_checkpoint_and_last_ckpt_wins(tmp_path):
    run = _run(tmp_path, checkpoints=("epoch=0-step=11.ckpt", "epoch=1-step=22.ckpt"))
    assert RunDir.of(run.path) == (run, run.checkpoint_dir / "epoch=1-step=22.ckpt")
    (run.checkpoint_dir / "last.ckpt").write_bytes(b"x")
    os.utime(run.checkpoint_dir / "last.ckpt", (time.time() - 500, time.time() - 500))  # older, yet named last
    assert RunDir.of(run.path)[1].name == "last.ckpt"


def test_a_checkpoint_file_gives_its_run(tmp_path):
    run = _run(tmp_path)
    ckpt = run.checkpoint_dir / "epoch=0-step=11.ckpt"
    found, checkpoint = RunDir.of(ckpt)
    assert found.path == run.path.resolve() and checkpoint == ckpt
    assert RunDir.of_checkpoint(ckpt) == found


def test_a_missing_path_or_a_run_without_checkpoints_is_one_line(tmp_path):
    with pytest.raises(DataError, match="does not exist; pass a run directory"):
        RunDir.of(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no checkpoints/\\*.ckpt"):
        RunDir.of(tmp_path / "empty")


def test_find_last_checkpoint_takes_the_newest_run_and_survives_a_kill_before_relinking(tmp_path):
    assert RunDir.find_last_checkpoint(tmp_path) is None
    old = _run(tmp_path, version="version_0", checkpoints=("epoch=0-step=11.ckpt", "last.ckpt"))
    new = _run(tmp_path, version="version_1", checkpoints=("epoch=0-step=11.ckpt",))
    os.utime(new.checkpoint_dir / "epoch=0-step=11.ckpt")  # now: the newest file of all
    (new.checkpoint_dir / "last.ckpt").symlink_to(new.checkpoint_dir / "epoch=0-step=11.ckpt")
    assert RunDir.find_last_checkpoint(tmp_path) == new.checkpoint_dir / "last.ckpt"
    # killed after writing a checkpoint, before relinking last.ckpt: the new file is found, not the stale link
    (new.checkpoint_dir / "epoch=1-step=22.ckpt").write_bytes(b"x")
    assert RunDir.find_last_checkpoint(tmp_path) == new.checkpoint_dir / "epoch=1-step=22.ckpt"
    assert old.path != new.path


def test_remove_if_empty_removes_only_a_run_without_files(tmp_path):
    empty = RunDir(tmp_path / "implicit_em" / "version_0")
    (empty.path / "checkpoints").mkdir(parents=True)
    empty.remove_if_empty()
    assert not (tmp_path / "implicit_em").exists()  # its name folder went too, being empty
    kept = _run(tmp_path)
    kept.remove_if_empty()
    assert kept.path.is_dir()


def test_config_and_metrics_read_back(tmp_path):
    run = _run(tmp_path)
    with pytest.raises(DataError, match="no config.yaml"):
        run.config()
    assert run.metrics() == {}
    _config(run, {"seed_everything": 3, "data": {"init_args": {"root": str(tmp_path / "h")}}})
    run.metrics_path.write_text(json.dumps({"probe_accuracy": 0.5}))
    assert run.config()["seed_everything"] == 3 and run.metrics() == {"probe_accuracy": 0.5}
    assert run.data_root() == tmp_path / "h"


def test_holds_config_compares_settings_not_comments(tmp_path):
    run = _run(tmp_path)
    assert not run.holds_config("a: 1\n")
    run.config_path.write_text("# lightning.pytorch==2.6\na: 1\nb: [1, 2]\n")
    assert run.holds_config("b:\n- 1\n- 2\na: 1\n")
    assert not run.holds_config("a: 2\nb: [1, 2]\n")


def test_require_config_names_what_is_wrong_with_the_path_given(tmp_path):
    lone = tmp_path / "models" / "model.ckpt"
    lone.parent.mkdir()
    lone.write_bytes(b"x")
    run, _ = RunDir.of(lone)
    with pytest.raises(DataError) as e:
        run.require_config(given=lone)
    assert str(e.value).startswith(f"{lone} is a checkpoint outside a run directory")
    folder = _run(tmp_path)
    with pytest.raises(DataError, match=f"{folder.path} has no config.yaml"):
        folder.require_config(given=folder.path)
    _config(folder, {"a": 1})
    folder.require_config(given=folder.checkpoint_dir / "epoch=0-step=11.ckpt")  # a run's own checkpoint: fine


def test_net_class_comes_from_the_config_for_plain_runs_and_ensembles(tmp_path):
    run = _run(tmp_path)
    _config(run, {"model": {"init_args": {"net": {"class_path": "implicit_em.models.sae.SparseAutoencoder"}}}})
    assert run.net_class() is SparseAutoencoder
    _config(run, {"model": {"class_path": "implicit_em.training.ensemble.Ensemble",
                            "init_args": {"member_class": "sae"}}})  # fmt: skip
    assert run.net_class() is SparseAutoencoder


def test_manifest_of_the_data_root(tmp_path):
    run = _run(tmp_path)
    root = tmp_path / "harvest"
    root.mkdir()
    _config(run, {"data": {"init_args": {"root": str(root)}}})
    assert run.manifest() is None
    (root / "manifest.json").write_text("{not json")
    assert run.manifest() is None
    (root / "manifest.json").write_text(json.dumps({"layer": 3}))
    assert run.manifest() == {"layer": 3}


def test_readout_round_trip_and_refusals(tmp_path):
    run = _run(tmp_path)
    with pytest.raises(DataError, match="readout.safetensors is missing"):
        run.readout()
    R, c = torch.randn(4, 3, dtype=torch.float64), torch.randn(3)
    assert run.save_readout({"R": R, "c": c}) == run.readout_path
    back = run.readout()
    assert back["R"].dtype == torch.float32 and torch.allclose(back["R"], R.float()) and torch.equal(back["c"], c)
    run.save_readout({"R": R})
    with pytest.raises(DataError, match="lacks R or c"):
        run.readout()
