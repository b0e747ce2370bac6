"""The sparse decoder-free model (``--model.k``): its code, its truncated E-step, its export; k = None unchanged."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from implicit_em.errors import ConfigError
from implicit_em.models.base import fit_to_data, keep_top_k
from implicit_em.models.implicit_em import ImplicitEM
from implicit_em.objective import implicit_em_objective, lse_loss, truncated_lse_loss

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
