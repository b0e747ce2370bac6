"""The encoder and the SAE baseline: shapes, activations, ensembles of independent members, decoding."""

import pytest
import torch
import torch.nn.functional as F

from implicit_em.models import ACTIVATIONS, Encoder, SparseAutoencoder, StackedLinear, member_generators

D, K, N = 12, 7, 9


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_encoder_shapes_single_and_ensemble():
    x = _x(N, D)
    assert Encoder(D, K)(x).shape == (1, N, K)
    ens = Encoder(D, K, seeds=(0, 1, 2))
    assert ens(x).shape == (3, N, K)  # one batch shared by all members
    assert ens(_x(3, N, D)).shape == (3, N, K)  # one batch per member
    assert ens.component_weights().shape == (3, K, D)
    assert Encoder(D, K).component_weights().shape == (1, K, D)
    assert len(ens.member_parameters(1)) == 2
    assert ens.member_parameters(1)[0].shape == (K, D) and ens.member_parameters(1)[1].shape == (K,)


def test_initialisation_matches_nn_linear_after_manual_seed():
    torch.manual_seed(5)
    ref = torch.nn.Linear(D, K)
    enc = Encoder(D, K, seeds=(5,))
    assert torch.equal(enc.linear.member_weight(0), ref.weight) and torch.equal(enc.linear.member_bias(0), ref.bias)
    bound = 1 / D**0.5
    assert enc.linear.member_weight(0).abs().max() <= bound and enc.linear.member_bias(0).abs().max() <= bound


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_each_activation(activation):
    enc = Encoder(D, K, activation=activation, seeds=(1,))
    x = _x(N, D, seed=1)
    pre = F.linear(x, enc.linear.member_weight(0), enc.linear.member_bias(0))
    expected = {
        "relu": pre.clamp_min(0),
        "softplus": torch.log1p(pre.exp()),
        "abs": pre.abs(),
        "square": pre * pre,
        "exp": pre.exp(),
        "identity": pre,
    }[activation]
    out = enc(x)
    assert torch.allclose(out[0], expected, atol=1e-6)
    if activation != "identity":
        assert (out >= 0).all()  # distances are non-negative
    if activation == "relu":
        assert (out == 0).any() and (out > 0).any()


def test_unknown_activation_raises():
    with pytest.raises(KeyError):
        Encoder(D, K, activation="tanhh")


@pytest.mark.parametrize("seeds", [(0, 1, 2), (7, 3)])
def test_ensemble_member_equals_lone_model_with_its_seed(seeds):
    ens = Encoder(D, K, activation="softplus", seeds=seeds)
    x, xs = _x(N, D, seed=2), _x(len(seeds), N, D, seed=3)
    shared, own = ens(x), ens(xs)
    for s, seed in enumerate(seeds):
        lone = Encoder(D, K, activation="softplus", seeds=(seed,))
        assert torch.equal(ens.linear.member_weight(s), lone.linear.member_weight(0))
        assert torch.equal(ens.linear.member_bias(s), lone.linear.member_bias(0))
        assert torch.allclose(shared[s], lone(x)[0], atol=1e-6)
        assert torch.allclose(own[s], lone(xs[s])[0], atol=1e-6)
    # distinct seeds give distinct members
    assert not torch.equal(ens.linear.member_weight(0), ens.linear.member_weight(1))


def test_ensemble_members_do_not_share_gradients():
    ens = Encoder(D, K, seeds=(0, 1, 2))  # one block: a single 3 x K x D parameter
    ens(_x(3, N, D))[1].sum().backward()
    grad = ens.linear.weights[0].grad
    assert grad[0].abs().max() == 0 and grad[2].abs().max() == 0
    assert grad[1].abs().max() > 0


