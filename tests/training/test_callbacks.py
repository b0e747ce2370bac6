"""The callbacks, each on a stand-in trainer and module: what they time, draw, probe, check and send."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from lightning.pytorch.callbacks import RichProgressBar

from implicit_em.data.memory import Split
from implicit_em.run.rundir import COMPONENTS_DIR, COMPONENTS_PNG
from implicit_em.training import callbacks as cb

CPU = torch.device("cpu")


class _Module:
    """A stand-in LightningModule: a fixed linear map as its forward, and what it logs."""

    def __init__(self, k=4, d=9, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(k, d, generator=g)
        self.model = SimpleNamespace(component_weights=lambda: self.weight, name="toy")
        self.device, self.logged, self.last_usage = CPU, {}, None

    def __call__(self, x):
        return (x @ self.weight.T).relu()

    def log(self, key, value, **kwargs):
        self.logged[key] = float(value)


def _trainer(tmp_path, epoch=0, image_shape=(3, 3), splits=None, loggers=(), sanity=False):
    splits = splits or {}
    datamodule = SimpleNamespace(image_shape=image_shape, device_split=lambda name: splits[name])
    return SimpleNamespace(current_epoch=epoch, log_dir=str(tmp_path), default_root_dir=str(tmp_path),
                           datamodule=datamodule, loggers=list(loggers), global_step=7 * (epoch + 1),
                           sanity_checking=sanity)  # fmt: skip


def test_epoch_timer_times_each_epoch_to_its_last_batch_and_keeps_the_record_in_checkpoints():
    timer, module = cb.EpochTimer(), _Module()
    for _ in range(2):
        timer.on_train_epoch_start(None, module)
        for i in range(3):
            timer.on_train_batch_end(None, module, None, None, i)
        timer.on_train_epoch_end(None, module)
    assert len(timer.epoch_seconds) == 2 and all(s >= 0 for s in timer.epoch_seconds)
    resumed = cb.EpochTimer()
    resumed.load_state_dict(timer.state_dict())
    assert resumed.epoch_seconds == timer.epoch_seconds and resumed.epoch_seconds is not timer.epoch_seconds


def test_component_images_every_n_epochs_and_at_the_end(tmp_path):
    images, module = cb.ComponentImages(every_n_epochs=2), _Module()
    for epoch in range(3):
        images.on_train_epoch_end(_trainer(tmp_path, epoch), module)
    drawn = sorted(p.name for p in (tmp_path / COMPONENTS_DIR).iterdir())
    assert drawn == ["epoch_0002.png"]
    images.on_fit_end(_trainer(tmp_path, 2), module)
    assert (tmp_path / COMPONENTS_PNG).stat().st_size > 0


def test_component_images_go_to_the_loggers_that_take_images_and_skip_non_image_data(tmp_path):
    sent = []
    wandb_like = SimpleNamespace(log_image=lambda key, images, step: sent.append((key, images, step)))
    cb.ComponentImages(every_n_epochs=0).on_fit_end(_trainer(tmp_path, 4, loggers=[wandb_like]), _Module())
    assert sent == [] and not (tmp_path / COMPONENTS_PNG).exists()  # 0: never drawn, not even at the end
    cb.ComponentImages(every_n_epochs=10).on_fit_end(_trainer(tmp_path, 4, loggers=[wandb_like]), _Module())
    assert sent == [("components", [str(tmp_path / COMPONENTS_PNG)], 35)]
    flat = tmp_path / "flat"
    cb.ComponentImages(every_n_epochs=1).on_train_epoch_end(_trainer(flat, 0, image_shape=()), _Module())
    assert not flat.exists()  # rows that are not images: nothing drawn


def _splits(labelled=True, n=60, d=9):
    g = torch.Generator().manual_seed(1)
    y = torch.arange(n) % 2
    x = torch.randn(n, d, generator=g) + 3 * y[:, None].float()  # two separable classes
    y = y if labelled else torch.full((n,), -1)
    return {"train": Split(x, y), "val": Split(x[:20], y[:20])}


def test_probe_during_training_logs_the_probe_every_n_epochs_only():
    probe, module = cb.ProbeDuringTraining(every_n_epochs=2), _Module()
    probe.on_validation_epoch_end(_trainer(None, epoch=0, splits=_splits()), module)
    assert module.logged == {}  # epoch 1 of every 2
    probe.on_validation_epoch_end(_trainer(None, epoch=1, splits=_splits()), module)
    assert 0.5 < module.logged["val/probe_accuracy"] <= 1.0
    quiet = _Module()
    probe.on_validation_epoch_end(_trainer(None, epoch=1, splits=_splits(), sanity=True), quiet)
    probe.on_validation_epoch_end(_trainer(None, epoch=1, splits=_splits(labelled=False)), quiet)
    cb.ProbeDuringTraining(every_n_epochs=0).on_validation_epoch_end(_trainer(None, epoch=1, splits=_splits()), quiet)
    assert quiet.logged == {}


def test_identity_check_logs_the_theorems_error_on_validation_inputs():
    check, module = cb.IdentityCheck(n_samples=16), _Module()
    check.on_validation_epoch_end(_trainer(None, splits=_splits()), module)
    assert 0 <= module.logged["val/identity_max_error"] < 1e-12  # autograd of the LSE = softmax(-d), float64
    sanity = _Module()
    check.on_validation_epoch_end(_trainer(None, splits=_splits(), sanity=True), sanity)
    assert sanity.logged == {}


def test_usage_histogram_goes_to_histogram_loggers():
    drawn = []
    tensorboard_like = SimpleNamespace(
        experiment=SimpleNamespace(add_histogram=lambda tag, values, step: drawn.append((tag, values, step)))
    )
    module = _Module()
    cb.UsageHistogram().on_validation_end(_trainer(None, epoch=3, loggers=[tensorboard_like]), module)
    assert drawn == []  # no usage yet (before the first validation)
    module.last_usage = torch.tensor([0.5, 0.25, 0.25, 0.0])
    cb.UsageHistogram().on_validation_end(_trainer(None, epoch=3, loggers=[tensorboard_like]), module)
    ((tag, values, step),) = drawn
    assert tag == "val/component_usage" and step == 3 and torch.equal(values, module.last_usage)


def test_progress_bar_shows_the_watched_numbers_under_short_names(monkeypatch):
    shown = {"train/loss": 1.5, "val/dead_components": 2.0, "val/probe_accuracy": 0.8, "v_num": 0, "other": 3.0}
    monkeypatch.setattr(RichProgressBar, "get_metrics", lambda self, trainer, module: dict(shown))
    assert cb.ProgressBar().get_metrics(None, None) == {"loss": 1.5, "dead": 2.0, "probe": 0.8}
