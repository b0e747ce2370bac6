"""The TopK SAE: exactly k codes survive, the objective is the MSE plus AuxK, it learns; the field's recipe:
unit-norm decoder directions kept through a step, the parallel gradient removed, b_dec at the data's centre, the dead
window scaled to the run."""

from __future__ import annotations

import pytest
import torch

from implicit_em.core.objective import topk_sae_objective
from implicit_em.core.sae import geometric_median
from implicit_em.experiments.compare import matched_k
from implicit_em.models.base import keep_top_k
from implicit_em.models.topk_sae import TopKSAE, unit_norm_directions


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
    assert set(terms) == {"loss", "mse", "fvu", "aux", "dead"} and terms["loss"].requires_grad
    assert ((module(x) != 0).sum(1) <= 3).all()


def _adam_step(model, x):
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    opt.zero_grad()
    model.objective(x, 0)["loss"].backward()
    model.before_optimizer_step()
    grad = model.decoder.weight.grad.clone()
    opt.step()
    model.after_optimizer_step()
    return grad


def test_a_step_keeps_the_decoder_directions_at_unit_norm_and_removes_the_parallel_gradient():
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0)) * 3
    model = TopKSAE(8, 24, k=3, seed=0)
    grad = _adam_step(model, x)
    w = model.decoder.weight
    assert torch.allclose(w.norm(dim=0), torch.ones(24), atol=1e-6)
    before = unit_norm_directions(8, 24, 0)  # the directions the step started from
    assert (grad * before).sum(0).abs().max() < 1e-6  # nothing of the gradient along them
    assert grad.abs().sum() > 0
    free = TopKSAE(8, 24, k=3, seed=0, unit_norm_decoder=False)  # the previous recipe: the norms drift
    _adam_step(free, x)
    assert (free.decoder.weight.norm(dim=0) - 1).abs().max() > 1e-3


@pytest.mark.parametrize("start", ["mean", "median"])
def test_b_dec_starts_at_the_data_centre_and_centres_the_pre_activations(start):
    x = torch.randn(300, 6, generator=torch.Generator().manual_seed(2)) + torch.arange(6.0)
    model = TopKSAE(6, 12, k=2, seed=1, b_dec_start=start)
    model.start_from_data(x, std=0.3)
    centre = x.mean(0) if start == "mean" else geometric_median(x).float()
    assert torch.allclose(model.decoder.bias, centre, atol=1e-5)
    assert torch.allclose(model.pre_activation(centre[None])[0], torch.zeros(12), atol=1e-5)  # b_e = -W_e b_d
    assert torch.allclose(model.decoder.weight.norm(dim=0), torch.ones(12))  # std does not rescale the directions
    assert torch.equal(model.encoder.weight, model.decoder.weight.T)


def test_the_dead_window_scales_with_the_run_and_auxk_reaches_the_dead():
    model = TopKSAE(8, 16, k=1, seed=0)
    model.plan_training(5_000)
    assert model.dead_window == 500 and model.settings()["dead_rows"] == 500
    fixed = TopKSAE(8, 16, k=1, seed=0, dead_rows=7)
    fixed.plan_training(5_000)
    assert fixed.dead_window == 7
    x = torch.randn(1, 8).repeat(64, 1)  # one row 64 times: one component fires (k = 1), 15 stay silent
    model.objective(x, 0)
    assert sorted(model.rows_since_fired.tolist()) == [0] + [64] * 15  # rows seen since each fired
    model.rows_since_fired.fill_(500)  # every component silent for the whole window: dead
    terms = model.objective(x, 1)
    assert float(terms["dead"]) == 16 and float(terms["aux"]) > 0
    terms["loss"].backward()
    assert model.encoder.weight.grad.abs().sum(1).gt(0).sum() > 1  # more components than the top-1 learn
    assert float(TopKSAE(8, 16, k=1, seed=0, aux_coefficient=0).objective(x, 0)["aux"]) == 0.0


def test_a_checkpoint_from_before_the_row_counts_loads_with_counts_at_zero():
    from implicit_em.models.batchtopk_sae import BatchTopKSAE

    for cls in (TopKSAE, BatchTopKSAE):
        trained = cls(8, 16, k=2, seed=3)
        trained.rows_since_fired.fill_(9)
        old = {k: v for k, v in trained.state_dict().items() if k != "rows_since_fired"}
        if cls is BatchTopKSAE:
            old["steps_since_fired"] = torch.zeros(16, dtype=torch.long)  # what its previous version saved
        fresh = cls(8, 16, k=2, seed=4)
        fresh.load_state_dict(old)  # strict
        assert torch.equal(fresh.encoder.weight, trained.encoder.weight)
        assert int(fresh.rows_since_fired.abs().sum()) == 0
