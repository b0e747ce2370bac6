"""The paper's implicit-EM objective and the SAE baselines' objectives: pure functions on tensors.

The paper's model trains on L = l_lse L_LSE + l_var L_var + l_tc L_tc + l_wr L_wr (:func:`implicit_em_objective`):
the mixture likelihood, whose gradient is the E-step (:func:`responsibilities`), a log-barrier on the variances
and the decorrelation and weight-orthogonality terms. The sparse model's truncated objective, built from these
terms, is :mod:`implicit_em.core.truncated`.

Shapes: distances ``d`` are ``N x K`` -- N samples (the batch) by K components (leading dimensions, e.g.
an ensemble's ``S x N x K``, are carried along: every loss reduces over the last two). Terms are computed
in at least float32, also under bf16 autocast. No term holds a K x K matrix when a smaller one gives the
same value, so dictionaries of 65,536 components cost about what their encoder costs.
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


def autograd_lse_gradient(d: Tensor) -> Tensor:
    """dL_LSE/dd by autograd of the textbook formula :func:`lse_loss_autograd`, in float64 and outside any
    autocast: what the identity checks compare with the responsibilities r = softmax(-d)."""
    d = d.detach().double().requires_grad_(True)
    with torch.enable_grad(), torch.autocast(d.device.type, enabled=False):
        (grad,) = torch.autograd.grad(lse_loss_autograd(d), d)
    return grad


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


def _standardized(centred: Tensor, var: Tensor) -> Tensor:
    """z_ij = c_ij / sqrt((N - 1)(Var_j + c)), c = 1e-8: the batch scaled so that Corr = z^T z."""
    return centred * torch.rsqrt((var + CORRELATION_EPS) * (centred.shape[-2] - 1)).unsqueeze(-2)


def standardized_correlation(centred: Tensor, var: Tensor) -> Tensor:
    """Corr = z^T z with z_ij = c_ij / sqrt((N - 1)(Var_j + c)), c = 1e-8 (from the batch statistics)."""
    z = _standardized(centred, var)
    return _matmul(z.transpose(-1, -2), z)


def correlation_matrix(d: Tensor) -> Tensor:
    """Batch correlation Corr(d)_jk = Cov(d_j, d_k) / sqrt((Var d_j + c)(Var d_k + c)), c = 1e-8.

    K x K: for the decorrelation term at large K use :func:`decorrelation_loss`, which never builds it.
    """
    return standardized_correlation(*centred_and_variance(d))


def covariance_to_correlation(cov: Tensor) -> Tensor:
    """Corr_jk = Cov_jk / sqrt((Cov_jj + c)(Cov_kk + c)), c = 1e-8 keeps constant components finite."""
    inv_sd = torch.rsqrt(torch.diagonal(cov, dim1=-2, dim2=-1) + CORRELATION_EPS)
    return cov * inv_sd.unsqueeze(-1) * inv_sd.unsqueeze(-2)


def off_diagonal_sq_norm(m: Tensor) -> Tensor:
    """||M - diag(M)||_F^2: the sum of squared off-diagonal entries of the last two dimensions."""
    return m.pow(2).sum(dim=(-2, -1)) - torch.diagonal(m, dim1=-2, dim2=-1).pow(2).sum(dim=-1)


def _decorrelation_forward(z: Tensor, var: Tensor, shifted: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    """L_tc from z = c r (Corr = z^T z), r_j = ((N - 1)(Var_j + c_eps))^-1/2, shifted = Var + c_eps.

    N < K: L = ||z z^T||_F^2 - sum_j q_j^2 with q_j = Corr_jj = Var_j / (Var_j + c_eps); else
    L = ||O||_F^2, O = z^T z without its diagonal. Returns (L, the Gram matrix used, q or None).
    """
    n, k = z.shape[-2:]
    if n < k:
        gram = _matmul(z, z.transpose(-1, -2))  # N x N
        q = var / shifted
        return gram.pow(2).sum(dim=(-2, -1)) - q.pow(2).sum(dim=-1), gram, q
    gram = _matmul(z.transpose(-1, -2), z)  # K x K
    gram.diagonal(dim1=-2, dim2=-1).zero_()
    return gram.pow(2).sum(dim=(-2, -1)), gram, None


def _decorrelation_backward(
    grad: Tensor, z: Tensor, gram: Tensor, r: Tensor, shifted: Tensor, q: Tensor | None
) -> tuple[Tensor, Tensor]:
    """(dL/dc at fixed Var, dL/dVar at fixed c) for :func:`_decorrelation_forward`, times ``grad``.

    With B = 4 (z z^T) z (N < K) or 4 z O, dL/dz at fixed q: dL/dc = B r and
    dL/dVar_j = -(sum_i B_ij z_ij) / (2 (Var_j + c_eps)) [- 2 q_j c_eps / (Var_j + c_eps)^2 for N < K].
    dL/dc has zero column sums (1^T z = 0), so centring c = d - mean(d) passes it through unchanged.
    """
    g = (4 * grad).unsqueeze(-1).unsqueeze(-1)
    b = _matmul(gram * g, z) if q is not None else _matmul(z, gram * g)
    grad_var = -torch.linalg.vecdot(b, z, dim=-2) / (2 * shifted)
    if q is not None:
        grad_var = grad_var - 2 * grad.unsqueeze(-1) * q * CORRELATION_EPS / shifted.pow(2)
    return b.mul_(r.unsqueeze(-2)), grad_var


def _scale_and_standardize(centred: Tensor, var: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(z, r, Var + c_eps) with r_j = ((N - 1)(Var_j + c_eps))^-1/2 and z = c r."""
    shifted = var + CORRELATION_EPS
    r = torch.rsqrt(shifted * (centred.shape[-2] - 1))
    return centred * r.unsqueeze(-2), r, shifted


