"""LightningModules: thin wiring of a model, its objective, the diagnostics and the optimisers.

Both modules train S >= 1 members at once (an ordinary run has S = 1). Optimisation is manual: a
Lightning batch carries several micro-batches and each gets its own exact optimiser step, which removes
Lightning's per-batch overhead from the step without changing the sequence of updates.
"""

from __future__ import annotations

import os
from collections import defaultdict
from typing import Any

import lightning as L
import torch
from torch import Tensor

from implicit_em.distributed import gather_samples
from implicit_em.errors import NonFiniteLossError, check, check_choice
from implicit_em.metrics import ComponentDiagnostics, effective_rank, weight_redundancy
from implicit_em.models import ACTIVATIONS, Encoder, SparseAutoencoder, first_appearance
from implicit_em.objective import implicit_em_objective, sae_objective

OPTIMIZERS = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}
MEMBER_KEYS = ("seed", "optimizer", "lr", "momentum", "weight_decay")


def default_seed() -> int:
    """The seed of ``--seed_everything`` (Lightning exports it), else 0."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


class ComponentModule(L.LightningModule):
    """What the implicit-EM model and the SAE share: members, optimisers, micro-steps, diagnostics.

    Subclasses build ``self.model`` (with ``forward``, ``component_weights`` and ``member_parameters``)
    and implement :meth:`objective`, returning ``{"loss": ..., <term>: ...}`` each of shape (S,).
    """

    #: keys a member spec may override on top of :data:`MEMBER_KEYS`
    member_hyperparameters: tuple[str, ...] = ()

    def __init__(self, members: list[dict[str, Any]] | None, **defaults: Any):
        super().__init__()
        self.automatic_optimization = False
        self.member_specs = resolve_members(members, defaults, MEMBER_KEYS + self.member_hyperparameters)
        self._nvml_check: str | None = None
        self._force_lightning_steps = False  # tests set it to compare both paths
        self._epoch_sum: Tensor | None = None
        self._pending_epoch_state: dict | None = None
        self._epoch_steps = 0
        self.epoch_means: dict[str, list[float]] = {}

    # -- members -------------------------------------------------------------------------------------
    @property
    def n_members(self) -> int:
        return len(self.member_specs)

    @property
    def member_seeds(self) -> list[int]:
        """Each member's seed: its initialisation and its data order (read by the DataModule)."""
        return [m["seed"] for m in self.member_specs]

    def per_member(self, key: str) -> float | Tensor:
        """A hyperparameter as a number when all members share it, else an S-vector on the module's device."""
        values = [float(m[key]) for m in self.member_specs]
        if len(set(values)) == 1:
            return values[0]
        return torch.tensor(values, device=self.device)

    def member_settings(self) -> dict[str, float | Tensor]:
        """:meth:`per_member` of every member hyperparameter, cached per device (they never change)."""
        cache = getattr(self, "_settings_cache", None)
        if cache is None or cache[0] != self.device:
            cache = self._settings_cache = (self.device, {k: self.per_member(k) for k in self.member_hyperparameters})
        return cache[1]

    def n_parameters(self) -> int:
        """Trainable parameters of one member."""
        return sum(p.numel() for p in self.model.member_parameters(0))

    # -- the model -----------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        """Features (S x N x K): distances d for the implicit-EM model, codes a for the SAE."""
        return self.model(x)

    def objective(self, x: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError

    # -- optimisation --------------------------------------------------------------------------------
    def member_blocks(self) -> dict[str, list]:
        """How the model stores the members: a block per (optimiser settings, data order), and which of the
        loader's data orders (distinct seeds, first appearance) each member reads."""
        settings = [(m["optimizer"], m["lr"], m["momentum"], m["weight_decay"], m["seed"]) for m in self.member_specs]
        return {"blocks": settings, "inputs": first_appearance(self.member_seeds)[1]}

    def configure_optimizers(self):
        """One optimiser per optimiser name, one parameter group per distinct (lr, momentum, weight_decay)."""
        groups: dict[str, dict[tuple, list]] = defaultdict(lambda: defaultdict(list))
        for b, members in enumerate(self.model.block_members()):
            m = self.member_specs[members[0]]
            groups[m["optimizer"]][(m["lr"], m["momentum"], m["weight_decay"])] += self.model.block_parameters(b)
        optimizers = []
        for name, by_setting in groups.items():
            param_groups = []
            for (lr, momentum, wd), params in by_setting.items():
                group = {"params": params, "lr": lr, "weight_decay": wd}
                if name == "sgd":
                    group["momentum"] = momentum
                param_groups.append(group)
            optimizers.append(OPTIMIZERS[name](param_groups, **fused_if_supported(param_groups)))
        return optimizers

    def training_step(self, batch: list[Tensor], batch_idx: int) -> None:
        """One exact optimiser step per micro-batch of the chunk ``batch``."""
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        fast = self._fast_steps()
        records = []
        for x in batch:
            for opt in optimizers:
                opt.optimizer.zero_grad(set_to_none=True)
            terms = self.objective(x)
            loss = terms["loss"].sum()
            if fast:
                loss.backward()
                for opt in optimizers:
                    opt.optimizer.step()
            else:
                self.manual_backward(loss)
                for opt in optimizers:
                    opt.step()
            records.append(torch.stack(list(terms.values())).detach())
        if fast:  # keep Lightning's step count (global_step) exact
            for _ in batch:
                for opt in optimizers:
                    opt._on_before_step()
                    opt._on_after_step()
        chunk = torch.stack(records).reshape(len(records), len(terms), -1)  # steps x terms x S
        self._term_names = list(terms)
        self._check_finite(chunk, self._term_names)
        self._epoch_sum = chunk.sum(0) if self._epoch_sum is None else self._epoch_sum + chunk.sum(0)
        self._epoch_steps += len(batch)
        if self.trainer.log_every_n_steps and batch_idx % self.trainer.log_every_n_steps == 0:
            self.log("train/loss_step", chunk[-1, 0].mean(), prog_bar=True)

    def _fast_steps(self) -> bool:
        """Step the torch optimisers directly, skipping Lightning's per-step hooks (``on_before_backward``,
        ``on_after_backward``, ``on_before_optimizer_step``), when nothing needs them: one process and no
        gradient scaler. Same updates either way; about 0.3 ms less per step on a CPU."""
        if self._force_lightning_steps or self.trainer.world_size > 1:
            return False
        return getattr(self.trainer.precision_plugin, "scaler", None) is None

    def _check_finite(self, chunk: Tensor, names: list[str]) -> None:
        """Stop on the first non-finite term of the chunk (one host sync per Lightning batch)."""
        if bool(torch.isfinite(chunk).all()):
            return
        bad = ~torch.isfinite(chunk)
        first, _, member = bad.nonzero()[0].tolist()
        # the total is non-finite whenever a term is: name the first non-finite term, else the total
        terms = [names[t] for t in bad[first, :, member].nonzero().flatten().tolist()]
        term = next((t for t in terms if t != "loss"), "total")
        step = self._epoch_steps + first
        ckpt = getattr(self.trainer.checkpoint_callback, "last_model_path", "") or "none saved yet"
        raise NonFiniteLossError(
            f"non-finite {term} loss at step {step} of epoch {self.current_epoch} (member {member}); "
            f"training stopped; last good checkpoint: {ckpt}; lower the learning rate or check the data"
        )

    def on_fit_start(self) -> None:
        # Importing Lightning sets PYTORCH_NVML_BASED_CUDA_CHECK=1, so torch.cuda.is_available() asks NVML
        # (which keeps a later fork() safe). torch's optimisers ask is_available() on every step; where NVML
        # is missing each ask dlopen()s it in vain, ~0.2 ms a step (a 30% slower epoch on a CPU here). The
        # processes are launched by now and we fork nothing, so torch's own cached check is safe here.
        self._nvml_check = os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK")
        os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "0"
        # A dead component gets zero gradients, and Adam's moments of its weights decay geometrically into
        # denormal floats (< 1e-38), which x86 CPUs compute ~100x slower: an ablation's LSE-only members
        # slowed every epoch. Flushing denormals to zero changes nothing above 1e-38.
        torch.set_flush_denormal(True)

    def on_fit_end(self) -> None:
        if self._nvml_check is not None:
            os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = self._nvml_check

    def on_train_epoch_start(self) -> None:
        # a run resumed from a mid-epoch checkpoint continues that epoch's sums
        pending, self._pending_epoch_state = self._pending_epoch_state, None
        if pending is not None and pending["epoch"] == self.current_epoch:
            self._epoch_sum, self._epoch_steps = pending["sum"], pending["steps"]
        else:
            self._epoch_sum, self._epoch_steps = None, 0

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["implicit_em"] = {
            "epoch_means": self.epoch_means,
            "epoch": self.current_epoch,
            "sum": self._epoch_sum,
            "steps": self._epoch_steps,
            "term_names": getattr(self, "_term_names", None),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("implicit_em")
        if state is not None:
            self.epoch_means = state["epoch_means"]
            self._term_names = state["term_names"]
            self._pending_epoch_state = state if state["steps"] else None

    def on_train_epoch_end(self) -> None:
        if self._epoch_sum is None:
            return
        means = self._epoch_sum / self._epoch_steps  # terms x S
        names = self._term_names
        self.epoch_means = {n: means[i].tolist() for i, n in enumerate(names)}
        for i, name in enumerate(names):
            for key, value in self.member_values(f"train/{name}", means[i]).items():
                self.log(key, value, sync_dist=True, prog_bar=key == "train/loss")

    def member_values(self, key: str, values: Tensor) -> dict[str, Tensor]:
        """``{key: v}`` for one member; ``{key/m<s>: v_s}`` per member for an ensemble."""
        if self.n_members == 1:
            return {key: values.reshape(-1)[0]}
        return {f"{key}/m{s}": v for s, v in enumerate(values)}

    # -- validation: diagnostics over the whole split --------------------------------------------------
    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.diagnostics.update(self(batch[0]))

    def on_validation_epoch_end(self) -> None:
        values = self.diagnostics.compute()
        self.diagnostics.reset()
        self.last_usage = values.pop("usage")
        weight = self.model.component_weights()
        values["weight_redundancy"] = weight_redundancy(weight)
        values["effective_rank"] = effective_rank(weight)
        for name, v in values.items():
            for key, value in self.member_values(f"val/{name}", v.float()).items():
                self.log(key, value, sync_dist=True, prog_bar=name in ("dead_components", "responsibility_entropy"))


class ImplicitEM(ComponentModule):
    """The decoder-free model d = phi(Wx + b) trained on the implicit-EM objective.

    Args:
        in_features: input dimension D (linked from the data).
        n_components: K, the number of mixture components (rows of W).
        activation: phi, one of relu, softplus, abs, square, exp, identity.
        lambda_lse: weight of the log-sum-exp (mixture likelihood) term.
        lambda_var: weight of the variance term -sum_j log(Var d_j + eps) (prevents dead components).
        lambda_tc: weight of the decorrelation term ||Corr(d) - I||^2 (prevents redundant components).
        lambda_wr: weight of the weight-orthogonality term ||W_n W_n^T - I||^2 (0: off).
        eps: added to each variance inside the log of the variance term.
        data_init: at the start of training, move every component's hyperplane through the training mean
            (b <- b - W mean(x)) and scale its row so the pre-activation has standard deviation ``init_std``
            over the training split. Same model, a data-independent start: with nn.Linear's scale and
            [0, 1] pixels about half the components start below the dead threshold Var(d_j) = 0.01, and a
            ReLU component negative on every input gets no gradient from any term and stays dead.
        init_std: the pre-activation standard deviation of ``data_init``; 0.3 puts Var(d_j) near 0.03
            (3x the dead threshold) for a ReLU through the mean. null: keep nn.Linear's scale.
        optimizer: adam, sgd or adamw.
        lr: learning rate.
        momentum: SGD momentum.
        weight_decay: the optimiser's weight decay.
        seed: initialisation and data-order seed (default: the ``--seed_everything`` value).
        members: train an ensemble: one dict per member overriding any of seed, optimizer, lr, momentum,
            weight_decay, lambda_lse, lambda_var, lambda_tc, lambda_wr.
    """

    member_hyperparameters = ("lambda_lse", "lambda_var", "lambda_tc", "lambda_wr")

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
        data_init: bool = True,
        init_std: float | None = 0.3,
        optimizer: str = "adam",
        lr: float = 1e-3,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        seed: int | None = None,
        members: list[dict[str, Any]] | None = None,
    ):
        check_model_args(in_features, n_components, optimizer, lr, momentum, weight_decay)
        check_choice(activation, "model.activation", ACTIVATIONS)
        for key, lam in (
            ("lambda_lse", lambda_lse),
            ("lambda_var", lambda_var),
            ("lambda_tc", lambda_tc),
            ("lambda_wr", lambda_wr),
        ):
            check(lam >= 0, f"model.{key}", ">= 0", lam)
        check(eps > 0, "model.eps", "> 0", eps)
        lambdas = (lambda_lse, lambda_var, lambda_tc, lambda_wr)
        check(any(lam > 0 for lam in lambdas), "model.lambda_*", "not all 0 (nothing to train)", lambdas)
        check(init_std is None or init_std > 0, "model.init_std", "> 0 or null", init_std)
        super().__init__(
            members,
            seed=default_seed() if seed is None else seed,
            optimizer=optimizer, lr=lr, momentum=momentum, weight_decay=weight_decay,
            lambda_lse=lambda_lse, lambda_var=lambda_var, lambda_tc=lambda_tc, lambda_wr=lambda_wr,
        )  # fmt: skip
        self.save_hyperparameters()
        self.eps, self.init_std = eps, init_std
        self.model = Encoder(in_features, n_components, activation, self.member_seeds, **self.member_blocks())
        self.register_buffer("initialized", torch.tensor(not data_init))
        self.diagnostics = ComponentDiagnostics(self.n_members, n_components)

    def on_train_start(self) -> None:
        """The data-aware start, once (a resumed run keeps its trained weights)."""
        if not bool(self.initialized):
            self.model.linear.fit_to_data(self.trainer.datamodule.device_split("train").x, self.init_std)
            self.initialized.fill_(True)

    def objective(self, x: Tensor) -> dict[str, Tensor]:
        d = self.model(x)
        d = gather_samples(d[0] if len(d) == 1 else d)  # one member: plain N x K matmuls
        lam = self.member_settings()
        weight = None
        if any(m["lambda_wr"] for m in self.member_specs):
            weight = self.model.component_weights()
            weight = weight[0] if len(weight) == 1 else weight
        return implicit_em_objective(d, weight, eps=self.eps, **lam)


class SparseAutoencoderModule(ComponentModule):
    """The standard SAE baseline: ReLU encoder, linear decoder, loss MSE + l1 * mean |a|.

    Args:
        in_features: input dimension D (linked from the data).
        n_components: K, the number of latent codes.
        l1: weight of the L1 sparsity penalty.
        optimizer: adam, sgd or adamw.
        lr: learning rate.
        momentum: SGD momentum.
        weight_decay: the optimiser's weight decay.
        seed: initialisation and data-order seed (default: the ``--seed_everything`` value).
        members: train an ensemble: one dict per member overriding any of seed, optimizer, lr, momentum,
            weight_decay, l1.
    """

    member_hyperparameters = ("l1",)

    def __init__(
        self,
        in_features: int = 64,
        n_components: int = 64,
        l1: float = 0.01,
        optimizer: str = "adam",
        lr: float = 1e-3,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        seed: int | None = None,
        members: list[dict[str, Any]] | None = None,
    ):
        check_model_args(in_features, n_components, optimizer, lr, momentum, weight_decay)
        check(l1 >= 0, "model.l1", ">= 0", l1)
        super().__init__(
            members, seed=default_seed() if seed is None else seed,
            optimizer=optimizer, lr=lr, momentum=momentum, weight_decay=weight_decay, l1=l1,
        )  # fmt: skip
        self.save_hyperparameters()
        self.model = SparseAutoencoder(in_features, n_components, self.member_seeds, **self.member_blocks())
        self.diagnostics = ComponentDiagnostics(self.n_members, n_components)

    def objective(self, x: Tensor) -> dict[str, Tensor]:
        codes = self.model(x)
        return sae_objective(x, self.model.decode(codes), codes, **self.member_settings())


def fused_if_supported(param_groups: list[dict]) -> dict:
    """``fused=True`` (one kernel per parameter and step, same update) where torch has it: float32/64
    parameters on a CPU or CUDA device."""
    params = [p for g in param_groups for p in g["params"]]
    ok = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float64) for p in params)
    return {"fused": True} if ok else {}


