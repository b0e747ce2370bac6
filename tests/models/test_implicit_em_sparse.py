"""The sparse decoder-free model (``implicit_em_sparse``, ``--model.k``): its code, its truncated objective (the
maths are tests/core/test_truncated.py's), its selections and thresholds, its export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from implicit_em.core.truncated import kept_set_objective, truncated_objective
from implicit_em.errors import ConfigError
from implicit_em.models.base import column_top_k, fit_to_data, keep_top_k
from implicit_em.models.implicit_em_sparse import ImplicitEMSparse

D, K = 12, 40
SPARSE_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "model" / "implicit_em_sparse.yaml"


def _x(n: int = 256, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g) @ torch.randn(D, D, generator=g) + 0.3


def test_code_keeps_the_k_deepest_of_the_affine_map():
    x = _x()
    net = ImplicitEMSparse(D, K, k=5, seed=1)
    fit_to_data(net.linear, x, 0.3)
    a = net(x)
    z = net.linear(x)
    assert torch.equal(a, keep_top_k(-z, 5))
    assert int((a != 0).sum(1).max()) == 5 and float((a != 0).sum(1).float().mean()) > 4.5
    assert bool((a >= 0).all())
    # the kept components are the k nearest (smallest z): every kept depth >= every dropped positive one
    kept = a != 0
    depth = -z
    dropped = torch.where(kept, torch.full_like(depth, -1e9), depth).max(1).values
    assert bool((torch.where(kept, depth, torch.full_like(depth, 1e9)).min(1).values >= dropped - 1e-6).all())
    assert sorted(net.state_dict()) == ["linear.bias", "linear.weight"]  # the paper model's keys


@pytest.mark.parametrize(
    "settings",
    [{}, {"activation": "softplus", "lambda_lse": 30.0, "lambda_aux": 10.0}, {"lambda_var": 2.0, "lambda_wr": 0.5},
     {"tc_components": 9, "activation": "softplus", "aux_k": 3, "lambda_aux": 1.0}],
)  # fmt: skip
def test_objective_is_the_truncated_objective_to_the_bit(settings):
    """The net's objective is core.truncated's on z = W x + b with its lambdas, phi and the subset drawn from its
    seed and the step."""
    x = _x()
    net = ImplicitEMSparse(D, K, k=5, seed=2, **settings)
    fit_to_data(net.linear, x, 0.3)
    ours = net.objective(x, 7)
    g = torch.Generator().manual_seed(2 * 1_000_003 + 7)
    weight = net.linear.weight if settings.get("lambda_wr") else None
    ref = truncated_objective(net.linear(x), 5, net.phi, weight, eps=net.eps, tc_components=net.tc_components,
                              generator=g, lambda_aux=net.lambda_aux, aux_k=net.aux_k, **net.lambdas)  # fmt: skip
    assert ours.keys() == ref.keys()
    for key in ref:
        assert torch.equal(ours[key], ref[key]), key


@pytest.mark.parametrize("selection", ["row", "component"])
def test_objective_is_finite_and_trains(selection):
    x = _x(512)
    net = ImplicitEMSparse(D, K, k=6, seed=2, selection=selection, activation="softplus", lambda_aux=1.0)
    net.start_from_data(x, 0.3)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    first = None
    for step in range(30):
        terms = net.objective(x, step)
        assert all(bool(torch.isfinite(v).all()) and v.dim() == 0 for v in terms.values())
        first = float(terms["loss"]) if first is None else first
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
    assert float(net.objective(x, 30)["loss"]) < first
    assert float((net(x) != 0).sum(1).float().mean()) > 4  # still about the target L0


def test_inference_form_reproduces_the_codes():
    """SAELens's topk form, TopK_k(relu(x W_enc + b_enc)), gives the net's codes exactly."""
    x = _x()
    net = ImplicitEMSparse(D, K, k=7, seed=4, activation="softplus")
    fit_to_data(net.linear, x, 0.3)
    form = net.inference_form()
    assert form.architecture == "topk" and form.k == 7 and form.decoder is None
    assert torch.allclose(keep_top_k(x @ form.weight.T + form.bias, form.k), net(x), atol=1e-6)
    assert net.settings()["k"] == 7 and net.settings()["activation"] == "softplus"
    assert net.settings()["selection"] == "row" and "threshold" not in net.settings()


def test_export_and_load_give_the_codes_on_raw_activations(tmp_path):
    """The export folds the normalisation into W_enc, b_enc: load(run).encode(raw x) is the run's code of the
    normalised x, to 1e-6 (tests/test_export.py's run layout)."""
    from implicit_em.export import export_run, load
    from tests.test_export import D as ED
    from tests.test_export import K as EK
    from tests.test_export import _normalise, _run

    run = _run(tmp_path, k=3)
    net = ImplicitEMSparse(ED, EK, k=3)
    net.load_state_dict({"linear.weight": run["w"], "linear.bias": run["b"]})
    x = torch.randn(200, ED, generator=torch.Generator().manual_seed(5)) * 2
    expected = net(_normalise(x, run["norm"]).float())
    out = export_run(run["run"], tmp_path / "export")
    sae = load(out)
    assert sae.architecture == "topk" and sae.k == 3
    codes = sae.encode(x)
    assert torch.allclose(codes, expected, rtol=1e-6, atol=1e-6)  # float32 fold: codes up to ~40
    assert torch.equal(codes != 0, expected != 0)


@pytest.mark.parametrize(
    "kwargs",
    [{"k": None}, {"k": K + 1}, {"k": 3, "selection": "batch"}, {"k": 3, "theta_momentum": 1.0},
     {"k": 3, "lambda_aux": -1.0}, {"k": 3, "aux_k": 0}, {"k": 3, "activation": "tanhh"}],
)  # fmt: skip
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ConfigError):
        ImplicitEMSparse(D, K, **kwargs)