class _Decorrelation(torch.autograd.Function):
    """L_tc(c, Var) through the smaller Gram matrix, its gradient written out (one matmul back);
    autograd carries Var's and c's own dependence on d."""

    @staticmethod
    def forward(ctx, centred: Tensor, var: Tensor) -> Tensor:
        z, r, shifted = _scale_and_standardize(centred, var)
        value, gram, q = _decorrelation_forward(z, var, shifted)
        ctx.save_for_backward(z, gram, r, shifted, q)
        return value

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:
        return _decorrelation_backward(grad, *ctx.saved_tensors)


class _BatchTerms(torch.autograd.Function):
    """L_LSE, Var(d) and L_tc of one batch with one backward pass written out over d (N x K):

        dL/dd_ij = g_lse r_ij + (2 / (N - 1)) gVar_j c_ij + dL_tc/dc_ij,   r = softmax(-d) (the E-step),

    where gVar sums the incoming gradient of Var and L_tc's. The same functions as the separate terms,
    with a few passes over the N x K batch instead of one per autograd node, which is what the step costs
    when N and K are both large (the SAE regime). ``index``: L_tc from those components only, times
    ``scale`` (the subset estimate); None: all components.
    """

    @staticmethod
    def forward(ctx, d: Tensor, with_lse: bool, with_tc: bool, index: Tensor | None, scale: float):
        with torch.autocast(d.device.type, enabled=False):
            var, mean = torch.var_mean(d, dim=-2, correction=1)
            lse = -torch.logsumexp(-d, dim=-1).sum(dim=-1) if with_lse else d.new_zeros(d.shape[:-2])
            tc, saved = d.new_zeros(d.shape[:-2]), (None,) * 5
            if with_tc:
                sub, sub_mean, sub_var = (d, mean, var) if index is None else (
                    d.index_select(-1, index), mean.index_select(-1, index), var.index_select(-1, index))  # fmt: skip
                z, r, shifted = _scale_and_standardize(sub - sub_mean.unsqueeze(-2), sub_var)
                value, gram, q = _decorrelation_forward(z, sub_var, shifted)
                tc, saved = value * scale, (z, gram, r, shifted, q)
        ctx.with_lse, ctx.with_tc, ctx.scale = with_lse, with_tc, scale
        ctx.save_for_backward(d, mean, index, *saved)
        return lse, var, tc

    @staticmethod
    def backward(ctx, g_lse: Tensor, g_var: Tensor, g_tc: Tensor):
        d, mean, index, *saved = ctx.saved_tensors
        with torch.autocast(d.device.type, enabled=False):
            grad_c_tc = None
            if ctx.with_tc:
                grad_c_tc, grad_var_tc = _decorrelation_backward(g_tc * ctx.scale, *saved)
                g_var = g_var + grad_var_tc if index is None else g_var.index_add(-1, index, grad_var_tc)
            if ctx.with_lse:
                grad = torch.softmax(-d, dim=-1).mul_(g_lse.unsqueeze(-1).unsqueeze(-1))
            else:
                grad = torch.zeros_like(d)
            grad.addcmul_(d - mean.unsqueeze(-2), (2 / (d.shape[-2] - 1) * g_var).unsqueeze(-2))
            if grad_c_tc is not None:
                grad = grad.add_(grad_c_tc) if index is None else grad.index_add_(-1, index, grad_c_tc)
        return grad, None, None, None, None


