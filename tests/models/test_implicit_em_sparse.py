"""The sparse decoder-free model (``--model.k``): its code, its truncated E-step, its export; k = None unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from implicit_em.errors import ConfigError
from implicit_em.models.base import fit_to_data, keep_top_k
from implicit_em.models.implicit_em import ImplicitEM
from implicit_em.objective import (
    centre_distance,
    implicit_em_objective,
    kept_lse_loss,
    lse_loss,
    readout_residual_loss,
    responsibilities,
    tempered_distance,
    truncated_lse_loss,
    truncation_gap_loss,
    unkept_lse_loss,
)

D, K = 12, 40


def _x(n: int = 256, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g) @ torch.randn(D, D, generator=g) + 0.3


def test_k_none_forward_and_objective_are_the_papers_bitwise():
    """k = None: the forward is phi(W x + b) and the objective the paper's on it, to the bit."""
    x = _x()
    for activation in ("relu", "softplus"):
        net = ImplicitEM(D, K, seed=3, activation=activation)
        fit_to_data(net.linear, x, 0.3)
        d = net.phi(F.linear(x, net.linear.weight, net.linear.bias))
        assert torch.equal(net(x), d)
        ours, ref = net.objective(x, 5), implicit_em_objective(d)
        assert ours.keys() == ref.keys()
        for key in ref:
            assert torch.equal(ours[key], ref[key]), key
        assert "code" not in net.settings()
    assert net.inference_form is not None and ImplicitEM(D, K).inference_form().architecture == "standard"


@pytest.mark.parametrize("code,sign", [("depth", -1), ("distance", 1)])
def test_sparse_code_keeps_exactly_k_of_the_affine_map(code, sign):
    x = _x()
    net = ImplicitEM(D, K, k=5, seed=1, code=code)
    fit_to_data(net.linear, x, 0.3)
    a = net(x)
    z = net.linear(x)
    assert torch.equal(a, keep_top_k(sign * z, 5))
    assert int((a != 0).sum(1).max()) == 5 and float((a != 0).sum(1).float().mean()) > 4.5
    assert bool((a >= 0).all())
    # the kept components are the k with the largest s z: every kept value >= every dropped positive one
    kept = a != 0
    s = sign * z
    assert float(s[kept].min()) >= float(torch.where(kept, torch.full_like(s, -1e9), s).max(1).values.min()) - 1e-6


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


@pytest.mark.parametrize("objective", ["truncated", "code", "dense"])
def test_sparse_objective_is_finite_and_trains(objective):
    x = _x(512)
    net = ImplicitEM(D, K, k=6, seed=2, sparse_objective=objective)
    fit_to_data(net.linear, x, 0.3)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    first = None
    for step in range(30):
        terms = net.objective(x, step)
        assert all(bool(torch.isfinite(v).all()) for v in terms.values())
        first = float(terms["loss"]) if first is None else first
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
    assert float(net.objective(x, 30)["loss"]) < first
    assert float((net(x) != 0).sum(1).float().mean()) > 5.5  # the target L0 still reached


def test_truncation_gap_is_the_lost_posterior_mass_and_trains_both_sides():
    g = torch.Generator().manual_seed(1)
    d = (torch.rand(7, 9, generator=g) * 3).double().requires_grad_(True)
    idx = torch.randn(7, 9, generator=g).topk(4, dim=-1).indices
    loss = truncation_gap_loss(d, idx)
    r = responsibilities(d.detach())
    assert torch.allclose(loss, -torch.log(r.gather(-1, idx).sum(-1)).sum()) and float(loss) >= 0
    (grad,) = torch.autograd.grad(loss, d)
    sel = torch.zeros_like(r, dtype=torch.bool).scatter(-1, idx, True)
    kept = torch.where(sel, r, torch.zeros_like(r))
    assert torch.allclose(grad, kept / kept.sum(-1, keepdim=True) - r, atol=1e-12)
    assert float(truncation_gap_loss(d, torch.arange(9).expand(7, 9))) == pytest.approx(0, abs=1e-12)
    net = ImplicitEM(D, K, k=5, seed=2, sparse_lse="gap", activation="softplus")
    fit_to_data(net.linear, _x(), 0.3)
    assert torch.isfinite(net.objective(_x(), 0)["loss"]) and net.settings()["sparse_lse"] == "gap"


