"""The encoder and what every net shares: seeded starts, activations, the data-aware start."""

import pytest
import torch
import torch.nn.functional as F

from implicit_em.errors import ConfigError
from implicit_em.models.base import ACTIVATIONS, fit_to_data, seeded_linear
from implicit_em.models.implicit_em import ImplicitEM as Encoder

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
