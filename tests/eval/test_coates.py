"""The Coates pipeline: the folded convolution equals encoding every patch on its own, quadrant pooling,
batched extraction, k-means, and one-line errors for impossible dictionaries and patch sizes."""

import pytest
import torch
import torch.nn.functional as F

from implicit_em.data.cifar10_patches import PatchNormalization, sample_patches
from implicit_em.errors import ConfigError
from implicit_em.eval.coates import (
    affine_maps,
    extract_features,
    fold,
    kmeans,
    kmeans_encoder,
    mixture_encoder,
    mixture_encodings,
    plot_dictionaries,
    quadrant_pool,
)

P = 4  # patch size of the small cases
D = 3 * P * P


@pytest.fixture
def images():
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(6, 3, 11, 11, generator=g) * 255).to(torch.uint8)
    x[0, :, :5, :5] = 77  # a flat region: patches there have zero variance (s = sqrt(eps))
    return x


@pytest.fixture
def normalization(images):
    raw, _ = sample_patches(images, 4000, P, torch.Generator().manual_seed(1))
    return PatchNormalization.fit(raw.float() / 255, P)


def whitened_patches(images, normalization):
    """The normalised, whitened patch at every position, one by one (float64): N x positions x D."""
    raw = F.unfold(images.double() / 255, P).transpose(1, 2)
    return normalization(raw.reshape(-1, D)).double().reshape(len(images), -1, D)


def as_maps(per_position, n, side):
    """N x positions x K -> N x side x side x K."""
    return per_position.reshape(n, side, side, -1).float()


def test_folded_convolution_equals_patch_by_patch_encoding(images, normalization):
    g = torch.Generator().manual_seed(2)
    weight, bias = torch.randn(5, D, generator=g), torch.randn(5, generator=g)
    z = affine_maps(images.float() / 255, fold(normalization, weight, bias))
    expected = as_maps(whitened_patches(images, normalization) @ weight.T.double() + bias.double(), 6, 8)
    assert z.shape == (6, 8, 8, 5)
    torch.testing.assert_close(z, expected, atol=2e-4, rtol=1e-4)
    encoded = mixture_encoder(normalization, weight, bias)(images.float() / 255)
    torch.testing.assert_close(encoded["signed_contrast"], (expected.mean(-1, keepdim=True) - expected).relu(),
                               atol=2e-4, rtol=1e-4)  # fmt: skip
    d = expected.relu()
    torch.testing.assert_close(encoded["distance"], d, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(encoded["contrast"], (d.mean(-1, keepdim=True) - d).relu(), atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(encoded["depth"], (-expected).relu(), atol=2e-4, rtol=1e-4)


def test_kmeans_triangle_code_equals_patch_by_patch(images, normalization):
    centroids = torch.randn(7, D, generator=torch.Generator().manual_seed(3))
    got = kmeans_encoder(normalization, centroids)(images.float() / 255)["triangle"]
    z = torch.cdist(whitened_patches(images, normalization), centroids.double())  # N x positions x K
    expected = as_maps((z.mean(-1, keepdim=True) - z).relu(), 6, 8)
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)
    assert (got >= 0).all() and (got == 0).any()  # components farther than average score 0


def test_quadrant_pooling_sums_each_quadrant():
    maps = torch.arange(2 * 5 * 5 * 3, dtype=torch.float32).reshape(2, 5, 5, 3)
    pooled = quadrant_pool(maps)
    assert pooled.shape == (2, 12)
    m = maps[1, :, :, 2]  # odd sizes: the first half is the larger one (3 + 2)
    expected = [m[:3, :3].sum(), m[:3, 3:].sum(), m[3:, :3].sum(), m[3:, 3:].sum()]
    torch.testing.assert_close(pooled[1].reshape(4, 3)[:, 2], torch.stack(expected))  # quadrant-major
    torch.testing.assert_close(pooled.reshape(2, 4, 3).sum(1), maps.sum((1, 2)))  # nothing lost or counted twice
    with pytest.raises(ConfigError, match="at least 2 x 2 positions"):
        quadrant_pool(torch.zeros(1, 1, 4, 3))


def test_extraction_in_batches_equals_one_batch(images, normalization):
    weight, bias = torch.randn(4, D, generator=torch.Generator().manual_seed(4)), torch.zeros(4)
    encoder = mixture_encoder(normalization, weight, bias)
    whole = extract_features(images, encoder, n_maps=16, batch_size=len(images))
    batched = extract_features(images, encoder, n_maps=16, batch_size=4)
    assert set(whole) == {"distance", "contrast", "signed_contrast", "depth"} and whole["distance"].shape == (6, 16)
    for name in whole:
        torch.testing.assert_close(batched[name], whole[name])


def test_mixture_encodings_reject_unknown_names(normalization):
    with pytest.raises(
        ConfigError, match="unknown encoding 'soft'; choose from distance, contrast, signed_contrast, depth"
    ):
        mixture_encoder(normalization, torch.randn(3, D), torch.zeros(3), encodings=("distance", "soft"))


def test_signed_contrast_is_the_triangle_code_of_squared_distances():
    """With z_j = -2 c_j x + ||c_j||^2, relu(mean z - z) is relu(mean_k ||x - c_k||^2 - ||x - c_j||^2)."""
    g = torch.Generator().manual_seed(5)
    x, c = torch.randn(30, 8, generator=g, dtype=torch.float64), torch.randn(6, 8, generator=g, dtype=torch.float64)
    sq = torch.cdist(x, c).pow(2)
    z = -2 * x @ c.T + c.pow(2).sum(1)
    got = mixture_encodings(z, encodings=("signed_contrast",))["signed_contrast"]
    torch.testing.assert_close(got, (sq.mean(-1, keepdim=True) - sq).relu())


def test_kmeans_converges_to_the_cluster_means():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 5, generator=g) * 10
    x = centres.repeat_interleave(200, 0) + torch.randn(800, 5, generator=g) * 0.1
    start = centres + torch.randn(4, 5, generator=g)  # near each cluster, not at its mean
    found, counts = kmeans(x, 4, iterations=3, init=start)
    assert counts.tolist() == [200.0] * 4
    torch.testing.assert_close(found, x.reshape(4, 200, 5).mean(1))