def test_centres_keep_the_nearest_gaussian_centres_and_their_e_step_is_the_m_step():
    x = _x(64).double()
    w = torch.randn(K, D, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    mu = -w
    d = centre_distance(x @ w.T, w)
    assert torch.allclose(d, 0.5 * torch.cdist(x, mu).pow(2) - 0.5 * x.pow(2).sum(-1, keepdim=True))
    net = ImplicitEM(D, K, k=4, seed=1, sparse_lse="centres", lambda_var=0.0, lambda_tc=0.0).double()
    with torch.no_grad():
        net.linear.weight.copy_(w)
        net.linear.bias.zero_()
    a = net(x)  # b = 0: the code keeps the 4 nearest centres
    nearest = torch.cdist(x, mu).topk(4, dim=-1, largest=False).indices
    assert torch.equal((a != 0).sum(-1).clamp_max(4), (a.gather(-1, nearest) != 0).sum(-1))
    net.objective(x, 0)["loss"].backward()
    r = torch.zeros_like(d).scatter(-1, nearest, torch.softmax(-d.gather(-1, nearest), -1))
    # dL/dw_j = sum_i r~_ij (x_i - mu_j): a descent step on w_j = -mu_j moves mu_j toward its inputs
    m_step = r.T @ x - r.sum(0, keepdim=True).T * mu
    assert torch.allclose(net.linear.weight.grad, m_step, atol=1e-9)
    form = net.inference_form()
    assert torch.allclose(keep_top_k(x @ form.weight.T + form.bias, 4), a, atol=1e-9)
    assert ImplicitEM(D, K, sparse_lse="centres").pre_activation(x.float()).shape == (64, K)


def test_centres_start_at_training_inputs_and_other_nets_at_the_data_aware_start():
    x = _x(100)
    net = ImplicitEM(D, K, k=4, seed=5, sparse_lse="centres")
    net.start_from_data(x, 0.3)
    mu = -net.linear.weight.detach()
    assert bool(((mu[:, None] - x[None]).abs().amax(-1).min(-1).values == 0).all()) and bool(
        (net.linear.bias == 0).all()
    )
    assert len({tuple(m.tolist()) for m in mu}) == K  # K distinct inputs
    plain, ref = ImplicitEM(D, K, k=4, seed=5), ImplicitEM(D, K, k=4, seed=5)
    plain.start_from_data(x, 0.3)
    fit_to_data(ref.linear, x, 0.3)
    assert torch.equal(plain.linear.weight, ref.linear.weight) and torch.equal(plain.linear.bias, ref.linear.bias)


def test_tempered_distance_is_relu_at_every_tau_and_softplus_reaches_the_selected():
    z = torch.linspace(-6, 6, 49, dtype=torch.float64)
    for tau in (0.25, 1.0, 4.0):
        assert torch.allclose(tempered_distance(z, F.relu, tau), F.relu(z))
        sp = tempered_distance(z, F.softplus, tau)
        assert torch.allclose(sp, tau * torch.log1p(torch.exp(z / tau)))
        assert bool((sp >= F.relu(z)).all()) and bool((sp[z <= 0] > 0).all())
    assert torch.equal(tempered_distance(z, F.softplus), F.softplus(z))
    # the truncated E-step with relu distances gives the selected components (z < 0) no gradient; softplus does
    x = _x()
    for activation, moved in (("relu", False), ("softplus", True)):
        net = ImplicitEM(D, K, k=4, seed=0, activation=activation, lambda_var=0.0, lambda_tc=0.0, temperature=2.0)
        fit_to_data(net.linear, x, 0.3)
        net.objective(x, 0)["loss"].backward()
        assert bool(net.linear.weight.grad.abs().sum() > 0) == moved


def _written_out(net: ImplicitEM, x: torch.Tensor, subset: torch.Tensor | None = None) -> torch.Tensor:
    """The truncated objective on dense N x K matrices: L_LSE^T of tau phi(z / tau) over the top k of s z, L_var
    on relu(s z), L_tc on the code a (on its columns ``subset``, scaled to the unbiased estimate)."""
    z, s, lam = net.linear(x), net.code_sign, net.lambdas
    values, index = (s * z).topk(net.k, dim=-1)
    a = torch.zeros_like(z).scatter(-1, index, F.relu(values))
    if subset is None:
        tc = implicit_em_objective(a, None, 0.0, 0.0, 1.0)["tc"]
    else:
        m = len(subset)
        tc = implicit_em_objective(a[:, subset], None, 0.0, 0.0, 1.0)["tc"] * K * (K - 1) / (m * (m - 1))
    var = implicit_em_objective(F.relu(s * z), None, 0.0, 1.0, 0.0)["var"]
    lse = truncated_lse_loss(tempered_distance(z, net.phi, net.temperature), index)
    return lam["lambda_tc"] * tc + lam["lambda_var"] * var + lam["lambda_lse"] * lse


@pytest.mark.parametrize(
    "settings",
    [{}, {"activation": "softplus", "temperature": 0.5, "lambda_lse": 30.0}, {"code": "distance", "lambda_var": 2.0},
     {"tc_components": 9, "activation": "softplus"}],
)  # fmt: skip
def test_truncated_objective_is_the_terms_written_out_in_value_and_gradient(settings):
    """The default sparse objective (no N x K temporaries, its backward written out) equals the terms on dense
    matrices: the value and the gradient w.r.t. W and b, in float64."""
    x = _x().double()
    net = ImplicitEM(D, K, k=5, seed=2, **settings).double()
    fit_to_data(net.linear, x, 0.3)
    subset = None
    if settings.get("tc_components"):  # the same draw as the net's: its seed and the step
        g = torch.Generator().manual_seed(net.seed * 1_000_003 + 7)
        subset = torch.randperm(K, generator=g)[: settings["tc_components"]]
    ours = net.objective(x, 7)["loss"]
    grads = torch.autograd.grad(ours, list(net.parameters()))
    ref = _written_out(net, x, subset)
    ref_grads = torch.autograd.grad(ref, list(net.parameters()))
    assert torch.allclose(ours, ref, rtol=1e-10, atol=1e-8)
    for g_ours, g_ref in zip(grads, ref_grads):
        assert torch.allclose(g_ours, g_ref, rtol=1e-8, atol=1e-10)


def test_sparse_tc_depth_decorrelates_the_dense_depth():
    x = _x()
    net = ImplicitEM(D, K, k=5, seed=2, sparse_tc="depth", activation="softplus", temperature=0.5)
    fit_to_data(net.linear, x, 0.3)
    z = net.linear(x)
    index = (-z).topk(5, dim=-1).indices
    ref = implicit_em_objective(F.relu(-z), None, 0.0)
    terms = net.objective(x, 0)
    lse = truncated_lse_loss(tempered_distance(z, F.softplus, 0.5), index)
    assert torch.allclose(terms["tc"], ref["tc"]) and torch.allclose(terms["var"], ref["var"])
    assert torch.allclose(terms["loss"], ref["loss"] + lse) and net.settings()["sparse_tc"] == "depth"


def test_inference_form_reproduces_the_codes():
    """SAELens's topk form, TopK_k(relu(x W_enc + b_enc)), gives the net's codes exactly."""
    x = _x()
    for code in ("depth", "distance"):
        net = ImplicitEM(D, K, k=7, seed=4, code=code)
        fit_to_data(net.linear, x, 0.3)
        form = net.inference_form()
        assert form.architecture == "topk" and form.k == 7 and form.decoder is None
        assert torch.allclose(keep_top_k(x @ form.weight.T + form.bias, form.k), net(x), atol=1e-6)
        assert net.settings()["k"] == 7 and net.settings()["code"] == code


def test_export_and_load_give_the_codes_on_raw_activations(tmp_path):
    """The export folds the normalisation into W_enc, b_enc: load(run).encode(raw x) is the run's code of the
    normalised x, to 1e-6 (tests/test_export.py's run layout)."""
    from implicit_em.export import export_run, load
    from tests.test_export import D as ED
    from tests.test_export import K as EK
    from tests.test_export import _normalise, _run

    run = _run(tmp_path, k=3)
    net = ImplicitEM(ED, EK, k=3)
    net.load_state_dict({"linear.weight": run["w"], "linear.bias": run["b"]})
    x = torch.randn(200, ED, generator=torch.Generator().manual_seed(5)) * 2
    expected = net(_normalise(x, run["norm"]).float())
    out = export_run(run["run"], tmp_path / "export")
    sae = load(out)
    assert sae.architecture == "topk" and sae.k == 3
    codes = sae.encode(x)
    assert torch.allclose(codes, expected, rtol=1e-6, atol=1e-6)  # float32 fold: codes up to ~40
    assert torch.equal(codes != 0, expected != 0)
    assert float((codes != 0).sum(1).float().mean()) == pytest.approx(float((expected != 0).sum(1).float().mean()))


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError):
        ImplicitEM(D, K, k=K + 1)
    with pytest.raises(ConfigError):
        ImplicitEM(D, K, k=3, code="margin")
    with pytest.raises(ConfigError):
        ImplicitEM(D, K, k=3, sparse_objective="nope")
    with pytest.raises(ConfigError):
        ImplicitEM(D, K, k=3, temperature=0.0)
    with pytest.raises(ConfigError):
        ImplicitEM(D, K, k=3, sparse_tc="distance")
    with pytest.raises(ConfigError):
        ImplicitEM(D, K, k=3, sparse_lse="full")


