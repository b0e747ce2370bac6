"""The implicit-EM objective: pure functions on tensors.

Shapes: distances ``d`` are ``(..., N, K)`` -- N samples (the batch) by K components, with any number of
leading dimensions (an ensemble of S models is ``(S, N, K)``). Every loss reduces over the last two
dimensions and keeps the leading ones, so one call evaluates a whole ensemble, each member on its own
batch. Terms are computed in at least float32, also under bf16 autocast.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Added to the variances inside the standard deviations of the correlation, so a constant component
#: (zero variance) has correlation 0 with everything and a finite gradient.
CORRELATION_EPS = 1e-8


def _wide(t: Tensor) -> Tensor:
    """``t`` in float32 at least (float64 stays float64), so bf16 autocast never reaches the objective."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _no_autocast(t: Tensor) -> torch.autocast:
    """Autocast off on ``t``'s device: under bf16 autocast a matmul would cast its float32 inputs back down."""
    return torch.autocast(t.device.type, enabled=False)


def responsibilities(d: Tensor) -> Tensor:
    """Posterior responsibilities r_ij = exp(-d_ij) / sum_l exp(-d_il) = softmax(-d)_ij over components."""
    return torch.softmax(-_wide(d), dim=-1)


def lse_loss(d: Tensor) -> Tensor:
    """Mixture negative log-likelihood L_LSE = -sum_i log sum_j exp(-d_ij), summed over the batch.

    Its gradient is the E-step: dL_LSE/dd_ij = r_ij (see :func:`responsibilities`). The distances are
    shifted by their row minimum m_i before ``logsumexp`` (L = sum_i m_i - log sum_j exp(-(d_ij - m_i))),
    so the backward pass exp(-(d - m) - lse) never subtracts two large numbers: the identity holds to
    float precision for d anywhere in [0, 1e4]. m is detached; L does not depend on it.
    """
    d = _wide(d)
    m = d.detach().amin(dim=-1, keepdim=True)
    return (m.squeeze(-1) - torch.logsumexp(m - d, dim=-1)).sum(dim=-1)


def batch_variance(d: Tensor) -> Tensor:
    """Unbiased variance of each component over the batch: Var(d_j) = sum_i (d_ij - mean_j)^2 / (N - 1)."""
    return _wide(d).var(dim=-2, unbiased=True)


def variance_loss(d: Tensor, eps: float = 1e-6) -> Tensor:
    """Anti-collapse term L_var = -sum_j log(Var(d_j) + eps): a log-barrier against dead components."""
    return -torch.log(batch_variance(d) + eps).sum(dim=-1)


def correlation_matrix(d: Tensor) -> Tensor:
    """Batch correlation Corr(d)_jk = Cov(d_j, d_k) / sqrt((Var d_j + c)(Var d_k + c)), c = 1e-8."""
    d = _wide(d)
    centred = d - d.mean(dim=-2, keepdim=True)
    with _no_autocast(d):
        cov = centred.transpose(-1, -2) @ centred / (d.shape[-2] - 1)
    return covariance_to_correlation(cov)


def covariance_to_correlation(cov: Tensor) -> Tensor:
    """Corr_jk = Cov_jk / sqrt((Cov_jj + c)(Cov_kk + c)), c = 1e-8 keeps constant components finite."""
    inv_sd = torch.rsqrt(torch.diagonal(cov, dim1=-2, dim2=-1) + CORRELATION_EPS)
    return cov * inv_sd.unsqueeze(-1) * inv_sd.unsqueeze(-2)


def off_diagonal_sq_norm(m: Tensor) -> Tensor:
    """||M - diag(M)||_F^2: the sum of squared off-diagonal entries of the last two dimensions."""
    return m.pow(2).sum(dim=(-2, -1)) - torch.diagonal(m, dim1=-2, dim2=-1).pow(2).sum(dim=-1)


def decorrelation_loss(d: Tensor) -> Tensor:
    """Redundancy term L_tc = ||Corr(d) - I||_F^2 over the off-diagonal entries only."""
    return off_diagonal_sq_norm(correlation_matrix(d))


def weight_orthogonality_loss(weight: Tensor) -> Tensor:
    """L_wr = ||W_n W_n^T - I||_F^2 with W_n the rows of W (K x D, or S x K x D) scaled to unit norm."""
    w = _wide(weight)
    w = w / w.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    with _no_autocast(w):
        gram = w @ w.transpose(-1, -2)
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    return (gram - eye).pow(2).sum(dim=(-2, -1))


def implicit_em_objective(
    d: Tensor,
    weight: Tensor | None = None,
    lambda_lse: float | Tensor = 1.0,
    lambda_var: float | Tensor = 1.0,
    lambda_tc: float | Tensor = 1.0,
    lambda_wr: float | Tensor = 0.0,
    eps: float = 1e-6,
) -> dict[str, Tensor]:
    """L = l_lse L_LSE + l_var L_var + l_tc L_tc + l_wr L_wr, the paper's objective.

    Returns ``{"loss": L, "lse": L_LSE, "var": L_var, "tc": L_tc, "wr": L_wr}`` (terms unweighted), each
    with the leading (ensemble) shape of ``d``; lambdas may be tensors of that shape. A term whose lambda
    is the number 0 is not computed and reads 0, which keeps ablations and the default l_wr = 0 free.
    """
    zero = _wide(d).new_zeros(d.shape[:-2])

    def term(lam, fn, *args):
        return zero if isinstance(lam, (int, float)) and lam == 0 else fn(*args)

    terms = {
        "lse": term(lambda_lse, lse_loss, d),
        "var": term(lambda_var, variance_loss, d, eps),
        "tc": term(lambda_tc, decorrelation_loss, d),
        "wr": zero if weight is None else term(lambda_wr, weight_orthogonality_loss, weight),
    }
    lambdas = {"lse": lambda_lse, "var": lambda_var, "tc": lambda_tc, "wr": lambda_wr}
    loss = sum(lambdas[k] * v for k, v in terms.items())
    return {"loss": loss, **terms}


def sae_objective(x: Tensor, reconstruction: Tensor, codes: Tensor, l1: float | Tensor = 0.01) -> dict[str, Tensor]:
    """Standard SAE loss L = mean (x - x_hat)^2 + l1 * mean |a| (means over batch and dimensions).

    Returns ``{"loss": L, "mse": ..., "l1": mean |a|}`` with the leading (ensemble) shape.
    """
    mse = (_wide(reconstruction) - _wide(x)).pow(2).mean(dim=(-2, -1))
    sparsity = _wide(codes).abs().mean(dim=(-2, -1))
    return {"loss": mse + l1 * sparsity, "mse": mse, "l1": sparsity}
