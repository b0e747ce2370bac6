"""The encoder and the SAE baseline: seeded starts, activations, the data-aware start, decoding."""

import pytest
import torch
import torch.nn.functional as F

from implicit_em.errors import ConfigError
from implicit_em.models.base import ACTIVATIONS, fit_to_data, seeded_linear
from implicit_em.models.implicit_em import ImplicitEM as Encoder
from implicit_em.models.sae import SparseAutoencoder

D, K, N = 12, 7, 9


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_encoder_shapes_and_keys():
    enc = Encoder(D, K)
    assert enc(_x(N, D)).shape == (N, K)
    assert enc.component_weights().shape == (K, D)
    assert sorted(enc.state_dict()) == ["linear.bias", "linear.weight"]


def test_seeded_start_is_nn_linear_distribution_and_independent_of_the_global_generator():
    torch.manual_seed(5)
    a = Encoder(D, K, seed=3)
    torch.manual_seed(6)
    torch.rand(100)
    b = Encoder(D, K, seed=3)
    assert torch.equal(a.linear.weight, b.linear.weight) and torch.equal(a.linear.bias, b.linear.bias)
    assert not torch.equal(a.linear.weight, Encoder(D, K, seed=4).linear.weight)
    bound = 1 / D**0.5
    assert a.linear.weight.abs().max() <= bound and a.linear.bias.abs().max() <= bound
    # W first, then b, from the same generator
    g = torch.Generator().manual_seed(3)
    w = torch.empty(K, D).uniform_(-bound, bound, generator=g)
    assert torch.equal(a.linear.weight.detach(), w)


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_each_activation(activation):
    enc = Encoder(D, K, activation=activation, seed=1)
    x = _x(N, D, seed=1)
    pre = F.linear(x, enc.linear.weight, enc.linear.bias)
    expected = {
        "relu": pre.clamp_min(0),
        "softplus": torch.log1p(pre.exp()),
        "abs": pre.abs(),
        "square": pre * pre,
        "exp": pre.exp(),
        "identity": pre,
    }[activation]
    out = enc(x)
    assert torch.allclose(out, expected, atol=1e-6)
    assert torch.allclose(enc.pre_activation(x), pre)
    if activation != "identity":
        assert (out >= 0).all()  # distances are non-negative
    if activation == "relu":
        assert (out == 0).any() and (out > 0).any()


def test_unknown_activation_raises():
    with pytest.raises(ConfigError, match="model.net.activation"):
        Encoder(D, K, activation="tanhh")


def test_fit_to_data_moves_hyperplanes_through_the_mean_and_sets_the_scale():
    lin = seeded_linear(D, K, torch.Generator().manual_seed(0))
    w0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    x = _x(200, D, seed=4) * 3 + 1
    fit_to_data(lin, x)  # centring only
    assert torch.equal(lin.weight.detach(), w0)
    # at the mean, the pre-activation equals the old bias: W mean + b_new = b_old
    assert torch.allclose(lin(x.mean(0)[None])[0], b0, atol=1e-5)
    fit_to_data(lin, x, std=0.3)
    assert torch.allclose(lin(x).std(0), torch.full((K,), 0.3), atol=1e-5)
    cos = F.cosine_similarity(lin.weight.detach(), w0, dim=1)  # directions kept, rows only rescaled
    assert torch.allclose(cos, torch.ones(K), atol=1e-5)


def test_sae_shapes_codes_and_decode():
    sae = SparseAutoencoder(D, K, seed=2)
    x = _x(N, D, seed=5)
    codes = sae(x)
    assert codes.shape == (N, K) and (codes >= 0).all()
    assert torch.allclose(codes, F.relu(x @ sae.encoder.weight.T + sae.encoder.bias), atol=1e-6)
    x_hat = sae.decode(codes)
    assert x_hat.shape == (N, D)
    assert torch.allclose(x_hat, codes @ sae.decoder.weight.T + sae.decoder.bias, atol=1e-6)
    assert sae.component_weights().shape == (K, D)
    assert sorted(sae.state_dict()) == ["decoder.bias", "decoder.weight", "encoder.bias", "encoder.weight"]


def test_sae_decode_by_hand():
    sae = SparseAutoencoder(2, 2)
    with torch.no_grad():
        sae.decoder.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        sae.decoder.bias.copy_(torch.tensor([0.5, -1.0]))
    codes = torch.tensor([[1.0, 0.0], [2.0, 1.0]])
    # x_hat = W_d a + b_d: (1, 3) + b and (2 + 2, 6 + 4) + b
    assert torch.allclose(sae.decode(codes), torch.tensor([[1.5, 2.0], [4.5, 9.0]]))


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
