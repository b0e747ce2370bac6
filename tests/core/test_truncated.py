"""The sparse model's truncated objective: the truncated E-steps, the sparse decorrelation, the fused dense pass,
and the whole objective against its terms written out on dense N x K matrices (float64)."""

import pytest
import torch
import torch.nn.functional as F

from implicit_em.core.objective import decorrelation_loss, implicit_em_objective, lse_loss, variance_loss
from implicit_em.core.truncated import (
    kept_lse_loss,
    kept_set_objective,
    select_and_depth_variance,
    sparse_decorrelation_loss,
    truncated_lse_loss,
    truncated_objective,
    unkept_lse_loss,
)


def _z(n: int = 60, k: int = 20, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_truncated_lse_gradient_is_the_truncated_e_step():
    g = torch.Generator().manual_seed(0)
    d = (torch.rand(7, 9, generator=g) * 3).double().requires_grad_(True)
    idx = torch.randn(7, 9, generator=g).topk(4, dim=-1).indices
    loss = truncated_lse_loss(d, idx)
    (grad,) = torch.autograd.grad(loss, d)
    sel = torch.zeros_like(d, dtype=torch.bool).scatter(-1, idx, True)
    r = torch.where(sel, torch.exp(-d), torch.zeros_like(d))
    r = r / r.sum(-1, keepdim=True)
    assert torch.allclose(grad, r, atol=1e-12)
    assert torch.allclose(grad.sum(-1), torch.ones(7, dtype=torch.float64))
    assert float(loss) >= float(lse_loss(d)) - 1e-12  # fewer components: an upper bound of the mixture NLL
    full = truncated_lse_loss(d, torch.arange(9).expand(7, 9))
    assert torch.allclose(full, lse_loss(d))
    assert torch.allclose(truncated_lse_loss(d.gather(-1, idx)), loss)  # index None: d holds the kept only


def test_kept_lse_is_the_truncated_e_step_over_any_kept_set():
    """L_LSE^M equals L_LSE^T when every row keeps k; a row with nothing kept adds nothing; its gradient is the
    responsibilities renormalised over each row's kept set."""
    g = torch.Generator().manual_seed(3)
    d = torch.rand(9, 7, generator=g, dtype=torch.float64) * 3
    index = d.topk(3, dim=-1, largest=False).indices
    kept = torch.zeros_like(d, dtype=torch.bool).scatter(-1, index, True)
    assert torch.allclose(kept_lse_loss(d, kept), truncated_lse_loss(d, index))
    kept = torch.rand(9, 7, generator=g) < 0.4
    kept[2] = False  # a row with nothing kept
    d.requires_grad_(True)
    (grad,) = torch.autograd.grad(kept_lse_loss(d, kept), d)
    expected = torch.where(kept, torch.exp(-d.detach()), torch.zeros_like(d))
    expected = expected / expected.sum(-1, keepdim=True).clamp_min(1e-300)
    assert torch.allclose(grad, expected) and bool((grad[2] == 0).all())
    rows = [i for i in range(9) if bool(kept[i].any())]
    value = -sum(torch.logsumexp(-d.detach()[i][kept[i]], 0) for i in rows)
    assert torch.allclose(kept_lse_loss(d, kept), value)


def test_unkept_e_step_moves_only_the_components_no_row_keeps():
    """L_aux's gradient is the truncated E-step over the k_aux nearest unkept components of each row (d = phi(z)),
    and 0 on every component some row keeps; 0 when every component is kept."""
    z = _z(30, 10)
    z[:, 6:] += 5.0  # components 6-9 are far from every row: never among the 3 nearest (smallest z)
    z.requires_grad_(True)
    index = (-z).topk(3, dim=-1).indices
    assert not bool(torch.isin(torch.arange(6, 10), index).any())
    (grad,) = torch.autograd.grad(unkept_lse_loss(z, index, 2, F.softplus), z)
    assert bool((grad[:, torch.unique(index)] == 0).all())
    zu = z.detach()[:, 6:]
    near = (-zu).topk(2, dim=-1).indices
    d = F.softplus(zu.gather(-1, near))
    expected = torch.zeros_like(zu).scatter(-1, near, torch.softmax(-d, dim=-1) * torch.sigmoid(zu.gather(-1, near)))
    assert torch.allclose(grad[:, 6:], expected)
    everything = torch.arange(10).expand(30, 10)
    assert float(unkept_lse_loss(z, everything, 2, F.softplus)) == 0


@pytest.mark.parametrize(("n", "k_components", "k"), [(50, 40, 5), (64, 300, 16), (200, 12, 12)])
def test_sparse_decorrelation_is_the_dense_codes_in_value_and_gradient(n, k_components, k):
    """L_tc from the k nonzeros per row equals decorrelation_loss of the dense code, value and gradient (float64),
    with a component never kept (constant 0), one kept in every row, and kept entries that are 0."""
    g = torch.Generator().manual_seed(n + k)
    z = torch.randn(n, k_components, generator=g, dtype=torch.float64)
    z[:, 0] = -1e3  # never among the top k: a dead column
    z[:, -1] += 1e3  # always kept
    values, index = z.topk(k, dim=-1)
    kept = torch.relu(values - 0.3).requires_grad_(True)  # some kept values 0
    dense = torch.zeros_like(z).scatter(-1, index, kept)
    ref = decorrelation_loss(dense)
    ours = sparse_decorrelation_loss(kept, index, k_components)
    assert torch.allclose(ours, ref, rtol=1e-10, atol=1e-9)
    (g_ref,) = torch.autograd.grad(ref, kept)
    (g_ours,) = torch.autograd.grad(ours, kept)
    assert torch.allclose(g_ours, g_ref, rtol=1e-8, atol=1e-10)


def test_select_and_depth_variance_is_topk_and_the_dense_variance_in_value_and_gradient():
    """The fused pass (its backward written out) against topk and torch's variance of relu(-z): the same index,
    values and variances, and the same gradient of any function of the values and the variances (float64)."""
    z = _z(40, 30, seed=3).requires_grad_(True)
    values, index, var = select_and_depth_variance(z, 4)
    ref_values, ref_index = (-z).topk(4, dim=-1)
    ref_var = torch.relu(-z).var(dim=0)
    assert torch.equal(index, ref_index) and torch.allclose(values, ref_values)
    assert torch.allclose(var, ref_var, rtol=1e-12)
    weights = torch.rand(40, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    (grad,) = torch.autograd.grad((weights * values).sum() + var.log().sum(), z)
    (ref_grad,) = torch.autograd.grad((weights * ref_values).sum() + ref_var.log().sum(), z)
    assert torch.allclose(grad, ref_grad, rtol=1e-10, atol=1e-12)
    assert bool(grad.abs().sum() > 0)


def _written_out(z, k, phi, weight, lam, subset=None, aux=0.0, aux_k=None):
    """The truncated objective on dense N x K matrices: L_LSE^T of phi(z) over the k smallest z, L_var on relu(-z),
    L_tc on the code a (on its columns ``subset``, scaled to the unbiased estimate), L_wr, and the unkept E-step."""
    values, index = (-z).topk(k, dim=-1)
    a = torch.zeros_like(z).scatter(-1, index, F.relu(values))
    n_components = z.shape[-1]
    if subset is None:
        tc = decorrelation_loss(a)
    else:
        m = len(subset)
        tc = decorrelation_loss(a[:, subset]) * n_components * (n_components - 1) / (m * (m - 1))
    terms = implicit_em_objective(a, weight, 0.0, 0.0, 0.0, lam["lambda_wr"])
    loss = (lam["lambda_lse"] * truncated_lse_loss(phi(z), index) + lam["lambda_var"] * variance_loss(F.relu(-z))
            + lam["lambda_tc"] * tc + terms["loss"])  # fmt: skip
    if aux:
        loss = loss + aux * unkept_lse_loss(z, index, aux_k or k, phi)
    return loss


@pytest.mark.parametrize(
    "settings",
    [{}, {"phi": F.softplus, "lambda_lse": 30.0}, {"lambda_var": 2.0, "lambda_wr": 0.5},
     {"tc_components": 9, "phi": F.softplus}, {"lambda_aux": 2.0, "aux_k": 3, "phi": F.softplus}],
)  # fmt: skip
def test_truncated_objective_is_the_terms_written_out_in_value_and_gradient(settings):
    """The truncated objective (no N x K temporaries, the fused pass's backward written out) equals its terms on
    dense matrices: the value and the gradient w.r.t. W and b, in float64."""
    settings = dict(settings)
    phi = settings.pop("phi", F.relu)
    lam = {"lambda_lse": 1.0, "lambda_var": 1.0, "lambda_tc": 1.0, "lambda_wr": 0.0}
    lam.update({key: settings.pop(key) for key in list(settings) if key in lam})
    g = torch.Generator().manual_seed(2)
    x = torch.randn(16, 6, generator=g, dtype=torch.float64)  # 16 x 5 selections of K = 20: some unkept
    w = torch.randn(20, 6, generator=g, dtype=torch.float64).requires_grad_(True)
    b = (torch.randn(20, generator=g, dtype=torch.float64) * 0.3).requires_grad_(True)
    z = x @ w.T + b
    m = settings.get("tc_components")
    subset = torch.randperm(20, generator=torch.Generator().manual_seed(7))[:m] if m else None
    weight = w if lam["lambda_wr"] else None
    out = truncated_objective(z, 5, phi, weight, generator=torch.Generator().manual_seed(7), **lam, **settings)
    ref = _written_out(z, 5, phi, weight, lam, subset, settings.get("lambda_aux", 0.0), settings.get("aux_k"))
    assert torch.allclose(out["loss"], ref, rtol=1e-10, atol=1e-8)
    if settings.get("lambda_aux"):
        assert float(out["aux"]) > 0
    for ours, want in zip(
        torch.autograd.grad(out["loss"], (w, b), retain_graph=True), torch.autograd.grad(ref, (w, b))
    ):
        assert torch.allclose(ours, want, rtol=1e-8, atol=1e-10)


def test_kept_set_objective_is_the_terms_written_out():
    """On any kept set (here each component's 2 deepest inputs): L_LSE^M of phi(z) over each row's kept set,
    L_var on the dense depth, L_tc on the code, plus the unkept E-step, in value and gradient."""
    z = _z(12, 20, seed=5)
    z[:, 15:] += 5.0  # components 15-19 have no depth anywhere: kept by no row
    z.requires_grad_(True)
    depth = F.relu(-z)
    top = depth.topk(2, dim=0).indices
    a = torch.zeros_like(z).scatter(0, top, depth.gather(0, top))
    kept = a > 0
    out = kept_set_objective(z, depth, a, F.softplus, lambda_lse=2.0, lambda_tc=0.5, lambda_aux=3.0, aux_k=2)
    ref = (2.0 * kept_lse_loss(F.softplus(z), kept) + variance_loss(depth) + 0.5 * decorrelation_loss(a)
           + 3.0 * unkept_lse_loss(z, kept.nonzero()[:, -1], 2, F.softplus))  # fmt: skip
    assert torch.allclose(out["loss"], ref, rtol=1e-10)
    assert {"lse", "var", "tc", "wr", "aux"} <= out.keys() and float(out["aux"]) > 0
    for ours, want in zip(torch.autograd.grad(out["loss"], z, retain_graph=True), torch.autograd.grad(ref, z)):
        assert torch.allclose(ours, want, rtol=1e-8, atol=1e-10)