def check_model_args(in_features, n_components, optimizer, lr, momentum, weight_decay) -> None:
    """Validate the settings both modules share (called before anything is built)."""
    check(in_features >= 1, "model.in_features", ">= 1", in_features)
    check(n_components >= 2, "model.n_components", "an integer >= 2", n_components)
    check_choice(optimizer, "model.optimizer", OPTIMIZERS)
    check(lr > 0, "model.lr", "> 0", lr)
    check(momentum >= 0, "model.momentum", ">= 0", momentum)
    check(weight_decay >= 0, "model.weight_decay", ">= 0", weight_decay)


def resolve_members(
    members: list[dict[str, Any]] | None, defaults: dict[str, Any], allowed: tuple[str, ...]
) -> list[dict]:
    """Full settings of each member: the module's defaults overridden by the member's own keys."""
    specs = []
    for i, member in enumerate(members or [{}]):
        unknown = set(member) - set(allowed)
        check(not unknown, f"model.members[{i}]", "a dict with keys among " + ", ".join(allowed), sorted(unknown))
        specs.append({**defaults, **member})
    for i, m in enumerate(specs):
        check_choice(m["optimizer"], f"model.members[{i}].optimizer", OPTIMIZERS)
        check(m["lr"] > 0, f"model.members[{i}].lr", "> 0", m["lr"])
        for key in set(m) & {"momentum", "weight_decay", "l1", "lambda_lse", "lambda_var", "lambda_tc", "lambda_wr"}:
            check(m[key] >= 0, f"model.members[{i}].{key}", ">= 0", m[key])
    return specs
