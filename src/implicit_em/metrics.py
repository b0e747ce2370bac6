"""Diagnostics of a component model, as torchmetrics ``Metric``s that sync across GPUs.

Each metric accumulates exact sufficient statistics (sums, not per-batch averages), so the value over a
split is the value on the concatenated split, also under DDP. Distances ``d`` are ``(S, N, K)``: S members
(1 for an ordinary run), N samples, K components; every result keeps the member dimension S.
The one-call functions at the bottom evaluate the same metrics on whole tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from implicit_em.objective import covariance_to_correlation, off_diagonal_sq_norm

#: the paper's thresholds: a component is dead when Var(d_j) < 0.01; an activation counts when > 0.01
DEAD_VARIANCE = 0.01
ACTIVE_THRESHOLD = 0.01


def _members(d: Tensor) -> Tensor:
    """(N, K) -> (1, N, K); (S, N, K) unchanged; float64 for exact accumulation."""
    return (d.unsqueeze(0) if d.dim() == 2 else d).double()


class _Accumulating(Metric):
    full_state_update = False
    higher_is_better = None

    def __init__(self, n_members: int = 1, n_components: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.n_members, self.n_components = n_members, n_components
        self.add_state("n", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def _sum_state(self, name: str, *shape: int) -> None:
        self.add_state(name, torch.zeros(self.n_members, *shape, dtype=torch.float64), dist_reduce_fx="sum")


class ResponsibilityEntropy(_Accumulating):
    """Mean posterior entropy H = -(1/N) sum_i sum_j r_ij log r_ij with r = softmax(-d).

    log K: every component equally responsible (no specialisation); 0: hard assignments.
    """

    def __init__(self, n_members: int = 1, **kwargs):
        super().__init__(n_members, **kwargs)
        self._sum_state("entropy")

    def update(self, d: Tensor) -> None:
        d = _members(d)
        log_r = torch.log_softmax(-d, dim=-1)
        self.entropy += -(log_r.exp() * log_r).sum(dim=(-2, -1))
        self.n += d.shape[-2]

    def compute(self) -> Tensor:
        return self.entropy / self.n


class L0Density(_Accumulating):
    """Fraction of activations above 0.01: (1/(N K)) sum_i sum_j [d_ij > 0.01]."""

    def __init__(self, n_members: int = 1, threshold: float = ACTIVE_THRESHOLD, **kwargs):
        super().__init__(n_members, **kwargs)
        self.threshold = threshold
        self._sum_state("active")

    def update(self, d: Tensor) -> None:
        d = _members(d)
        self.active += (d > self.threshold).sum(dim=(-2, -1))
        self.n += d.shape[-2] * d.shape[-1]

    def compute(self) -> Tensor:
        return self.active / self.n


class ComponentUsage(_Accumulating):
    """Mean responsibility of each component, u_j = (1/N) sum_i r_ij (S x K; sums to 1 over j)."""

    def __init__(self, n_members: int = 1, n_components: int = 1, **kwargs):
        super().__init__(n_members, n_components, **kwargs)
        self._sum_state("usage", n_components)

    def update(self, d: Tensor) -> None:
        d = _members(d)
        self.usage += torch.softmax(-d, dim=-1).sum(dim=-2)
        self.n += d.shape[-2]

    def compute(self) -> Tensor:
        return self.usage / self.n


class DeadComponents(_Accumulating):
    """Components with Var(d_j) < 0.01 over the split (the paper's dead units), and, separately,
    components that never exceed the activation threshold on any input (``never_active``)."""

    def __init__(self, n_members: int = 1, n_components: int = 1, threshold: float = DEAD_VARIANCE, **kwargs):
        super().__init__(n_members, n_components, **kwargs)
        self.threshold = threshold
        self._sum_state("total", n_components)
        self._sum_state("total_sq", n_components)
        self._sum_state("active", n_components)

    def update(self, d: Tensor) -> None:
        d = _members(d)
        self.total += d.sum(dim=-2)
        self.total_sq += d.pow(2).sum(dim=-2)
        self.active += (d > ACTIVE_THRESHOLD).sum(dim=-2)
        self.n += d.shape[-2]

    def variance(self) -> Tensor:
        """Unbiased Var(d_j) = (sum d^2 - (sum d)^2 / N) / (N - 1), S x K."""
        return ((self.total_sq - self.total.pow(2) / self.n) / (self.n - 1)).clamp_min(0)

    def compute(self) -> dict[str, Tensor]:
        return {
            "dead_components": (self.variance() < self.threshold).sum(-1),
            "never_active": (self.active == 0).sum(-1),
        }


class Redundancy(_Accumulating):
    """||Corr(d) - I||_F^2 off the diagonal, Corr over the whole split: 0 for decorrelated components,
    up to K(K - 1) when all are copies of one."""

    def __init__(self, n_members: int = 1, n_components: int = 1, **kwargs):
        super().__init__(n_members, n_components, **kwargs)
        self._sum_state("total", n_components)
        self._sum_state("cross", n_components, n_components)

    def update(self, d: Tensor) -> None:
        d = _members(d)
        self.total += d.sum(dim=-2)
        self.cross += d.transpose(-1, -2) @ d
        self.n += d.shape[-2]

    def compute(self) -> Tensor:
        mean = self.total / self.n
        cov = (self.cross - self.n * mean.unsqueeze(-1) * mean.unsqueeze(-2)) / (self.n - 1)
        return off_diagonal_sq_norm(covariance_to_correlation(cov))


def weight_redundancy(weight: Tensor) -> Tensor:
    """||W_n W_n^T - I||_F^2 off the diagonal, W_n the unit-norm rows of W (S x K x D -> S)."""
    w = weight.detach().double()
    w = w / w.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return off_diagonal_sq_norm(w @ w.transpose(-1, -2))


def effective_rank(weight: Tensor) -> Tensor:
    """Effective rank exp(-sum_k p_k log p_k), p = singular values of W normalised to sum 1 (S x K x D -> S)."""
    s = torch.linalg.svdvals(weight.detach().double())
    p = s / s.sum(dim=-1, keepdim=True).clamp_min(1e-300)
    return torch.exp(-(p * torch.log(p.clamp_min(1e-300))).sum(dim=-1))


class ComponentDiagnostics(torch.nn.Module):
    """All distance-based metrics together: ``update(d)`` per batch (N x K), ``compute()`` -> name -> value."""

    def __init__(self, n_components: int, **metric_kwargs):
        super().__init__()
        self.entropy = ResponsibilityEntropy(1, **metric_kwargs)
        self.l0 = L0Density(1, **metric_kwargs)
        self.usage = ComponentUsage(1, n_components, **metric_kwargs)
        self.dead = DeadComponents(1, n_components, **metric_kwargs)
        self.redundancy = Redundancy(1, n_components, **metric_kwargs)

    def update(self, d: Tensor) -> None:
        for m in self.children():
            m.update(d)

    def compute(self) -> dict[str, Tensor]:
        """name -> scalar (``usage``: a K-vector)."""
        out = {
            "responsibility_entropy": self.entropy.compute(),
            "l0_density": self.l0.compute(),
            "redundancy": self.redundancy.compute(),
            **self.dead.compute(),
        }
        out = {k: v.reshape(()) for k, v in out.items()}
        out["usage"] = self.usage.compute().reshape(-1)
        return out

    def reset(self) -> None:
        for m in self.children():
            m.reset()


def component_diagnostics(d: Tensor, weight: Tensor | None = None) -> dict[str, Tensor]:
    """Every diagnostic on a whole N x K tensor at once (plus the weight metrics when given).

    Local to this process: no synchronisation across ranks.
    """
    diag = ComponentDiagnostics(d.shape[-1], sync_on_compute=False).to(d.device)
    diag.update(d)
    out = diag.compute()
    if weight is not None:
        out["weight_redundancy"] = weight_redundancy(weight)
        out["effective_rank"] = effective_rank(weight)
    return out
