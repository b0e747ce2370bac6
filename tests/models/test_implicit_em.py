"""The paper's decoder-free model: d = phi(W x + b) on the implicit-EM objective, its settings, its export form,
and ``--model.k`` refused with the sparse model's config as the fix."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from implicit_em.core.objective import implicit_em_objective
from implicit_em.errors import ConfigError
from implicit_em.models.base import fit_to_data
from implicit_em.models.implicit_em import ImplicitEM

D, K = 12, 40


def _x(n: int = 256, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g) @ torch.randn(D, D, generator=g) + 0.3


def test_forward_and_objective_are_the_papers_bitwise():
    """The forward is phi(W x + b) and the objective the paper's on it, to the bit; W and b are the whole state."""
    x = _x()
    for activation in ("relu", "softplus"):
        net = ImplicitEM(D, K, seed=3, activation=activation, lambda_wr=0.5)
        fit_to_data(net.linear, x, 0.3)
        d = net.phi(F.linear(x, net.linear.weight, net.linear.bias))
        assert torch.equal(net(x), d)
        ours, ref = net.objective(x, 5), implicit_em_objective(d, net.linear.weight, lambda_wr=0.5)
        assert ours.keys() == ref.keys() == {"loss", "lse", "var", "tc", "wr"}
        for key in ref:
            assert torch.equal(ours[key], ref[key]), key
    assert sorted(net.state_dict()) == ["linear.bias", "linear.weight"]


def test_tc_components_draws_its_subset_from_the_seed_and_the_step():
    x = _x()
    net = ImplicitEM(D, K, seed=2, tc_components=9)
    d = net(x)
    g = torch.Generator().manual_seed(2 * 1_000_003 + 7)
    assert torch.equal(net.objective(x, 7)["tc"], implicit_em_objective(d, tc_components=9, generator=g)["tc"])
    assert not torch.equal(net.objective(x, 7)["tc"], net.objective(x, 8)["tc"])


def test_settings_and_inference_form():
    net = ImplicitEM(D, K, seed=1, lambda_tc=2.0)
    assert net.settings() == {"activation": "relu", "lambda_lse": 1.0, "lambda_var": 1.0, "lambda_tc": 2.0,
                              "lambda_wr": 0.0, "eps": 1e-6, "tc_components": None}  # fmt: skip
    form = net.inference_form()
    assert form.architecture == "standard" and form.decoder is None and torch.equal(form.weight, net.linear.weight)
    with pytest.raises(ConfigError, match="activation relu"):
        ImplicitEM(D, K, activation="softplus").inference_form()


@pytest.mark.parametrize(
    "kwargs",
    [{"activation": "tanhh"}, {"lambda_var": -1.0}, {"eps": 0.0}, {"tc_components": 1},
     {"lambda_lse": 0.0, "lambda_var": 0.0, "lambda_tc": 0.0}],
)  # fmt: skip
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ConfigError):
        ImplicitEM(D, K, **kwargs)


def test_k_is_refused_naming_the_sparse_config():
    with pytest.raises(ConfigError, match="configs/model/implicit_em_sparse.yaml"):
        ImplicitEM(D, K, k=4)


def test_model_k_on_the_command_line_is_refused_in_one_line_with_exit_2():
    from tests.conftest import main_in_process

    run = main_in_process("--model.k", "4", "--trainer.max_epochs", "1")
    assert run.returncode == 2, run.stderr[-1500:]
    lines = [ln for ln in run.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in run.stderr and "model.k" in lines[-1]
    assert "--config configs/model/implicit_em_sparse.yaml" in lines[-1]
