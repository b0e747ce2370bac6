"""The sparse model's truncated objective (``implicit_em_sparse``): pure functions on its pre-activations.

The sparse model reads z = W x + b (N x K) as depths: its code a = TopK_k(relu(-z)) keeps, for each input x_i,
the k components nearest to it (T_i, the k smallest z_ij), each valued by its depth relu(-z_ij) inside its
halfspace. It trains on

    L = l_lse L_LSE^T + l_var L_var(relu(-z)) + l_tc L_tc(a) + l_wr L_wr(W) [+ l_aux L_aux]:

the E-step truncated to the kept components (:func:`truncated_lse_loss`, or :func:`kept_lse_loss` when the kept
set is chosen per component), the variance term on every component's dense depth (so none stays outside every
input's top k), the decorrelation term on the code (:func:`sparse_decorrelation_loss`, from its nonzeros) and,
optionally, the E-step of the components no row keeps (:func:`unkept_lse_loss`). The paper's terms
(:mod:`implicit_em.core.objective`) supply L_var, L_tc on dense columns and L_wr.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from implicit_em.core.objective import (
    CORRELATION_EPS,
    _is_zero,
    _matmul,
    _standardized,
    _subset,
    _wide,
    centred_and_variance,
    decorrelation_loss,
    implicit_em_objective,
    log_variance_barrier,
    off_diagonal_sq_norm,
    weight_orthogonality_loss,
)

#: phi, the distance d = phi(z) of the truncated E-step (the model's activation)
Distance = Callable[[Tensor], Tensor]


class _SelectAndDepthVariance(torch.autograd.Function):
    """The dense part of the truncated objective in one pass each way (see :func:`select_and_depth_variance`)."""

    @staticmethod
    def forward(ctx, z: Tensor, k: int):
        values, index = z.topk(k, dim=-1, largest=False)
        depth = torch.neg(z).relu()  # h = relu(-z)
        n = depth.shape[-2]
        mean = depth.sum(dim=-2) / n
        sq = depth.new_zeros(mean.shape)
        for rows in depth.split(1024, dim=-2):  # two-pass variance in row blocks: no N x K temporary
            centred = rows - mean.unsqueeze(-2)
            sq += torch.linalg.vecdot(centred, centred, dim=-2)
        ctx.save_for_backward(depth, mean, index)
        ctx.mark_non_differentiable(index)
        return torch.neg(values), index, sq / (n - 1)

    @staticmethod
    def backward(ctx, g_selected: Tensor, _g_index, g_var: Tensor):
        depth, mean, index = ctx.saved_tensors
        coef = g_var * (-2 / (depth.shape[-2] - 1))
        # dVar_j/dz_ij = -(2 / (N - 1)) (h_ij - mean_j) 1[h_ij > 0], and 1[h > 0] = sign(h) for h >= 0
        grad = torch.sign(depth).mul_(-mean.unsqueeze(-2)).add_(depth).mul_(coef.unsqueeze(-2))
        if g_selected is not None:
            grad.scatter_add_(-1, index, torch.neg(g_selected))
        return grad, None


def select_and_depth_variance(z: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """What the truncated objective needs from the dense N x K pre-activations z, without an N x K temporary
    beyond the depth itself:

        index T_i = the k smallest of z_i,   values -z_{i, T_i},   Var_j = Var_i(relu(-z_ij)),

    the variance the unbiased batch variance of every component's depth (the variance term's input). Its backward
    is written out: dL/dz_ij = -(dL/dvalues scattered to T_i) - (2 / (N - 1)) dL/dVar_j (h_ij - mean_j) 1[h_ij > 0],
    h = relu(-z), in one N x K buffer, so a step costs about the encoder's matmuls and a few passes over z
    (``benchmarks/sparse_step.py``)."""
    return _SelectAndDepthVariance.apply(_wide(z), int(k))


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


def unkept_lse_loss(z: Tensor, index: Tensor, k_aux: int, phi: Distance) -> Tensor:
    """The truncated E-step over the components that no row of the batch keeps (U = those not in any T_i, the
    kept indices ``index``):

        L_aux = -sum_i log sum_{j in A_i} exp(-d_ij),   A_i = the k_aux smallest z_ij over j in U,   d = phi(z).

    Its gradient is the E-step of those components only, r~_ij over A_i: each unkept component is moved toward the
    inputs it is nearest to, as the kept ones are by L_LSE^T, until it is kept (the decoder-free counterpart of an
    SAE's auxiliary loss on dead latents, and of re-seeding an empty cluster in k-means). 0 when every component is
    kept somewhere. Summed over the batch."""
    n_components = z.shape[-1]
    kept = torch.zeros(n_components, dtype=torch.bool, device=z.device)
    kept[index.reshape(-1)] = True
    unkept = (~kept).nonzero().squeeze(-1)
    if len(unkept) == 0:
        return z.new_zeros(())
    zu = z.index_select(-1, unkept)
    depths = torch.neg(zu).topk(min(k_aux, len(unkept)), dim=-1).values
    return truncated_lse_loss(phi(torch.neg(depths)))


def truncated_objective(
    z: Tensor,
    k: int,
    phi: Distance,
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
    """The sparse model's truncated objective from its pre-activations z (N x K), each row keeping its k nearest:

        L = l_lse L_LSE^T(d_{i, T_i}) + l_var L_var(relu(-z)) + l_tc L_tc(a) + l_wr L_wr(W) [+ l_aux L_aux],

    T_i the k smallest of z_i, a = TopK_k(relu(-z)) the code, d = phi(z) on the kept components only: the
    truncated E-step (:func:`truncated_lse_loss`), the variance term on every component's dense depth (none left
    outside every top k), the decorrelation term on the code, exact from its nonzeros
    (:func:`sparse_decorrelation_loss`) or its unbiased subset estimate from ``tc_components`` columns (as
    :func:`~implicit_em.core.objective.decorrelation_subset_estimate`). The same value as the terms written out on
    dense N x K matrices, at the cost of the dense depth's variance (:func:`select_and_depth_variance`) and N k^2
    for the decorrelation. ``lambda_aux`` > 0 adds the E-step of the components no row keeps
    (:func:`unkept_lse_loss`, over ``aux_k`` of them per row, default k) as ``aux``."""
    values, index, depth_var = select_and_depth_variance(z, k)
    zero = values.new_zeros(values.shape[:-2])
    terms = {"lse": zero, "var": zero, "tc": zero, "wr": zero}
    if not _is_zero(lambda_lse):
        terms["lse"] = truncated_lse_loss(phi(torch.neg(values)))
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
        terms["aux"] = unkept_lse_loss(z, index, aux_k or k, phi)
        lambdas["aux"] = lambda_aux
    weighted = [lam * terms[t] for t, lam in lambdas.items() if not _is_zero(lam)]
    return {"loss": sum(weighted[1:], weighted[0]) if weighted else zero, **terms}


def kept_set_objective(
    z: Tensor,
    depth: Tensor,
    a: Tensor,
    phi: Distance,
    weight: Tensor | None = None,
    lambda_lse: float = 1.0,
    lambda_var: float = 1.0,
    lambda_tc: float = 1.0,
    lambda_wr: float = 0.0,
    eps: float = 1e-6,
    tc_components: int | None = None,
    generator: torch.Generator | None = None,
    lambda_aux: float = 0.0,
    aux_k: int = 1,
) -> dict[str, Tensor]:
    """The truncated objective on a kept set chosen otherwise than k per row (``selection component``: each
    component's N k / K deepest inputs), from the pre-activations z, the dense depth h = relu(-z) and the code a
    (all N x K; a = h on the kept set M = {a > 0}, 0 elsewhere):

        L = l_tc L_tc(a) + l_wr L_wr(W) + l_var L_var(h) + l_lse L_LSE^M(phi(z)) [+ l_aux L_aux],

    the E-step over each row's kept set (:func:`kept_lse_loss`), the decorrelation term on the code (dense, exact or
    from ``tc_components`` columns), the variance term on the dense depth, and with ``lambda_aux`` > 0 the E-step of
    the components no row keeps (:func:`unkept_lse_loss` over ``aux_k`` of them per row) as ``aux``."""
    kept = a > 0
    lse = kept_lse_loss(phi(z), kept)
    terms = implicit_em_objective(a, weight, 0.0, 0.0, lambda_tc, lambda_wr, eps, tc_components, generator)
    var = implicit_em_objective(depth, None, 0.0, lambda_var, 0.0, 0.0, eps)["var"]
    out = {**terms, "lse": lse, "var": var}
    loss = terms["loss"] + lambda_var * var + lambda_lse * lse
    if not _is_zero(lambda_aux):
        out["aux"] = unkept_lse_loss(z, kept.nonzero()[:, -1], aux_k, phi)
        loss = loss + lambda_aux * out["aux"]
    return {**out, "loss": loss}
