"""The one LightningModule: a registered net (:mod:`implicit_em.models`), its objective, the validation
diagnostics and an optimiser injected from the config.

A training batch is a *chunk*: a list of micro-batches, one exact optimiser step each (see
:mod:`implicit_em.training.steps`). Each step goes through Lightning's ``manual_backward`` and
``optimizer.step``, so every backward and optimiser hook of every callback runs once per step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor

from implicit_em.core.sae import gao_learning_rate, lr_factor, warmup_steps_for
from implicit_em.errors import NonFiniteLossError, check
from implicit_em.eval.diagnostics import ComponentDiagnostics, effective_rank, weight_redundancy
from implicit_em.models import Net
from implicit_em.models.implicit_em import ImplicitEM

#: what the ``net`` argument takes: a registered Net class with its own settings, called with (D, K, k, seed)
NetCallable = Callable[[int, int, "int | None", int], Net]


def adam(params) -> torch.optim.Optimizer:
    """The default optimiser: Adam, lr 1e-3, fused (one kernel per step, the same update)."""
    return torch.optim.Adam(params, lr=1e-3, fused=True)


class ComponentModule(L.LightningModule):
    """Any registered net trained on its own objective: the data-aware start, the training step, the optimiser
    and the validation diagnostics.

    Args:
        net: the model (``--model.net ImplicitEM | ImplicitEMSparse | SparseAutoencoder | TopKSAE |
            BatchTopKSAE``, each with its own settings, ``--model.net.<setting>``); see ``implicit_em.models``.
        in_features: input dimension D (linked from the data).
        n_components: K, the number of components (rows of W; the SAEs' latents).
        k: codes kept per input, for the nets that take a target L0 (the sparse model, the TopK SAEs); null: the
            net's default.
        data_init: at the start of training, move every component's hyperplane through the training mean
            (b <- b - W mean(x)) and scale its row so the pre-activation has standard deviation ``init_std``
            over the training split. With nn.Linear's scale and [0, 1] pixels about half the components
            would start below the dead threshold Var(d_j) = 0.01, and a ReLU component negative on every
            input gets no gradient and stays dead. false: nn.Linear's start (the paper's).
        init_std: the pre-activation standard deviation of ``data_init``; null keeps nn.Linear's scale.
        optimizer: the torch optimiser (``--model.optimizer AdamW --model.optimizer.weight_decay 0.01``);
            default Adam, lr 1e-3, fused.
        lr: when given, the learning rate of every parameter group (overrides the optimiser's own); ``gao``:
            2e-4 / sqrt(K / 2^14), Gao et al.'s rule (the SAE configs' default).
        lr_warmup_steps: the learning rate rises linearly over the first W optimiser steps (0: no warm-up; null:
            W = min(1000, T / 20) for a run of T steps).
        lr_decay_fraction: the learning rate falls linearly to 0 over the last fraction F of the run's steps (0:
            none). With W and F the learning rate of step t is lr * :func:`~implicit_em.core.sae.lr_factor`,
            set before each step from the step alone (so a resumed run continues the same schedule).
        seed: the initial weights (linked from ``--seed_everything``).
    """

    def __init__(
        self,
        net: NetCallable = ImplicitEM,
        in_features: int = 64,
        n_components: int = 64,
        k: int | None = None,
        data_init: bool = True,
        init_std: float | None = 0.3,
        optimizer: OptimizerCallable = adam,
        lr: float | Literal["gao"] | None = None,
        lr_warmup_steps: int | None = 0,
        lr_decay_fraction: float = 0.0,
        seed: int = 0,
    ):
        super().__init__()
        check(init_std is None or init_std > 0, "model.init_std", "> 0 or null", init_std)
        check(lr is None or lr == "gao" or (not isinstance(lr, str) and lr > 0), "model.lr", "> 0, gao or null", lr)
        check(lr_warmup_steps is None or lr_warmup_steps >= 0, "model.lr_warmup_steps", ">= 0 or null",
              lr_warmup_steps)  # fmt: skip
        check(0 <= lr_decay_fraction <= 1, "model.lr_decay_fraction", "in [0, 1]", lr_decay_fraction)
        self.save_hyperparameters(ignore=["net", "optimizer"])
        self.automatic_optimization = False
        self.model = net(in_features, n_components, k, seed)
        self.make_optimizer = optimizer
        self.diagnostics = ComponentDiagnostics(n_components)
        self.register_buffer("initialized", torch.tensor(not data_init))
        self.total_steps = 0  # the run's optimiser steps, known once training starts (:meth:`plan`)

    # -- the model -----------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        """The codes (N x K): distances d for the implicit-EM model, codes a for the SAEs."""
        return self.model(x)

    def objective(self, x: Tensor, step: int | None = None) -> dict[str, Tensor]:
        """``{"loss": L, <term>: ...}``, scalars, on one (global) batch; ``step`` is the optimiser step that
        this batch makes (default: the trainer's ``global_step``; an ensemble passes its own to its members)."""
        return self.model.objective(x, self.global_step if step is None else step)

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def optimizer_name(self) -> str:
        """The injected optimiser's class name, lower case (``adam``, ``sgd``, ...)."""
        return type(self.make_optimizer([torch.nn.Parameter(torch.zeros(1))])).__name__.lower()

    def settings(self) -> dict[str, Any]:
        """The model's settings for results: its registry name, the shared ones, the optimiser, the net's own."""
        shared = {key: v for key, v in self.hparams.items() if isinstance(v, (int, float, str, bool)) or v is None}
        return {"model_name": self.model.name, **shared, "optimizer": self.optimizer_name, **self.model.settings()}

    def fit_to_data(self, x: Tensor) -> None:
        """The data-aware start on training inputs ``x``, once (a resumed run keeps its trained weights)."""
        if not bool(self.initialized):
            self.model.start_from_data(x, self.hparams.init_std)
            self.initialized.fill_(True)

    def on_train_start(self) -> None:
        self.fit_to_data(self.trainer.datamodule.device_split("train").x)
        self.plan(self.trainer)

    def plan(self, trainer) -> None:
        """The run's length: its optimiser steps T (for the learning-rate schedule and the end of training) and
        the rows it will see (T x the global batch, for the net's settings that scale with the run)."""
        self.total_steps = planned_steps(trainer)
        if self.total_steps:
            self.model.plan_training(self.total_steps * int(getattr(trainer.datamodule, "batch_size", 1)))
        scaled = self.hparams.lr_decay_fraction > 0 or self.hparams.lr_warmup_steps is None
        check(self.total_steps or not scaled, "model.lr_decay_fraction",
              "0 with lr_warmup_steps set, for a run of unbounded length", self.hparams.lr_decay_fraction)  # fmt: skip

    # -- training ------------------------------------------------------------------------------------
    def configure_optimizers(self):
        optimizer = self.make_optimizer(self.model.parameters())
        lr = self.hparams.lr
        for group in optimizer.param_groups:
            if lr is not None:
                group["lr"] = gao_learning_rate(self.hparams.n_components) if lr == "gao" else lr
            group["base_lr"] = group["lr"]  # what the schedule scales (kept in the optimiser's state)
        return optimizer

    def set_learning_rate(self, optimizer, step: int) -> None:
        """Every group's lr <- its base lr * :func:`lr_factor` of optimiser step ``step`` (0-based); a constant
        schedule leaves the optimiser as it is."""
        decay, warmup = self.hparams.lr_decay_fraction, self.hparams.lr_warmup_steps
        if not decay and warmup == 0:
            return
        warmup = warmup_steps_for(self.total_steps) if warmup is None else warmup
        factor = lr_factor(step, self.total_steps, warmup, decay)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor

    def take_step(self, optimizer) -> None:
        """One optimiser step after the backward pass: this step's learning rate, the net's constraint on the
        gradients, the step, the net's constraint on the weights; after the run's last step, the net's fit on the
        training rows (before that step's validation and checkpoint)."""
        self.set_learning_rate(optimizer, self.global_step)
        self.model.before_optimizer_step()
        optimizer.step()
        self.model.after_optimizer_step()
        if self.global_step == self.total_steps:
            self.finish_training()

    def finish_training(self) -> None:
        """The net's fit after its last step (:meth:`Net.finish_training`) on the training rows, once per step."""
        if getattr(self, "_finished_at", None) != self.global_step:
            self.model.finish_training(self.trainer.datamodule.device_split("train").x)
            self._finished_at = self.global_step

    def on_train_end(self) -> None:
        self.finish_training()  # a run stopped before its planned last step (the checkpoints then lack the fit)

    def training_step(self, chunk: list[Tensor], batch_idx: int) -> None:
        """One exact optimiser step per micro-batch of ``chunk``."""
        opt = self.optimizers()
        records = []
        for x in chunk:
            terms = self.objective(x)
            opt.zero_grad(set_to_none=True)
            self.manual_backward(terms["loss"])
            self.take_step(opt)
            records.append(torch.stack(list(terms.values())).detach())
        self.record_chunk(torch.stack(records), list(terms))

    def record_chunk(self, values: Tensor, names: list[str], suffix: str = "") -> None:
        """Stop on a non-finite term (one host sync per chunk), add the chunk to the epoch means, and write
        the loss of every ``log_every_n_steps``-th optimiser step at that step. values: steps x terms."""
        check_finite(values, names, self.global_step - len(values), self.current_epoch, suffix, self.trainer)
        for i, name in enumerate(names):
            self.log(f"train/{name}{suffix}", values[:, i].mean(), on_step=False, on_epoch=True,
                     batch_size=len(values), prog_bar=name == "loss" and not suffix)  # fmt: skip
        every = self.trainer.log_every_n_steps
        if every and self.global_step % every == 0:  # chunks end on multiples of log_every_n_steps
            step_loss = float(values[-1, 0])
            for logger in self.loggers:
                logger.log_metrics({f"train/loss_step{suffix}": step_loss}, step=self.global_step)

    # -- validation: diagnostics over the whole split ------------------------------------------------
    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.diagnostics.update(self(batch[0]))

    def diagnostic_values(self) -> dict[str, Tensor]:
        """The validation diagnostics over the split (synced across ranks), and the weight metrics; resets."""
        values = self.diagnostics.compute()
        self.diagnostics.reset()
        self.last_usage = values.pop("usage")
        weight = self.model.component_weights()
        values["weight_redundancy"] = weight_redundancy(weight)
        values["effective_rank"] = effective_rank(weight)
        return values

    def on_validation_epoch_end(self) -> None:
        for name, value in self.diagnostic_values().items():
            self.log(f"val/{name}", value.float(), prog_bar=name in ("dead_components", "responsibility_entropy"))


def planned_steps(trainer) -> int:
    """T, the optimiser steps the fit will take: the Trainer's estimate, or, for a training loader without a
    length (chunks of several steps), ``max_epochs`` x the loader's batches per epoch (at most ``max_steps``);
    0 for a run of unbounded length."""
    estimate = trainer.estimated_stepping_batches
    if estimate != float("inf") and estimate > 0:
        return int(estimate)
    per_epoch = getattr(trainer.train_dataloader, "n_batches", None)
    epochs = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs > 0 else None
    steps = [s for s in (trainer.max_steps, per_epoch * epochs if per_epoch and epochs else None) if s and s > 0]
    return int(min(steps)) if steps else 0


def check_finite(values: Tensor, names: list[str], first_step: int, epoch: int, suffix: str, trainer) -> None:
    """Raise :class:`NonFiniteLossError` naming the first non-finite term of a chunk (steps x terms)."""
    if bool(torch.isfinite(values).all()):
        return
    step, _ = (~torch.isfinite(values)).nonzero()[0].tolist()
    bad = [n for n, v in zip(names, values[step]) if not torch.isfinite(v)]
    term = next((t for t in bad if t != "loss"), "total")  # the total is non-finite whenever a term is
    ckpt = getattr(trainer.checkpoint_callback, "last_model_path", "") or "none saved yet"
    raise NonFiniteLossError(
        f"non-finite {term} loss{suffix} at optimiser step {first_step + step + 1} (epoch {epoch}); training "
        f"stopped; last good checkpoint: {ckpt}; lower the learning rate or check the data"
    )