def test_unkept_e_step_moves_only_the_components_no_row_keeps():
    """L_aux's gradient is the truncated E-step over the k_aux nearest unkept components of each row, and 0 on every
    component some row keeps; lambda_aux adds it to the objective as ``aux``."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(30, 10, generator=g, dtype=torch.float64)
    z[:, 6:] += 5.0  # components 6-9 are far from every row: never among the 3 nearest (smallest z)
    z.requires_grad_(True)
    index = (-z).topk(3, dim=-1).indices
    assert not bool(torch.isin(torch.arange(6, 10), index).any())
    loss = unkept_lse_loss(z, index, -1, 2, F.softplus)
    (grad,) = torch.autograd.grad(loss, z)
    kept = torch.unique(index)
    assert bool((grad[:, kept] == 0).all())
    zu = z.detach()[:, 6:]
    near = (-zu).topk(2, dim=-1).indices
    d = F.softplus(zu.gather(-1, near))
    expected = torch.zeros_like(zu).scatter(-1, near, torch.softmax(-d, dim=-1) * torch.sigmoid(zu.gather(-1, near)))
    assert torch.allclose(grad[:, 6:], expected)
    x = _x(n=6)  # 24 selections of K = 40: some components unkept
    net = ImplicitEM(D, K, k=4, seed=1, activation="softplus", lambda_aux=2.0, aux_k=3)
    fit_to_data(net.linear, _x(), 0.3)
    terms = net.objective(x, 0)
    off = ImplicitEM(D, K, k=4, seed=1, activation="softplus")
    off.load_state_dict(net.state_dict())
    assert torch.allclose(terms["loss"], off.objective(x, 0)["loss"] + 2.0 * terms["aux"])
    assert float(terms["aux"]) != 0 and net.settings()["lambda_aux"] == 2.0
    with pytest.raises(ConfigError):
        ImplicitEM(D, K, k=4, lambda_aux=1.0, sparse_lse="gap")


def test_sparse_objective_code_is_the_papers_objective_on_the_code():
    """``sparse_objective code`` (with the default sparse_lse and sparse_tc) trains the paper's objective on a."""
    x = _x()
    net = ImplicitEM(D, K, k=5, seed=2, sparse_objective="code")
    fit_to_data(net.linear, x, 0.3)
    a = net(x)
    assert torch.allclose(net.objective(x, 0)["loss"], implicit_em_objective(a)["loss"])


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


