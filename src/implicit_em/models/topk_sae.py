"""The TopK SAE baseline (Gao et al. 2024): a = TopK(ReLU(W_e x + b_e)), x_hat = W_d a + b_d, loss MSE."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from implicit_em.core.objective import topk_sae_objective
from implicit_em.models.base import InferenceForm, Net, keep_top_k, seeded_linear
from implicit_em.models.registry import register


def unit_norm_directions(in_features: int, n_components: int, seed: int) -> Tensor:
    """D x K random directions of unit norm (the decoder columns of Gao et al.'s start), from ``seed``."""
    g = torch.Generator().manual_seed(int(seed))
    directions = torch.randn(in_features, n_components, generator=g)
    return directions / directions.norm(dim=0, keepdim=True).clamp_min(1e-12)


class TiedStartSAE(Net):
    """An SAE started as Gao et al. start theirs: decoder columns of unit norm in random directions (from the
    seed's own generator), the encoder their transpose, biases 0. Subclasses choose the sparsity."""

    takes_k = True

    def __init__(self, in_features: int, n_components: int, k: int | None = 32, seed: int = 0):
        super().__init__(in_features, n_components, k, seed)
        generator = torch.Generator().manual_seed(self.seed)
        self.encoder = seeded_linear(in_features, n_components, generator)
        self.decoder = seeded_linear(n_components, in_features, generator)
        directions = unit_norm_directions(in_features, n_components, self.seed)
        with torch.no_grad():
            self.decoder.weight.copy_(directions)
            self.encoder.weight.copy_(directions.T)
            self.decoder.bias.zero_()
            self.encoder.bias.zero_()

    def first_layer(self) -> nn.Linear:
        return self.encoder

    def decode(self, codes: Tensor) -> Tensor:
        """x_hat = W_d a + b_d."""
        return self.decoder(codes)


@register("topk_sae")
class TopKSAE(TiedStartSAE):
    """codes a = TopK(ReLU(W_e x + b_e)) with k per input (``--model.k``), x_hat = W_d a + b_d, loss MSE (no L1:
    the TopK is the sparsity)."""

    def __init__(self, in_features: int, n_components: int, k: int | None = 32, seed: int = 0):
        super().__init__(in_features, n_components, 32 if k is None else k, seed)

    def forward(self, x: Tensor) -> Tensor:
        """The codes a (N x K), at most k nonzero per row."""
        return keep_top_k(self.encoder(x), self.k)

    def objective(self, x: Tensor, step: int) -> dict[str, Tensor]:
        return topk_sae_objective(x, self.decode(self(x)))

    def settings(self) -> dict[str, Any]:
        return {"k": self.k}

    def inference_form(self) -> InferenceForm:
        decoder = (self.decoder.weight.T, self.decoder.bias)
        return InferenceForm("topk", self.encoder.weight, self.encoder.bias, decoder, k=self.k)
