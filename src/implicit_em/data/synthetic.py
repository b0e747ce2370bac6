"""A synthetic sparse mixture with known ground-truth components, to measure how well they are recovered.

Each sample is one dominant true component plus a few weaker ones plus Gaussian noise:

    x_i = sum_m a_im c_m + sigma * eps_i,   eps_i ~ N(0, I_D),   y_i = argmax_m a_im

with c_m the rows of ``true_components`` (unit norm; orthonormal when M <= D).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from implicit_em.data.memory import InMemoryDataModule
from implicit_em.errors import check

#: coefficient ranges: the dominant component's, and any other active component's (always smaller)
DOMINANT = (1.0, 2.0)
SECONDARY = (0.0, 0.5)


def true_components(dims: int, n_true_components: int, seed: int) -> np.ndarray:
    """M x D unit-norm directions from ``seed``: orthonormal rows when M <= D, else random unit vectors."""
    rng = np.random.default_rng([seed, 0])
    c = rng.standard_normal((n_true_components, dims))
    if n_true_components <= dims:
        q, r = np.linalg.qr(c.T)  # D x M with orthonormal columns; the sign fix makes it unique
        c = (q * np.sign(np.diag(r))).T
    return (c / np.linalg.norm(c, axis=1, keepdims=True)).astype(np.float32)


def sample_mixture(
    components: np.ndarray, n: int, sparsity: float, noise: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` samples of the mixture in the module docstring and their labels (the dominant component).

    The dominant component is uniform over the M components with a ~ U(1, 2); every other component is
    present with probability 1 - ``sparsity``, with a ~ U(0, 0.5).
    """
    m, d = components.shape
    y = rng.integers(0, m, size=n)
    active = rng.random((n, m)) >= sparsity
    a = np.where(active, rng.uniform(*SECONDARY, size=(n, m)), 0.0)
    a[np.arange(n), y] = rng.uniform(*DOMINANT, size=n)
    x = a @ components + noise * rng.standard_normal((n, d))
    return x.astype(np.float32), y.astype(np.int64)


def component_recovery(weights: Tensor, true: Tensor, signed: bool = False) -> Tensor:
    """How well each true component is matched by some learned row of W: the best-match cosine.

        recovery_m = max_k |<w_k, c_m>| / (||w_k|| ||c_m||)

    (without the absolute value when ``signed``: a component may encode its prototype with either sign).
    ``weights`` is K x D or S x K x D (an ensemble); returns M values (or S x M). Their mean is 1 exactly
    when every true component has a learned row parallel to it; random rows give about sqrt(2 log K / D).
    """
    w = torch.nn.functional.normalize(weights.detach().double(), dim=-1)
    c = torch.nn.functional.normalize(true.detach().double().to(w.device), dim=-1)
    cos = w @ c.T  # ... x K x M
    return (cos if signed else cos.abs()).amax(dim=-2)


def recovery_score(weights: Tensor, true: Tensor, signed: bool = False) -> float | list[float]:
    """The mean of :func:`component_recovery` over the true components (one per member for S x K x D)."""
    r = component_recovery(weights, true, signed).mean(dim=-1)
    return float(r) if r.ndim == 0 else r.tolist()


class SyntheticMixtureDataModule(InMemoryDataModule):
    """The synthetic mixture above, regenerated from ``seed`` (no files; ``root`` is unused).

    ``true_components`` (M x D tensor) is available as soon as the module is built; measure recovery with
    :func:`component_recovery` (in input space, so with ``normalization: none``). Samples are not confined to
    [0, 1]. Component images are sqrt(D) x sqrt(D) when D is a perfect square, else 1 x D strips.

    Args:
        dims: input dimension D.
        n_true_components: number M of true components; also the number of classes (labels).
        sparsity: probability that each non-dominant component is absent from a sample (1: exactly one).
        noise: standard deviation sigma of the isotropic Gaussian noise.
        n_samples: training samples (validation is split off them); ``n_test``: test samples.
        **kwargs: the common options of :class:`InMemoryDataModule` (``seed`` also fixes the data).
    """

    name = "synthetic"

    def __init__(
        self,
        dims: int = 64,
        n_true_components: int = 8,
        sparsity: float = 0.9,
        noise: float = 0.1,
        n_samples: int = 10000,
        n_test: int = 2000,
        **kwargs,
    ):
        super().__init__(**kwargs)
        check(isinstance(dims, int) and dims >= 1, "data.dims", "an integer >= 1", dims)
        check(n_true_components >= 2, "data.n_true_components", ">= 2", n_true_components)
        check(0.0 <= sparsity <= 1.0, "data.sparsity", "in [0, 1]", sparsity)
        check(noise >= 0, "data.noise", ">= 0", noise)
        check(
            n_samples >= 2 * n_true_components,
            "data.n_samples",
            f">= 2 x n_true_components ({2 * n_true_components})",
            n_samples,
        )
        check(n_test >= n_true_components, "data.n_test", f">= n_true_components ({n_true_components})", n_test)
        self.n_true_components, self.sparsity, self.noise = n_true_components, sparsity, noise
        self.n_samples, self.n_test = n_samples, n_test
        side = math.isqrt(dims)
        self.image_shape = (side, side) if side * side == dims else (1, dims)
        self.true_components = torch.from_numpy(true_components(dims, n_true_components, self.seed))

    def load(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        c = self.true_components.numpy()
        rng = np.random.default_rng([self.seed, 1])
        return {
            "train": sample_mixture(c, self.n_samples, self.sparsity, self.noise, rng),
            "test": sample_mixture(c, self.n_test, self.sparsity, self.noise, rng),
        }
