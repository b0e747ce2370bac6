"""The in-memory loader (order, sharding, chunking, resume), the normalisations (fitted on the training split
only, saved with the model) and the DataModule base (splits, finiteness, batch-size checks)."""

import numpy as np
import pytest
import torch

from implicit_em.data.memory import (
    InMemoryDataModule,
    InMemoryLoader,
    batches_per_epoch,
    epoch_permutation,
    epoch_sizes,
    rows_of_steps,
    steps_for_rows,
    stratified_split,
)
from implicit_em.data.normalization import NORMALIZATIONS, Normalization
from implicit_em.errors import ConfigError, DataError


def make_loader(n=100, b=10, seed=0, epoch=0, chunk=1, rank=0, world=1, first_step=0, drop_last=False, max_steps=-1):
    x = torch.arange(n, dtype=torch.float32)[:, None]  # each sample holds its own index
    loader = InMemoryLoader(
        x, b, seed, step_fn=lambda: first_step, chunk=chunk, max_steps=max_steps, rank=rank, world_size=world,
        drop_last=drop_last,
    )  # fmt: skip
    loader.sampler.set_epoch(epoch)  # what Lightning calls at every epoch start
    return loader


def batches(loader) -> list[torch.Tensor]:
    """Every micro-batch of one epoch, as the indices of its samples."""
    return [mb[..., 0].long() for chunk in loader for mb in chunk]


def test_one_permutation_per_epoch_fixed_by_seed_and_epoch():
    got = torch.cat(batches(make_loader(n=100, b=10, seed=3, epoch=2)))
    assert torch.equal(got, epoch_permutation(100, 3, 2))
    assert sorted(got.tolist()) == list(range(100))  # every sample once
    torch.manual_seed(123)  # the order ignores the global RNG
    assert torch.equal(torch.cat(batches(make_loader(seed=3, epoch=2))), got)
    assert not torch.equal(torch.cat(batches(make_loader(seed=3, epoch=3))), got)
    assert not torch.equal(torch.cat(batches(make_loader(seed=4, epoch=2))), got)


