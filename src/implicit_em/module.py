"""LightningModules: the wiring of a model, its objective, the diagnostics and the optimiser.

A training batch is a *chunk*: a list of micro-batches, one exact optimiser step each (the loaders decide the
chunk lengths so that every step setting of the Trainer counts optimiser steps; see
:mod:`implicit_em.data.chunks`). Each step goes through Lightning's ``manual_backward`` and ``optimizer.step``,
so every backward and optimiser hook of every callback runs once per step.
"""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor

from implicit_em.distributed import gather_samples
from implicit_em.errors import NonFiniteLossError, check, check_choice
from implicit_em.metrics import ComponentDiagnostics, effective_rank, weight_redundancy
from implicit_em.models import ACTIVATIONS, Encoder, SparseAutoencoder, TopKSparseAutoencoder, fit_to_data
from implicit_em.objective import implicit_em_objective, sae_objective, topk_sae_objective

OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}


def make_optimizer(name: str, params, lr: float, momentum: float = 0.0, weight_decay: float = 0.0):
    """The torch optimiser ``name`` (adam, adamw, sgd), fused (one kernel per step, same update) where torch
    has it: float32/64 parameters on a CPU or CUDA device."""
    params = list(params)
    kwargs = {"lr": lr, "weight_decay": weight_decay, **({"momentum": momentum} if name == "sgd" else {})}
    if all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float64) for p in params):
        kwargs["fused"] = True
    return OPTIMIZERS[name](params, **kwargs)


class ComponentModule(L.LightningModule):
    """What the implicit-EM model and the SAE share: the data-aware start, the training step, the optimiser
    and the validation diagnostics. Subclasses build ``self.model`` and implement :meth:`objective`.

    Args (shared by the subclasses):
        in_features: input dimension D (linked from the data).
        n_components: K, the number of components (rows of W; the SAE's latents).
        data_init: at the start of training, move every component's hyperplane through the training mean
            (b <- b - W mean(x)) and scale its row so the pre-activation has standard deviation ``init_std``
            over the training split. With nn.Linear's scale and [0, 1] pixels about half the components
            would start below the dead threshold Var(d_j) = 0.01, and a ReLU component negative on every
            input gets no gradient and stays dead. false: nn.Linear's start (the paper's).
        init_std: the pre-activation standard deviation of ``data_init``; null keeps nn.Linear's scale.
        optimizer: adam, adamw or sgd.
        lr: learning rate.
        momentum: SGD momentum.
        weight_decay: the optimiser's weight decay.
        seed: the initial weights (linked from ``--seed_everything``).
    """

    def __init__(
        self,
        in_features: int,
        n_components: int,
        data_init: bool,
        init_std: float | None,
        optimizer: str,
        lr: float,
        momentum: float,
        weight_decay: float,
        seed: int,
    ):
        super().__init__()
        check(in_features >= 1, "model.in_features", ">= 1", in_features)
        check(n_components >= 2, "model.n_components", "an integer >= 2", n_components)
        check_choice(optimizer, "model.optimizer", OPTIMIZERS)
        check(lr > 0, "model.lr", "> 0", lr)
        check(momentum >= 0, "model.momentum", ">= 0", momentum)
        check(weight_decay >= 0, "model.weight_decay", ">= 0", weight_decay)
        check(init_std is None or init_std > 0, "model.init_std", "> 0 or null", init_std)
        self.automatic_optimization = False
        self.diagnostics = ComponentDiagnostics(n_components)
        self.register_buffer("initialized", torch.tensor(not data_init))

    # -- the model -----------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        """Features (N x K): distances d for the implicit-EM model, codes a for the SAE."""
        return self.model(x)

    def objective(self, x: Tensor, step: int | None = None) -> dict[str, Tensor]:
        """``{"loss": L, <term>: ...}``, scalars, on one (global) batch; ``step`` is the optimiser step that
        this batch makes (default: the trainer's ``global_step``; an ensemble passes its own to its members)."""
        raise NotImplementedError

    def first_layer(self) -> torch.nn.Linear:
        """The affine map whose rows are the components (what the data-aware start adjusts)."""
        raise NotImplementedError

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def fit_to_data(self, x: Tensor) -> None:
        """The data-aware start on training inputs ``x``, once (a resumed run keeps its trained weights)."""
        if not bool(self.initialized):
            fit_to_data(self.first_layer(), x, self.hparams.init_std)
            self.initialized.fill_(True)

    def on_train_start(self) -> None:
        self.fit_to_data(self.trainer.datamodule.device_split("train").x)

    # -- training ------------------------------------------------------------------------------------
    def configure_optimizers(self):
        h = self.hparams
        return make_optimizer(h.optimizer, self.model.parameters(), h.lr, h.momentum, h.weight_decay)

    def training_step(self, chunk: list[Tensor], batch_idx: int) -> None:
        """One exact optimiser step per micro-batch of ``chunk``."""
        opt = self.optimizers()
        records = []
        for x in chunk:
            terms = self.objective(x)
            opt.zero_grad(set_to_none=True)
            self.manual_backward(terms["loss"])
            opt.step()
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