def test_kmeans_restarts_an_empty_centroid_at_a_sample():
    x = torch.randn(100, 3, generator=torch.Generator().manual_seed(0))
    start = torch.stack([torch.zeros(3), torch.full((3,), 1e3)])  # the second one is nearest to nothing
    found, counts = kmeans(x, 2, iterations=1, init=start)
    assert counts.tolist() == [100.0, 0.0]  # dead at the last assignment, and reported so
    assert (x == found[1]).all(1).any()  # moved onto a sample, so it can win points again
    _, counts = kmeans(x, 2, iterations=5, init=start)
    assert counts.min() > 0 and counts.sum() == 100


def test_fewer_than_two_components_is_a_one_line_error(normalization):
    with pytest.raises(ConfigError, match="the number of components K must be at least 2"):
        kmeans(torch.randn(10, 3), 1)
    with pytest.raises(ConfigError, match="at least 2"):
        mixture_encoder(normalization, torch.randn(1, D), torch.zeros(1))
    with pytest.raises(ConfigError, match="at least 2"):
        kmeans_encoder(normalization, torch.randn(1, D))
    with pytest.raises(ConfigError, match="at most the 10 samples"):
        kmeans(torch.randn(10, 3), 11)


def test_patch_larger_than_the_image_is_a_one_line_error(normalization):
    small = torch.zeros(2, 3, 3, 3)
    with pytest.raises(ConfigError, match="data.patch_size must be an integer from 1 to the image size 3"):
        affine_maps(small, fold(normalization, torch.randn(2, D)))


def test_a_dictionary_of_other_patches_is_rejected(normalization):
    with pytest.raises(ConfigError, match="has 10 dims per component, the patches 48"):
        fold(normalization, torch.randn(3, 10))


def test_filter_picture(tmp_path):
    path = plot_dictionaries({"a": torch.randn(9, 27), "b": torch.randn(9, 27)}, 3, tmp_path / "f.png", columns=3)
    assert path.stat().st_size > 1000
