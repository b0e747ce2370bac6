"""CIFAR-10 patches: sampling, Coates' contrast normalisation, ZCA whitening fitted on training patches, the
DataModule's splits and saved normalisation, and one-line errors for impossible settings."""

import pytest
import torch
import torch.nn.functional as F

from implicit_em.data.cifar10_patches import (
    CONTRAST_EPS,
    CIFAR10PatchesDataModule,
    PatchNormalization,
    contrast_normalize,
    patch_normalization_from_checkpoint,
    sample_patches,
    zca_matrix,
)
from implicit_em.errors import ConfigError
from tests.data.conftest import assert_one_line_error, write_cifar_batches


def random_images(n=12, size=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, size, size, generator=g) * 255).to(torch.uint8)


def test_every_patch_is_a_crop_of_its_image():
    images = random_images()
    patches, index = sample_patches(images, 300, 4, torch.Generator().manual_seed(1))
    assert patches.shape == (300, 48) and patches.dtype == torch.uint8 and index.shape == (300,)
    crops = F.unfold(images.float(), 4).transpose(1, 2)  # N x positions x (C p p), C x p x p order
    for patch, i in zip(patches.float(), index):
        assert (crops[i] == patch).all(dim=1).any()
    assert len(index.unique()) == len(images)  # 300 draws reach all 12 images


def test_contrast_normalisation_is_coates_formula():
    x = torch.rand(50, 108, dtype=torch.float64)
    u = contrast_normalize(x, CONTRAST_EPS)
    torch.testing.assert_close(u.mean(1), torch.zeros(50, dtype=torch.float64), atol=1e-12, rtol=0)
    var = x.var(1)  # unbiased, like MATLAB's var in Coates' code
    torch.testing.assert_close(u.var(1), var / (var + CONTRAST_EPS))
    assert CONTRAST_EPS == pytest.approx(10 / 255**2)  # Coates' 10 on the 0..255 scale


def test_whitening_gives_identity_covariance_on_the_training_patches():
    images = random_images(40, 12)
    raw, _ = sample_patches(images, 20_000, 3, torch.Generator().manual_seed(0))
    norm = PatchNormalization.fit(raw.float() / 255, 3, zca_eps=0.0)
    white = norm(raw.float() / 255).double()
    cov = torch.cov(white.T)
    # contrast normalisation removes the patch mean, the one direction whitening cannot scale to 1
    ones = torch.full((27, 1), 27**-0.5, dtype=torch.float64)
    torch.testing.assert_close(cov, torch.eye(27, dtype=torch.float64) - ones @ ones.T, atol=1e-4, rtol=0)
    torch.testing.assert_close(white.mean(0), torch.zeros(27, dtype=torch.float64), atol=1e-5, rtol=0)


def test_zca_eps_shrinks_each_eigenvalue_to_lambda_over_lambda_plus_eps():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 6, generator=g, dtype=torch.float64)
    cov = a @ a.T
    p = zca_matrix(cov, 0.5)
    torch.testing.assert_close(p, p.T)  # ZCA: symmetric, the whitened patch stays in pixel space
    lam = torch.linalg.eigvalsh(cov)
    torch.testing.assert_close(torch.linalg.eigvalsh(p @ cov @ p), (lam / (lam + 0.5)).sort().values)


def test_normalisation_state_round_trips():
    raw, _ = sample_patches(random_images(), 500, 3, torch.Generator().manual_seed(0))
    norm = PatchNormalization.fit(raw.float() / 255, 3)
    again = PatchNormalization.from_state_dict(norm.state_dict())
    torch.testing.assert_close(again(raw.float() / 255), norm(raw.float() / 255))
    assert (again.patch_size, again.channels, again.dims) == (3, 3, 27)


@pytest.fixture
def cifar_root(tmp_path):
    write_cifar_batches(tmp_path / "cifar-10-batches-py", n_per_batch=20)
    return tmp_path


def test_datamodule_serves_normalised_training_patches_and_keeps_the_images(cifar_root):
    dm = CIFAR10PatchesDataModule(
        root=str(cifar_root), patch_size=5, n_patches=3000, n_eval=200, batch_size=64, val_fraction=0.2
    )
    dm.setup()
    assert dm.dims == 75 and dm.image_shape == (3, 5, 5)
    assert [len(dm.images[s][0]) for s in ("train", "val", "test")] == [80, 20, 20]
    assert dm.images["train"][0].dtype == torch.uint8 and dm.images["train"][0].shape[1:] == (3, 32, 32)
    assert dm.train_patches.shape == (3000, 75)
    for split in ("train", "val", "test"):
        assert dm.splits[split].x.shape == (200, 75) and dm.splits[split].y.shape == (200,)
    torch.testing.assert_close(dm.splits["train"].x, dm.train_patches[:200])
    # the fitted normalisation whitens the training patches (eps 0.1 shrinks, never grows, a direction)
    eig = torch.linalg.eigvalsh(torch.cov(dm.train_patches.double().T))
    assert eig.max() < 1.0 and eig[1:].min() > 0.2
    loader = dm.train_dataloader()
    rows = torch.cat([b for chunk in loader for b in chunk])
    assert len(rows) == 3000 and torch.equal(rows.sort(0).values, dm.train_patches.sort(0).values)
    # the same seed gives the same patches; the normalisation is saved and restored
    other = CIFAR10PatchesDataModule(root=str(cifar_root), patch_size=5, n_patches=3000, n_eval=200, val_fraction=0.2)
    other.load_state_dict(dm.state_dict())
    torch.testing.assert_close(other.normalization.whiten, dm.normalization.whiten)
    ckpt = {"CIFAR10PatchesDataModule": dm.state_dict(), "state_dict": {}}
    torch.testing.assert_close(patch_normalization_from_checkpoint(ckpt).mean, dm.normalization.mean)


def test_patch_larger_than_the_image_is_a_one_line_error():
    with pytest.raises(ConfigError, match="data.patch_size must be an integer from 1 to the image size 32"):
        CIFAR10PatchesDataModule(patch_size=33)
    with pytest.raises(ConfigError, match="patch_size"):
        sample_patches(random_images(size=8), 10, 9, torch.Generator())


def test_patch_size_error_through_the_cli(train, cifar_root):
    run = train(
        "--config", "configs/data/cifar10_patches.yaml", "--data.root", str(cifar_root), "--data.patch_size", "40"
    )
    assert_one_line_error(run, "data.patch_size")


def test_one_epoch_through_the_cli(train, cifar_root):
    run = train(
        "--config", "configs/data/cifar10_patches.yaml", "--data.root", str(cifar_root),
        "--data.n_patches", "2000", "--data.n_eval", "300", "--model.n_components", "8",
        "--trainer.max_epochs", "1", "--report.kmeans", "false", "--report.probe_method", "torch",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    m = run.metrics
    assert m["data"] == "cifar10_patches" and m["n_parameters"] == 8 * 108 + 8 and m["n_train"] == 300
    state = torch.load(m["checkpoint"], map_location="cpu", weights_only=False)
    norm = patch_normalization_from_checkpoint(state)
    assert norm.whiten.shape == (108, 108) and norm.patch_size == 6
