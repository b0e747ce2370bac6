"""Diagnostics of a component model, as torchmetrics ``Metric``s that sync across GPUs.

Each metric accumulates exact sufficient statistics (sums, not per-batch averages), so the value over a
split is the value on the concatenated split, also under DDP. Distances ``d`` are ``N x K``: N samples,
K components. Memory stays bounded at any K: updates run over row chunks of at most ``CHUNK_ELEMENTS``
float64 values, and no state or temporary is K x K once K exceeds ``REDUNDANCY_EXACT_MAX`` (the
redundancy is then an estimate with its standard error). The one-call functions at the bottom evaluate
the same metrics on whole tensors.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor
from torchmetrics import Metric

from implicit_em.core.objective import (
    covariance_to_correlation,
    off_diagonal_sq_norm,
    subset_estimate_variance_from_subset,
    subset_inclusion_probabilities,
)

#: the paper's thresholds: a component is dead when Var(d_j) < 0.01; an activation counts when > 0.01
DEAD_VARIANCE = 0.01
ACTIVE_THRESHOLD = 0.01
#: float64 values per chunk of rows an update works on (32 MB)
CHUNK_ELEMENTS = 1 << 22
#: up to this K the redundancy is exact (a K x K float64 state, 32 MB at 2048); above it, an estimate
REDUNDANCY_EXACT_MAX = 2048
#: components in the fixed random subset the estimate is computed on
REDUNDANCY_SUBSET = 1024


def _row_chunks(t: Tensor) -> Iterator[Tensor]:
    """``t`` (N x K, or K x D) in float64, a chunk of rows at a time, at most CHUNK_ELEMENTS values each."""
    t = t.detach()
    if t.dim() != 2:
        raise ValueError(f"expected a 2-dimensional (N x K) tensor, got shape {tuple(t.shape)}")
    for chunk in t.split(max(1, CHUNK_ELEMENTS // max(t.shape[-1], 1))):
        yield chunk.double()


class _Accumulating(Metric):
    full_state_update = False
    higher_is_better = None

    def __init__(self, n_components: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.n_components = n_components
        self.add_state("n", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def _sum_state(self, name: str, *shape: int) -> None:
        self.add_state(name, torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")


class ResponsibilityEntropy(_Accumulating):
    """Mean posterior entropy H = -(1/N) sum_i sum_j r_ij log r_ij with r = softmax(-d).

    log K: every component equally responsible (no specialisation); 0: hard assignments.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._sum_state("entropy")

    def update(self, d: Tensor) -> None:
        for chunk in _row_chunks(d):
            log_r = torch.log_softmax(-chunk, dim=-1)
            self.entropy += -(log_r.exp() * log_r).sum()
            self.n += chunk.shape[0]

    def compute(self) -> Tensor:
        return self.entropy / self.n


class L0Density(_Accumulating):
    """Fraction of activations above 0.01: (1/(N K)) sum_i sum_j [d_ij > 0.01]."""

    def __init__(self, threshold: float = ACTIVE_THRESHOLD, **kwargs):
        super().__init__(**kwargs)
        self.threshold = threshold
        self._sum_state("active")

    def update(self, d: Tensor) -> None:
        for chunk in _row_chunks(d):
            self.active += (chunk > self.threshold).sum()
            self.n += chunk.numel()

    def compute(self) -> Tensor:
        return self.active / self.n


class ComponentUsage(_Accumulating):
    """Mean responsibility of each component, u_j = (1/N) sum_i r_ij (a K-vector summing to 1)."""

    def __init__(self, n_components: int, **kwargs):
        super().__init__(n_components, **kwargs)
        self._sum_state("usage", n_components)

    def update(self, d: Tensor) -> None:
        for chunk in _row_chunks(d):
            self.usage += torch.softmax(-chunk, dim=-1).sum(dim=0)
            self.n += chunk.shape[0]

    def compute(self) -> Tensor:
        return self.usage / self.n