def test_batch_selection_keeps_n_k_per_batch_and_reads_a_threshold():
    """``selection batch``: the objective's code keeps the batch's N k largest depths; the data-aware start puts
    theta where the untrained code has L0 k; training steps move theta; the code users read is
    relu(-z) 1[-z > theta] and exports as SAELens's jumprelu with that threshold."""
    x = _x(n=512)
    net = ImplicitEM(D, K, k=6, seed=3, activation="softplus", selection="batch", lambda_aux=1.0)
    net.start_from_data(x, 0.3)
    theta0 = float(net.threshold)
    assert theta0 > 0 and bool(net.threshold_set)
    l0 = float((net(x) != 0).sum(-1).float().mean())
    assert 6 - 1 / 512 - 1e-9 <= l0 <= 6  # every depth above the N k-th largest, the N k-th itself excluded
    assert bool(((net(x) != 0).sum(-1) != 6).any())  # the number kept varies by row
    z = net.pre_activation(x)
    assert torch.equal(net(x), F.relu(-z) * (-z > net.threshold))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for step in range(20):
        terms = net.objective(x[step * 16 : step * 16 + 64], step)
        assert bool(torch.isfinite(terms["loss"])) and {"lse", "var", "tc", "aux", "threshold"} <= terms.keys()
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
    assert float(net.threshold) != theta0
    net.eval()
    before = net.threshold.clone()
    net.objective(x[:64], 99)  # not a training step: theta kept
    assert torch.equal(net.threshold, before)
    form = net.inference_form()
    assert form.architecture == "jumprelu" and form.extra["k"] == 6 and form.decoder is None
    pre = x @ form.weight.T + form.bias
    assert torch.allclose(pre * (pre > form.threshold), net(x), atol=1e-6)
    assert net.settings()["selection"] == "batch" and net.settings()["threshold"] == pytest.approx(float(before))
    assert "threshold" not in ImplicitEM(D, K, k=6).state_dict()  # the row-selected net's state is unchanged


