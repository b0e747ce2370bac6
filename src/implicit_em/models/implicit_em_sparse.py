"""The sparse decoder-free model: the depths a = TopK_k(relu(-(W x + b))), trained on the truncated objective."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from implicit_em.core.distributed import gather_samples
from implicit_em.core.truncated import kept_set_objective, truncated_objective
from implicit_em.errors import check, check_choice
from implicit_em.models.base import InferenceForm, column_top_k, jump_relu, keep_top_k, update_running_threshold
from implicit_em.models.implicit_em import ImplicitEM
from implicit_em.models.registry import register

#: how the sparse net selects its kept components in training: the k nearest of each input, or each component's
#: N k / K nearest inputs (which reads one threshold per component at inference)
SELECTIONS = ("row", "component")


@register("implicit_em_sparse")
class ImplicitEMSparse(ImplicitEM):
    """The paper's model with a sparse code of L0 k (``--model.k``): with z = W x + b, the code users read
    (training, evaluation, readout, export: this forward) is

        a = TopK_k(relu(-z)),

    the k components nearest to x, each valued by its depth relu(-z) inside its halfspace (where the distance
    d = phi(z) is smallest), SAELens's ``topk`` form of the affine map -(W x + b). It trains on the truncated
    objective (:func:`~implicit_em.core.truncated.truncated_objective`): the truncated E-step L_LSE^T over the k
    kept components, on d = phi(z), the decorrelation term on the code a and the variance term on the dense depth
    relu(-z) (every component's, so none stays outside every input's top k: no dead components).

    Args, beyond the paper model's (activation, lambda_lse, lambda_var, lambda_tc, lambda_wr, eps, tc_components,
    each used alike by the truncated objective's terms):
        lambda_aux: weight of the E-step over the components no row of the batch keeps
            (``core.truncated.unkept_lse_loss``: each moved toward the inputs it is nearest to, against dead
            components); 0 (the default): off. aux_k: how many of them per row (null: k).
        selection: ``row`` (the default): the k nearest components of every input, as above. ``component``:
            training keeps each component's N k / K deepest inputs of the batch (k per input on average; every
            component fires on as many inputs, so none is dead), with the truncated E-step over each row's kept set
            (``core.truncated.kept_set_objective``); inference and export replace the batch's selection by one
            threshold theta_j per component, the running mean (``theta_momentum``, 0.9) of the smallest depth each
            batch kept: a_j = relu(-z_j) 1[-z_j > theta_j], SAELens's ``jumprelu`` form. theta starts where the
            data-aware start's code keeps N k / K inputs per component.
    """

    takes_k = True

    def __init__(
        self,
        in_features: int,
        n_components: int,
        k: int | None = None,
        seed: int = 0,
        activation: str = "relu",
        lambda_lse: float = 1.0,
        lambda_var: float = 1.0,
        lambda_tc: float = 1.0,
        lambda_wr: float = 0.0,
        eps: float = 1e-6,
        tc_components: int | None = None,
        lambda_aux: float = 0.0,
        aux_k: int | None = None,
        selection: str = "row",
        theta_momentum: float = 0.9,
    ):
        check(k is not None, "model.k", f"an integer in 1..{n_components}: the sparse model's L0", k)
        super().__init__(in_features, n_components, k, seed, activation, lambda_lse, lambda_var, lambda_tc,
                         lambda_wr, eps, tc_components)  # fmt: skip
        check(lambda_aux >= 0, "model.net.lambda_aux", ">= 0", lambda_aux)
        check(aux_k is None or aux_k >= 1, "model.net.aux_k", "null or an integer >= 1", aux_k)
        check_choice(selection, "model.net.selection", SELECTIONS)
        check(0 <= theta_momentum < 1, "model.net.theta_momentum", "in [0, 1)", theta_momentum)
        self.lambda_aux, self.aux_k = lambda_aux, aux_k
        self.selection, self.theta_momentum = selection, theta_momentum
        if selection == "component":  # the inference thresholds (only then: the row-selected net has W and b only)
            self.register_buffer("threshold", torch.zeros(n_components))
            self.register_buffer("threshold_set", torch.tensor(False))

    def forward(self, x: Tensor) -> Tensor:
        """The code (N x K): a = TopK_k(relu(-z)), every entry but the k depths 0; with ``selection component``,
        a = relu(-z) 1[-z > theta], the trained thresholds."""
        z = self.linear(x)
        if self.selection == "component":
            return jump_relu(F.relu(-z), self.threshold)
        return keep_top_k(-z, self.k)

    @torch.no_grad()
    def start_from_data(self, x: Tensor, std: float | None) -> None:
        """The data-aware start; with ``selection component``, theta_j then starts at the smallest of component j's
        N k / K largest depths over (up to 8,192 of) the inputs x, so the untrained net's code keeps that many."""
        super().start_from_data(x, std)
        if self.selection == "component":
            g = torch.Generator().manual_seed(self.seed)
            rows = x[torch.randperm(len(x), generator=g)[:8192].to(x.device)]
            self.threshold.copy_(column_top_k(-self.linear(rows.to(self.linear.weight)), self.k)[1])
            self.threshold_set.fill_(True)

    def objective(self, x: Tensor, step: int) -> dict[str, Tensor]:
        """The truncated objective (class docstring); with ``selection component`` also the running thresholds
        moved toward the batch's (training steps only), logged as ``threshold`` (their mean)."""
        z = gather_samples(self.linear(x))  # the global batch under DDP
        weight, subsets = self.objective_inputs(step)
        shared = {"eps": self.eps, "tc_components": self.tc_components, "generator": subsets,
                  "lambda_aux": self.lambda_aux, **self.lambdas}  # fmt: skip
        if self.selection == "row":
            return truncated_objective(z, self.k, self.phi, weight, aux_k=self.aux_k, **shared)
        s = -z  # one node for the code and the dense depth: their gradients summed before the sign flip
        a, theta_batch = column_top_k(s, self.k)
        if self.training:
            update_running_threshold(self.threshold, self.threshold_set, theta_batch.detach(), self.theta_momentum)
        terms = kept_set_objective(z, F.relu(s), a, self.phi, weight, aux_k=self.aux_k or self.k, **shared)
        return {**terms, "threshold": self.threshold.detach().mean()}  # logged: a scalar

    def settings(self) -> dict[str, Any]:
        own = {**super().settings(), "k": self.k, "lambda_aux": self.lambda_aux, "aux_k": self.aux_k,
               "selection": self.selection}  # fmt: skip
        if self.selection == "component":
            own.update(theta_momentum=self.theta_momentum, threshold=float(self.threshold.mean()))
        return own

    def inference_form(self) -> InferenceForm:
        """SAELens's ``topk`` form of -(W x + b) (whatever phi the objective uses), or with ``selection component``
        its ``jumprelu`` form, relu(-z) 1[-z > theta]."""
        weight, bias = -self.linear.weight, -self.linear.bias
        if self.selection == "component":
            return InferenceForm("jumprelu", weight, bias, threshold=self.threshold.clone(),
                                 extra={"code": "depth", "trained_as": "componenttopk", "k": self.k})  # fmt: skip
        return InferenceForm("topk", weight, bias, k=self.k, extra={"code": "depth"})
