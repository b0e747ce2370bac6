"""The in-memory loader (order, sharding, chunking, ensembles, resume) and the DataModule base (splits,
normalisation fitted on train only, finiteness, batch-size checks)."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from implicit_em.data.memory import (
    InMemoryDataModule,
    InMemoryLoader,
    epoch_permutation,
    fit_normalization,
    stratified_split,
)
from implicit_em.errors import DataError


def make_loader(n=100, b=10, seeds=(0,), epoch=0, spc=1, rank=0, world=1):
    x = torch.arange(n, dtype=torch.float32)[:, None]  # each sample holds its own index
    return InMemoryLoader(x, b, list(seeds), epoch_fn=lambda: epoch, steps_per_call=spc, rank=rank, world_size=world)


def batches(loader) -> list[torch.Tensor]:
    """Every micro-batch of one epoch, as the indices of its samples."""
    return [mb[..., 0].long() for chunk in loader for mb in chunk]


def test_one_permutation_per_epoch_fixed_by_seed_and_epoch():
    got = torch.cat(batches(make_loader(n=100, b=10, seeds=(3,), epoch=2)))
    assert torch.equal(got, epoch_permutation(100, 3, 2))
    assert sorted(got.tolist()) == list(range(100))  # every sample once
    torch.manual_seed(123)  # the order ignores the global RNG
    assert torch.equal(torch.cat(batches(make_loader(seeds=(3,), epoch=2))), got)
    assert not torch.equal(torch.cat(batches(make_loader(seeds=(3,), epoch=3))), got)
    assert not torch.equal(torch.cat(batches(make_loader(seeds=(4,), epoch=2))), got)


@pytest.mark.parametrize("world", [2, 4])
def test_rank_shards_concatenate_to_the_single_process_batch(world):
    single = batches(make_loader(n=100, b=20, seeds=(1,)))
    shards = [batches(make_loader(n=100, b=20, seeds=(1,), rank=r, world=world)) for r in range(world)]
    assert all(len(s) == len(single) for s in shards)
    for i, full in enumerate(single):
        assert all(len(s[i]) == 20 // world for s in shards)
        assert torch.equal(torch.cat([s[i] for s in shards]), full)


def test_steps_per_call_does_not_change_the_sequence():
    reference = batches(make_loader(n=95, b=10, spc=1))
    for spc in (2, 3, 8, 20):
        loader = make_loader(n=95, b=10, spc=spc)
        assert len(loader) == -(-len(reference) // spc)
        assert all(len(chunk) <= spc for chunk in loader)
        got = batches(loader)
        assert len(got) == len(reference) and all(torch.equal(a, b) for a, b in zip(got, reference))


def test_each_ensemble_member_has_its_own_order():
    seeds = (5, 6, 7)
    got = batches(make_loader(n=60, b=12, seeds=seeds, spc=2))
    assert got[0].shape == (3, 12)
    for s, seed in enumerate(seeds):
        alone = batches(make_loader(n=60, b=12, seeds=(seed,)))
        assert all(torch.equal(g[s], a) for g, a in zip(got, alone))
    assert not torch.equal(got[0][0], got[0][1])


@pytest.mark.parametrize(
    "n, b, world, sizes",
    [
        (41, 20, 1, [20, 20]),  # a last batch of 1 is dropped (no variance)
        (42, 20, 1, [20, 20, 2]),  # a last batch of 2 is kept
        (42, 20, 2, [10, 10]),  # 2 over 2 ranks is 1 per rank: dropped
        (44, 20, 2, [10, 10, 2]),  # 4 over 2 ranks: kept, 2 per rank
        (40, 20, 1, [20, 20]),
    ],
)
def test_last_batch_smaller_than_two_per_rank_is_dropped(n, b, world, sizes):
    got = batches(make_loader(n=n, b=b, world=world))
    assert [len(g) for g in got] == sizes


def test_state_dict_resumes_mid_epoch():
    full = list(make_loader(n=100, b=10, spc=2, epoch=1))
    first = make_loader(n=100, b=10, spc=2, epoch=1)
    it = iter(first)
    seen = [next(it), next(it)]
    state = first.state_dict()
    assert state == {"epoch": 1, "chunk": 2}
    resumed = make_loader(n=100, b=10, spc=2, epoch=1)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(seen) + len(rest) == len(full)
    for a, b in zip(seen + rest, full):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    # the state applies once: the next epoch starts at its beginning
    assert len(list(resumed)) == len(full)


def test_state_from_another_epoch_starts_the_epoch_over():
    loader = make_loader(n=100, b=10, spc=2, epoch=3)
    loader.load_state_dict({"epoch": 2, "chunk": 4})
    assert len(list(loader)) == 5


class Toy(InMemoryDataModule):
    """Known arrays with an explicit test split: 200 train samples of 3 features, 5 classes."""

    image_shape = (3,)
    name = "toy"

    def __init__(self, train_x=None, test_x=None, **kwargs):
        super().__init__(**kwargs)
        rng = np.random.default_rng(0)
        if train_x is None:
            train_x = rng.normal([1.0, 5.0, -2.0], [0.5, 2.0, 3.0], size=(200, 3)).astype(np.float32)
            train_x[:, 2] += 10 * train_x[:, 0]  # correlated features, for ZCA
        self.raw = {
            "train": (train_x, np.arange(200) % 5),
            "test": (
                rng.normal(4.0, 1.0, size=(50, 3)).astype(np.float32) if test_x is None else test_x,
                np.arange(50) % 5,
            ),
        }

    def load(self):
        return {k: (x.copy(), y.copy()) for k, (x, y) in self.raw.items()}


def raw_train_split(dm):
    x, y = dm.raw["train"]
    x_train, _, _, _ = stratified_split(x, y, dm.val_fraction, dm.seed, "data.val_fraction")
    return x_train


def test_splits_are_stratified_and_reproducible():
    dm = Toy(val_fraction=0.2, batch_size=8, seed=3)
    dm.setup()
    assert {k: len(v.x) for k, v in dm.splits.items()} == {"train": 160, "val": 40, "test": 50}
    assert torch.bincount(dm.splits["val"].y).tolist() == [8] * 5
    again = Toy(val_fraction=0.2, batch_size=8, seed=3)
    again.setup()
    assert torch.equal(again.splits["val"].x, dm.splits["val"].x)
    other = Toy(val_fraction=0.2, batch_size=8, seed=4)
    other.setup()
    assert not torch.equal(other.splits["val"].x, dm.splits["val"].x)


def test_no_normalization_leaves_values_alone():
    dm = Toy(batch_size=8)
    dm.setup()
    assert torch.equal(dm.splits["test"].x, torch.from_numpy(dm.raw["test"][0]))


def test_standardize_is_fitted_on_the_training_split_only():
    dm = Toy(batch_size=8, normalization="standardize")
    dm.setup()
    train = dm.splits["train"].x.double()
    assert torch.allclose(train.mean(0), torch.zeros(3, dtype=torch.double), atol=1e-5)
    assert torch.allclose(train.std(0, unbiased=False), torch.ones(3, dtype=torch.double), atol=1e-5)
    x_train = raw_train_split(dm).astype(np.float64)
    expected = (dm.raw["test"][0] - x_train.mean(0)) / x_train.std(0)
    np.testing.assert_allclose(dm.splits["test"].x.numpy(), expected, rtol=1e-5, atol=1e-5)
    assert dm.splits["test"].x.mean(0).abs().min() > 0.5  # test data (mean 4) is not re-centred on itself


def test_zca_is_fitted_on_the_training_split_only():
    dm = Toy(batch_size=8, normalization="zca")
    dm.setup()
    x_train = raw_train_split(dm).astype(np.float64)
    transform = fit_normalization(x_train, "zca")
    np.testing.assert_allclose(
        dm.splits["test"].x.numpy(), transform(dm.raw["test"][0].astype(np.float64)), rtol=1e-4, atol=1e-4
    )
    white = dm.splits["train"].x.double()
    assert torch.allclose(white.mean(0), torch.zeros(3, dtype=torch.double), atol=1e-5)
    # regularised ZCA: the training covariance V diag(l) V^T becomes V diag(l / (l + eps)) V^T, eps = 0.1 mean(l)
    evals, evecs = np.linalg.eigh(np.cov(x_train, rowvar=False))
    expected = (evecs * (evals / (evals + 0.1 * evals.mean()))) @ evecs.T
    np.testing.assert_allclose(np.cov(white.numpy(), rowvar=False), expected, atol=1e-4)
    assert abs(np.corrcoef(x_train, rowvar=False)[0, 2]) > 0.5 and abs(expected[0, 2]) < 0.1


@pytest.mark.parametrize("split, index", [("train", 7), ("train", 150), ("test", 3)])
def test_non_finite_values_are_rejected_naming_the_first_bad_sample(split, index):
    x = Toy().raw[split][0].copy()
    x[index, 1] = np.nan
    x[index + 5, 0] = np.inf
    dm = Toy(batch_size=8, **{f"{split}_x": x})
    with pytest.raises(DataError, match=f"toy {split} data: sample {index} has non-finite"):
        dm.setup()


def test_batch_larger_than_the_training_split_is_an_error():
    with pytest.raises(DataError, match="data.batch_size 1000 exceeds the 180 training samples"):
        Toy(batch_size=1000).setup()


def test_global_batch_must_divide_across_devices():
    dm = Toy(batch_size=10)
    dm.setup()
    dm.trainer = SimpleNamespace(global_rank=0, world_size=3)
    with pytest.raises(DataError, match="data.batch_size 10 must divide evenly across 3 devices"):
        dm.train_dataloader()


def test_train_dataloader_serves_the_global_batch_sharded():
    dm = Toy(batch_size=12, steps_per_call=4)
    dm.setup()
    dm.trainer = None
    single = [mb for chunk in dm.train_dataloader() for mb in chunk]
    assert single[0].shape == (12, 3) and len(single) == 180 // 12
    x = dm.splits["train"].x
    order = epoch_permutation(len(x), dm.seed, 0)
    assert torch.equal(torch.cat(single), x[order[: len(single) * 12]])