@pytest.mark.parametrize("n, b", [(100, 10), (95, 10), (1293, 128)])
def test_every_sample_once_per_epoch_the_last_batch_partial(n, b):
    got = batches(make_loader(n=n, b=b))
    assert sorted(torch.cat(got).tolist()) == list(range(n))
    assert [len(g) for g in got] == [b] * (n // b) + ([n % b] if n % b else [])


@pytest.mark.parametrize("chunk", [2, 3, 8, 20])
@pytest.mark.parametrize("first_step", [0, 7, 13])
def test_chunks_do_not_change_the_sequence(chunk, first_step):
    reference = batches(make_loader(n=95, b=10))
    loader = make_loader(n=95, b=10, chunk=chunk, first_step=first_step)
    chunks = list(loader)
    assert all(1 <= len(c) <= chunk for c in chunks) and max(len(c) for c in chunks) > 1
    # chunks end on the multiples of `chunk` of the global step
    step = first_step
    for c in chunks[:-1]:
        step += len(c)
        assert step % chunk == 0
    got = batches(loader)
    assert len(got) == len(reference) and all(torch.equal(a, b) for a, b in zip(got, reference))


def test_a_chunk_ends_on_max_steps():
    chunks = list(make_loader(n=95, b=10, chunk=8, first_step=3, max_steps=6))
    assert [len(c) for c in chunks] == [3, 2, 5]  # steps 4-6 (max_steps) | 7-8 | 9-13 (the epoch's end)


def test_a_chunked_loader_has_no_length_a_plain_one_its_steps():
    assert len(make_loader(n=95, b=10)) == 10
    with pytest.raises(TypeError, match="no fixed length"):
        len(make_loader(n=95, b=10, chunk=4))


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("n, b", [(100, 20), (95, 20), (86, 12)])
def test_rank_shards_concatenate_to_the_global_batch_also_the_uneven_last(world, n, b):
    single = batches(make_loader(n=n, b=b, seed=1))
    shards = [batches(make_loader(n=n, b=b, seed=1, rank=r, world=world, chunk=1)) for r in range(world)]
    assert all(len(s) == len(single) for s in shards)
    for i, full in enumerate(single):
        sizes = [len(s[i]) for s in shards]
        assert max(sizes) - min(sizes) <= 1, sizes  # as even as it gets
        assert torch.equal(torch.cat([s[i] for s in shards]), full)
    assert len(single[-1]) == (n % b or b)  # the last, partial batch is kept and shared out


@pytest.mark.parametrize(
    "n, b, drop_last, sizes",
    [
        (41, 20, False, [20, 20]),  # a last batch of 1 is dropped (no variance)
        (42, 20, False, [20, 20, 2]),  # a last batch of 2 is kept
        (42, 20, True, [20, 20]),  # unless drop_last
        (40, 20, False, [20, 20]),
    ],
)
@pytest.mark.parametrize("world", [1, 2, 4])
def test_the_same_global_batches_for_any_number_of_processes(n, b, drop_last, sizes, world):
    assert batches_per_epoch(n, b, drop_last) == len(sizes)
    shards = [batches(make_loader(n=n, b=b, world=world, rank=r, drop_last=drop_last)) for r in range(world)]
    assert [sum(len(s[i]) for s in shards) for i in range(len(sizes))] == sizes
    assert all(len(s) == len(sizes) for s in shards)


@pytest.mark.parametrize("n, b, drop_last", [(42, 20, False), (42, 20, True), (41, 20, False), (40, 20, False)])
def test_rows_of_steps_count_the_batches_the_loader_serves_and_steps_for_rows_inverts_them(n, b, drop_last):
    served = [len(i) for epoch in range(3) for i in batches(make_loader(n=n, b=b, epoch=epoch, drop_last=drop_last))]
    assert epoch_sizes(n, b, drop_last) == served[: len(served) // 3]
    for steps in range(len(served) + 1):
        assert rows_of_steps(steps, n, b, drop_last) == sum(served[:steps])
    for rows in range(1, sum(served) + 1):
        steps = steps_for_rows(rows, n, b, drop_last)
        assert sum(served[:steps]) >= rows > sum(served[: steps - 1])
    assert steps_for_rows(0, n, b, drop_last) == 0


def test_state_dict_resumes_mid_epoch_at_the_step_trained_not_the_chunk_fetched():
    full = list(make_loader(n=100, b=10, chunk=2, epoch=1))
    steps = [11]  # the global step, as the Trainer counts it: 11 steps before this epoch
    first = make_loader(n=100, b=10, chunk=2, epoch=1)
    first.step_fn = lambda: steps[0]
    it = iter(first)
    seen = [next(it), next(it)]
    steps[0] += len(seen[0])  # trained on the first chunk only; the second is fetched ahead, as Lightning does
    state = first.state_dict()
    assert state == {"epoch": 1, "batch": 1}  # the first chunk was 1 step (11 -> 12: chunks end on even steps)
    resumed = make_loader(n=100, b=10, chunk=2, epoch=1, first_step=steps[0])
    resumed.load_state_dict(state)
    rest = list(resumed)
    got = [mb for chunk in seen[:1] + rest for mb in chunk]
    assert len(got) == 10 and all(torch.equal(a, b) for a, b in zip(got, [mb for c in full for mb in c]))
    # the state applies once: the next epoch starts at its beginning
    assert sum(len(c) for c in resumed) == 10


def test_a_loaded_position_is_where_the_next_iteration_begins():
    """A resumed fit fetches its first batch before Lightning sets the epoch: the checkpoint's position decides;
    a position at the end of an epoch begins the next one."""
    loader = make_loader(n=100, b=10, chunk=2, epoch=0)
    loader.load_state_dict({"epoch": 2, "batch": 4})
    assert len(list(loader)) == 3 and loader.epoch == 2  # batches 4-9 of epoch 2, in chunks of 2
    loader.load_state_dict({"epoch": 2, "batch": 10})
    assert len(list(loader)) == 5 and loader.epoch == 3


# -- normalisations -----------------------------------------------------------------------------------------


def _train_x(n=300, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g) * torch.tensor([0.5, 2.0, 3.0, 1.0]) + torch.tensor([1.0, 5.0, -2.0, 0.0])
    x[:, 2] += 6 * x[:, 0]  # correlated features, for ZCA
    return x


def test_none_is_the_identity():
    x = _train_x()
    assert torch.equal(Normalization.fit(x, "none")(x), x)


def test_center_and_center_scale():
    x, other = _train_x(), _train_x(seed=1)
    mean = x.double().mean(0)
    centred = Normalization.fit(x, "center")
    assert torch.allclose(centred(other).double(), other.double() - mean, atol=1e-5)
    scaled = Normalization.fit(x, "center+scale")
    out = scaled(x).double()
    assert out.norm(dim=1).mean() == pytest.approx(1.0, rel=1e-5)  # rows of norm ~1 on average
    s = (x.double() - mean).norm(dim=1).mean()
    assert torch.allclose(scaled(other).double(), (other.double() - mean) / s, atol=1e-5)


def test_standardize_per_feature():
    x = _train_x()
    x[:, 3] = 7.0  # a constant feature is centred, not divided by 0
    out = Normalization.fit(x, "standardize")(x).double()
    assert torch.allclose(out.mean(0), torch.zeros(4, dtype=torch.double), atol=1e-5)
    assert torch.allclose(out[:, :3].std(0, unbiased=False), torch.ones(3, dtype=torch.double), atol=1e-5)
    assert torch.equal(out[:, 3], torch.zeros(len(x), dtype=torch.double))


def test_zca_whitens_with_the_regularised_inverse_square_root():
    x = _train_x().double()
    out = Normalization.fit(x, "zca")(x).double()
    c = np.cov(x.numpy(), rowvar=False)
    evals, evecs = np.linalg.eigh(c)
    # regularised ZCA: the covariance V diag(l) V^T becomes V diag(l / (l + eps)) V^T, eps = 0.1 mean(l)
    expected = (evecs * (evals / (evals + 0.1 * evals.mean()))) @ evecs.T
    np.testing.assert_allclose(np.cov(out.numpy(), rowvar=False), expected, atol=1e-4)
    assert abs(np.corrcoef(x.numpy(), rowvar=False)[0, 2]) > 0.5 and abs(expected[0, 2]) < 0.1


@pytest.mark.parametrize("kind", NORMALIZATIONS)
def test_state_dict_round_trip(kind):
    x, other = _train_x(), _train_x(seed=2)
    fitted = Normalization.fit(x, kind)
    state = fitted.state_dict()
    assert all(v is None or isinstance(v, torch.Tensor) for v in state.values())  # loads with weights_only=True
    assert torch.equal(Normalization.from_state_dict(state)(other), fitted(other))


def test_unknown_normalization_is_a_config_error():
    with pytest.raises(ConfigError, match="data.normalization"):
        Normalization.fit(_train_x(), "whiten")


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


@pytest.mark.parametrize("kind", ["center", "center+scale", "zca"])
def test_every_normalization_is_fitted_on_the_training_split_only(kind):
    dm = Toy(batch_size=8, normalization=kind)
    dm.setup()
    transform = Normalization.fit(torch.from_numpy(raw_train_split(dm)), kind)
    expected = transform(torch.from_numpy(dm.raw["test"][0]))
    np.testing.assert_allclose(dm.splits["test"].x.numpy(), expected.numpy(), atol=1e-5)
    assert torch.allclose(dm.splits["train"].x.double().mean(0), torch.zeros(3, dtype=torch.double), atol=1e-5)
    assert dm.splits["test"].x.double().mean(0).abs().max() > 0.1  # the test split is not re-centred on itself


def test_the_datamodule_saves_and_restores_its_normalization():
    dm = Toy(batch_size=8, normalization="zca")
    dm.setup()
    again = Toy(batch_size=8)  # another setting: the checkpoint's normalisation wins
    again.load_state_dict(dm.state_dict())
    x = torch.from_numpy(dm.raw["test"][0])
    assert torch.equal(again.normalization(x), dm.normalization(x))


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


def test_train_dataloader_serves_the_global_batch_sharded():
    dm = Toy(batch_size=12, steps_per_call=4, shuffle_seed=5)
    dm.setup()
    dm.trainer = None
    loader = dm.train_dataloader()
    chunks = list(loader)
    assert max(len(c) for c in chunks) == 4
    single = [mb for chunk in chunks for mb in chunk]
    assert single[0].shape == (12, 3) and len(single) == 180 // 12
    x = dm.splits["train"].x
    order = epoch_permutation(len(x), 5, 0)  # the data order follows shuffle_seed, the splits data.seed
    assert torch.equal(torch.cat(single), x[order[: len(single) * 12]])
