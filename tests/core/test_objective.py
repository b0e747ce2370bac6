"""The objective's terms: the paper's identity, hand-computed values, numerical safety, ensembles."""

import math

import pytest
import torch

from implicit_em.core.objective import (
    correlation_matrix,
    decorrelation_loss,
    implicit_em_objective,
    lse_loss,
    lse_loss_autograd,
    responsibilities,
    sae_objective,
    variance_loss,
    weight_orthogonality_loss,
)

# A 3 x 2 example worked by hand. Columns: d_1 = (0, 2, 1), d_2 = (1, 0, 3).
#   means 1 and 4/3; deviations (-1, 1, 0) and (-1/3, -4/3, 5/3)
#   Var(d_1) = (1 + 1 + 0) / 2 = 1, Var(d_2) = (1/9 + 16/9 + 25/9) / 2 = 7/3
#   Cov = ((-1)(-1/3) + (1)(-4/3) + 0) / 2 = -1/2, Corr = -1/2 / sqrt(7/3), Corr^2 = 3/28
D = [[0.0, 1.0], [2.0, 0.0], [1.0, 3.0]]
# -sum_i log sum_j exp(-d_ij): rows log(1 + e^-1), log(e^-2 + 1), log(e^-1 + e^-3)
LSE = -(math.log(1 + math.exp(-1)) + math.log(math.exp(-2) + 1) + math.log(math.exp(-1) + math.exp(-3)))
LSE_NUMBER = 0.43288  # the same, written out
VAR = -(math.log(1 + 1e-6) + math.log(7 / 3 + 1e-6))  # -0.847298...
TC = 2 * 3 / 28  # both off-diagonal entries, = 3/14
# Rows (3, 4), (1, 0), (0, 2) -> unit rows (.6, .8), (1, 0), (0, 1); Gram off-diagonal .6, .8, 0 (twice each)
W = [[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]]
WR = 2 * (0.6**2 + 0.8**2 + 0.0**2)  # = 2.0


def test_identity_gradient_equals_responsibilities_float64():
    g = torch.Generator().manual_seed(0)
    for scale in (1.0, 10.0, 1e4):
        d = (torch.rand(64, 128, generator=g, dtype=torch.float64) * scale).requires_grad_(True)
        (grad,) = torch.autograd.grad(lse_loss(d), d)
        assert (grad - responsibilities(d)).abs().max() <= 1e-12, scale
        assert torch.allclose(grad.sum(-1), torch.ones(64, dtype=torch.float64))


def test_identity_gradient_equals_responsibilities_float32():
    g = torch.Generator().manual_seed(1)
    for scale in (1.0, 10.0, 1e4):
        d = (torch.rand(64, 128, generator=g) * scale).requires_grad_(True)
        (grad,) = torch.autograd.grad(lse_loss(d), d)
        assert grad.dtype == torch.float32
        assert (grad - responsibilities(d)).abs().max() <= 1e-6, scale
        # and against the float64 truth
        assert (grad.double() - responsibilities(d.double())).abs().max() <= 1e-6, scale


def test_identity_at_large_magnitudes_with_far_apart_distances():
    # the softmax is dominated by the minimum: distances spread over [0, 1e4] in float32 must not overflow
    d = torch.tensor([[0.0, 5.0, 1e4], [9999.0, 10000.0, 9998.5]], requires_grad=True)
    (grad,) = torch.autograd.grad(lse_loss(d), d)
    assert torch.isfinite(grad).all()
    assert (grad - responsibilities(d)).abs().max() <= 1e-6
    expected = torch.softmax(-d.detach().double(), -1)
    assert (grad.double() - expected).abs().max() <= 1e-6
    assert torch.isclose(lse_loss(d.detach().double()), -torch.logsumexp(-d.detach().double(), -1).sum())


def test_lse_backward_is_the_true_gradient():
    """lse_loss writes its backward as the responsibilities; check it against finite differences and
    against autograd of the textbook formula, so the identity tests above are not true by construction."""
    d = (torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 2).requires_grad_()
    assert torch.autograd.gradcheck(lse_loss, (d,))
    big = (torch.rand(64, 128, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) * 50).requires_grad_()
    (ours,) = torch.autograd.grad(lse_loss(big), big)
    (textbook,) = torch.autograd.grad(lse_loss_autograd(big), big)
    assert (ours - textbook).abs().max() <= 1e-12
    assert (textbook - responsibilities(big.detach())).abs().max() <= 1e-12  # the theorem itself


