"""The standard sparse autoencoder baseline: a = ReLU(W_e x + b_e), x_hat = W_d a + b_d, loss MSE + l1 |a|."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from implicit_em.core.objective import sae_objective
from implicit_em.errors import check
from implicit_em.models.base import InferenceForm, Net, UnitNormDecoder, seeded_linear
from implicit_em.models.registry import register


@register("sae")
class SparseAutoencoder(UnitNormDecoder, Net):
    """The standard SAE: ReLU encoder, linear decoder, loss mean (x - x_hat)^2 + l1 * mean |a|.

    The paper's comparison trains it as the implicit-EM model trains (the same data-aware start of the encoder,
    free decoder norms); ``unit_norm_decoder`` adds the field's constraint, under which the L1 penalty cannot be
    dodged by growing the decoder: decoder directions rescaled to unit norm at the start and after every step, and
    the gradient along them removed before it (:mod:`implicit_em.core.sae`).

    Args:
        l1: weight of the L1 sparsity penalty.
        unit_norm_decoder: keep the decoder directions (the K columns of W_d) at unit norm.
    """

    def __init__(
        self,
        in_features: int,
        n_components: int,
        k: int | None = None,
        seed: int = 0,
        l1: float = 0.01,
        unit_norm_decoder: bool = False,
    ):
        super().__init__(in_features, n_components, k, seed)
        check(l1 >= 0, "model.net.l1", ">= 0", l1)
        self.l1, self.unit_norm_decoder = l1, bool(unit_norm_decoder)
        generator = torch.Generator().manual_seed(self.seed)
        self.encoder = seeded_linear(in_features, n_components, generator)
        self.decoder = seeded_linear(n_components, in_features, generator)
        self.after_optimizer_step()  # with unit_norm_decoder, the directions start at unit norm

    def forward(self, x: Tensor) -> Tensor:
        """The codes a (N x K)."""
        return F.relu(self.encoder(x))

    def first_layer(self) -> nn.Linear:
        return self.encoder

    def decode(self, codes: Tensor) -> Tensor:
        """x_hat = W_d a + b_d."""
        return self.decoder(codes)

    def objective(self, x: Tensor, step: int) -> dict[str, Tensor]:
        codes = self(x)
        return sae_objective(x, self.decode(codes), codes, self.l1)

    def settings(self) -> dict[str, Any]:
        return {"l1": self.l1, "unit_norm_decoder": self.unit_norm_decoder}

    def inference_form(self) -> InferenceForm:
        return InferenceForm("standard", self.encoder.weight, self.encoder.bias, self._decoder())

    def _decoder(self) -> tuple[Tensor, Tensor]:
        return self.decoder.weight.T, self.decoder.bias
