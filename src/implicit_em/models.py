"""The models as plain ``nn.Module``s: the decoder-free encoder and the standard SAE baseline.

Both start like ``nn.Linear`` (W and b uniform in +-1/sqrt(D)) from their own seeded generator, so a model
built with ``seed=s`` is the same whatever else the process drew from torch's global generator.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "softplus": F.softplus,
    "abs": torch.abs,
    "square": torch.square,
    "exp": torch.exp,
    "identity": lambda t: t,
}


def seeded_linear(in_features: int, out_features: int, generator: torch.Generator) -> nn.Linear:
    """``nn.Linear(in, out)`` with nn.Linear's initial distribution, U(-1/sqrt(in), 1/sqrt(in)) for W and b,
    drawn from ``generator`` (W first, then b)."""
    linear = nn.Linear(in_features, out_features)
    bound = 1.0 / math.sqrt(in_features)
    with torch.no_grad():
        linear.weight.copy_(torch.empty(out_features, in_features).uniform_(-bound, bound, generator=generator))
        linear.bias.copy_(torch.empty(out_features).uniform_(-bound, bound, generator=generator))
    return linear


@torch.no_grad()
def fit_to_data(linear: nn.Linear, x: Tensor, std: float | None = None) -> None:
    """Data-aware start of an affine map z = W x + b: b <- b - W mean(x), so every hyperplane passes through
    the data mean offset by its random initial bias; then, when ``std`` is given, each row of W and b scaled
    so its pre-activation has that standard deviation over ``x`` (directions kept). x: N x in."""
    w, b = linear.weight, linear.bias
    x = x.to(w)
    b -= w @ x.mean(0)
    if std is not None:
        scale = std / (x @ w.T).std(0).clamp_min(1e-12)
        w.mul_(scale.unsqueeze(1))
        b.mul_(scale)


class Encoder(nn.Module):
    """The decoder-free model: distances d = phi(W x + b), K components (the rows of W), no decoder."""

    def __init__(self, in_features: int, n_components: int, activation: str = "relu", seed: int = 0):
        super().__init__()
        self.linear = seeded_linear(in_features, n_components, torch.Generator().manual_seed(int(seed)))
        self.activation = activation
        self.phi = ACTIVATIONS[activation]

    def forward(self, x: Tensor) -> Tensor:
        """Distances d (N x K)."""
        return self.phi(self.linear(x))

    def pre_activation(self, x: Tensor) -> Tensor:
        """z = W x + b (N x K), before the activation."""
        return self.linear(x)

    def component_weights(self) -> Tensor:
        """K x D: the rows of W, the components the feature images show."""
        return self.linear.weight


class SparseAutoencoder(nn.Module):
    """The standard SAE baseline: codes a = ReLU(W_e x + b_e), reconstruction x_hat = W_d a + b_d."""

    def __init__(self, in_features: int, n_components: int, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(int(seed))
        self.encoder = seeded_linear(in_features, n_components, generator)
        self.decoder = seeded_linear(n_components, in_features, generator)

    def forward(self, x: Tensor) -> Tensor:
        """The codes a (N x K): the SAE's features."""
        return F.relu(self.encoder(x))

    def pre_activation(self, x: Tensor) -> Tensor:
        """W_e x + b_e (N x K), before the ReLU."""
        return self.encoder(x)

    def decode(self, codes: Tensor) -> Tensor:
        """x_hat = W_d a + b_d."""
        return self.decoder(codes)

    def component_weights(self) -> Tensor:
        """K x D: the encoder's rows."""
        return self.encoder.weight
