"""scikit-learn's embedded digits: sizes, pixel range, and the seeded stratified splits."""

import numpy as np
import torch

from implicit_em.data import DigitsDataModule


def test_sizes_pixels_labels_and_splits():
    dm = DigitsDataModule(batch_size=64, seed=0)
    assert dm.dims == 64 and dm.image_shape == (8, 8)
    x, y = dm.load()["train"]
    assert x.shape == (1797, 64) and x.dtype == np.float32 and x.min() == 0.0 and x.max() == 1.0
    assert set(np.unique(y)) == set(range(10))
    dm.setup()
    sizes = {k: len(v.x) for k, v in dm.splits.items()}
    assert sum(sizes.values()) == 1797 and sizes["test"] == int(np.ceil(0.2 * 1797))
    assert sizes["val"] == int(np.ceil(0.1 * (1797 - sizes["test"])))
    for split in dm.splits.values():  # stratified: every class in every split, in proportion
        counts = torch.bincount(split.y, minlength=10).double()
        assert counts.min() > 0 and (counts / counts.sum() - 0.1).abs().max() < 0.02
    # the splits are disjoint and together are the whole dataset
    all_rows = torch.cat([s.x for s in dm.splits.values()])
    assert torch.unique(all_rows, dim=0).shape[0] == np.unique(x, axis=0).shape[0]


def test_the_seed_fixes_the_splits():
    a, b, c = DigitsDataModule(seed=1), DigitsDataModule(seed=1), DigitsDataModule(seed=2)
    for dm in (a, b, c):
        dm.setup()
    assert torch.equal(a.splits["test"].x, b.splits["test"].x)
    assert not torch.equal(a.splits["test"].x, c.splits["test"].x)


def test_each_load_is_its_own_copy_of_the_pixels_read_once():
    """The file is read once per process; a module that changes its arrays in place changes no later load."""
    first = DigitsDataModule().load()["train"]
    first[0][:] = -1.0
    first[1][:] = 99
    x, y = DigitsDataModule().load()["train"]
    assert x.min() == 0.0 and x.max() == 1.0 and set(np.unique(y)) == set(range(10))