def test_lse_loss_by_hand():
    d = torch.tensor(D, dtype=torch.float64)
    assert lse_loss(d).item() == pytest.approx(LSE, abs=1e-12)
    assert lse_loss(d).item() == pytest.approx(LSE_NUMBER, abs=1e-5)


def test_responsibilities_by_hand():
    r = responsibilities(torch.tensor(D, dtype=torch.float64))
    # row 1: (1, e^-1) / (1 + e^-1)
    assert r[0, 0].item() == pytest.approx(1 / (1 + math.exp(-1)), abs=1e-12)
    assert r[0, 0].item() == pytest.approx(0.731059, abs=1e-6)
    assert r[2, 1].item() == pytest.approx(math.exp(-3) / (math.exp(-1) + math.exp(-3)), abs=1e-12)


def test_variance_loss_by_hand():
    d = torch.tensor(D, dtype=torch.float64)
    assert variance_loss(d).item() == pytest.approx(VAR, abs=1e-12)
    assert variance_loss(d).item() == pytest.approx(-math.log(7 / 3), abs=1e-5)  # -0.847298
    assert variance_loss(d, eps=1.0).item() == pytest.approx(-(math.log(2) + math.log(10 / 3)), abs=1e-12)


def test_decorrelation_loss_by_hand():
    d = torch.tensor(D, dtype=torch.float64)
    corr = correlation_matrix(d)
    assert corr[0, 1].item() == pytest.approx(-0.5 / math.sqrt(7 / 3), abs=1e-8)  # -0.327327
    assert corr[0, 0].item() == pytest.approx(1 / (1 + 1e-8), abs=1e-12)  # Var / (Var + c), c = 1e-8
    assert decorrelation_loss(d).item() == pytest.approx(TC, abs=1e-8)
    assert decorrelation_loss(d).item() == pytest.approx(0.2142857, abs=1e-7)
    # perfectly (anti-)correlated copies: every off-diagonal |Corr| = 1, loss K (K - 1)
    col = torch.tensor([[0.0], [1.0], [3.0], [2.0]], dtype=torch.float64)
    copies = torch.cat([col, 2 * col + 1, -col], dim=1)
    assert decorrelation_loss(copies).item() == pytest.approx(6.0, abs=1e-6)


def test_weight_orthogonality_loss_by_hand():
    w = torch.tensor(W, dtype=torch.float64)
    assert weight_orthogonality_loss(w).item() == pytest.approx(WR, abs=1e-12)
    assert weight_orthogonality_loss(torch.eye(3, dtype=torch.float64) * 5).item() == pytest.approx(0.0, abs=1e-12)


def test_implicit_em_objective_combines_terms_with_lambdas():
    d, w = torch.tensor(D, dtype=torch.float64), torch.tensor(W, dtype=torch.float64)
    out = implicit_em_objective(d, w, lambda_lse=2.0, lambda_var=0.5, lambda_tc=3.0, lambda_wr=0.25)
    assert set(out) == {"loss", "lse", "var", "tc", "wr"}
    assert out["lse"].item() == pytest.approx(LSE, abs=1e-12)
    assert out["var"].item() == pytest.approx(VAR, abs=1e-12)
    assert out["tc"].item() == pytest.approx(TC, abs=1e-8)
    assert out["wr"].item() == pytest.approx(WR, abs=1e-12)
    assert out["loss"].item() == pytest.approx(2 * LSE + 0.5 * VAR + 3 * TC + 0.25 * WR, abs=1e-8)
    # default lambdas 1/1/1, l_wr = 0: the weight term is not computed and reads 0
    default = implicit_em_objective(d, w)
    assert default["wr"].item() == 0.0
    assert default["loss"].item() == pytest.approx(LSE + VAR + TC, abs=1e-8)
    # an ablation: a zero lambda switches its term off (reads 0) and leaves the rest
    lse_only = implicit_em_objective(d, lambda_var=0, lambda_tc=0)
    assert lse_only["var"].item() == 0.0 and lse_only["tc"].item() == 0.0
    assert lse_only["loss"].item() == pytest.approx(LSE, abs=1e-12)


def test_sae_objective_by_hand():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    x_hat = torch.ones(2, 2, dtype=torch.float64)  # squared errors 0, 1, 4, 9: mean 3.5
    codes = torch.tensor([[1.0, -2.0], [0.0, 3.0]], dtype=torch.float64)  # mean |a| = 6 / 4 = 1.5
    out = sae_objective(x, x_hat, codes, l1=0.1)
    assert out["mse"].item() == pytest.approx(3.5)
    assert out["l1"].item() == pytest.approx(1.5)
    assert out["loss"].item() == pytest.approx(3.65)


