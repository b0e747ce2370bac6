"""The single-layer feature pipeline of Coates, Lee & Ng (2011) for any dictionary of patch components.

A dictionary (the implicit-EM model's W, b, or k-means centroids) acts on normalised, whitened p x p patches
(:class:`~implicit_em.data.cifar10_patches.PatchNormalization`). Here it is applied at every position of
every image (stride 1), each position is encoded, and every encoding is sum-pooled over the image's four
quadrants: 4K features per image, which a linear probe judges.

Folding: at each position the patch x (D = C p p values) becomes x_w = (u - mu) P with u = (x - m) / s its
contrast-normalised values (m, s: the patch's mean and sqrt(unbiased variance + e)). For an affine map
z = x_w A + b (A: D x K), with G = P A,

    z = u G + (b - mu G),

so the whitening and the components are one D x K matrix: the convolution is one matrix product of the
unfolded patches u (positions x D) with G, with the offset added in the same call. Only the contrast
normalisation is not linear; it is computed on the D values of each position, D / K of the product's cost.
The maps are position-major (N x H' x W' x K), so the encodings' means over components and the pooling
(a matrix product with the quadrants' indicators) read contiguous memory; extraction goes through a few
images at a time so their maps stay in the CPU's cache.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from implicit_em.data.cifar10_patches import PatchNormalization, check_patch_size, contrast_normalize
from implicit_em.errors import ConfigError, check
from implicit_em.models.base import ACTIVATIONS

#: encodings of the mixture model at a position (z = W x_w + b, d = phi(z)): ``distance`` d itself;
#: ``contrast`` relu(mean_j d_j - d), the triangle code's form (a component scores when it is closer than the
#: average one); ``signed_contrast`` relu(mean_j z_j - z), the same on the signed pre-activations, which for a
#: ReLU are d outside a component's zero region and minus the depth inside it; ``depth`` relu(-z), how deep
#: the position lies inside each component's zero-distance region (for a ReLU, where d_j = 0: the region the
#: component claims), 0 outside it
MIXTURE_ENCODINGS = ("distance", "contrast", "signed_contrast", "depth")
#: bytes of feature maps one batch of images may hold during extraction (a few MB: they stay in cache)
BATCH_BYTES = 8 * 2**20


@dataclass
class FoldedFilters:
    """z = u G + offset at every position, u the contrast-normalised patch (see the module docstring)."""

    matrix: Tensor  # D x K: G = P A
    offset: Tensor  # K: b - mu G
    patch_size: int
    contrast_eps: float


def fold(normalization: PatchNormalization, weight: Tensor, bias: Tensor | None = None) -> FoldedFilters:
    """Fold the whitening into the affine map z = x_w W^T + b (W: K x D on whitened patches)."""
    n = normalization
    if weight.shape[-1] != n.dims:
        raise ConfigError(f"the dictionary has {weight.shape[-1]} dims per component, the patches {n.dims}")
    g = n.whiten.double() @ weight.double().T  # D x K
    offset = -(n.mean.double() @ g)
    if bias is not None:
        offset = offset + bias.double()
    return FoldedFilters(g.float().contiguous(), offset.float(), n.patch_size, n.contrast_eps)


def every_patch(images: Tensor, patch_size: int) -> Tensor:
    """The patch at every position (stride 1): N x C x H x W -> N x H' x W' x (C p p), C x p x p order."""
    n, _, h, w = images.shape
    check_patch_size(patch_size, min(h, w))
    u = F.unfold(images, patch_size).transpose(1, 2)
    return u.reshape(n, h - patch_size + 1, w - patch_size + 1, -1)


def affine_maps(images: Tensor, folded: FoldedFilters) -> Tensor:
    """z = x_w A + b at every position of float images N x C x H x W (pixels in [0, 1]): N x H' x W' x K."""
    # contrast normalisation is shift-invariant; centring the pixels keeps float32 sums of squares exact
    u = contrast_normalize(every_patch(images - 0.5, folded.patch_size), folded.contrast_eps)
    z = torch.addmm(folded.offset, u.reshape(-1, u.shape[-1]), folded.matrix)
    return z.reshape(*u.shape[:-1], -1)


def quadrant_indicators(h: int, w: int) -> Tensor:
    """4 x (h w): row q is 1 on the positions of quadrant q (top-left, top-right, bottom-left, bottom-right);
    for odd sizes the first half is the larger one (27 positions split 14 + 13)."""
    if h < 2 or w < 2:
        raise ConfigError(f"quadrant pooling needs at least 2 x 2 positions, got {h} x {w}; use smaller patches")
    rows, cols = torch.arange(h)[:, None] >= math.ceil(h / 2), torch.arange(w)[None, :] >= math.ceil(w / 2)
    quadrant = (2 * rows + cols).flatten()
    return (quadrant[None, :] == torch.arange(4)[:, None]).float()


def quadrant_pool(maps: Tensor) -> Tensor:
    """Sum over each quadrant of the positions: N x H x W x K -> N x 4K, quadrant-major (q K + k)."""
    n, h, w, k = maps.shape
    return (quadrant_indicators(h, w).to(maps) @ maps.reshape(n, h * w, k)).reshape(n, 4 * k)


def mixture_encodings(
    z: Tensor, activation: str = "relu", encodings: Sequence[str] = MIXTURE_ENCODINGS
) -> dict[str, Tensor]:
    """Encodings (see :data:`MIXTURE_ENCODINGS`) of pre-activations z (... x K), d = phi(z):
    ``distance`` = d, ``contrast`` = relu(mean_j d_j - d), ``signed_contrast`` = relu(mean_j z_j - z),
    ``depth`` = relu(-z).

    ``signed_contrast`` is k-means' triangle code in the form it takes on squared distances: there
    ||x - c_j||^2 = ||x||^2 + z_j with z_j = -2 c_j x + ||c_j||^2 affine, and the shared ||x||^2 cancels in
    mean_k - (.)_j; here z_j = w_j x + b_j is the model's own affine map, whose positive part is d_j.
    """
    unknown = [e for e in encodings if e not in MIXTURE_ENCODINGS]
    if unknown:
        raise ConfigError(f"unknown encoding {unknown[0]!r}; choose from {', '.join(MIXTURE_ENCODINGS)}")
    out = {}
    d = ACTIVATIONS[activation](z) if {"distance", "contrast"} & set(encodings) else None
    for name in encodings:
        if name == "distance":
            out[name] = d
        elif name == "contrast":
            out[name] = torch.sub(d.mean(dim=-1, keepdim=True), d).clamp_min_(0)
        elif name == "depth":
            out[name] = torch.neg(z).clamp_min_(0)
        else:
            out[name] = torch.sub(z.mean(dim=-1, keepdim=True), z).clamp_min_(0)
    return out


def triangle(sq_distances: Tensor) -> Tensor:
    """The k-means triangle code f_j = relu(mean_k z_k - z_j), z_j = ||x_w - c_j|| (last dim indexes j)."""
    z = sq_distances.clamp_min(0).sqrt_()
    return torch.sub(z.mean(dim=-1, keepdim=True), z).clamp_min_(0)


Encoder = Callable[[Tensor], dict[str, Tensor]]


def mixture_encoder(
    normalization: PatchNormalization,
    weight: Tensor,
    bias: Tensor,
    activation: str = "relu",
    encodings: Sequence[str] = MIXTURE_ENCODINGS,
) -> Encoder:
    """The implicit-EM dictionary d = phi(W x_w + b) at every position, encoded by ``encodings``."""
    check_dictionary(weight)
    mixture_encodings(torch.zeros(1, 2), activation, encodings)  # an unknown name fails here, not mid-extraction
    folded = fold(normalization, weight, bias)
    return lambda images: mixture_encodings(affine_maps(images, folded), activation, encodings)


def kmeans_encoder(normalization: PatchNormalization, centroids: Tensor) -> Encoder:
    """Centroids c_j at every position, triangle-encoded: ||x_w - c_j||^2 = ||x_w||^2 - 2 x_w c_j + ||c_j||^2,
    with x_w itself from the same convolution (D identity filters after the K centroid filters)."""
    check_dictionary(centroids)
    k, dims = centroids.shape
    weight = torch.cat([centroids, torch.eye(dims, dtype=centroids.dtype)])
    folded = fold(normalization, weight)
    c2 = centroids.double().pow(2).sum(1).float()

    def encode(images: Tensor) -> dict[str, Tensor]:
        z = affine_maps(images, folded)
        cross, whitened = z[..., :k], z[..., k:]
        sq = torch.add(c2, cross, alpha=-2).add_(whitened.pow(2).sum(-1, keepdim=True))
        return {"triangle": triangle(sq)}

    return encode


def check_dictionary(weight: Tensor) -> None:
    check(weight.dim() == 2 and len(weight) >= 2, "the number of components K", "at least 2", len(weight))


@torch.no_grad()
def extract_features(
    images: Tensor, encoder: Encoder, n_maps: int, batch_size: int | None = None, log: Callable | None = None
) -> dict[str, Tensor]:
    """Quadrant-pooled encodings of uint8 images N x C x H x W: ``{encoding: N x 4K}`` (float32).

    Images go through in batches whose feature maps (``n_maps`` channels in all) fit in :data:`BATCH_BYTES`.
    """
    n, _, h, w = images.shape
    if batch_size is None:
        batch_size = max(1, BATCH_BYTES // (4 * n_maps * h * w))
    out: dict[str, Tensor] = {}  # written in place: many small kept tensors fragment the heap (GBs at 50k images)
    step = max(batch_size, n // 10)
    for lo in range(0, n, batch_size):
        batch = images[lo : lo + batch_size].float().div_(255)
        for name, maps in encoder(batch).items():
            pooled = quadrant_pool(maps)
            if name not in out:
                out[name] = torch.empty(n, pooled.shape[1])
            out[name][lo : lo + len(batch)] = pooled
        if log is not None and (lo + batch_size) // step > lo // step:
            log(f"  features: {min(lo + batch_size, n)} / {n} images")
    return out


@torch.no_grad()
def kmeans(
    x: Tensor, k: int, iterations: int = 10, seed: int = 0, init: Tensor | None = None, chunk: int = 65536
) -> tuple[Tensor, Tensor]:
    """Plain k-means (Lloyd) on the rows of x (n x D): returns the centroids (K x D) and each one's count at
    the last assignment. Starts from ``init`` or K distinct random rows; a centroid left empty restarts at a
    random row (the count it reports is that of its last assignment, 0 for a dead one)."""
    check(k >= 2, "the number of components K", "at least 2", k)
    check(k <= len(x), "the number of components K", f"at most the {len(x)} samples", k)
    g = torch.Generator().manual_seed(seed)
    centroids = x[torch.randperm(len(x), generator=g)[:k]].clone() if init is None else init.clone().to(x)
    counts = torch.zeros(k)
    for _ in range(iterations):
        sums = torch.zeros_like(centroids, dtype=torch.float64)
        counts = torch.zeros(k, dtype=torch.float64)
        c2 = centroids.pow(2).sum(1)
        for part in x.split(chunk):
            nearest = torch.addmm(c2, part, centroids.T, alpha=-2).argmin(1)
            sums.index_add_(0, nearest, part.double())
            counts.index_add_(0, nearest, torch.ones(len(part), dtype=torch.float64))
        empty = counts == 0
        centroids = (sums / counts.clamp_min(1)[:, None]).float()
        centroids[empty] = x[torch.randint(len(x), (int(empty.sum()),), generator=g)]
    return centroids, counts.float()


def plot_dictionaries(dictionaries: dict[str, Tensor], patch_size: int, path: Path, columns: int = 20) -> Path:
    """The components of each dictionary (K x C p p, on whitened patches) as p x p colour filters, side by
    side; each filter scaled by its own max |w|, 0 shown as grey. At most ``columns``^2 filters each."""
    import matplotlib.pyplot as plt

    from implicit_em.eval.figures import component_grid

    fig, axes = plt.subplots(1, len(dictionaries), figsize=(6 * len(dictionaries), 6.4), squeeze=False)
    for ax, (title, weight) in zip(axes[0], dictionaries.items()):
        shown = weight[: columns * columns]
        grid = component_grid(shown, (weight.shape[1] // patch_size**2, patch_size, patch_size), columns=columns)
        ax.imshow(((grid + 1) / 2).clip(0, 1))
        ax.set_title(f"{title} ({len(shown)} of {len(weight)})")
        ax.set_axis_off()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