def test_fit_to_data_moves_hyperplanes_through_the_mean_and_sets_the_scale():
    lin = StackedLinear(D, K, member_generators([0, 1]))
    before = [(lin.member_weight(s).detach().clone(), lin.member_bias(s).detach().clone()) for s in range(2)]
    x = _x(200, D, seed=4) * 3 + 1
    lin.fit_to_data(x)  # centring only
    for s in range(2):
        w0, b0 = before[s]
        assert torch.equal(lin.member_weight(s).detach(), w0)
        # at the mean, the pre-activation equals the old bias: W mean + b_new = b_old
        assert torch.allclose(lin(x.mean(0)[None])[s, 0], b0, atol=1e-5)
    lin.fit_to_data(x, std=0.3)
    z = lin(x)  # S x N x K
    assert torch.allclose(z.std(1), torch.full((2, K), 0.3), atol=1e-5)
    for s in range(2):  # directions kept: each row only rescaled by a positive factor
        cos = torch.nn.functional.cosine_similarity(lin.member_weight(s).detach(), before[s][0], dim=1)
        assert torch.allclose(cos, torch.ones(K), atol=1e-5)


def test_sae_shapes_codes_and_decode():
    sae = SparseAutoencoder(D, K, seeds=(0, 1))
    x = _x(N, D, seed=5)
    codes = sae(x)
    assert codes.shape == (2, N, K) and (codes >= 0).all()
    x_hat = sae.decode(codes)
    assert x_hat.shape == (2, N, D)
    for s in range(2):
        w_d, b_d = sae.decoder.member_weight(s), sae.decoder.member_bias(s)
        assert w_d.shape == (D, K)
        assert torch.allclose(x_hat[s], codes[s] @ w_d.T + b_d, atol=1e-6)
        assert torch.allclose(
            codes[s], F.relu(x @ sae.encoder.member_weight(s).T + sae.encoder.member_bias(s)), atol=1e-6
        )
    assert sae.component_weights().shape == (2, K, D)
    assert len(sae.member_parameters(0)) == 4


def test_sae_decode_by_hand():
    sae = SparseAutoencoder(2, 2)
    with torch.no_grad():
        sae.decoder.member_weight(0).copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        sae.decoder.member_bias(0).copy_(torch.tensor([0.5, -1.0]))
    codes = torch.tensor([[[1.0, 0.0], [2.0, 1.0]]])
    # x_hat = W_d a + b_d: (1, 3) + b and (2 + 2, 6 + 4) + b
    expected = torch.tensor([[[1.5, 2.0], [4.5, 9.0]]])
    assert torch.allclose(sae.decode(codes), expected)


def test_sae_member_equals_lone_sae():
    ens = SparseAutoencoder(D, K, seeds=(4, 9))
    x = _x(N, D, seed=6)
    codes = ens(x)
    for s, seed in enumerate((4, 9)):
        lone = SparseAutoencoder(D, K, seeds=(seed,))
        for a, b in zip(ens.member_parameters(s), lone.member_parameters(0)):
            assert torch.equal(a, b)
        assert torch.allclose(codes[s], lone(x)[0], atol=1e-6)
        assert torch.allclose(ens.decode(codes)[s], lone.decode(lone(x))[0], atol=1e-5)


def test_blocks_store_members_together_and_keep_the_member_order():
    seeds = (0, 1, 2, 3)
    x = _x(2, N, D, seed=9)  # two data orders
    blocked = Encoder(D, K, seeds=seeds, blocks=["a", "b", "a", "b"], inputs=[0, 1, 0, 1])
    assert blocked.block_members() == [[0, 2], [1, 3]]
    assert [tuple(p.shape) for p in blocked.block_parameters(1)] == [(2, K, D), (2, K)]
    out = blocked(x)
    for s in seeds:  # member s reads data order s % 2 and equals its lone model
        lone = Encoder(D, K, seeds=(s,))
        assert torch.equal(blocked.linear.member_weight(s), lone.linear.member_weight(0))
        assert torch.allclose(out[s], lone(x[s % 2])[0], atol=1e-6)
    assert torch.equal(blocked.component_weights()[3], blocked.linear.member_weight(3))