def _assert_finite_with_grads(d: torch.Tensor, w: torch.Tensor | None = None) -> dict:
    d = d.detach().requires_grad_(True)
    leaves = [d] if w is None else [d, w.detach().requires_grad_(True)]
    out = implicit_em_objective(d, leaves[-1] if w is not None else None, lambda_wr=1.0)
    for name, v in out.items():
        assert torch.isfinite(v).all(), name
    grads = torch.autograd.grad(out["loss"].sum(), leaves)
    for g in grads:
        assert torch.isfinite(g).all()
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_objective_finite_for_distances_up_to_1e4(dtype):
    g = torch.Generator().manual_seed(2)
    d = torch.rand(64, 32, generator=g, dtype=dtype) * 1e4
    d[:, 0] = 1e4  # a far, constant component
    d[0, 1] = 0.0
    _assert_finite_with_grads(d, torch.randn(32, 16, generator=g, dtype=dtype) * 100)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_objective_finite_for_constant_components(dtype):
    g = torch.Generator().manual_seed(3)
    d = torch.rand(16, 8, generator=g, dtype=dtype)
    d[:, 2] = 0.0  # dead ReLU component
    d[:, 5] = 3.0  # constant, nonzero
    out = _assert_finite_with_grads(d)
    # a constant component is uncorrelated with everything, and its correlation reads 0, not NaN
    corr = correlation_matrix(d)
    assert torch.isfinite(corr).all() and corr[2].abs().max() == 0 and corr[:, 5].abs().max() == 0
    # every component constant: the variance term is -K log(eps), the decorrelation term 0
    flat = _assert_finite_with_grads(torch.zeros(16, 8, dtype=dtype))
    assert flat["var"].item() == pytest.approx(-8 * math.log(1e-6), rel=1e-5)
    assert flat["tc"].item() == 0.0
    # the two constant components each cost the barrier's maximum -log(eps), the others less
    assert -2 * math.log(1e-6) < out["var"].item() < -8 * math.log(1e-6)


def test_objective_under_bf16_autocast_is_computed_in_float32():
    g = torch.Generator().manual_seed(4)
    x = torch.rand(64, 20, generator=g)
    lin = torch.nn.Linear(20, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        d = torch.relu(lin(x))
        assert d.dtype == torch.bfloat16
        out = implicit_em_objective(d, lin.weight, lambda_wr=1.0)
    for name, v in out.items():
        assert v.dtype == torch.float32, name
        assert torch.isfinite(v).all(), name
    # the same bf16 distances evaluated without autocast give the same float32 terms
    reference = implicit_em_objective(d.detach().float(), lin.weight.detach(), lambda_wr=1.0)
    for name in out:
        assert out[name].item() == pytest.approx(reference[name].item(), rel=1e-5, abs=1e-5), name
    out["loss"].backward()
    assert torch.isfinite(lin.weight.grad).all() and torch.isfinite(lin.bias.grad).all()


def test_objective_under_bf16_autocast_at_large_magnitudes():
    g = torch.Generator().manual_seed(5)
    d = (torch.rand(64, 32, generator=g) * 1e4).bfloat16().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = implicit_em_objective(d)
    assert all(torch.isfinite(v).all() for v in out.values())
    (grad,) = torch.autograd.grad(out["loss"], d)
    assert torch.isfinite(grad).all()


def test_leading_ensemble_dims_equal_per_member_calls():
    g = torch.Generator().manual_seed(6)
    d = torch.rand(3, 40, 16, generator=g, dtype=torch.float64) * 5
    w = torch.randn(3, 16, 10, generator=g, dtype=torch.float64)
    lam = {
        "lambda_lse": torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64),
        "lambda_var": torch.tensor([1.0, 0.0, 3.0], dtype=torch.float64),
        "lambda_tc": torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64),
        "lambda_wr": torch.tensor([0.0, 0.1, 1.0], dtype=torch.float64),
    }
    out = implicit_em_objective(d, w, **lam)
    for name in out:
        assert out[name].shape == (3,), name
    for s in range(3):
        single = implicit_em_objective(d[s], w[s], **{k: float(v[s]) for k, v in lam.items()})
        for name in ("loss", "lse"):
            assert out[name][s].item() == pytest.approx(single[name].item(), abs=1e-10), (s, name)
        # the terms are reported unweighted, so compare them with the terms computed alone
        assert out["var"][s].item() == pytest.approx(variance_loss(d[s]).item(), abs=1e-10)
        assert out["tc"][s].item() == pytest.approx(decorrelation_loss(d[s]).item(), abs=1e-10)
        assert out["wr"][s].item() == pytest.approx(weight_orthogonality_loss(w[s]).item(), abs=1e-10)
    # gradients too: member s's gradient only depends on member s
    dd = d.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(implicit_em_objective(dd, w, **lam)["loss"].sum(), dd)
    for s in range(3):
        ds = d[s].clone().requires_grad_(True)
        (gs,) = torch.autograd.grad(
            implicit_em_objective(ds, w[s], **{k: float(v[s]) for k, v in lam.items()})["loss"], ds
        )
        assert torch.allclose(grad[s], gs, atol=1e-10)
    # the SAE loss keeps the member dimension as well
    x, x_hat, codes = (torch.rand(3, 8, 5, generator=g, dtype=torch.float64) for _ in range(3))
    sae = sae_objective(x, x_hat, codes, l1=torch.tensor([0.0, 0.1, 1.0], dtype=torch.float64))
    for s, l1 in enumerate((0.0, 0.1, 1.0)):
        assert sae["loss"][s].item() == pytest.approx(sae_objective(x[s], x_hat[s], codes[s], l1)["loss"].item())


