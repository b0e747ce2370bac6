"""The standard SAE baseline: codes, decoding, its objective by hand, its seeded start, its SAELens form, learning."""

import pytest
import torch
import torch.nn.functional as F

from implicit_em.errors import ConfigError
from implicit_em.models.sae import SparseAutoencoder

D, K, N = 12, 7, 9


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_sae_shapes_codes_and_decode():
    sae = SparseAutoencoder(D, K, seed=2)
    x = _x(N, D, seed=5)
    codes = sae(x)
    assert codes.shape == (N, K) and (codes >= 0).all()
    assert torch.allclose(codes, F.relu(x @ sae.encoder.weight.T + sae.encoder.bias), atol=1e-6)
    x_hat = sae.decode(codes)
    assert x_hat.shape == (N, D)
    assert torch.allclose(x_hat, codes @ sae.decoder.weight.T + sae.decoder.bias, atol=1e-6)
    assert sae.component_weights().shape == (K, D) and sae.component_weights() is sae.encoder.weight
    assert sae.has_decoder
    assert sorted(sae.state_dict()) == ["decoder.bias", "decoder.weight", "encoder.bias", "encoder.weight"]


def test_sae_decode_by_hand():
    sae = SparseAutoencoder(2, 2)
    with torch.no_grad():
        sae.decoder.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        sae.decoder.bias.copy_(torch.tensor([0.5, -1.0]))
    codes = torch.tensor([[1.0, 0.0], [2.0, 1.0]])
    # x_hat = W_d a + b_d: (1, 3) + b and (2 + 2, 6 + 4) + b
    assert torch.allclose(sae.decode(codes), torch.tensor([[1.5, 2.0], [4.5, 9.0]]))


def test_objective_is_mse_plus_l1_times_the_mean_code_by_hand():
    sae = SparseAutoencoder(2, 2, l1=0.5)
    with torch.no_grad():  # codes a = relu(x), x_hat = a: a perfect copy where x >= 0
        sae.encoder.weight.copy_(torch.eye(2))
        sae.encoder.bias.zero_()
        sae.decoder.weight.copy_(torch.eye(2))
        sae.decoder.bias.zero_()
    x = torch.tensor([[2.0, -1.0], [0.0, 4.0]])
    terms = sae.objective(x, step=0)
    # residual only at x = -1 (decoded 0): mse = 1 / 4; mean |a| = (2 + 0 + 0 + 4) / 4 = 1.5
    assert terms["mse"].item() == pytest.approx(0.25) and terms["l1"].item() == pytest.approx(1.5)
    assert terms["loss"].item() == pytest.approx(0.25 + 0.5 * 1.5)


def test_seeded_start_depends_on_the_seed_only():
    torch.manual_seed(1)
    a = SparseAutoencoder(D, K, seed=3)
    torch.manual_seed(2)
    b = SparseAutoencoder(D, K, seed=3)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    assert not torch.equal(a.encoder.weight, SparseAutoencoder(D, K, seed=4).encoder.weight)


def test_a_negative_l1_is_refused_and_the_setting_is_reported():
    with pytest.raises(ConfigError, match="model.net.l1 must be >= 0"):
        SparseAutoencoder(D, K, l1=-0.1)
    assert SparseAutoencoder(D, K, l1=0.2).settings() == {"l1": 0.2, "unit_norm_decoder": False}


def test_the_saelens_form_encodes_and_decodes_as_the_model_does():
    sae = SparseAutoencoder(D, K, seed=6)
    form = sae.inference_form()
    x = _x(N, D, seed=7)
    assert form.architecture == "standard" and form.k is None
    codes = F.relu(x @ form.weight.T + form.bias)
    assert torch.allclose(codes, sae(x), atol=1e-6)
    w_dec, b_dec = form.decoder
    assert w_dec.shape == (K, D) and torch.allclose(codes @ w_dec + b_dec, sae.decode(codes), atol=1e-6)


def test_training_lowers_the_loss_and_the_l1_keeps_codes_sparse():
    x = _x(256, 2) @ _x(2, D, seed=1)
    sae = SparseAutoencoder(D, 16, seed=0, l1=0.05)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    first = sae.objective(x, 0)["loss"].item()
    for step in range(200):
        opt.zero_grad()
        sae.objective(x, step)["loss"].backward()
        opt.step()
    last = sae.objective(x, 200)
    assert last["loss"].item() < 0.5 * first
    assert (sae(x) == 0).float().mean() > 0.3  # the ReLU and the L1 leave many codes at zero


def test_sae_unit_norm_decoder_keeps_the_directions_through_a_step():
    x = _x(64, D, seed=6)
    for constrained in (True, False):
        sae = SparseAutoencoder(D, K, seed=2, unit_norm_decoder=constrained)
        opt = torch.optim.Adam(sae.parameters(), lr=0.05)
        sae.objective(x, 0)["loss"].backward()
        sae.before_optimizer_step()
        along = (sae.decoder.weight.grad * sae.decoder.weight).sum(0).abs().max()
        opt.step()
        sae.after_optimizer_step()
        off_unit = (sae.decoder.weight.norm(dim=0) - 1).abs().max()
        if constrained:  # the gradient along each direction removed, the norms back at 1
            assert along < 1e-6 and off_unit < 1e-6
        else:  # the paper's SAE: nn.Linear's start, free norms
            assert along > 1e-4 and off_unit > 1e-2