def decorrelation_from_statistics(centred: Tensor, var: Tensor) -> Tensor:
    """L_tc = sum_{j != k} Corr_jk^2 from the batch statistics, through the smaller Gram matrix.

    With z as in :func:`standardized_correlation` (Corr = z^T z) and ||z^T z||_F = ||z z^T||_F (both are
    the sum of z's fourth-power singular values):

        L_tc = ||z z^T||_F^2 - sum_j Corr_jj^2,   Corr_jj = Var_j / (Var_j + c),

    through the N x N matrix z z^T when N < K (cost N^2 K, memory N^2), else through the K x K matrix
    z^T z with its diagonal left out (cost N K^2). Both are the same function of d, so values and
    gradients agree to rounding. The subtraction loses no digits that matter: after it, L_tc is at
    least about K(K - 1)/N (the sampling noise of N-sample correlations), against sum_j Corr_jj^2 <= K.
    """
    return _Decorrelation.apply(centred, var)


def decorrelation_loss(d: Tensor) -> Tensor:
    """Redundancy term L_tc = ||Corr(d) - I||_F^2 over the off-diagonal entries only (exact, any K;
    see :func:`decorrelation_from_statistics` for how it avoids the K x K matrix when N < K)."""
    return decorrelation_from_statistics(*centred_and_variance(d))


def subset_inclusion_probabilities(k: int, m: int) -> tuple[float, float, float]:
    """p_r = m (m - 1) ... (m - r + 1) / (K (K - 1) ... (K - r + 1)): the chance that r given distinct
    components all lie in a uniformly random m-subset of the K, for r = 2, 3, 4."""
    p = [1.0]
    for r in range(4):
        p.append(p[-1] * max(m - r, 0) / (k - r) if k > r else 0.0)
    return p[2], p[3], p[4]


def decorrelation_subset_estimate(
    centred: Tensor, var: Tensor, m: int, generator: torch.Generator | None = None
) -> Tensor:
    """Unbiased estimate of L_tc from a uniformly random subset M of m of the K components:

        L_tc_hat = K (K - 1) / (m (m - 1)) * sum_{j != k in M} Corr_jk^2.

    Each ordered pair j != k lies in M with probability p_2 = m (m - 1) / (K (K - 1)), so
    E[L_tc_hat] = L_tc; the gradient is the gradient of an unbiased estimate, so unbiased as well.
    Cost: the correlations of m columns only (N m min(N, m)) instead of N K min(N, K).
    Its variance over the draw of M (the batch fixed) is :func:`subset_estimate_variance`: zero when all
    pairs are equally correlated, large when a few pairs carry the redundancy. The subset comes from
    ``generator`` (its device; None: torch's global generator). Under DDP, identically seeded generators
    make every rank draw the same subset, so the run equals one process on the global batch; ranks that
    draw different subsets still get an unbiased gradient (the mean of their R estimates).
    """
    k = centred.shape[-1]
    if m >= k:
        return decorrelation_from_statistics(centred, var)
    idx, scale = _subset(k, m, generator, centred.device)
    return decorrelation_from_statistics(centred.index_select(-1, idx), var.index_select(-1, idx)) * scale


