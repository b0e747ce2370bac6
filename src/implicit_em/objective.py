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


def _matmul(a: Tensor, b: Tensor) -> Tensor:
    """a @ b in the inputs' precision: under bf16 autocast a matmul would cast float32 inputs back down."""
    if torch.is_autocast_enabled(a.device.type):
        with torch.autocast(a.device.type, enabled=False):
            return a @ b
    return a @ b


def responsibilities(d: Tensor) -> Tensor:
    """Posterior responsibilities r_ij = exp(-d_ij) / sum_l exp(-d_il) = softmax(-d)_ij over components."""
    return torch.softmax(-_wide(d), dim=-1)


class _NegLogSumExp(torch.autograd.Function):
    """-log sum_j exp(-d_ij) per row, whose backward is written as what it is, the E-step:
    dL/dd_ij = softmax(-d_i)_j = r_ij. Computing it as a softmax (shifted by the row minimum inside)
    keeps the identity exact in float32 even for d ~ 1e4, where exp(-d - lse) would lose digits."""

    @staticmethod
    def forward(ctx, d: Tensor) -> Tensor:
        ctx.save_for_backward(d)
        return -torch.logsumexp(-d, dim=-1)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (d,) = ctx.saved_tensors
        return responsibilities(d) * grad.unsqueeze(-1)


def lse_loss(d: Tensor) -> Tensor:
    """Mixture negative log-likelihood L_LSE = -sum_i log sum_j exp(-d_ij), summed over the batch.

    Its gradient is the E-step: dL_LSE/dd_ij = r_ij (see :func:`responsibilities`), to float precision
    for d anywhere in [0, 1e4].
    """
    return _NegLogSumExp.apply(_wide(d)).sum(dim=-1)


def lse_loss_autograd(d: Tensor) -> Tensor:
    """The same L_LSE as the textbook formula -sum_i logsumexp(-d_i), differentiated by autograd: the
    independent reference that the identity checks compare the responsibilities with."""
    return -torch.logsumexp(-_wide(d), dim=-1).sum(dim=-1)


def centred_and_variance(d: Tensor) -> tuple[Tensor, Tensor]:
    """The batch statistics both InfoMax terms use: c_ij = d_ij - mean_i d_ij and the unbiased
    Var(d_j) = sum_i c_ij^2 / (N - 1)."""
    d = _wide(d)
    centred = d - d.mean(dim=-2, keepdim=True)
    return centred, centred.pow(2).sum(dim=-2) / (d.shape[-2] - 1)


def batch_variance(d: Tensor) -> Tensor:
    """Unbiased variance of each component over the batch: Var(d_j) = sum_i (d_ij - mean_j)^2 / (N - 1)."""
    return centred_and_variance(d)[1]


def log_variance_barrier(var: Tensor, eps: float = 1e-6) -> Tensor:
    """-sum_j log(Var_j + eps), from the variances."""
    return -torch.log(var + eps).sum(dim=-1)


def variance_loss(d: Tensor, eps: float = 1e-6) -> Tensor:
    """Anti-collapse term L_var = -sum_j log(Var(d_j) + eps): a log-barrier against dead components."""
    return log_variance_barrier(batch_variance(d), eps)


def standardized_correlation(centred: Tensor, var: Tensor) -> Tensor:
    """Corr = z^T z / (N - 1) with z_ij = c_ij / sqrt(Var_j + c), c = 1e-8 (from the batch statistics)."""
    z = centred * torch.rsqrt(var + CORRELATION_EPS).unsqueeze(-2)
    return _matmul(z.transpose(-1, -2), z) / (centred.shape[-2] - 1)


def correlation_matrix(d: Tensor) -> Tensor:
    """Batch correlation Corr(d)_jk = Cov(d_j, d_k) / sqrt((Var d_j + c)(Var d_k + c)), c = 1e-8."""
    return standardized_correlation(*centred_and_variance(d))


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
    gram = _matmul(w, w.transpose(-1, -2))
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    return (gram - eye).pow(2).sum(dim=(-2, -1))


def _is_zero(lam: float | Tensor) -> bool:
    return isinstance(lam, (int, float)) and lam == 0


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
    The variance and decorrelation terms share one pass over the batch statistics.
    """
    d = _wide(d)
    lambdas = {"lse": lambda_lse, "var": lambda_var, "tc": lambda_tc, "wr": lambda_wr}
    zero = d.new_zeros(d.shape[:-2])
    terms = dict.fromkeys(lambdas, zero)
    if not _is_zero(lambda_lse):
        terms["lse"] = lse_loss(d)
    if not (_is_zero(lambda_var) and _is_zero(lambda_tc)):
        centred, var = centred_and_variance(d)
        if not _is_zero(lambda_var):
            terms["var"] = log_variance_barrier(var, eps)
        if not _is_zero(lambda_tc):
            terms["tc"] = off_diagonal_sq_norm(standardized_correlation(centred, var))
    if weight is not None and not _is_zero(lambda_wr):
        terms["wr"] = weight_orthogonality_loss(weight)
    weighted = [
        t if isinstance(lam, (int, float)) and lam == 1 else lam * t
        for lam, t in zip(lambdas.values(), terms.values())
        if not _is_zero(lam)
    ]
    loss = sum(weighted[1:], weighted[0]) if weighted else zero
    return {"loss": loss, **terms}


def sae_objective(x: Tensor, reconstruction: Tensor, codes: Tensor, l1: float | Tensor = 0.01) -> dict[str, Tensor]:
    """Standard SAE loss L = mean (x - x_hat)^2 + l1 * mean |a| (means over batch and dimensions).

    Returns ``{"loss": L, "mse": ..., "l1": mean |a|}`` with the leading (ensemble) shape.
    """
    mse = (_wide(reconstruction) - _wide(x)).pow(2).mean(dim=(-2, -1))
    sparsity = _wide(codes).abs().mean(dim=(-2, -1))
    return {"loss": mse + l1 * sparsity, "mse": mse, "l1": sparsity}
