"""The implicit-EM objective: pure functions on tensors.

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


class _SelectAndDepthVariance(torch.autograd.Function):
    """The dense part of the truncated objective in one pass each way (see :func:`select_and_depth_variance`)."""

    @staticmethod
    def forward(ctx, z: Tensor, sign: int, k: int):
        values, index = z.topk(k, dim=-1, largest=sign > 0)
        depth = (z if sign > 0 else torch.neg(z)).relu()  # relu(s z), s = sign
        n = depth.shape[-2]
        mean = depth.sum(dim=-2) / n
        sq = depth.new_zeros(mean.shape)
        for rows in depth.split(1024, dim=-2):  # two-pass variance in row blocks: no N x K temporary
            centred = rows - mean.unsqueeze(-2)
            sq += torch.linalg.vecdot(centred, centred, dim=-2)
        ctx.sign = sign
        ctx.save_for_backward(depth, mean, index)
        ctx.mark_non_differentiable(index)
        return values * sign, index, sq / (n - 1)

    @staticmethod
    def backward(ctx, g_selected: Tensor, _g_index, g_var: Tensor):
        depth, mean, index = ctx.saved_tensors
        coef = g_var * (2 * ctx.sign / (depth.shape[-2] - 1))
        # dVar_j/dz_ij = s (2 / (N - 1)) (h_ij - mean_j) 1[h_ij > 0], and 1[h > 0] = sign(h) for h >= 0
        grad = torch.sign(depth).mul_(-mean.unsqueeze(-2)).add_(depth).mul_(coef.unsqueeze(-2))
        if g_selected is not None:
            grad.scatter_add_(-1, index, g_selected * ctx.sign)
        return grad, None, None


def select_and_depth_variance(z: Tensor, sign: int, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """What the truncated objective needs from the dense N x K pre-activations z, without an N x K temporary
    beyond the depth itself:

        index T_i = the k largest of s z_i,   values (s z)_{i, T_i},   Var_j = Var_i(relu(s z_ij)),

    with s = ``sign`` (+1 or -1); the variance is the unbiased batch variance of every component's depth (the
    variance term's input). Its backward is written out: dL/dz_ij = s (dL/dvalues scattered to T_i) +
    s (2 / (N - 1)) dL/dVar_j (h_ij - mean_j) 1[h_ij > 0], h = relu(s z), in one N x K buffer, so a step costs
    about the encoder's matmuls and a few passes over z (``benchmarks/sparse_step.py``)."""
    return _SelectAndDepthVariance.apply(_wide(z), int(sign), int(k))


def code_columns(values: Tensor, index: Tensor, columns: Tensor, n_components: int) -> Tensor:
    """The columns ``columns`` (m component indices) of the k-sparse code a (N x K) whose row i holds ``values``
    (N x k) at ``index`` (N x k) and 0 elsewhere: a[:, columns] (N x m), built without the N x K matrix."""
    where = torch.full((n_components,), len(columns), dtype=torch.long, device=index.device)
    where[columns] = torch.arange(len(columns), device=index.device)
    out = values.new_zeros(*values.shape[:-1], len(columns) + 1)  # the last column takes the unselected
    return out.scatter(-1, where[index], values)[..., :-1]


