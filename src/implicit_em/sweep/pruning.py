"""What a trial tells Optuna's pruner during training: a validation number after every epoch.

Labelled data: the fast linear probe's validation accuracy (``val/probe_accuracy``, from
:class:`~implicit_em.training.callbacks.ProbeDuringTraining` run every epoch). Activations: the validation FVU of
a ridge readout fitted on training rows (``val/fvu``, :class:`ValidationFVU`). The final value of a trial is the
number in its metrics.json; these only let the pruner stop poor trials early.
"""

from __future__ import annotations

import lightning as L
import optuna
import torch

from implicit_em.eval.sae_metrics import fit_ridge_readout, readout_scores

#: the per-epoch validation number logged for each metrics.json objective
MONITORS = {"val_probe_accuracy": "val/probe_accuracy", "val_fvu": "val/fvu"}


class ValidationFVU(L.Callback):
    """After every validation epoch, ``val/fvu``: the fraction of variance of the validation rows (at most
    ``max_rows``) left unexplained by the ridge readout x ~ f R + c fitted on as many training rows
    (:func:`~implicit_em.eval.sae_metrics.fit_ridge_readout`), in raw units where the data is normalised:

        FVU = sum_i ||x_i - x_hat_i||^2 / sum_i ||x_i - mean(x)||^2.

    Args:
        max_rows: rows of each split used (the first ones: the same rows every epoch).
    """

    def __init__(self, max_rows: int = 4096):
        self.max_rows = max_rows

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        dm = trainer.datamodule
        train, val = dm.device_split("train"), dm.device_split("val")
        x_train, x_val = train.x[: self.max_rows], val.x[: self.max_rows]
        with torch.no_grad():
            f_train, f_val = pl_module(x_train), pl_module(x_val)
        to_raw = dm.normalization.inverse() if hasattr(dm, "normalization") else None
        readout = fit_ridge_readout(f_train, x_train, to_raw=to_raw)
        fvu = readout_scores(x_val, readout(f_val), to_raw)["fvu"]
        pl_module.log("val/fvu", torch.tensor(fvu, dtype=torch.float32))


class ReportToPruner(L.Callback):
    """Reports ``monitor`` (a logged validation number) to an Optuna trial after every validation epoch, at step
    = the epoch (from 0), and stops the trial when the study's pruner says so (raising
    :class:`optuna.TrialPruned`, which marks the trial PRUNED). An epoch without the number reports nothing."""

    def __init__(self, trial: optuna.trial.Trial, monitor: str):
        self.trial, self.monitor = trial, monitor
        self.reported: list[float] = []

    def on_validation_end(self, trainer, pl_module) -> None:
        value = trainer.callback_metrics.get(self.monitor)
        if trainer.sanity_checking or value is None:
            return
        value = float(value)
        self.trial.report(value, step=trainer.current_epoch)
        self.reported.append(value)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"{self.monitor} {value:.4g} after epoch {trainer.current_epoch + 1}")
