"""The models as plain ``nn.Module``s: the decoder-free encoder and the standard SAE baseline.

Both hold S independent *members* (S = 1 for an ordinary run), each with its own parameters, so an
ensemble of seeds or settings trains as one module with batched matmuls while every member keeps its own
optimiser state. Outputs carry the member dimension first: ``(S, N, K)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence

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


def first_appearance(keys: Sequence[Hashable]) -> tuple[list, list[int]]:
    """The distinct keys in order of first appearance, and the index of each key among them."""
    distinct: list = []
    for k in keys:
        if k not in distinct:
            distinct.append(k)
    return distinct, [distinct.index(k) for k in keys]


def member_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


class StackedLinear(nn.Module):
    """S independent affine maps y_s = W_s x + b_s (W_s: out x in), one per member.

    Members with the same *block* key (the module uses: same optimiser settings and same data order) are
    stored together as one S_b x out x in parameter: a block is one wide matmul and one optimiser update,
    which is what makes an ensemble fast. Initialised like ``nn.Linear`` (U(-1/sqrt(in), 1/sqrt(in)) for
    W and b) from each member's own generator, so member s equals a lone model built after
    ``torch.manual_seed(seed_s)``.

    Args:
        generators: one per member.
        blocks: a key per member (default: all members in one block).
        inputs: per member, which slice of a U x N x in input it reads (its data order); members of one
            block must read the same slice. None: inputs are shared (N x in) or per member (S x N x in).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        generators: Sequence[torch.Generator],
        blocks: Sequence[Hashable] | None = None,
        inputs: Sequence[int] | None = None,
    ):
        super().__init__()
        n = len(generators)
        keys = [(b, None if inputs is None else inputs[s]) for s, b in enumerate(blocks or [0] * n)]
        _, block_of = first_appearance(keys)
        self.members = [[s for s in range(n) if block_of[s] == b] for b in range(max(block_of) + 1)]
        self.inputs = None if inputs is None else [inputs[m[0]] for m in self.members]
        self.where = {s: (b, i) for b, ms in enumerate(self.members) for i, s in enumerate(ms)}
        bound = 1.0 / math.sqrt(in_features)
        pairs = [
            (torch.empty(out_features, in_features).uniform_(-bound, bound, generator=g),
             torch.empty(out_features).uniform_(-bound, bound, generator=g))
            for g in generators
        ]  # fmt: skip
        self.weights = nn.ParameterList(nn.Parameter(torch.stack([pairs[s][0] for s in ms])) for ms in self.members)
        self.biases = nn.ParameterList(nn.Parameter(torch.stack([pairs[s][1] for s in ms])) for ms in self.members)
        order = [s for ms in self.members for s in ms]
        reorder = None if order == list(range(n)) else torch.argsort(torch.tensor(order))
        self.register_buffer("reorder", reorder, persistent=False)

    @property
    def n_members(self) -> int:
        return len(self.where)

    def member_weight(self, s: int) -> Tensor:
        """W_s (out x in), a view into its block."""
        b, i = self.where[s]
        return self.weights[b][i]

    def member_bias(self, s: int) -> Tensor:
        b, i = self.where[s]
        return self.biases[b][i]

    def block_parameters(self, b: int) -> list[nn.Parameter]:
        return [self.weights[b], self.biases[b]]

    def _in_member_order(self, blocks: list[Tensor]) -> Tensor:
        stacked = blocks[0] if len(blocks) == 1 else torch.cat(blocks)
        return stacked if self.reorder is None else stacked.index_select(0, self.reorder)

    def weight(self) -> Tensor:
        """All members' weights, S x out x in (a view when there is one block)."""
        return self._in_member_order(list(self.weights))

    def bias(self) -> Tensor:
        return self._in_member_order(list(self.biases))

    @torch.no_grad()
    def fit_to_data(self, x: Tensor, std: float | None = None) -> None:
        """Data-aware start: b_s <- b_s - W_s mean(x), so every hyperplane passes through the data mean
        offset by its random initial bias; then, when ``std`` is given, each row of W_s and b_s scaled so
        its pre-activation has that standard deviation over ``x`` (directions kept). x: N x in."""
        mean = x.mean(0)
        for s in range(self.n_members):
            w, b = self.member_weight(s), self.member_bias(s)
            b -= w @ mean.to(w)
            if std is not None:
                scale = std / (x.to(w) @ w.T).std(0).clamp_min(1e-12)
                w.mul_(scale.unsqueeze(1))
                b.mul_(scale)

    def forward(self, x: Tensor) -> Tensor:
        """-> S x N x out. x: N x in (one batch for all); U x N x in with ``inputs`` (block b reads
        x[inputs_b]); or S x N x in without ``inputs`` (one batch per member)."""
        if x.dim() == 3 and self.inputs is None:  # per member: one batched matmul
            return torch.baddbmm(self.bias().unsqueeze(1), x, self.weight().transpose(1, 2))
        outs = []
        for b, (w, bias) in enumerate(zip(self.weights, self.biases)):
            xb = x if x.dim() == 2 else x[self.inputs[b]]
            if w.shape[0] == 1:
                outs.append(F.linear(xb, w[0], bias[0]).unsqueeze(0))
            else:  # every member of the block at once: one wide matmul
                out = F.linear(xb, w.flatten(0, 1), bias.flatten())
                outs.append(out.unflatten(-1, w.shape[:2]).transpose(0, 1))
        return self._in_member_order(outs)