def sparse_decorrelation_loss(values: Tensor, index: Tensor, n_components: int) -> Tensor:
    """L_tc = sum_{j != l} Corr(a)_jl^2 of the k-sparse code a (N x K: row i holds ``values`` at ``index``, both
    N x k with distinct indices per row, and 0 elsewhere), exact, from its N k nonzeros and N k^2 pairs.

    The columns kept in more than half the rows (F, fewer than 2k) are taken dense and centred: z_F (N x |F|),
    Corr_FF = z_F^T z_F. For the others (S), with mu_j, ss_j = sum_i (a_ij - mu_j)^2 (over a column's nonzeros,
    plus (N - n_j) mu_j^2 for its zeros), r_j = (ss_j + (N - 1) c)^-1/2, b_ij = r_j a_ij and m_j = r_j mu_j:
    Corr_SS = B^T B - N m m^T and, since z_F's columns sum to 0, Corr_SF = B^T z_F, so

        ||Corr_SS||_F^2 = sum_jl (B^T B)_jl^2 - 2 N ||B m||^2 + N^2 (m . m)^2,
        L_tc = ||Corr_SS||_F^2 - sum_{j in S} q_j^2 + 2 ||B^T z_F||_F^2 + sum_{f != g in F} Corr_fg^2,

    q_j = Corr_jj = ss_j / (ss_j + (N - 1) c), c = 1e-8 (as :func:`decorrelation_loss`). (B^T B)_jl sums
    b_ij b_il over the rows where both j and l are kept: the N k (k - 1) / 2 pairs j < l, summed by key. In S,
    mu_j / sd_j <= 1 (kept in at most half the rows), so the expansion loses no digits; F holds the columns where
    it would. Cost N k^2 (a sort) against N^2 K for the dense code; the same value as
    :func:`decorrelation_loss` of the dense code, to rounding (tested)."""
    values = _wide(values)
    n, k = values.shape
    flat, cols = values.reshape(-1), index.reshape(-1)
    count = torch.bincount(cols, minlength=n_components)
    mean = values.new_zeros(n_components).index_add_(0, cols, flat) / n
    ss = values.new_zeros(n_components).index_add_(0, cols, (flat - mean[cols]).pow(2))
    ss = ss + (n - count).to(values.dtype) * mean.pow(2)
    frequent = count > n // 2
    r = torch.rsqrt(ss + (n - 1) * CORRELATION_EPS) * ~frequent  # 0 on F: B and m hold S only
    b = values * r[index]
    m = r * mean
    upper = torch.triu_indices(k, k, offset=1, device=index.device)
    first, second = index[:, upper[0]], index[:, upper[1]]  # every pair j != l of a row, once (N x k(k-1)/2)
    keys = torch.minimum(first, second) * n_components + torch.maximum(first, second)
    _, which = torch.unique(keys.reshape(-1), return_inverse=True)
    pairs = (b[:, upper[0]] * b[:, upper[1]]).reshape(-1)
    off = b.new_zeros(int(which.max()) + 1 if which.numel() else 0).index_add_(0, which, pairs)  # (B^T B)_jl, j < l
    diag = b.new_zeros(n_components).index_add_(0, cols, b.reshape(-1).pow(2))  # (B^T B)_jj
    corr_sq = 2 * off.pow(2).sum() + diag.pow(2).sum()
    corr_sq = corr_sq - 2 * n * (b * m[index]).sum(dim=-1).pow(2).sum() + (n * m.pow(2).sum()).pow(2)
    q = ss / (ss + (n - 1) * CORRELATION_EPS)
    loss = corr_sq - q[~frequent].pow(2).sum()
    if bool(frequent.any()):
        dense = code_columns(values, index, frequent.nonzero().squeeze(-1), n_components)
        z_f = _standardized(*centred_and_variance(dense))  # N x |F|, Corr_FF = z_F^T z_F
        cross = b.new_zeros(n_components, z_f.shape[-1]).index_add_(
            0, cols, b.reshape(-1, 1) * z_f.repeat_interleave(k, dim=0)
        )  # B^T z_F (K x |F|), 0 on F's rows
        loss = loss + 2 * cross.pow(2).sum() + off_diagonal_sq_norm(_matmul(z_f.T, z_f))
    return loss


def unkept_lse_loss(z: Tensor, index: Tensor, sign: int, k_aux: int, distance) -> Tensor:
    """The truncated E-step over the components that no row of the batch keeps (U = those not in any T_i):

        L_aux = -sum_i log sum_{j in A_i} exp(-d_ij),   A_i = the k_aux largest s z_ij over j in U,

    d = ``distance``(z) (as in :func:`truncated_objective`). Its gradient is the E-step of those components only,
    r~_ij over A_i: each unkept component is moved toward the inputs it is nearest to, as the kept ones are by
    L_LSE^T, until it is kept (the decoder-free counterpart of an SAE's auxiliary loss on dead latents, and of
    re-seeding an empty cluster in k-means). 0 when every component is kept somewhere. Summed over the batch."""
    n_components = z.shape[-1]
    kept = torch.zeros(n_components, dtype=torch.bool, device=z.device)
    kept[index.reshape(-1)] = True
    unkept = (~kept).nonzero().squeeze(-1)
    if len(unkept) == 0:
        return z.new_zeros(())
    zu = z.index_select(-1, unkept)
    values = (sign * zu).topk(min(k_aux, len(unkept)), dim=-1).values
    return truncated_lse_loss(distance(values * sign))