def test_batch_selection_objective_is_the_terms_written_out():
    """The batch objective is L_LSE^M on the batch top-k set + L_var on the dense depth + L_tc on the code."""
    x = _x(n=128)
    net = ImplicitEM(D, K, k=5, seed=1, activation="softplus", selection="batch", lambda_lse=2.0, lambda_tc=0.5)
    fit_to_data(net.linear, x, 0.3)
    z = net.linear(x)
    a = F.relu(-z).flatten()
    top = a.topk(128 * 5).indices
    code = torch.zeros_like(a).scatter(0, top, a[top]).view_as(z)
    dense = implicit_em_objective(code, lambda_lse=0.0, lambda_var=0.0, lambda_tc=0.5)["loss"]
    var = implicit_em_objective(F.relu(-z), lambda_lse=0.0, lambda_var=1.0, lambda_tc=0.0)["loss"]
    expected = dense + var + 2.0 * kept_lse_loss(F.softplus(z), code > 0)
    assert torch.allclose(net.objective(x, 0)["loss"], expected, rtol=1e-5)
    with pytest.raises(ConfigError):
        ImplicitEM(D, K, selection="batch")  # no k
    with pytest.raises(ConfigError):
        ImplicitEM(D, K, k=5, selection="batch", sparse_lse="gap")
    with pytest.raises(ConfigError):
        ImplicitEM(D, K, k=5, selection="column")


