"""Several models trained side by side in one run, each exactly as it would train alone.

``Ensemble`` holds S :class:`~implicit_em.training.module.ComponentModule` members of one registered model, built from shared settings plus each member's
own overrides. **What is exact:** member s computes, in the same order, the same float operations as a lone
run of its class with its settings on the same batches (``--seed_everything`` = its seed, same data settings):
its own seeded initial weights, its own data-aware start, its own forward, objective, backward and optimiser
on its own parameters. Its weights are therefore bitwise equal to the lone run's, step for step, on the same
machine and thread settings (tested). All members read the DataModule's batches (one data order per run).

A member whose loss turns non-finite stops alone: it is not stepped again (its weights stay those of its last
finite step), its result says when and why, and the others finish. The run fails only when every member
has stopped. The ensemble shows member 0 to callbacks (``ensemble(x)``, ``ensemble.model``).
"""

from __future__ import annotations

import contextvars
import functools
import inspect
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from implicit_em.errors import NonFiniteLossError, check


def member_module(member_class: str, in_features: int, n_components: int, settings: dict[str, Any]):
    """A :class:`ComponentModule` of the registered net ``member_class`` from one flat dict of settings, as
    ``scripts/train.py`` would build it: the module's own (seed, k, lr, data_init, ...), then the net's
    (``lambda_tc``, ``l1``, ...), then ``optimizer`` (a ``torch.optim`` class name, e.g. ``SGD``) and its
    arguments (``momentum``, ``weight_decay``, ...)."""
    from implicit_em.models import model_class
    from implicit_em.training.module import ComponentModule

    cls = model_class(member_class)
    settings = dict(settings)
    shared = set(inspect.signature(ComponentModule).parameters) - {"net", "optimizer", "in_features", "n_components"}
    module_args = {key: settings.pop(key) for key in list(settings) if key in shared}
    own = set(inspect.signature(cls).parameters) - {"in_features", "n_components", "k", "seed"}
    net_args = {key: settings.pop(key) for key in list(settings) if key in own}
    optimizer = settings.pop("optimizer", None)
    if optimizer is not None or settings:
        optimizer_class = optimizer_named(optimizer or "Adam")
        accepted = set(inspect.signature(optimizer_class).parameters) - {"params"}
        unknown = sorted(set(settings) - accepted)
        check(not unknown, "model.members", f"settings of ComponentModule, the {cls.name} net or the optimiser "
              f"({', '.join(sorted(shared | own | accepted))})", unknown)  # fmt: skip
        module_args["optimizer"] = functools.partial(optimizer_class, **settings)
    return ComponentModule(net=functools.partial(cls, **net_args), in_features=in_features, n_components=n_components,
                           **module_args)  # fmt: skip


def optimizer_named(name: str) -> type:
    """The ``torch.optim`` class called ``name`` (any case: ``SGD``, ``sgd``, ``AdamW``)."""
    classes = {o.__name__.lower(): o for o in vars(torch.optim).values() if isinstance(o, type)}
    found = classes.get(str(name).lower())
    check(found is not None, "a member's optimizer", "a torch.optim class name (Adam, AdamW, SGD, ...)", name)
    return found