def test_component_selection_fires_every_component_equally_and_reads_one_threshold_each():
    """``selection component``: in training each component keeps its m = N k / K deepest inputs (none dead, k per
    input on average); the data-aware start sets theta_j where that holds on the inputs; training steps move theta,
    other calls keep it; the code users read is relu(-z_j) 1[-z_j > theta_j], exported as jumprelu."""
    x = _x(n=400)
    net = ImplicitEMSparse(D, K, k=5, seed=3, activation="softplus", selection="component", lambda_aux=1.0)
    net.start_from_data(x, 0.3)
    z = net.linear(x)
    codes, theta = column_top_k(-z, 5)
    assert bool(((codes > 0).sum(0) == 50).all())  # m = 400 * 5 / 40
    assert torch.equal(net.threshold, theta) and net.threshold.shape == (K,) and bool(net.threshold_set)
    fired = (net(x) != 0).sum(0)
    assert bool((fired == 49).all())  # each component above its own 50th deepest input: 49 of them
    assert torch.equal(net(x), F.relu(-z) * (-z > net.threshold))
    terms = net.objective(x[:128], 0)
    z = net.linear(x[:128])
    ref = kept_set_objective(z, F.relu(-z), column_top_k(-z, 5)[0], F.softplus, lambda_aux=1.0, aux_k=5)
    assert torch.equal(terms["loss"], ref["loss"]) and "threshold" in terms
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for step in range(5):
        terms = net.objective(x[step * 64 : step * 64 + 128], step)
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
    assert not torch.equal(net.threshold, theta)
    net.eval()
    before = net.threshold.clone()
    net.objective(x[:64], 99)  # not a training step: theta kept
    assert torch.equal(net.threshold, before)
    form = net.inference_form()
    assert form.architecture == "jumprelu" and torch.equal(form.threshold, net.threshold) and form.extra["k"] == 5
    pre = x @ form.weight.T + form.bias
    assert torch.allclose(pre * (pre > form.threshold), net(x), atol=1e-6)
    assert net.settings()["selection"] == "component"
    assert net.settings()["threshold"] == pytest.approx(float(before.mean()))


def test_component_selection_exports_as_jumprelu_and_loads_with_the_same_codes(tmp_path):
    """A run trained with ``selection component`` exports as SAELens's jumprelu (threshold per latent, the
    normalisation folded in): load(run).encode(raw x) is the run's code of the normalised x, to 1e-6."""
    from implicit_em.export import export_run, load
    from tests.test_export import D as ED
    from tests.test_export import K as EK
    from tests.test_export import _normalise, _run

    theta = torch.linspace(0.2, 1.2, EK)
    buffers = {"threshold": theta, "threshold_set": torch.tensor(True)}
    run = _run(tmp_path, k=3, net_args={"selection": "component"}, buffers=buffers)
    net = ImplicitEMSparse(ED, EK, k=3, selection="component")
    net.load_state_dict({"linear.weight": run["w"], "linear.bias": run["b"], **buffers})
    x = torch.randn(200, ED, generator=torch.Generator().manual_seed(5)) * 2
    expected = net(_normalise(x, run["norm"]).float())
    sae = load(export_run(run["run"], tmp_path / "export"))
    assert sae.architecture == "jumprelu" and torch.equal(sae.threshold, theta)
    codes = sae.encode(x)
    assert torch.allclose(codes, expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(codes != 0, expected != 0) and bool((expected != 0).any()) and bool((expected == 0).any())


@pytest.mark.parametrize("selection", ["row", "component"])
def test_the_sparse_config_trains_through_the_cli(selection, tmp_path):
    """``--config configs/model/implicit_em_sparse.yaml --model.k k`` trains the sparse model end to end through
    scripts/train.py's path (its logged terms are scalars) and stays sparse on digits."""
    from tests.conftest import fit_in_process

    cli = fit_in_process(tmp_path, "--config", SPARSE_CONFIG, "--model.k", "4", "--model.net.selection", selection,
                         "--model.net.activation", "softplus", "--trainer.max_epochs", "2", "--report.sae_metrics", "true")  # fmt: skip
    assert type(cli.model.model) is ImplicitEMSparse and cli.model.model.k == 4
    metrics = json.loads(Path(cli.metrics_path).read_text())
    assert metrics["model"] == "implicit_em_sparse"
    assert 1 <= metrics["l0"] <= 16, metrics["l0"]  # of K = 64; a 22-step run: theta lags the growing depths