def test_batch_selection_exports_as_jumprelu_and_loads_with_the_same_codes(tmp_path):
    """A run trained with ``selection batch`` exports as SAELens's jumprelu (threshold per latent, the normalisation
    folded in): load(run).encode(raw x) is the run's code of the normalised x, to 1e-6."""
    from implicit_em.export import export_run, load
    from tests.test_export import D as ED
    from tests.test_export import K as EK
    from tests.test_export import _normalise, _run

    theta = torch.tensor(0.7)
    buffers = {"threshold": theta, "threshold_set": torch.tensor(True)}
    run = _run(tmp_path, k=3, net_args={"selection": "batch"}, buffers=buffers)
    net = ImplicitEM(ED, EK, k=3, selection="batch")
    net.load_state_dict({"linear.weight": run["w"], "linear.bias": run["b"], **buffers})
    x = torch.randn(200, ED, generator=torch.Generator().manual_seed(5)) * 2
    expected = net(_normalise(x, run["norm"]).float())
    sae = load(export_run(run["run"], tmp_path / "export"))
    assert sae.architecture == "jumprelu" and torch.equal(sae.threshold, theta.expand(EK))
    codes = sae.encode(x)
    assert torch.allclose(codes, expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(codes != 0, expected != 0) and bool((expected != 0).any()) and bool((expected == 0).any())


def test_readout_residual_is_the_cross_fitted_ridge_fvu_and_trains_the_encoder():
    """L_rec = N x the held-out FVU of ridge readouts fitted on the batch's even rows and scored on its odd rows and
    back (the normal equations written out); 0 when the code spans x; lambda_rec adds it as ``rec`` and its
    gradient reaches W."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(50, 6, generator=g, dtype=torch.float64)
    a = torch.randn(50, 9, generator=g, dtype=torch.float64)
    err = 0.0
    for fit, score in ((slice(0, None, 2), slice(1, None, 2)), (slice(1, None, 2), slice(0, None, 2))):
        xf, af = x[fit], a[fit]
        xc, ac = xf - xf.mean(0), af - af.mean(0)
        gram = ac.T @ ac
        r = torch.linalg.solve(gram + 1e-3 * gram.diagonal().mean() * torch.eye(9, dtype=torch.float64), ac.T @ xc)
        err = err + (x[score] - xf.mean(0) - (a[score] - af.mean(0)) @ r).pow(2).sum()
    expected = 50 * err / (x - x.mean(0)).pow(2).sum()
    assert torch.allclose(readout_residual_loss(x, a), expected)
    assert float(readout_residual_loss(x, torch.cat([x, a], 1), ridge=1e-12)) < 1e-6
    a_wide = torch.randn(50, 200, generator=g, dtype=torch.float64)  # K > N: held out, random codes explain little
    assert float(readout_residual_loss(x, a_wide)) > 0.5 * 50
    x = _x()
    net = ImplicitEM(D, K, k=5, seed=2, activation="softplus", lambda_rec=3.0)
    fit_to_data(net.linear, x, 0.3)
    off = ImplicitEM(D, K, k=5, seed=2, activation="softplus")
    off.load_state_dict(net.state_dict())
    terms = net.objective(x, 0)
    assert torch.allclose(terms["rec"], readout_residual_loss(x, net(x)))
    assert torch.allclose(terms["loss"], off.objective(x, 0)["loss"] + 3.0 * terms["rec"])
    (grad,) = torch.autograd.grad(terms["rec"], net.linear.weight)
    assert float(grad.abs().sum()) > 0
    with pytest.raises(ConfigError):
        ImplicitEM(D, K, lambda_rec=1.0)  # no k


def test_component_selection_fires_every_component_equally_and_reads_one_threshold_each():
    """``selection component``: in training each component keeps its m = N k / K deepest inputs (none dead, k per
    input on average); the data-aware start sets theta_j where that holds on the inputs; the code users read is
    relu(-z_j) 1[-z_j > theta_j], exported as jumprelu with theta per component."""
    from implicit_em.models.base import column_top_k

    x = _x(n=400)
    net = ImplicitEM(D, K, k=5, seed=3, activation="softplus", selection="component", lambda_aux=1.0)
    net.start_from_data(x, 0.3)
    z = net.pre_activation(x)
    codes, theta = column_top_k(-z, 5)
    assert bool(((codes > 0).sum(0) == 50).all())  # m = 400 * 5 / 40
    assert torch.equal(net.threshold, theta) and net.threshold.shape == (K,)
    fired = (net(x) != 0).sum(0)
    assert bool((fired == 49).all())  # each component above its own 50th deepest input: 49 of them
    assert float((net(x) != 0).sum(1).float().mean()) == pytest.approx(49 * K / 400)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for step in range(5):
        terms = net.objective(x[step * 64 : step * 64 + 128], step)
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
    assert not torch.equal(net.threshold, theta)
    form = net.inference_form()
    assert form.architecture == "jumprelu" and torch.equal(form.threshold, net.threshold)
    pre = x @ form.weight.T + form.bias
    assert torch.allclose(pre * (pre > form.threshold), net(x), atol=1e-6)


@pytest.mark.parametrize("selection", ["batch", "component"])
def test_threshold_selections_train_through_the_cli_and_log_scalars(selection, tmp_path):
    """A thresholded net trains end to end through scripts/train.py's path (its logged terms are scalars) and
    stays sparse on digits."""
    from tests.conftest import fit_in_process

    cli = fit_in_process(tmp_path, "--model.k", "4", "--model.net.selection", selection,
                         "--model.net.activation", "softplus", "--trainer.max_epochs", "2")  # fmt: skip
    import json

    metrics = json.loads(Path(cli.metrics_path).read_text())
    assert 1 <= metrics["l0"] <= 16, metrics["l0"]  # of K = 64; a 22-step run: theta lags the growing depths
