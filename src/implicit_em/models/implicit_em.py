"""The paper's decoder-free model: distances d = phi(W x + b), trained on the implicit-EM objective."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from implicit_em.core.distributed import gather_samples
from implicit_em.core.objective import implicit_em_objective
from implicit_em.errors import ConfigError, check, check_choice
from implicit_em.models.base import ACTIVATIONS, InferenceForm, Net, seeded_linear
from implicit_em.models.registry import register


@register("implicit_em")
class ImplicitEM(Net):
    """d = phi(W x + b): K components (the rows of W), no decoder; the codes are the distances d, trained on

        L = l_lse L_LSE(d) + l_var L_var(d) + l_tc L_tc(d) + l_wr L_wr(W)

    (:func:`~implicit_em.core.objective.implicit_em_objective`), whose L_LSE gradient is the E-step,
    dL_LSE/dd_ij = r_ij. The codes are dense: for a sparse code with an L0 k, use the ``implicit_em_sparse`` model
    (``configs/model/implicit_em_sparse.yaml``).

    Args:
        activation: phi, one of relu, softplus, abs, square, exp, identity.
        lambda_lse: weight of the log-sum-exp (mixture likelihood) term.
        lambda_var: weight of the variance term -sum_j log(Var d_j + eps) (prevents dead components).
        lambda_tc: weight of the decorrelation term ||Corr(d) - I||^2 (prevents redundant components).
        lambda_wr: weight of the weight-orthogonality term ||W_n W_n^T - I||^2 (0: off).
        eps: added to each variance inside the log of the variance term.
        tc_components: null (default): the exact decorrelation term. m < K: its unbiased estimate from m
            components drawn afresh each step (the same on every rank, fixed by the seed and the step, so
            resumed runs draw the same); see ``core.objective.decorrelation_subset_estimate`` for its variance.
    """

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
    ):
        if k is not None and not self.takes_k:
            raise ConfigError(
                f"model.k is not used by the paper's implicit_em model, whose distances are dense (got {k}); for a "
                f"sparse code add --config configs/model/implicit_em_sparse.yaml (then --model.k {k})"
            )
        super().__init__(in_features, n_components, k, seed)
        check_choice(activation, "model.net.activation", ACTIVATIONS)
        check(tc_components is None or tc_components >= 2, "model.net.tc_components", "null or an integer >= 2",
              tc_components)  # fmt: skip
        self.lambdas = {"lambda_lse": lambda_lse, "lambda_var": lambda_var, "lambda_tc": lambda_tc,
                        "lambda_wr": lambda_wr}  # fmt: skip
        for key, lam in self.lambdas.items():
            check(lam >= 0, f"model.net.{key}", ">= 0", lam)
        check(any(lam > 0 for lam in self.lambdas.values()), "model.net.lambda_*", "not all 0 (nothing to train)",
              self.lambdas)  # fmt: skip
        check(eps > 0, "model.net.eps", "> 0", eps)
        self.activation, self.eps, self.tc_components = activation, eps, tc_components
        self.linear = seeded_linear(in_features, n_components, torch.Generator().manual_seed(self.seed))
        self.phi = ACTIVATIONS[activation]

    def forward(self, x: Tensor) -> Tensor:
        """The codes (N x K): the distances d = phi(W x + b)."""
        return self.phi(self.linear(x))

    def first_layer(self) -> nn.Linear:
        return self.linear

    def objective_inputs(self, step: int) -> tuple[Tensor | None, torch.Generator | None]:
        """What every objective of this family takes besides the batch: W for the weight term (None when
        l_wr = 0) and the generator of the decorrelation subsets (None without ``tc_components``), seeded by the
        net's seed and the optimiser step."""
        weight = self.component_weights() if self.lambdas["lambda_wr"] else None
        subsets = torch.Generator().manual_seed(self.seed * 1_000_003 + step) if self.tc_components else None
        return weight, subsets

    def objective(self, x: Tensor, step: int) -> dict[str, Tensor]:
        d = gather_samples(self(x))  # the global batch under DDP
        weight, subsets = self.objective_inputs(step)
        return implicit_em_objective(d, weight, eps=self.eps, tc_components=self.tc_components, generator=subsets,
                                     **self.lambdas)  # fmt: skip

    def settings(self) -> dict[str, Any]:
        return {"activation": self.activation, **self.lambdas, "eps": self.eps, "tc_components": self.tc_components}

    def inference_form(self) -> InferenceForm:
        if self.activation != "relu":
            raise ConfigError(
                f"activation {self.activation!r} cannot be exported: SAELens's standard architecture computes "
                "relu(x W_enc + b_enc); export a run trained with --model.net.activation relu"
            )
        return InferenceForm("standard", self.linear.weight, self.linear.bias)
