"""Callbacks: epoch timing, component images, the probe during training, and the identity check."""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.utilities import rank_zero_only

from implicit_em.core.objective import autograd_lse_gradient, responsibilities
from implicit_em.eval.figures import save_component_grid
from implicit_em.eval.probe import torch_probe
from implicit_em.run.rundir import COMPONENTS_DIR, COMPONENTS_PNG, RunDir


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class EpochTimer(L.Callback):
    """Wall time of each training epoch: from its start to the end of its last training batch.

    Validation, checkpointing and the probe are outside it. Saved in checkpoints, so a resumed run
    reports every epoch; an epoch resumed from a checkpoint inside it counts the time before the
    checkpoint (``epoch_so_far``) and the time from the resume on, not the pause between.
    """

    def __init__(self):
        self.epoch_seconds: list[float] = []
        self._start = self._last = time.perf_counter()
        self._carried = 0.0  # seconds of the epoch in progress spent before a resume
        self._resumed = False

    def on_train_start(self, trainer, pl_module) -> None:  # every fit, a resume inside an epoch included
        _sync(pl_module.device)
        self._start = self._last = time.perf_counter()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        _sync(pl_module.device)
        self._start = self._last = time.perf_counter()
        if not self._resumed:  # a new epoch; the one resumed into keeps what it had before the checkpoint
            self._carried = 0.0
        self._resumed = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        _sync(pl_module.device)
        self._last = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.epoch_seconds.append(self._carried + self._last - self._start)
        self._carried, self._start, self._resumed = 0.0, self._last, False

    def state_dict(self) -> dict:
        return {"epoch_seconds": list(self.epoch_seconds), "epoch_so_far": self._carried + self._last - self._start}

    def load_state_dict(self, state_dict: dict) -> None:
        self.epoch_seconds = list(state_dict["epoch_seconds"])
        self._carried = float(state_dict.get("epoch_so_far", 0.0))  # older checkpoints: the resumed part only
        self._resumed = True


class ComponentImages(L.Callback):
    """The rows of W as images in the data's shape (the paper's Figure 4), every N epochs and at the end.

    Saved as ``components/epoch_XXXX.png`` and ``components.png`` in the run directory and sent to the
    loggers that take images (W&B, TensorBoard).

    Args:
        every_n_epochs: how often during training, besides once at the end (0: never, not even at the end).
    """

    def __init__(self, every_n_epochs: int = 10):
        self.every_n_epochs = every_n_epochs

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        epoch = trainer.current_epoch + 1
        if self.every_n_epochs and epoch % self.every_n_epochs == 0:
            self._draw(
                trainer, pl_module, RunDir.of_trainer(trainer) / COMPONENTS_DIR / f"epoch_{epoch:04d}.png", epoch
            )

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.every_n_epochs:
            self._draw(trainer, pl_module, RunDir.of_trainer(trainer) / COMPONENTS_PNG, trainer.current_epoch)

    @rank_zero_only
    def _draw(self, trainer, pl_module, path: Path, epoch: int) -> None:
        shape = getattr(trainer.datamodule, "image_shape", None)
        if not shape:
            return
        weights = pl_module.model.component_weights().detach()
        usage = getattr(pl_module, "last_usage", None)  # the most used components first, when K is large
        title = f"{getattr(pl_module.model, 'name', type(pl_module).__name__)} components, epoch {epoch}"
        save_component_grid(weights, shape, path, title=title, usage=usage)
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(key="components", images=[str(path)], step=trainer.global_step)
            elif hasattr(getattr(logger, "experiment", None), "add_image"):
                import matplotlib.image

                logger.experiment.add_image("components", matplotlib.image.imread(path), epoch, dataformats="HWC")


class ProbeDuringTraining(L.Callback):
    """The fast linear probe (train split -> validation split) every N epochs, logged as
    ``val/probe_accuracy``. Every rank computes the same value from the full in-memory splits.

    Args:
        every_n_epochs: how often (0: never during training; the final probe is in metrics.json).
    """

    def __init__(self, every_n_epochs: int = 10):
        self.every_n_epochs = every_n_epochs

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        epoch = trainer.current_epoch + 1
        if trainer.sanity_checking or not self.every_n_epochs or epoch % self.every_n_epochs:
            return
        dm = trainer.datamodule
        train, val = dm.device_split("train"), dm.device_split("val")
        if not bool((train.y >= 0).any()) or not bool((val.y >= 0).any()):  # unlabelled data: nothing to probe
            return
        with torch.no_grad():
            f_train, f_val = pl_module(train.x), pl_module(val.x)
        pl_module.log("val/probe_accuracy", torch_probe(f_train, train.y, f_val, val.y), prog_bar=True)


class IdentityCheck(L.Callback):
    """Checks the paper's theorem on live distances once per epoch: max |dL_LSE/dd - softmax(-d)|
    over a batch of validation inputs, the gradient by autograd of the textbook LSE, logged as
    ``val/identity_max_error`` (float64)."""

    def __init__(self, n_samples: int = 256):
        self.n_samples = n_samples

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        x = trainer.datamodule.device_split("val").x[: self.n_samples]
        with torch.no_grad():
            d = pl_module(x).double()
        error = (autograd_lse_gradient(d) - responsibilities(d)).abs().max()
        pl_module.log("val/identity_max_error", error.float(), sync_dist=True)


class UsageHistogram(L.Callback):
    """Mean responsibility of each component over the validation split, sent every validation
    epoch to the loggers that draw histograms: W&B as a bar chart of usage by component, TensorBoard as a
    histogram. A flat histogram is a mixture that uses all its components; a spike is collapse."""

    @rank_zero_only
    def on_validation_end(self, trainer, pl_module) -> None:
        usage = getattr(pl_module, "last_usage", None)
        if usage is None or trainer.sanity_checking:
            return
        u = usage.detach().float().cpu()
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(logger, "log_image"):  # W&B
                import wandb

                table = wandb.Table(data=[[j, float(v)] for j, v in enumerate(u)], columns=["component", "usage"])
                experiment.log(
                    {
                        "val/component_usage": wandb.plot.bar(table, "component", "usage"),
                        "trainer/global_step": trainer.global_step,
                    }
                )
            elif hasattr(experiment, "add_histogram"):  # TensorBoard
                experiment.add_histogram("val/component_usage", u, trainer.current_epoch)


class ProgressBar(RichProgressBar):
    """Rich progress bar with the loss and the diagnostics users watch, under short names."""

    SHORT = {
        "train/loss": "loss",
        "train/loss_step": "loss_step",
        "val/dead_components": "dead",
        "val/responsibility_entropy": "H(r)",
        "val/probe_accuracy": "probe",
    }

    def get_metrics(self, trainer, pl_module) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        return {self.SHORT[k]: v for k, v in metrics.items() if k in self.SHORT}
