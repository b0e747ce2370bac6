"""The synthetic mixture: its known components, its labels, its shapes, and the recovery score."""

import math

import numpy as np
import pytest
import torch

from implicit_em.data import SyntheticMixtureDataModule
from implicit_em.data.synthetic import component_recovery, recovery_score
from implicit_em.errors import ConfigError


def test_true_components_are_orthonormal_and_fixed_by_the_seed():
    dm = SyntheticMixtureDataModule(dims=64, n_true_components=10, seed=3)
    c = dm.true_components
    assert c.shape == (10, 64) and c.dtype == torch.float32
    assert torch.allclose(c @ c.T, torch.eye(10), atol=1e-5)
    assert torch.equal(SyntheticMixtureDataModule(dims=64, n_true_components=10, seed=3).true_components, c)
    assert not torch.allclose(SyntheticMixtureDataModule(dims=64, n_true_components=10, seed=4).true_components, c)


def test_more_components_than_dims_are_unit_vectors():
    c = SyntheticMixtureDataModule(dims=5, n_true_components=12).true_components
    assert c.shape == (12, 5) and torch.allclose(c.norm(dim=1), torch.ones(12), atol=1e-5)


@pytest.mark.parametrize("dims, shape", [(64, (8, 8)), (49, (7, 7)), (50, (1, 50)), (3, (1, 3))])
def test_dims_and_image_shape(dims, shape):
    dm = SyntheticMixtureDataModule(dims=dims, n_true_components=2)
    assert dm.dims == dims and dm.image_shape == shape and math.prod(shape) == dims


def test_samples_labels_and_splits():
    dm = SyntheticMixtureDataModule(dims=36, n_true_components=6, n_samples=3000, n_test=600, noise=0.05, seed=1)
    raw = dm.load()
    x, y = raw["train"]
    assert x.shape == (3000, 36) and x.dtype == np.float32 and raw["test"][0].shape == (600, 36)
    assert set(np.unique(y)) == set(range(6)) and abs(np.bincount(y).min() - 500) < 100
    # the label is the dominant component: coefficients >= 1 against <= 0.5, well above the noise
    proj = x @ dm.true_components.numpy().T
    assert (proj.argmax(1) == y).mean() > 0.99
    again = SyntheticMixtureDataModule(
        dims=36, n_true_components=6, n_samples=3000, n_test=600, noise=0.05, seed=1
    ).load()
    assert np.array_equal(again["train"][0], x) and np.array_equal(again["test"][1], raw["test"][1])
    dm.setup()
    assert len(dm.splits["train"].x) + len(dm.splits["val"].x) == 3000 and len(dm.splits["test"].x) == 600


def test_sparsity_one_without_noise_is_a_pure_mixture():
    dm = SyntheticMixtureDataModule(dims=16, n_true_components=4, sparsity=1.0, noise=0.0, n_samples=400, n_test=40)
    x, y = dm.load()["train"]
    coeff = x @ dm.true_components.numpy().T  # orthonormal components: exact coefficients
    active = np.abs(coeff) > 1e-5
    assert active.sum(1).tolist() == [1] * 400 and np.array_equal(coeff.argmax(1), y)
    assert coeff.max(1).min() >= 1.0 - 1e-5 and coeff.max(1).max() <= 2.0 + 1e-5


def test_lower_sparsity_means_more_active_components():
    def mean_active(sparsity):
        dm = SyntheticMixtureDataModule(
            dims=16, n_true_components=8, sparsity=sparsity, noise=0.0, n_samples=2000, n_test=40
        )
        coeff = dm.load()["train"][0] @ dm.true_components.numpy().T
        return (np.abs(coeff) > 1e-5).sum(1).mean()

    assert mean_active(0.9) == pytest.approx(1 + 7 * 0.1, abs=0.1)
    assert mean_active(0.5) == pytest.approx(1 + 7 * 0.5, abs=0.15)


def test_noise_is_the_residual_standard_deviation():
    dm = SyntheticMixtureDataModule(dims=64, n_true_components=4, sparsity=1.0, noise=0.3, n_samples=4000, n_test=40)
    x = dm.load()["train"][0]
    c = dm.true_components.numpy()
    residual = x - (x @ c.T) @ c  # remove the part in the components' span
    assert residual.std() * math.sqrt(64 / 60) == pytest.approx(0.3, rel=0.03)


def test_recovery_is_one_for_the_true_components_up_to_order_scale_and_sign():
    true = SyntheticMixtureDataModule(dims=64, n_true_components=8).true_components
    w = torch.cat([-3 * true.flip(0), torch.randn(20, 64)])  # reversed, scaled, negated, plus other rows
    assert torch.allclose(component_recovery(w, true), torch.ones(8, dtype=torch.double))
    assert recovery_score(w, true) == pytest.approx(1.0)
    assert component_recovery(w[:8], true, signed=True).max() < 0.5  # all anti-aligned


def test_recovery_of_random_rows_is_low_and_partial_recovery_is_partial():
    true = SyntheticMixtureDataModule(dims=64, n_true_components=8).true_components
    random = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    assert recovery_score(random, true) < 0.5
    half = torch.cat([true[:4], random])
    r = component_recovery(half, true)
    assert torch.allclose(r[:4], torch.ones(4, dtype=torch.double)) and r[4:].max() < 0.6


def test_recovery_per_ensemble_member():
    true = SyntheticMixtureDataModule(dims=16, n_true_components=4).true_components
    members = torch.stack([torch.cat([true, torch.zeros(2, 16) + 1e-3]), torch.randn(6, 16)])
    r = component_recovery(members, true)
    assert r.shape == (2, 4) and torch.allclose(r[0], torch.ones(4, dtype=torch.double))
    scores = recovery_score(members, true)
    assert len(scores) == 2 and scores[0] == pytest.approx(1.0) and scores[1] < 1.0


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"n_true_components": 1}, "data.n_true_components"),
        ({"sparsity": 1.5}, "data.sparsity"),
        ({"noise": -0.1}, "data.noise"),
        ({"dims": 0}, "data.dims"),
        ({"n_samples": 10}, "data.n_samples"),
    ],
)
def test_invalid_settings(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        SyntheticMixtureDataModule(**kwargs)


def test_trains_through_the_cli_with_component_images_for_any_dims(train):
    run = train(
        "--config", "configs/data/synthetic.yaml", "--data.dims", "50", "--data.n_samples", "2000",
        "--trainer.max_epochs", "2", "--report.kmeans", "false", "--model.n_components", "16",
        "--components.every_n_epochs", "10",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    m = run.metrics
    assert m["data"] == "synthetic" and m["n_parameters"] == 16 * 50 + 16
    assert m["probe_accuracy"] > 0.9  # eight well-separated classes
    assert (run.metrics_path.parent / "components.png").is_file()
