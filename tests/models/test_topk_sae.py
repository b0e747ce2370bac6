"""The TopK SAE: exactly k codes survive, the objective is the MSE, it learns."""

from __future__ import annotations

import pytest
import torch

from implicit_em.core.objective import topk_sae_objective
from implicit_em.experiments.compare import matched_k
from implicit_em.models.base import keep_top_k
from implicit_em.models.topk_sae import TopKSAE


def test_keep_top_k_by_hand():
    z = torch.tensor([[3.0, -1.0, 2.0, 0.5], [-1.0, -2.0, 0.1, -3.0]])
    expected = torch.tensor([[3.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.1, 0.0]])  # ReLU first: at most k survive
    assert torch.equal(keep_top_k(z, 2), expected)


def test_the_model_keeps_exactly_k_codes():
    torch.manual_seed(0)
    model = TopKSAE(16, 64, k=5, seed=1)
    with torch.no_grad():
        model.encoder.bias.fill_(100.0)  # every pre-activation positive: exactly k survive
    codes = model(torch.randn(32, 16))
    assert codes.shape == (32, 64)
    assert ((codes != 0).sum(1) == 5).all()
    z = model.pre_activation(torch.randn(4, 16))
    kept = keep_top_k(z, 5)
    assert torch.equal(kept.topk(5).values, z.topk(5).values)  # they are the largest


def test_seeded_initialisation_ties_encoder_to_decoder():
    a, b = TopKSAE(8, 12, 3, seed=7), TopKSAE(8, 12, 3, seed=7)
    assert torch.equal(a.decoder.weight, b.decoder.weight)
    assert torch.allclose(a.decoder.weight.norm(dim=0), torch.ones(12))
    assert torch.equal(a.encoder.weight, a.decoder.weight.T)
    assert not torch.equal(a.decoder.weight, TopKSAE(8, 12, 3, seed=8).decoder.weight)


def test_k_out_of_range_is_refused():
    with pytest.raises(ValueError, match="k must be"):
        TopKSAE(4, 8, k=9)


def test_objective_by_hand():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    terms = topk_sae_objective(x, torch.zeros_like(x))
    assert terms["loss"].item() == pytest.approx(0.5) and terms["mse"].item() == pytest.approx(0.5)
    assert terms["fvu"].item() == pytest.approx(2.0)  # residual 2, variance sum 1


def test_training_lowers_the_loss():
    torch.manual_seed(0)
    x = torch.randn(256, 2) @ torch.randn(2, 10)  # rank-2 data: k = 2 can reconstruct it
    model = TopKSAE(10, 16, k=2, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(300):
        loss = topk_sae_objective(x, model.decode(model(x)))["loss"]
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2 * first


def test_matched_k():
    assert matched_k(12.4, 768) == 12 and matched_k(0.2, 768) == 1 and matched_k(900.0, 768) == 768
    assert matched_k(float("nan"), 10) == 1


def test_the_module_checks_k_and_trains_on_the_mse():
    from implicit_em.errors import ConfigError
    from implicit_em.training.module import ComponentModule

    with pytest.raises(ConfigError, match="model.k"):
        ComponentModule(TopKSAE, in_features=8, n_components=16, k=17)
    module = ComponentModule(TopKSAE, in_features=8, n_components=16, k=3, seed=1)
    x = torch.randn(32, 8)
    terms = module.objective(x)
    assert set(terms) == {"loss", "mse", "fvu"} and terms["loss"].requires_grad
    assert ((module(x) != 0).sum(1) <= 3).all()
