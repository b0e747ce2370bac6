"""The TopK sparse autoencoder baseline (Gao et al. 2024): only the k largest codes of each input survive.

(To be moved: the model into ``models.py``, the objective into ``objective.py``, the LightningModule into
``module.py`` and ``configs/model/topk_sae.yaml``'s class_path with it.)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from implicit_em.errors import check
from implicit_em.models import SparseAutoencoder
from implicit_em.module import ComponentModule


def keep_top_k(z: Tensor, k: int) -> Tensor:
    """a = TopK(ReLU(z)): the k largest of ReLU(z_i) per row kept, every other entry 0 (at most k nonzero;
    fewer when fewer than k pre-activations are positive)."""
    values, idx = F.relu(z).topk(min(k, z.shape[-1]), dim=-1)
    return torch.zeros_like(z).scatter(-1, idx, values)


class TopKSparseAutoencoder(SparseAutoencoder):
    """codes a = TopK(ReLU(W_e x + b_e)), reconstruction x_hat = W_d a + b_d (the SAE with a TopK).

    Initialised as Gao et al. do: decoder columns of unit norm in random directions (from ``seed``'s own
    generator), the encoder their transpose, biases 0.
    """

    def __init__(self, in_features: int, n_components: int, k: int, seed: int = 0):
        super().__init__(in_features, n_components, seed)
        if not 1 <= k <= n_components:
            raise ValueError(f"k must be in 1..n_components={n_components} (got {k})")
        self.k = k
        g = torch.Generator().manual_seed(int(seed))
        directions = torch.randn(in_features, n_components, generator=g)
        directions /= directions.norm(dim=0, keepdim=True).clamp_min(1e-12)
        with torch.no_grad():
            self.decoder.weight.copy_(directions)
            self.encoder.weight.copy_(directions.T)
            self.decoder.bias.zero_()
            self.encoder.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        """The codes a (N x K), at most k nonzero per row."""
        return keep_top_k(self.encoder(x), self.k)


def topk_sae_objective(x: Tensor, reconstruction: Tensor) -> dict[str, Tensor]:
    """TopK SAE loss L = mean (x - x_hat)^2 (over batch and dimensions): sparsity is the TopK's, so no L1.

    Returns ``{"loss": L, "mse": L, "fvu": sum (x - x_hat)^2 / sum (x - mean(x))^2}`` (the batch's FVU,
    logged, not optimised).
    """
    resid = (reconstruction - x).pow(2)
    mse = resid.mean()
    fvu = resid.sum() / (x - x.mean(0)).pow(2).sum().clamp_min(torch.finfo(x.dtype).tiny)
    return {"loss": mse, "mse": mse, "fvu": fvu.detach()}


def matched_k(l0: float, n_components: int) -> int:
    """The TopK k matching a model's L0: round(L0), within 1..K (NaN or 0 gives 1)."""
    return min(max(int(round(l0)) if math.isfinite(l0) else 1, 1), n_components)


class TopKSparseAutoencoderModule(ComponentModule):
    """The TopK SAE baseline: ReLU encoder keeping the k largest codes, linear decoder, loss MSE.

    Args:
        k: codes kept per input.
        (the other arguments: see :class:`implicit_em.module.ComponentModule`; the data-aware start adjusts
        the encoder)
    """

    def __init__(
        self,
        in_features: int = 64,
        n_components: int = 64,
        k: int = 32,
        data_init: bool = True,
        init_std: float | None = 0.3,
        optimizer: str = "adam",
        lr: float = 1e-3,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        seed: int = 0,
    ):
        super().__init__(in_features, n_components, data_init, init_std, optimizer, lr, momentum, weight_decay, seed)
        check(isinstance(k, int) and 1 <= k <= n_components, "model.k", f"an integer in 1..{n_components}", k)
        self.save_hyperparameters()
        self.model = TopKSparseAutoencoder(in_features, n_components, k, seed)

    def first_layer(self) -> nn.Linear:
        return self.model.encoder

    def objective(self, x: Tensor) -> dict[str, Tensor]:
        return topk_sae_objective(x, self.model.decode(self.model(x)))