class Encoder(nn.Module):
    """The decoder-free model: distances d = phi(W x + b), K components, no decoder.

    The rows of W are the components (the paper's prototypes); phi defaults to ReLU.
    """

    def __init__(
        self,
        in_features: int,
        n_components: int,
        activation: str = "relu",
        seeds: Sequence[int] = (0,),
        blocks: Sequence[Hashable] | None = None,
        inputs: Sequence[int] | None = None,
    ):
        super().__init__()
        self.linear = StackedLinear(in_features, n_components, member_generators(seeds), blocks, inputs)
        self.activation = activation
        self.phi = ACTIVATIONS[activation]

    def forward(self, x: Tensor) -> Tensor:
        return self.phi(self.pre_activation(x))

    def pre_activation(self, x: Tensor) -> Tensor:
        """z = W x + b (S x N x K), before the activation."""
        return self.linear(x)

    def component_weights(self) -> Tensor:
        """S x K x D: the rows of W, the components the feature images show."""
        return self.linear.weight()

    def block_members(self) -> list[list[int]]:
        return self.linear.members

    def block_parameters(self, b: int) -> list[nn.Parameter]:
        return self.linear.block_parameters(b)

    def member_parameters(self, s: int) -> list[Tensor]:
        """Member s's W and b (views into their blocks)."""
        return [self.linear.member_weight(s), self.linear.member_bias(s)]


class SparseAutoencoder(nn.Module):
    """The standard SAE baseline: codes a = ReLU(W_e x + b_e), reconstruction x_hat = W_d a + b_d."""

    def __init__(
        self,
        in_features: int,
        n_components: int,
        seeds: Sequence[int] = (0,),
        blocks: Sequence[Hashable] | None = None,
        inputs: Sequence[int] | None = None,
    ):
        super().__init__()
        generators = member_generators(seeds)
        self.encoder = StackedLinear(in_features, n_components, generators, blocks, inputs)
        self.decoder = StackedLinear(n_components, in_features, generators, blocks)

    def forward(self, x: Tensor) -> Tensor:
        """The codes a (S x N x K): the SAE's features."""
        return F.relu(self.pre_activation(x))

    def pre_activation(self, x: Tensor) -> Tensor:
        """W_e x + b_e (S x N x K), before the ReLU."""
        return self.encoder(x)

    def decode(self, codes: Tensor) -> Tensor:
        """x_hat = W_d a + b_d for codes S x N x K."""
        return self.decoder(codes)

    def component_weights(self) -> Tensor:
        return self.encoder.weight()

    def block_members(self) -> list[list[int]]:
        return self.encoder.members

    def block_parameters(self, b: int) -> list[nn.Parameter]:
        return self.encoder.block_parameters(b) + self.decoder.block_parameters(b)

    def member_parameters(self, s: int) -> list[Tensor]:
        """Member s's W_e, b_e, W_d, b_d (views into their blocks)."""
        e, d = self.encoder, self.decoder
        return [e.member_weight(s), e.member_bias(s), d.member_weight(s), d.member_bias(s)]