class DeadComponents(_Accumulating):
    """Components with Var(d_j) < 0.01 over the split (the paper's dead units), and, separately,
    components that never exceed the activation threshold on any input (``never_active``)."""

    def __init__(self, n_components: int, threshold: float = DEAD_VARIANCE, **kwargs):
        super().__init__(n_components, **kwargs)
        self.threshold = threshold
        self._sum_state("total", n_components)
        self._sum_state("total_sq", n_components)
        self._sum_state("active", n_components)

    def update(self, d: Tensor) -> None:
        for chunk in _row_chunks(d):
            self.total += chunk.sum(dim=0)
            self.total_sq += chunk.pow(2).sum(dim=0)
            self.active += (chunk > ACTIVE_THRESHOLD).sum(dim=0)
            self.n += chunk.shape[0]

    def variance(self) -> Tensor:
        """Unbiased Var(d_j) = (sum d^2 - (sum d)^2 / N) / (N - 1), a K-vector."""
        return ((self.total_sq - self.total.pow(2) / self.n) / (self.n - 1)).clamp_min(0)

    def compute(self) -> dict[str, Tensor]:
        return {
            "dead_components": (self.variance() < self.threshold).sum(),
            "never_active": (self.active == 0).sum(),
        }


class Redundancy(_Accumulating):
    """``redundancy`` = ||Corr(d) - I||_F^2 off the diagonal, Corr over the whole split: 0 for decorrelated
    components, up to K(K - 1) when all are copies of one; and ``redundancy_stderr``, its standard error.

    Exact (``redundancy_stderr`` = 0) for K <= ``max_exact``, from a K x K cross-product state. Above, an
    unbiased *estimate* from a fixed random subset M of ``subset`` components (drawn from ``seed``, so the
    same on every rank and every epoch): K(K - 1)/(m(m - 1)) times the subset's off-diagonal sum, with
    the standard error sqrt(Var) over the draw of M, Var estimated from the subset itself
    (:func:`~implicit_em.core.objective.subset_estimate_variance_from_subset`). State: m x m.
    """

    def __init__(
        self,
        n_components: int,
        max_exact: int = REDUNDANCY_EXACT_MAX,
        subset: int = REDUNDANCY_SUBSET,
        seed: int = 0,
        **kwargs,
    ):
        super().__init__(n_components, **kwargs)
        exact = n_components <= max_exact or subset >= n_components
        if not exact and subset < 4:
            raise ValueError(f"the redundancy estimate needs a subset of at least 4 components, got {subset}")
        index = None
        if not exact:
            index = torch.randperm(n_components, generator=torch.Generator().manual_seed(seed))[:subset].sort().values
        self.register_buffer("index", index, persistent=False)
        m = n_components if exact else subset
        self._sum_state("total", m)
        self._sum_state("cross", m, m)

    def update(self, d: Tensor) -> None:
        if self.index is not None:
            d = d.detach().index_select(-1, self.index)
        for chunk in _row_chunks(d):
            self.total += chunk.sum(dim=0)
            self.cross += chunk.T @ chunk
            self.n += chunk.shape[0]

    def compute(self) -> dict[str, Tensor]:
        mean = self.total / self.n
        cov = (self.cross - self.n * torch.outer(mean, mean)) / (self.n - 1)
        corr_sq = covariance_to_correlation(cov).pow(2)
        value = corr_sq.sum() - corr_sq.diagonal().sum()
        if self.index is None:
            return {"redundancy": value, "redundancy_stderr": torch.zeros_like(value)}
        k, m = self.n_components, len(self.index)
        variance = subset_estimate_variance_from_subset(corr_sq, k).clamp_min(0)
        return {"redundancy": value / subset_inclusion_probabilities(k, m)[0], "redundancy_stderr": variance.sqrt()}