# -- the exact terms without K x K matrices ---------------------------------------------------------------


def _reference_tc(d: torch.Tensor) -> torch.Tensor:
    """The K x K textbook formula: Corr = z^T z / (N - 1), z = c / sqrt(Var + 1e-8), off-diagonal squares."""
    n = d.shape[0]
    c = d - d.mean(0, keepdim=True)
    z = c / torch.sqrt(c.pow(2).sum(0) / (n - 1) + 1e-8)
    corr = z.T @ z / (n - 1)
    return corr.pow(2).sum() - corr.diagonal().pow(2).sum()


def _reference_wr(w: torch.Tensor) -> torch.Tensor:
    """The K x K textbook formula ||W_n W_n^T - I||_F^2, diagonal included."""
    wn = w / w.norm(dim=1, keepdim=True)
    return (wn @ wn.T - torch.eye(w.shape[0], dtype=w.dtype)).pow(2).sum()


def _relative_errors(ours, reference, leaf):
    (ga,) = torch.autograd.grad(ours, leaf, retain_graph=True)
    (gb,) = torch.autograd.grad(reference, leaf, retain_graph=True)
    return float((ours - reference).abs() / reference.abs()), float((ga - gb).abs().max() / gb.abs().max())


@pytest.mark.parametrize(
    "n, k, dim",
    [
        (20, 60, 30),  # N < K: the N x N Gram; D < K: the D x D Gram
        (60, 20, 30),  # N > K: the K x K Gram; D > K: the K x K Gram
        (40, 41, 41),  # one component more than samples: N x N; D = K: the K x K weight Gram
        (41, 41, 40),  # N = K: K x K; D = K - 1: D x D
    ],
)
def test_terms_equal_the_k_by_k_formulas_on_both_sides_of_the_switch(n, k, dim):
    g = torch.Generator().manual_seed(n * k + dim)
    w = torch.randn(k, dim, generator=g, dtype=torch.float64).requires_grad_(True)
    x = torch.randn(n, dim, generator=g, dtype=torch.float64)
    d = torch.relu(x @ w.T + 0.1)
    d = torch.cat([d[:, :-1], torch.zeros(n, 1, dtype=torch.float64)], dim=1)  # a dead component
    out = implicit_em_objective(d, w, lambda_lse=0.0, lambda_var=0.0, lambda_tc=1.0, lambda_wr=1.0)
    for ours, reference in ((out["tc"], _reference_tc(d)), (out["wr"], _reference_wr(w))):
        value, grad = _relative_errors(ours, reference, w)
        assert value <= 1e-12 and grad <= 1e-10, (value, grad)
    # the gradient with respect to the distances too (what DDP gathers)
    dd = d.detach().requires_grad_(True)
    value, grad = _relative_errors(decorrelation_loss(dd), _reference_tc(dd), dd)
    assert value <= 1e-12 and grad <= 1e-10, (value, grad)


def test_exact_terms_in_float32_stay_close_to_float64():
    g = torch.Generator().manual_seed(7)
    for n, k in ((128, 2048), (2048, 128)):
        d = torch.relu(torch.randn(n, k, generator=g) + 0.2)
        assert decorrelation_loss(d).item() == pytest.approx(_reference_tc(d.double()).item(), rel=1e-4)
    w = torch.randn(2048, 64, generator=g)
    assert weight_orthogonality_loss(w).item() == pytest.approx(_reference_wr(w.double()).item(), rel=1e-4)


