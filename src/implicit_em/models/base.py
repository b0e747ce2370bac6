"""What every registered model shares: the ``Net`` interface and the layers and starts the models build on.

A *net* is a plain ``nn.Module`` that maps inputs x (N x D, normalised) to codes (N x K, one column per
*component*), knows its own training objective, and describes its inference form for export. The one
LightningModule (:class:`implicit_em.training.module.ComponentModule`) wires any net to the Trainer, so a new
model is one file in this package (a subclass of :class:`Net` under :func:`~implicit_em.models.registry.register`)
plus one config in ``configs/model/``.

Every net starts like ``nn.Linear`` (W and b uniform in +-1/sqrt(D)) from its own seeded generator, so a net
built with ``seed=s`` is the same whatever else the process drew from torch's global generator.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from implicit_em.core.sae import remove_parallel_gradient, unit_norm

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


def keep_top_k(z: Tensor, k: int) -> Tensor:
    """a = TopK(ReLU(z)): the k largest of ReLU(z_i) per row kept, every other entry 0 (at most k nonzero;
    fewer when fewer than k pre-activations are positive)."""
    values, idx = F.relu(z).topk(min(k, z.shape[-1]), dim=-1)
    return torch.zeros_like(z).scatter(-1, idx, values)


def jump_relu(z: Tensor, threshold: Tensor) -> Tensor:
    """a = z * 1[z > theta] (theta >= 0 per component or one scalar): JumpReLU, the inference form of
    thresholded codes."""
    return z * (z > threshold)


def batch_top_k(z: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """a = BatchTopK(ReLU(z)): the N k largest entries of ReLU(z) (N x K) kept over the whole batch, every other
    entry 0; and theta_batch, the smallest kept positive value (0 when none is positive)."""
    flat = F.relu(z).flatten()
    values, idx = flat.topk(min(k * z.shape[0], flat.numel()))
    codes = torch.zeros_like(flat).scatter(0, idx, values).view_as(z)
    positive = values[values > 0]
    return codes, positive.min() if len(positive) else values.new_zeros(())


def column_top_k(z: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """a = the m = max(1, round(N k / K)) largest entries of ReLU(z) (N x K) kept in every column, every other entry
    0: each component fires on its m inputs (k per input on average, none dead); and theta_batch (K), each
    column's smallest kept positive value (0 where none is positive)."""
    m = min(max(1, round(z.shape[0] * k / z.shape[1])), z.shape[0])
    values, idx = F.relu(z).topk(m, dim=0)
    return torch.zeros_like(z).scatter(0, idx, values), values[-1]


@torch.no_grad()
def update_running_threshold(threshold: Tensor, is_set: Tensor, theta_batch: Tensor, momentum: float) -> None:
    """theta <- m theta + (1 - m) theta_batch in place (the first call sets theta = theta_batch and ``is_set``):
    the inference threshold of a net trained with batch top-k selection."""
    m = momentum if bool(is_set) else 0.0
    threshold.mul_(m).add_((1 - m) * theta_batch)
    is_set.fill_(True)


class UnitNormDecoder:
    """The unit-norm decoder constraint, for a :class:`Net` with ``decoder`` (nn.Linear K -> D, its K columns the
    decoder directions) and ``unit_norm_decoder``: before each optimiser step the gradient along each direction is
    removed, after it each direction is rescaled to unit norm (:mod:`implicit_em.core.sae`). List it before
    :class:`Net` among the bases."""

    decoder: nn.Linear
    unit_norm_decoder: bool

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        w, grad = self.decoder.weight, self.decoder.weight.grad
        if self.unit_norm_decoder and grad is not None:
            grad.copy_(remove_parallel_gradient(w, grad, dim=0))

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        if self.unit_norm_decoder:
            self.decoder.weight.copy_(unit_norm(self.decoder.weight, dim=0))