def truncated_objective(
    z: Tensor,
    sign: int,
    k: int,
    distance,
    weight: Tensor | None = None,
    lambda_lse: float = 1.0,
    lambda_var: float = 1.0,
    lambda_tc: float = 1.0,
    lambda_wr: float = 0.0,
    eps: float = 1e-6,
    tc_components: int | None = None,
    generator: torch.Generator | None = None,
    lambda_aux: float = 0.0,
    aux_k: int | None = None,
) -> dict[str, Tensor]:
    """The sparse model's truncated objective from its pre-activations z (N x K), with s = ``sign``:

        L = l_lse L_LSE^T(d_{i, T_i}) + l_var L_var(relu(s z)) + l_tc L_tc(a) + l_wr L_wr(W) [+ l_aux L_aux],

    T_i the k largest of s z_i, a = TopK_k(relu(s z)) the code, d = ``distance``(z) (e.g. tau phi(z / tau),
    :func:`tempered_distance`) on the kept components only: the truncated E-step
    (:func:`truncated_lse_loss`), the variance term on every component's dense depth (none left outside every
    top k), the decorrelation term on the code, exact from its nonzeros (:func:`sparse_decorrelation_loss`) or
    its unbiased subset estimate from ``tc_components`` columns (as :func:`decorrelation_subset_estimate`). The
    same value as the terms written out on dense N x K matrices, at the cost of the dense depth's variance
    (:func:`select_and_depth_variance`) and N k^2 for the decorrelation. ``lambda_aux`` > 0 adds the E-step of
    the components no row keeps (:func:`unkept_lse_loss`, over ``aux_k`` of them per row, default k) as ``aux``."""
    values, index, depth_var = select_and_depth_variance(z, sign, k)
    zero = values.new_zeros(values.shape[:-2])
    terms = {"lse": zero, "var": zero, "tc": zero, "wr": zero}
    if not _is_zero(lambda_lse):
        terms["lse"] = truncated_lse_loss(distance(values * sign))
    if not _is_zero(lambda_var):
        terms["var"] = log_variance_barrier(depth_var, eps)
    if not _is_zero(lambda_tc):
        n_components, kept = z.shape[-1], torch.relu(values)
        if tc_components is None or tc_components >= n_components:
            terms["tc"] = sparse_decorrelation_loss(kept, index, n_components)
        else:
            columns, scale = _subset(n_components, tc_components, generator, z.device)
            terms["tc"] = decorrelation_loss(code_columns(kept, index, columns, n_components)) * scale
    if weight is not None and not _is_zero(lambda_wr):
        terms["wr"] = weight_orthogonality_loss(weight)
    lambdas = {"lse": lambda_lse, "var": lambda_var, "tc": lambda_tc, "wr": lambda_wr}
    if not _is_zero(lambda_aux):
        terms["aux"] = unkept_lse_loss(z, index, sign, aux_k or k, distance)
        lambdas["aux"] = lambda_aux
    weighted = [lam * terms[t] for t, lam in lambdas.items() if not _is_zero(lam)]
    return {"loss": sum(weighted[1:], weighted[0]) if weighted else zero, **terms}


def truncated_lse_loss(d: Tensor, index: Tensor | None = None) -> Tensor:
    """Truncated mixture NLL (expectation truncation): only the components in T_i (``index``, N x k) count,

        L_LSE^T = -sum_i log sum_{j in T_i} exp(-d_ij),

    an upper bound of L_LSE (fewer terms in each sum). Its gradient is the truncated E-step:
    dL/dd_ij = r~_ij = exp(-d_ij) / sum_{l in T_i} exp(-d_il) for j in T_i, and 0 for every other j
    (the responsibilities renormalised over the k kept components). Summed over the batch. ``index`` None:
    ``d`` holds the kept components' distances only (N x k, d_{i, T_i})."""
    d = _wide(d)
    return -torch.logsumexp(-(d if index is None else d.gather(-1, index)), dim=-1).sum(dim=-1)


def kept_lse_loss(d: Tensor, kept: Tensor) -> Tensor:
    """The truncated mixture NLL over a kept set of any size per row (``kept``, an N x K mask; batch top-k
    selection keeps more components for some inputs and fewer for others):

        L_LSE^M = -sum_{i: M_i nonempty} log sum_{j in M_i} exp(-d_ij),

    with gradient dL/dd_ij = exp(-d_ij) / sum_{l in M_i} exp(-d_il) on M_i and 0 elsewhere (the truncated
    E-step); a row with nothing kept adds nothing. Equals :func:`truncated_lse_loss` when every row keeps k.
    Summed over the batch."""
    d = _wide(d)
    rows = kept.any(dim=-1)
    neg = torch.where(kept[rows], -d[rows], torch.full_like(d[rows], -torch.inf))
    return -torch.logsumexp(neg, dim=-1).sum(dim=-1)