def test_weight_term_with_a_zero_row_matches_on_both_sides():
    # a zero row has W_n's row 0: the diagonal entry (0 - 1)^2 = 1 counts, on both paths, gradient 0 there
    w = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    w[2] = 0.0
    w.requires_grad_(True)
    wide = torch.cat([w, torch.zeros(6, 5, dtype=torch.float64)], dim=1)  # D = 8 > K = 6: the K x K path
    narrow, reference = weight_orthogonality_loss(w), weight_orthogonality_loss(wide)
    assert narrow.item() == pytest.approx(reference.item(), abs=1e-12)
    (g_narrow,) = torch.autograd.grad(narrow, w)
    (g_reference,) = torch.autograd.grad(reference, w)
    assert torch.allclose(g_narrow, g_reference, atol=1e-12) and (g_narrow[2] == 0).all()
    # the written-out backward of the D x D form against finite differences
    assert torch.autograd.gradcheck(
        weight_orthogonality_loss, (torch.randn(7, 3, dtype=torch.float64).requires_grad_(),)
    )


def test_no_k_by_k_matrix_at_large_k():
    # K = 20,000 at N = 32, D = 16: a K x K float64 matrix alone would be 3.2 GB; the terms need only
    # N x N and D x D ones
    g = torch.Generator().manual_seed(8)
    w = torch.randn(20000, 16, generator=g, dtype=torch.float64, requires_grad=True)
    d = torch.relu(torch.randn(32, 16, generator=g, dtype=torch.float64) @ w.T)
    out = implicit_em_objective(d, w, lambda_wr=1.0)
    out["loss"].backward()
    assert torch.isfinite(w.grad).all()
    # K(K - 1)/N is the noise floor of random correlations; the value sits near it
    assert 0.5 < out["tc"].item() / (20000 * 19999 / 32) < 2
    assert 0.5 < out["wr"].item() / (20000 * 19999 / 16) < 2


# -- the unbiased subset estimate of the decorrelation term ----------------------------------------------