def _subset(k: int, m: int, generator: torch.Generator | None, device: torch.device) -> tuple[Tensor, float]:
    """m of the K components uniformly at random (from ``generator``, on its device; None: torch's global
    generator) and the estimate's scale K (K - 1) / (m (m - 1))."""
    if m < 2:
        raise ValueError(f"the decorrelation estimate needs at least 2 components, got m = {m}")
    rng_device = generator.device if generator is not None else torch.device("cpu")
    idx = torch.randperm(k, generator=generator, device=rng_device)[:m].to(device)
    return idx, k * (k - 1) / (m * (m - 1))


def _pair_moments(a: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """For symmetric a with zero diagonal: T = sum_{j!=k} a_jk, A2 = sum_{j!=k} a_jk^2,
    P3 = sum over distinct j, k, l of a_jk a_jl, Q4 = sum over distinct j, k, l, q of a_jk a_lq
    (so T^2 = 2 A2 + 4 P3 + Q4)."""
    t = a.sum(dim=(-2, -1))
    a2 = a.pow(2).sum(dim=(-2, -1))
    p3 = a.sum(dim=-1).pow(2).sum(dim=-1) - a2
    return t, a2, p3, t.pow(2) - 2 * a2 - 4 * p3


def subset_estimate_variance(corr_sq: Tensor, m: int) -> Tensor:
    """Var(L_tc_hat) over the random m-subset, given a = the K x K squared correlations (any diagonal):

        Var = 2 A2 (1/p_2 - 1) + 4 P3 (p_3/p_2^2 - 1) + Q4 (p_4/p_2^2 - 1)

    with A2, P3, Q4 the pair, path and disjoint-pair moments of the off-diagonal a (``_pair_moments``) and
    p_r from :func:`subset_inclusion_probabilities`. It follows from E[S^2] = 2 A2 p_2 + 4 P3 p_3 + Q4 p_4
    for the subset sum S (pairs of pairs share 2, 1 or 0 components) and T^2 = 2 A2 + 4 P3 + Q4.
    """
    k = corr_sq.shape[-1]
    a = corr_sq - torch.diag_embed(torch.diagonal(corr_sq, dim1=-2, dim2=-1))
    _, a2, p3, q4 = _pair_moments(a)
    p2_, p3_, p4_ = subset_inclusion_probabilities(k, m)
    return 2 * a2 * (1 / p2_ - 1) + 4 * p3 * (p3_ / p2_**2 - 1) + q4 * (p4_ / p2_**2 - 1)


def subset_estimate_variance_from_subset(corr_sq_subset: Tensor, k: int) -> Tensor:
    """Unbiased estimate of :func:`subset_estimate_variance` from the m x m squared correlations of the
    drawn subset alone (m >= 4): A2, P3 and Q4 replaced by their subset sums divided by p_2, p_3, p_4.
    It can come out slightly negative on a small subset; callers clamp it at 0."""
    m = corr_sq_subset.shape[-1]
    if m >= k:
        return corr_sq_subset.new_zeros(corr_sq_subset.shape[:-2])
    if m < 4:
        raise ValueError(f"a variance estimate from the subset needs m >= 4, got m = {m}")
    a = corr_sq_subset - torch.diag_embed(torch.diagonal(corr_sq_subset, dim1=-2, dim2=-1))
    _, a2, p3, q4 = _pair_moments(a)
    p2_, p3_, p4_ = subset_inclusion_probabilities(k, m)
    a2, p3, q4 = a2 / p2_, p3 / p3_, q4 / p4_
    return 2 * a2 * (1 / p2_ - 1) + 4 * p3 * (p3_ / p2_**2 - 1) + q4 * (p4_ / p2_**2 - 1)


class _WeightOrthogonality(torch.autograd.Function):
    """L_wr(W) through the D x D matrix M = W_n^T W_n (D < K), its gradient written out so that it holds one
    K x D temporary besides W_n: with G = dL/dW_n = 4 W_n M, dL/dw_j = (g_j - w_n,j (w_n,j . g_j)) / ||w_j||
    (the projection of the unit-norm map; the -2 sum_j ||w_n,j||^2 term has gradient 0)."""

    @staticmethod
    def forward(ctx, w: Tensor) -> Tensor:
        norm = torch.linalg.vector_norm(w, dim=-1, keepdim=True)
        scale = norm.clamp_min(1e-12)
        wn = w / scale
        m = _matmul(wn.transpose(-1, -2), wn)
        unit = (norm / scale).squeeze(-1).pow(2)  # ||w_n,j||^2: 1, or 0 for a zero row
        ctx.save_for_backward(wn, m, scale)
        return m.pow(2).sum(dim=(-2, -1)) - 2 * unit.sum(dim=-1) + w.shape[-2]

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        wn, m, scale = ctx.saved_tensors
        g = _matmul(wn, m * (4 * grad).unsqueeze(-1).unsqueeze(-1))
        along = torch.linalg.vecdot(wn, g, dim=-1).unsqueeze(-1)
        return g.addcmul_(wn, along, value=-1).div_(scale)


def weight_orthogonality_loss(weight: Tensor) -> Tensor:
    """L_wr = ||W_n W_n^T - I||_F^2 with W_n the rows of W (K x D) scaled to unit norm.

    When D < K it is computed through the D x D matrix W_n^T W_n (||A A^T||_F = ||A^T A||_F):

        L_wr = ||W_n^T W_n||_F^2 - 2 sum_j ||w_n,j||^2 + K      (||w_n,j||^2 = 1, or 0 for a zero row)

    cost K D^2 and memory D^2 (plus two K x D temporaries) instead of K^2 D and K^2; else through the
    K x K Gram. Same function of W either way, so values and gradients agree to rounding.
    """
    w = _wide(weight)
    k, dim = w.shape[-2:]
    if dim < k:
        return _WeightOrthogonality.apply(w)
    w = w / w.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    gram = _matmul(w, w.transpose(-1, -2))
    eye = torch.eye(k, dtype=gram.dtype, device=gram.device)
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
    tc_components: int | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """L = l_lse L_LSE + l_var L_var + l_tc L_tc + l_wr L_wr, the paper's objective.

    Returns ``{"loss": L, "lse": L_LSE, "var": L_var, "tc": L_tc, "wr": L_wr}`` (terms unweighted), each
    with the leading shape of ``d`` (none for N x K); lambdas may be tensors of that shape. A term whose
    lambda is the number 0 is not computed and reads 0, which keeps ablations and the default l_wr = 0
    free. The variance and decorrelation terms share one pass over the batch statistics; neither L_tc nor
    L_wr builds a K x K matrix when a smaller Gram matrix gives the same value (N < K, D < K).

    ``tc_components = m`` (< K) replaces L_tc by the unbiased estimate from m random components drawn
    from ``generator`` (:func:`decorrelation_subset_estimate`), for batches much larger than m; None
    (the default) computes it exactly.
    """
    d = _wide(d)
    lambdas = {"lse": lambda_lse, "var": lambda_var, "tc": lambda_tc, "wr": lambda_wr}
    zero = d.new_zeros(d.shape[:-2])
    terms = dict.fromkeys(lambdas, zero)
    with_lse, with_var, with_tc = (not _is_zero(lambdas[t]) for t in ("lse", "var", "tc"))
    if with_lse or with_var or with_tc:
        index, scale = None, 1.0
        k = d.shape[-1]
        if with_tc and tc_components is not None and tc_components < k:
            index, scale = _subset(k, tc_components, generator, d.device)
        lse, var, tc = _BatchTerms.apply(d, with_lse, with_tc, index, scale)
        terms.update({name: t for name, t, on in (("lse", lse, with_lse), ("tc", tc, with_tc)) if on})
        if with_var:
            terms["var"] = log_variance_barrier(var, eps)
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


def topk_sae_objective(x: Tensor, reconstruction: Tensor) -> dict[str, Tensor]:
    """TopK SAE loss L = mean (x - x_hat)^2 (over batch and dimensions): sparsity is the TopK's, so no L1.

    Returns ``{"loss": L, "mse": L, "fvu": sum (x - x_hat)^2 / sum (x - mean(x))^2}`` (the batch's FVU,
    logged, not optimised).
    """
    resid = (reconstruction - x).pow(2)
    mse = resid.mean()
    fvu = resid.sum() / (x - x.mean(0)).pow(2).sum().clamp_min(torch.finfo(x.dtype).tiny)
    return {"loss": mse, "mse": mse, "fvu": fvu.detach()}
