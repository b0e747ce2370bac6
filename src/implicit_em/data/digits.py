"""scikit-learn's embedded 8x8 digits (1,797 images, ten classes): the default data, no download."""

from __future__ import annotations

import functools

import numpy as np

from implicit_em.data.memory import InMemoryDataModule


class DigitsDataModule(InMemoryDataModule):
    """``sklearn.datasets.load_digits`` with pixels scaled to [0, 1] (from 0..16) and seeded stratified
    train/val/test splits (``test_fraction`` then ``val_fraction`` of the rest). ``root`` is unused."""

    image_shape = (8, 8)
    name = "digits"

    def load(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        x, y = _digits()
        return {"train": (x.copy(), y.copy())}


@functools.cache
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """The pixels in [0, 1] and the labels, read once per process (the experiments fit many rows in one)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.data / 16.0).astype(np.float32), digits.target.astype(np.int64)
