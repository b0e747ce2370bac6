"""scikit-learn's embedded 8x8 digits (1,797 images, ten classes): the default data, no download."""

from __future__ import annotations

import numpy as np

from implicit_em.data.memory import InMemoryDataModule


class DigitsDataModule(InMemoryDataModule):
    """``sklearn.datasets.load_digits`` with pixels scaled to [0, 1] (from 0..16) and seeded stratified
    train/val/test splits (``test_fraction`` then ``val_fraction`` of the rest). ``root`` is unused."""

    image_shape = (8, 8)
    name = "digits"

    def load(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        return {"train": ((digits.data / 16.0).astype(np.float32), digits.target.astype(np.int64))}