class ImplicitEM(ComponentModule):
    """The decoder-free model d = phi(Wx + b) trained on the implicit-EM objective.

    Args:
        activation: phi, one of relu, softplus, abs, square, exp, identity.
        lambda_lse: weight of the log-sum-exp (mixture likelihood) term.
        lambda_var: weight of the variance term -sum_j log(Var d_j + eps) (prevents dead components).
        lambda_tc: weight of the decorrelation term ||Corr(d) - I||^2 (prevents redundant components).
        lambda_wr: weight of the weight-orthogonality term ||W_n W_n^T - I||^2 (0: off).
        eps: added to each variance inside the log of the variance term.
        tc_components: null (default): the exact decorrelation term. m < K: its unbiased estimate from m
            components drawn afresh each step (the same on every rank, fixed by the seed and the step, so
            resumed runs draw the same), for batches and dictionaries where even the exact N x N form costs
            more than the encoder; see ``objective.decorrelation_subset_estimate`` for its variance.
        (the other arguments: see :class:`ComponentModule`)
    """

    def __init__(
        self,
        in_features: int = 64,
        n_components: int = 64,
        activation: str = "relu",
        lambda_lse: float = 1.0,
        lambda_var: float = 1.0,
        lambda_tc: float = 1.0,
        lambda_wr: float = 0.0,
        eps: float = 1e-6,
        tc_components: int | None = None,
        data_init: bool = True,
        init_std: float | None = 0.3,
        optimizer: str = "adam",
        lr: float = 1e-3,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        seed: int = 0,
    ):
        super().__init__(in_features, n_components, data_init, init_std, optimizer, lr, momentum, weight_decay, seed)
        check_choice(activation, "model.activation", ACTIVATIONS)
        check(tc_components is None or tc_components >= 2, "model.tc_components", "null or an integer >= 2",
              tc_components)  # fmt: skip
        lambdas = {"lambda_lse": lambda_lse, "lambda_var": lambda_var, "lambda_tc": lambda_tc, "lambda_wr": lambda_wr}
        for key, lam in lambdas.items():
            check(lam >= 0, f"model.{key}", ">= 0", lam)
        check(any(lam > 0 for lam in lambdas.values()), "model.lambda_*", "not all 0 (nothing to train)", lambdas)
        check(eps > 0, "model.eps", "> 0", eps)
        self.save_hyperparameters()
        self.lambdas = lambdas
        self.model = Encoder(in_features, n_components, activation, seed)

    def first_layer(self) -> torch.nn.Linear:
        return self.model.linear

    def objective(self, x: Tensor, step: int | None = None) -> dict[str, Tensor]:
        d = gather_samples(self.model(x))  # the global batch under DDP
        weight = self.model.component_weights() if self.lambdas["lambda_wr"] else None
        m = self.hparams.tc_components
        step = self.global_step if step is None else step
        subsets = torch.Generator().manual_seed(self.hparams.seed * 1_000_003 + step) if m else None
        return implicit_em_objective(
            d, weight, eps=self.hparams.eps, tc_components=m, generator=subsets, **self.lambdas
        )


class SparseAutoencoderModule(ComponentModule):
    """The standard SAE baseline: ReLU encoder, linear decoder, loss MSE + l1 * mean |a|.

    Args:
        l1: weight of the L1 sparsity penalty.
        (the other arguments: see :class:`ComponentModule`; the data-aware start adjusts the encoder)
    """

    def __init__(
        self,
        in_features: int = 64,
        n_components: int = 64,
        l1: float = 0.01,
        data_init: bool = True,
        init_std: float | None = 0.3,
        optimizer: str = "adam",
        lr: float = 1e-3,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        seed: int = 0,
    ):
        super().__init__(in_features, n_components, data_init, init_std, optimizer, lr, momentum, weight_decay, seed)
        check(l1 >= 0, "model.l1", ">= 0", l1)
        self.save_hyperparameters()
        self.model = SparseAutoencoder(in_features, n_components, seed)

    def first_layer(self) -> torch.nn.Linear:
        return self.model.encoder

    def objective(self, x: Tensor, step: int | None = None) -> dict[str, Tensor]:
        codes = self.model(x)
        return sae_objective(x, self.model.decode(codes), codes, self.hparams.l1)


class TopKSparseAutoencoderModule(SparseAutoencoderModule):
    """The TopK SAE baseline (Gao et al. 2024): ReLU encoder keeping the k largest codes, linear decoder, loss
    MSE (no L1: the TopK is the sparsity).

    Args:
        k: codes kept per input.
        (the other arguments: see :class:`SparseAutoencoderModule`, whose ``l1`` is unused here)
    """

    def __init__(self, k: int = 32, **kwargs):
        super().__init__(**kwargs)
        n_components = self.hparams.n_components
        check(isinstance(k, int) and 1 <= k <= n_components, "model.k", f"an integer in 1..{n_components}", k)
        self.save_hyperparameters()
        self.model = TopKSparseAutoencoder(self.hparams.in_features, n_components, k, self.hparams.seed)

    def objective(self, x: Tensor, step: int | None = None) -> dict[str, Tensor]:
        return topk_sae_objective(x, self.model.decode(self.model(x)))


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