class MemberOptimizers:
    """The members' torch optimisers stepped as one optimiser, so one ensemble step is one Trainer step.

    A member whose parameters have no gradient (a stopped member) is skipped by its optimiser."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers
        self.defaults: dict = {}
        self.state: dict = {}

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for o in self.optimizers:
            o.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"members": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        for o, s in zip(self.optimizers, state["members"]):
            o.load_state_dict(s)


class Ensemble(L.LightningModule):
    """S members of ``member_class`` trained together (see the module docstring for what is exact).

    Args:
        members: one dict per member: the member's own settings (``seed``, ``lr``, ``lambda_tc``, ...),
            overriding ``defaults``; an optional ``name`` labels the member in results.
        seeds: when given, every member once per seed (member-major order).
        member_class: the registered model of every member (``implicit_em``, ``sae``, ``topk_sae``, ...; see
            ``implicit_em.models``).
        defaults: settings every member shares (see :func:`member_module`).
        in_features: input dimension D (linked from the data).
        n_components: K of every member.
        seed: the seed of members that name none (linked from ``--seed_everything``).
    """

    def __init__(
        self,
        members: list[dict[str, Any]],
        seeds: list[int] | None = None,
        member_class: str = "implicit_em",
        defaults: dict[str, Any] | None = None,
        in_features: int = 64,
        n_components: int = 64,
        seed: int = 0,
    ):
        super().__init__()
        check(len(members) >= 1, "model.members", "a list of at least one member dict", members)
        self.save_hyperparameters()
        self.automatic_optimization = False
        specs = [{"seed": s, **m} for m in members for s in seeds] if seeds else [{"seed": seed, **m} for m in members]
        self.names = [str(m.pop("name", f"m{i}")) for i, m in enumerate(specs)]
        # each member in a fresh context: LightningCLI's context would hand every member the ensemble's
        # hyperparameters when the member saves its own
        self.members = nn.ModuleList(
            contextvars.Context().run(member_module, member_class, in_features, n_components, {**(defaults or {}), **m})
            for m in specs
        )
        self.register_buffer("stopped_at", torch.zeros(len(specs), dtype=torch.long))  # 0: still training
        self.stop_reasons: list[str | None] = [None] * len(specs)

    @property
    def model(self) -> nn.Module:
        """Member 0's model (what the callbacks show)."""
        return self.members[0].model

    def forward(self, x: Tensor) -> Tensor:
        return self.members[0](x)

    def n_parameters(self) -> int:
        return self.members[0].n_parameters()

    def alive(self) -> list[int]:
        return [s for s in range(len(self.members)) if int(self.stopped_at[s]) == 0]

    def member_status(self, s: int) -> dict[str, Any]:
        """Member s's ``name``, ``stopped_at_step`` (0: trained to the end) and ``stopped_because``."""
        return {
            "name": self.names[s],
            "stopped_at_step": int(self.stopped_at[s]),
            "stopped_because": self.stop_reasons[s],
        }

    def on_train_start(self) -> None:
        x = self.trainer.datamodule.device_split("train").x
        for m in self.members:
            m.fit_to_data(x)
            m.plan(self.trainer)

    def configure_optimizers(self):
        self.member_optimizers = MemberOptimizers([m.configure_optimizers() for m in self.members])
        return self.member_optimizers

    def training_step(self, chunk: list[Tensor], batch_idx: int) -> None:
        opt = self.optimizers()
        sums: dict[int, Tensor] = {}
        counts = dict.fromkeys(range(len(self.members)), 0)
        for x in chunk:
            alive = self.alive()
            if not alive:
                break
            terms = {s: self.members[s].objective(x, self.global_step) for s in alive}
            finite = torch.isfinite(torch.stack([terms[s]["loss"] for s in alive])).tolist()
            for s, ok in zip(alive, finite):
                if not ok:
                    self._stop(s, terms.pop(s))
            if not terms:
                break
            opt.zero_grad(set_to_none=True)
            self.manual_backward(sum(t["loss"] for t in terms.values()))
            self.take_step(opt, list(terms))
            for s, t in terms.items():
                values = torch.stack(list(t.values())).detach()
                sums[s] = sums[s] + values if s in sums else values
                counts[s] += 1
            self._names = list(next(iter(terms.values())))
        for s, total in sums.items():
            for i, name in enumerate(self._names):
                self.log(f"train/{name}/m{s}", total[i] / counts[s], on_step=False, on_epoch=True,
                         batch_size=counts[s])  # fmt: skip
        if not self.alive():
            reasons = "; ".join(f"member {s}: {r}" for s, r in enumerate(self.stop_reasons))
            raise NonFiniteLossError(f"every member stopped on a non-finite loss ({reasons}); lower the learning rates")

    def take_step(self, opt, stepping: list[int]) -> None:
        """One step of the members in ``stepping``, each as its lone run takes it
        (:meth:`ComponentModule.take_step`): its learning rate and constraints, the step; after the last step, each
        net's fit on the training rows."""
        step = self.global_step
        for s in stepping:
            self.members[s].set_learning_rate(self.member_optimizers.optimizers[s], step)
            self.members[s].model.before_optimizer_step()
        opt.step()
        last = self.global_step == self.members[stepping[0]].total_steps
        for s in stepping:
            self.members[s].model.after_optimizer_step()
            if last:
                self.members[s].model.finish_training(self.trainer.datamodule.device_split("train").x)

    def _stop(self, s: int, terms: dict[str, Tensor]) -> None:
        bad = [n for n, v in terms.items() if n != "loss" and not torch.isfinite(v)]
        step = self.global_step + 1
        self.stopped_at[s] = step
        self.stop_reasons[s] = f"non-finite {bad[0] if bad else 'total'} loss at optimiser step {step}"

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["stop_reasons"] = list(self.stop_reasons)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.stop_reasons = list(checkpoint.get("stop_reasons", self.stop_reasons))

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        for m in self.members:
            m.diagnostics.update(m(batch[0]))

    def on_validation_epoch_end(self) -> None:
        for s, m in enumerate(self.members):
            for name, value in m.diagnostic_values().items():
                self.log(f"val/{name}/m{s}", value.float())