def truncation_gap_loss(d: Tensor, index: Tensor) -> Tensor:
    """The gap between the truncated and the full mixture NLL: the posterior mass outside the kept components,

        L_gap = L_LSE^T - L_LSE = -sum_i log sum_{j in T_i} r_ij >= 0,   r = softmax(-d),

    zero when the k kept components (``index``, N x k) hold all the responsibility. Its gradient trains both
    sides of the truncation: dL/dd_ij = r~_ij 1[j in T_i] - r_ij, pulling the kept components in and pushing
    every other one out by its responsibility. Summed over the batch."""
    return truncated_lse_loss(d, index) - lse_loss(d)


def centre_distance(wx: Tensor, weight: Tensor) -> Tensor:
    """Unit-variance Gaussian distances to the centres mu_j = -w_j, up to a per-row constant:

        d_ij = ||x_i - mu_j||^2 / 2 - ||x_i||^2 / 2 = w_j . x_i + ||w_j||^2 / 2,

    from wx = x W^T (N x K, no bias) and W (K x D). The dropped ||x_i||^2 / 2 is the same for every component of
    a row, so the responsibilities, the k nearest and every gradient w.r.t. W are the Gaussian mixture's: the
    truncated E-step over d moves each kept centre by r~_ij (x_i - mu_j), the M-step of k-means."""
    return wx + 0.5 * _wide(weight).pow(2).sum(dim=-1)


def tempered_distance(z: Tensor, phi, temperature: float = 1.0) -> Tensor:
    """Distances at temperature tau for the truncated E-step: d = tau phi(z / tau).

    For relu, d = relu(z) at every tau (relu is homogeneous), so the components the sparse code selects (z < 0)
    have d = 0 and dL_LSE^T/dz = 0. For softplus, d = tau log(1 + exp(z / tau)) > 0 with
    dd/dz = sigmoid(z / tau): the truncated E-step's responsibility r~_ij reaches the selected components with
    weight sigmoid(z_ij / tau), from relu's (tau -> 0) to half the raw distance's (tau -> infinity).
    """
    return phi(z) if temperature == 1 else temperature * phi(z / temperature)


def _ridge_readout(x: Tensor, a: Tensor, ridge: float) -> tuple[Tensor, Tensor, Tensor]:
    """R = (A^T A + rho I)^-1 A^T X on the centred x and a, rho = ridge tr(A^T A) / K; returns R and the two
    means."""
    mx, ma = x.mean(dim=-2, keepdim=True), a.mean(dim=-2, keepdim=True)
    xc, ac = x - mx, a - ma
    gram = ac.transpose(-2, -1) @ ac
    rho = ridge * gram.diagonal(dim1=-2, dim2=-1).mean(dim=-1).clamp_min(torch.finfo(a.dtype).tiny)
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram + rho[..., None, None] * eye, ac.transpose(-2, -1) @ xc), mx, ma


def readout_residual_loss(x: Tensor, a: Tensor, ridge: float = 1e-3) -> Tensor:
    """The batch's held-out least-squares readout error of the code, a reconstruction term with a readout solved,
    not learned (cross-fitted: the batch's even rows E and odd rows O each scored by the other's readout):

        L_rec = N (||X_O - A_O R_E - c_E||^2 + ||X_E - A_E R_O - c_O||^2) / ||X - mean X||^2,

    R_E = (A_E^T A_E + rho I)^-1 A_E^T X_E on E's centred rows (rho = ridge tr(A_E^T A_E) / K), c_E its intercept;
    X (N x D) inputs, A (N x K) codes. So L_rec is N times a held-out FVU, summed over the batch like the other
    terms; held out because with K >= N / 2 a readout fitted on the rows it scores fits them almost exactly. Its
    gradient reaches the encoder through A only: no decoder parameters. Not the implicit-EM objective: it asks
    the code for what a reconstruction needs (``--model.net.lambda_rec``), to measure how much of the SAEs' lead
    that is."""
    x, a = _wide(x), _wide(a)
    halves = (slice(0, None, 2), slice(1, None, 2))
    err = x.new_zeros(x.shape[:-2])
    for fit, score in (halves, halves[::-1]):
        r, mx, ma = _ridge_readout(x[..., fit, :], a[..., fit, :], ridge)
        err = err + (x[..., score, :] - mx - (a[..., score, :] - ma) @ r).pow(2).sum(dim=(-2, -1))
    total = (x - x.mean(dim=-2, keepdim=True)).pow(2).sum(dim=(-2, -1))
    return x.shape[-2] * err / total.clamp_min(torch.finfo(x.dtype).tiny)


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
