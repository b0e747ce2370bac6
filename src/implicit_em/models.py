"""The models as plain ``nn.Module``s: the decoder-free encoder and the standard SAE baseline.

Both hold S independent *members* (S = 1 for an ordinary run), each with its own parameters, so an
ensemble of seeds or settings trains as one module with batched matmuls while every member keeps its own
optimiser state. Outputs carry the member dimension first: ``(S, N, K)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

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


class StackedLinear(nn.Module):
    """S independent affine maps y_s = W_s x + b_s (W_s: out x in), one parameter pair per member.

    Initialised like ``nn.Linear`` (U(-1/sqrt(in), 1/sqrt(in)) for W and b) from each member's own
    generator, so member s equals a lone model built after ``torch.manual_seed(seed_s)``.
    """

    def __init__(self, in_features: int, out_features: int, generators: Sequence[torch.Generator]):
        super().__init__()
        bound = 1.0 / math.sqrt(in_features)
        self.weights = nn.ParameterList(
            nn.Parameter(torch.empty(out_features, in_features).uniform_(-bound, bound, generator=g))
            for g in generators
        )
        self.biases = nn.ParameterList(
            nn.Parameter(torch.empty(out_features).uniform_(-bound, bound, generator=g)) for g in generators
        )

    @property
    def n_members(self) -> int:
        return len(self.weights)

    def member_parameters(self, s: int) -> list[nn.Parameter]:
        return [self.weights[s], self.biases[s]]

    @torch.no_grad()
    def fit_to_data(self, x: Tensor, std: float | None = None) -> None:
        """Data-aware start: b_s <- b_s - W_s mean(x), so every hyperplane passes through the data mean
        offset by its random initial bias; then, when ``std`` is given, each row of W_s and b_s scaled so
        its pre-activation has that standard deviation over ``x`` (directions kept). x: N x in."""
        mean = x.mean(0)
        for w, b in zip(self.weights, self.biases):
            b -= w @ mean.to(w)
            if std is not None:
                scale = std / (x.to(w) @ w.T).std(0).clamp_min(1e-12)
                w.mul_(scale.unsqueeze(1))
                b.mul_(scale)

    def weight(self) -> Tensor:
        """All members' weights, S x out x in (a view when S = 1)."""
        if self.n_members == 1:
            return self.weights[0].unsqueeze(0)
        return torch.stack(list(self.weights))

    def bias(self) -> Tensor:
        if self.n_members == 1:
            return self.biases[0].unsqueeze(0)
        return torch.stack(list(self.biases))

    def forward(self, x: Tensor) -> Tensor:
        """x: N x in (shared by all members) or S x N x in (one batch per member) -> S x N x out."""
        if self.n_members == 1:
            return F.linear(x, self.weights[0], self.biases[0]).reshape(1, *x.shape[-2:-1], -1)
        w, b = self.weight(), self.bias()
        if x.dim() == 2:  # one batch for every member: a single wide matmul
            out = F.linear(x, w.flatten(0, 1), b.flatten())
            return out.unflatten(-1, (w.shape[0], w.shape[1])).transpose(0, 1)
        return torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))


def member_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


class Encoder(nn.Module):
    """The decoder-free model: distances d = phi(W x + b), K components, no decoder.

    The rows of W are the components (the paper's prototypes); phi defaults to ReLU.
    """

    def __init__(self, in_features: int, n_components: int, activation: str = "relu", seeds: Sequence[int] = (0,)):
        super().__init__()
        self.linear = StackedLinear(in_features, n_components, member_generators(seeds))
        self.activation = activation
        self.phi = ACTIVATIONS[activation]

    def forward(self, x: Tensor) -> Tensor:
        return self.phi(self.linear(x))

    def component_weights(self) -> Tensor:
        """S x K x D: the rows of W, the components the feature images show."""
        return self.linear.weight()

    def member_parameters(self, s: int) -> list[nn.Parameter]:
        return self.linear.member_parameters(s)


class SparseAutoencoder(nn.Module):
    """The standard SAE baseline: codes a = ReLU(W_e x + b_e), reconstruction x_hat = W_d a + b_d."""

    def __init__(self, in_features: int, n_components: int, seeds: Sequence[int] = (0,)):
        super().__init__()
        generators = member_generators(seeds)
        self.encoder = StackedLinear(in_features, n_components, generators)
        self.decoder = StackedLinear(n_components, in_features, generators)

    def forward(self, x: Tensor) -> Tensor:
        """The codes a (S x N x K): the SAE's features."""
        return F.relu(self.encoder(x))

    def decode(self, codes: Tensor) -> Tensor:
        """x_hat = W_d a + b_d for codes S x N x K."""
        return torch.baddbmm(self.decoder.bias().unsqueeze(1), codes, self.decoder.weight().transpose(1, 2))

    def component_weights(self) -> Tensor:
        return self.encoder.weight()

    def member_parameters(self, s: int) -> list[nn.Parameter]:
        return self.encoder.member_parameters(s) + self.decoder.member_parameters(s)