@dataclass
class InferenceForm:
    """A net as SAELens runs it, in the net's own (normalised) input space.

    ``architecture``: ``standard`` (relu(x W_enc + b_enc)), ``topk`` (that, keeping the ``k`` largest) or
    ``jumprelu`` (z * 1[z > threshold]). ``encoder``: the affine map (W K x D, b K); ``decoder``: (W_dec K x D,
    b_dec D) when the net has one, None for the decoder-free model (export then uses the fitted readout).
    """

    architecture: str
    weight: Tensor
    bias: Tensor
    decoder: tuple[Tensor, Tensor] | None = None
    k: int | None = None
    threshold: Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Net(nn.Module):
    """The interface every registered model implements (see the module docstring).

    Args of every net (the LightningModule passes them): in_features D, n_components K, k (codes kept per
    input, for nets that take a target; None: the net's own sparsity), seed (its initial weights).
    """

    #: the registry name (set by :func:`~implicit_em.models.registry.register`)
    name: ClassVar[str] = ""
    #: whether the net takes ``k`` (codes kept per input)
    takes_k: ClassVar[bool] = False

    def __init__(self, in_features: int, n_components: int, k: int | None = None, seed: int = 0):
        super().__init__()
        from implicit_em.errors import ConfigError, check

        check(in_features >= 1, "model.in_features", ">= 1", in_features)
        check(n_components >= 2, "model.n_components", "an integer >= 2", n_components)
        if k is not None and not self.takes_k:
            raise ConfigError(f"model.k is not used by the {self.name} model (got {k}); drop --model.k")
        if k is not None:
            check(isinstance(k, int) and 1 <= k <= n_components, "model.k", f"an integer in 1..{n_components}", k)
        self.in_features, self.n_components, self.k, self.seed = in_features, n_components, k, int(seed)

    def forward(self, x: Tensor) -> Tensor:
        """The codes (N x K) users read: what every evaluation, probe and export sees of an input."""
        raise NotImplementedError

    def pre_activation(self, x: Tensor) -> Tensor:
        """z = W x + b (N x K), before the activation."""
        return self.first_layer()(x)

    def first_layer(self) -> nn.Linear:
        """The affine map whose rows are the components (what the data-aware start adjusts)."""
        raise NotImplementedError

    def start_from_data(self, x: Tensor, std: float | None) -> None:
        """The data-aware start on training inputs x (N x D): :func:`fit_to_data` on the first layer."""
        fit_to_data(self.first_layer(), x, std)

    def plan_training(self, total_rows: int) -> None:
        """Told once, as training starts, how many rows the run will see in all (optimiser steps x global batch):
        what scales with the run is set here (the SAEs' dead window). Nothing by default."""

    def before_optimizer_step(self) -> None:
        """After the backward pass, before the optimiser's step: a constraint on the gradients. None by default."""

    def after_optimizer_step(self) -> None:
        """After the optimiser's step: the weights put back on their constraint. None by default."""

    def finish_training(self, x: Tensor) -> None:
        """After the last optimiser step, on the training rows x (N x D): what inference needs beyond the trained
        weights (the BatchTopK threshold). Nothing by default."""

    def component_weights(self) -> Tensor:
        """K x D: the rows of the first layer, the components."""
        return self.first_layer().weight

    def objective(self, x: Tensor, step: int) -> dict[str, Tensor]:
        """``{"loss": L, <term>: ...}``, scalars, on one (global) batch; ``step``: the optimiser step it makes."""
        raise NotImplementedError

    def decode(self, codes: Tensor) -> Tensor:
        """x_hat from codes, for nets with a decoder (the decoder-free model has none: AttributeError)."""
        raise AttributeError(f"the {self.name} model has no decoder; its readout is fitted after training")

    @property
    def has_decoder(self) -> bool:
        return type(self).decode is not Net.decode

    def settings(self) -> dict[str, Any]:
        """The net's own settings (its constructor's arguments beyond D, K, k and seed), for results."""
        return {}

    def inference_form(self) -> InferenceForm:
        """How SAELens runs this net (see :class:`InferenceForm`)."""
        raise NotImplementedError