def _normalized_rows(chunk: Tensor) -> Tensor:
    return chunk / chunk.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _small_gram(weight: Tensor, normalize: bool) -> Tensor:
    """The smaller Gram matrix of W (K x D), float64: W^T W (D x D, accumulated over row chunks) when
    D < K, else W W^T (K x K). Rows scaled to unit norm first when ``normalize``."""
    k, dim = weight.shape
    if dim < k:
        gram = torch.zeros(dim, dim, dtype=torch.float64, device=weight.device)
        for chunk in _row_chunks(weight):
            chunk = _normalized_rows(chunk) if normalize else chunk
            gram += chunk.T @ chunk
        return gram
    w = weight.detach().double()
    w = _normalized_rows(w) if normalize else w
    return w @ w.T


def weight_redundancy(weight: Tensor) -> Tensor:
    """||W_n W_n^T - I||_F^2 off the diagonal, W_n the unit-norm rows of W (K x D -> a scalar).

    Through the D x D matrix when D < K: ||W_n^T W_n||_F^2 - sum_j ||w_n,j||^4 (||w_n,j|| = 1, or 0 for a
    zero row); exact, memory D^2 plus a chunk of rows.
    """
    k, dim = weight.shape
    gram = _small_gram(weight, normalize=True)
    if dim < k:
        norm = weight.detach().double().norm(dim=-1)
        unit = (norm / norm.clamp_min(1e-12)).pow(2)
        return gram.pow(2).sum() - unit.pow(2).sum()
    return off_diagonal_sq_norm(gram)


def effective_rank(weight: Tensor) -> Tensor:
    """Effective rank exp(-sum_k p_k log p_k), p = singular values of W normalised to sum 1 (K x D -> scalar).

    Small W (up to 2^22 entries): LAPACK's singular values. Larger: the square roots of the eigenvalues
    of the smaller Gram matrix (D x D or K x K), so memory stays bounded; singular values below ~1e-8 of
    the largest are then not resolved, which moves the result by less than 1e-6.
    """
    if weight.numel() <= CHUNK_ELEMENTS:
        s = torch.linalg.svdvals(weight.detach().double())
    else:
        s = torch.linalg.eigvalsh(_small_gram(weight, normalize=False)).clamp_min(0).sqrt()
    p = s / s.sum(dim=-1, keepdim=True).clamp_min(1e-300)
    return torch.exp(-(p * torch.log(p.clamp_min(1e-300))).sum(dim=-1))


class ComponentDiagnostics(torch.nn.Module):
    """All distance-based metrics together: ``update(d)`` per batch (d: N x K), ``compute()`` -> name ->
    scalar tensor, with ``usage`` a K-vector. Bounded memory at any K (see :class:`Redundancy`)."""

    def __init__(self, n_components: int, **metric_kwargs):
        super().__init__()
        self.entropy = ResponsibilityEntropy(**metric_kwargs)
        self.l0 = L0Density(**metric_kwargs)
        self.usage = ComponentUsage(n_components, **metric_kwargs)
        self.dead = DeadComponents(n_components, **metric_kwargs)
        self.redundancy = Redundancy(n_components, **metric_kwargs)

    def update(self, d: Tensor) -> None:
        for m in self.children():
            m.update(d)

    def compute(self) -> dict[str, Tensor]:
        return {
            "responsibility_entropy": self.entropy.compute(),
            "l0_density": self.l0.compute(),
            **self.redundancy.compute(),
            **self.dead.compute(),
            "usage": self.usage.compute(),
        }

    def reset(self) -> None:
        for m in self.children():
            m.reset()


def component_diagnostics(d: Tensor, weight: Tensor | None = None) -> dict[str, Tensor]:
    """Every diagnostic on a whole N x K tensor at once (plus the weight metrics of W, K x D, when given).

    Local to this process: no synchronisation across ranks.
    """
    diag = ComponentDiagnostics(d.shape[-1], sync_on_compute=False).to(d.device)
    diag.update(d)
    out = diag.compute()
    if weight is not None:
        out["weight_redundancy"] = weight_redundancy(weight)
        out["effective_rank"] = effective_rank(weight)
    return out