def _correlated_distances(n=50, k=12, seed=0):
    """Distances with a few strongly correlated pairs, so the estimate's variance is far from zero."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, k, generator=g, dtype=torch.float64)
    base[:, 1] = base[:, 0] + 0.3 * base[:, 1]
    base[:, 5] = -base[:, 4] + 0.5 * base[:, 5]
    return torch.relu(base + 0.5)


def test_subset_estimate_over_all_subsets_is_exactly_unbiased_with_the_stated_variance():
    from itertools import combinations

    from implicit_em.core.objective import centred_and_variance, correlation_matrix, subset_estimate_variance

    d = _correlated_distances()
    k, m = d.shape[1], 4
    exact = decorrelation_loss(d).item()
    corr_sq = correlation_matrix(d).pow(2)
    scale = k * (k - 1) / (m * (m - 1))
    values = torch.tensor(
        [decorrelation_loss(d[:, list(s)]).item() * scale for s in combinations(range(k), m)], dtype=torch.float64
    )
    assert values.mean().item() == pytest.approx(exact, rel=1e-12)  # unbiased, exactly
    population_var = values.var(unbiased=False).item()
    assert population_var > 0.1 * exact**2  # a case where the variance matters
    assert subset_estimate_variance(corr_sq, m).item() == pytest.approx(population_var, rel=1e-10)
    # m = K: the estimate is the exact value, variance 0
    assert subset_estimate_variance(corr_sq, k).item() == pytest.approx(0.0, abs=1e-10 * exact**2)
    centred, var = centred_and_variance(d)
    from implicit_em.core.objective import decorrelation_subset_estimate

    assert decorrelation_subset_estimate(centred, var, k).item() == pytest.approx(exact, rel=1e-12)


def test_subset_variance_estimate_from_the_subset_is_unbiased():
    from itertools import combinations

    from implicit_em.core.objective import (
        correlation_matrix,
        subset_estimate_variance,
        subset_estimate_variance_from_subset,
    )

    d = _correlated_distances(seed=1)
    k, m = d.shape[1], 5
    corr_sq = correlation_matrix(d).pow(2)
    plug_in = torch.stack(
        [subset_estimate_variance_from_subset(corr_sq[list(s)][:, list(s)], k) for s in combinations(range(k), m)]
    )
    assert plug_in.mean().item() == pytest.approx(subset_estimate_variance(corr_sq, m).item(), rel=1e-9)


def test_objective_estimate_through_implicit_em_objective_is_unbiased_and_gradients_flow():
    from implicit_em.core.objective import correlation_matrix, subset_estimate_variance

    d = _correlated_distances(n=80, k=40, seed=2)
    m, draws = 8, 4000
    exact = decorrelation_loss(d).item()
    g = torch.Generator().manual_seed(0)
    values = torch.tensor(
        [implicit_em_objective(d, tc_components=m, generator=g)["tc"].item() for _ in range(draws)],
        dtype=torch.float64,
    )
    sd = subset_estimate_variance(correlation_matrix(d).pow(2), m).sqrt().item()
    assert abs(values.mean().item() - exact) <= 4 * sd / math.sqrt(draws)
    # the empirical spread matches the formula (the sample sd of 4000 draws is within ~5% of the truth)
    assert values.std().item() == pytest.approx(sd, rel=0.1)
    # the same generator state gives the same subset; the gradient reaches only the m drawn components
    dd = d.clone().requires_grad_(True)
    a = implicit_em_objective(
        dd, lambda_lse=0, lambda_var=0, tc_components=m, generator=torch.Generator().manual_seed(5)
    )
    b = implicit_em_objective(
        d, lambda_lse=0, lambda_var=0, tc_components=m, generator=torch.Generator().manual_seed(5)
    )
    assert a["tc"].item() == b["tc"].item()
    (grad,) = torch.autograd.grad(a["loss"], dd)
    assert int((grad.abs().sum(0) > 0).sum()) == m
    # off by default; m >= K is the exact term; m < 2 is refused
    assert implicit_em_objective(d)["tc"].item() == pytest.approx(exact, rel=1e-12)
    assert implicit_em_objective(d, tc_components=40)["tc"].item() == pytest.approx(exact, rel=1e-12)
    with pytest.raises(ValueError, match="at least 2"):
        implicit_em_objective(d, tc_components=1)


@pytest.mark.parametrize("n, k", [(5, 7), (7, 5)])
def test_decorrelation_backward_is_the_true_gradient_in_its_two_inputs(n, k):
    """The written-out backward against finite differences, with the centred batch and the variances as
    independent inputs (autograd chains their dependence on d), on both sides of the N < K switch."""
    from implicit_em.core.objective import decorrelation_from_statistics

    g = torch.Generator().manual_seed(n)
    centred = torch.randn(n, k, generator=g, dtype=torch.float64, requires_grad=True)
    var = (torch.rand(k, generator=g, dtype=torch.float64) + 0.1).requires_grad_(True)
    tiny = torch.full((k,), 1e-9, dtype=torch.float64, requires_grad=True)  # near-constant components
    assert torch.autograd.gradcheck(decorrelation_from_statistics, (centred, var))
    assert torch.autograd.gradcheck(decorrelation_from_statistics, (centred * 1e-5, tiny), eps=1e-12, atol=1e-4)


@pytest.mark.parametrize("n, k, m", [(12, 30, None), (30, 12, None), (12, 30, 7), (30, 12, 5)])
def test_objective_gradient_equals_autograd_of_the_textbook_terms(n, k, m):
    """The objective's one written-out backward over d (E-step + variance + decorrelation, exact or on a
    subset) against autograd through the textbook formulas, and against finite differences."""
    g = torch.Generator().manual_seed(n + k)
    d = (torch.relu(torch.randn(n, k, generator=g, dtype=torch.float64) + 0.3) * 3).requires_grad_(True)
    lam = {"lambda_lse": 0.7, "lambda_var": 1.3, "lambda_tc": 0.4}
    out = implicit_em_objective(d, **lam, tc_components=m, generator=torch.Generator().manual_seed(3))
    idx = slice(None) if m is None else torch.randperm(k, generator=torch.Generator().manual_seed(3))[:m]
    scale = 1.0 if m is None else k * (k - 1) / (m * (m - 1))
    var = d.var(0)
    reference = 0.7 * lse_loss_autograd(d) - 1.3 * torch.log(var + 1e-6).sum() + 0.4 * scale * _reference_tc(d[:, idx])
    value, grad = _relative_errors(out["loss"], reference, d)
    assert value <= 1e-12 and grad <= 1e-10, (value, grad)
    small = d.detach()[:6, :5].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: implicit_em_objective(t, lambda_var=0.5)["loss"], (small,))
