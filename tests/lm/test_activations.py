"""The activations DataModule: splits by document, streaming order, resume, DDP parts, normalisation, errors."""

from __future__ import annotations

import json
import weakref

import numpy as np
import pytest
import torch

from implicit_em.errors import ConfigError, DataError
from implicit_em.lm.activations import (
    ActivationLoader,
    ActivationsDataModule,
    RowRuns,
    split_by_document,
    split_by_rows,
)

D = 6


def write_shards(
    root, sizes=(700, 500, 900), docs: bool = True, labels: bool = True, seed: int = 0, index: bool = True
) -> np.ndarray:
    """float32 shards of 4 classes (label = document id mod 4) whose column 0 is the global row index (unless
    not ``index``); documents are runs of 1..40 rows. Returns the doc ids."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    n = sum(sizes)
    lengths = rng.integers(1, 40, size=n)
    doc_ids = np.repeat(np.arange(n), lengths)[:n]
    centres = rng.normal(size=(4, D)) * 3
    at = 0
    for i, size in enumerate(sizes):
        x = (centres[doc_ids[at : at + size] % 4] + rng.normal(size=(size, D))).astype(np.float32)
        if index:
            x[:, 0] = np.arange(at, at + size)
        np.save(root / f"shard-{i:05d}.npy", x)
        at += size
    if docs:
        np.save(root / "doc_ids.npy", doc_ids)
    if labels:
        np.save(root / "labels.npy", doc_ids % 4)
        (root / "label_names.json").write_text(json.dumps(["a", "b", "c", "d"]))
    return doc_ids


def module(root, **kwargs) -> ActivationsDataModule:
    args = dict(root=str(root), batch_size=64, block_rows=50, buffer_rows=200, normalization="none")
    dm = ActivationsDataModule(**{**args, **kwargs})
    dm.setup()
    return dm


def loader(dm: ActivationsDataModule, epoch: int = 0, **kwargs) -> ActivationLoader:
    args = dict(
        shards=dm.shards,
        rows=dm.rows["train"],
        batch_size=dm.batch_size,
        seed=dm.seed,
        block_rows=dm.block_rows,
        buffer_rows=dm.buffer_rows,
    )
    made = ActivationLoader(**{**args, **kwargs})
    made.sampler.set_epoch(epoch)  # what Lightning calls at every epoch start
    return made


def ids(chunks) -> list[np.ndarray]:
    """The row indices (column 0) of every micro-batch."""
    return [b[:, 0].long().numpy() for chunk in chunks for b in chunk]


def train_rows(dm) -> np.ndarray:
    r = dm.rows["train"]
    return np.concatenate([np.arange(lo, hi) for lo, hi in r.ranges(0, r.n)])


@pytest.fixture
def root(tmp_path):
    write_shards(tmp_path / "acts")
    return tmp_path / "acts"


# -- splits --------------------------------------------------------------------------------------------------
def test_split_by_document_puts_every_document_in_one_split(root):
    doc_ids = np.load(root / "doc_ids.npy")
    dm = module(root)
    rows = {name: np.concatenate([np.arange(lo, hi) for lo, hi in r.ranges(0, r.n)]) for name, r in dm.rows.items()}
    every = np.sort(np.concatenate(list(rows.values())))
    assert np.array_equal(every, np.arange(len(doc_ids)))  # a partition of the rows
    docs = {name: set(doc_ids[r].tolist()) for name, r in rows.items()}
    assert not docs["train"] & docs["val"] and not docs["train"] & docs["test"] and not docs["val"] & docs["test"]
    n = len(doc_ids)
    assert abs(len(rows["test"]) / n - 0.2) < 0.03 and abs(len(rows["val"]) / n - 0.1) < 0.03
    # the evaluation samples carry their documents as groups when the Split has them, and their labels
    for name, split in dm.splits.items():
        row = split.x[:, 0].long().numpy()
        assert set(doc_ids[row].tolist()) <= docs[name]
        assert np.array_equal(split.y.numpy(), doc_ids[row] % 4)
        if hasattr(split, "groups"):
            assert np.array_equal(split.groups.numpy(), doc_ids[row])


def test_documents_need_not_be_contiguous():
    starts, docs = np.array([0, 10, 20, 30, 40, 50]), np.array([7, 8, 7, 9, 8, 5])
    out = split_by_document(starts, docs, 60, 0.2, 0.2, seed=1, where="x")
    owner = {}
    for name, runs in out.items():
        for lo, hi in runs:
            for s in range(lo, hi, 10):
                assert owner.setdefault(int(docs[s // 10]), name) == name
    assert sum(int((r[:, 1] - r[:, 0]).sum()) for r in out.values()) == 60


def test_too_few_documents_is_an_error():
    with pytest.raises(DataError, match="names 2 document.*at least 3.*remove doc_ids.npy"):
        split_by_document(np.array([0, 5]), np.array([0, 1]), 10, 0.1, 0.2, 0, "doc_ids.npy")


def test_without_doc_ids_rows_are_held_out_in_runs(tmp_path):
    write_shards(tmp_path / "a", docs=False)
    dm = module(tmp_path / "a")
    assert all(s.groups is None for s in dm.splits.values() if hasattr(s, "groups"))
    out = split_by_rows(10_000, 100, 0.1, 0.2, 0, "x")
    covered = np.zeros(10_000, int)
    for runs in out.values():
        for lo, hi in runs:
            covered[lo:hi] += 1
            assert (hi - lo) % 100 == 0
    assert (covered == 1).all()
    assert split_by_rows(10_000, 100, 0.1, 0.2, 0, "x")["test"].tolist() == out["test"].tolist()
    assert split_by_rows(10_000, 100, 0.1, 0.2, 1, "x")["test"].tolist() != out["test"].tolist()


def test_without_labels_y_is_minus_one(tmp_path):
    write_shards(tmp_path / "a", labels=False)
    dm = module(tmp_path / "a")
    assert all((s.y == -1).all() for s in dm.splits.values())


def test_evaluation_samples_are_bounded_random_runs(root):
    dm = module(root, eval_train_rows=300, eval_val_rows=100, eval_test_rows=130)
    assert [len(dm.splits[s].x) for s in ("train", "val", "test")] == [300, 100, 130]
    row = dm.splits["train"].x[:, 0].long().numpy()
    assert len(set(row.tolist())) == 300 and set(row.tolist()) <= set(train_rows(dm).tolist())
    assert row.max() - row.min() > 1000  # drawn from all over the data, not one place
    again = module(root, eval_train_rows=300, eval_val_rows=100, eval_test_rows=130)
    assert torch.equal(again.splits["train"].x, dm.splits["train"].x)


def test_row_runs_sample_and_map_rows():
    r = RowRuns(np.array([[0, 10], [20, 25], [30, 100]]))
    assert r.n == 85 and r.ranges(8, 17) == [(8, 10), (20, 25), (30, 32)]
    ranges = r.sample(40, np.random.default_rng(0), run=8)
    got = [i for lo, hi in ranges for i in range(lo, hi)]
    assert len(got) == 40 and len(set(got)) == 40 and all(not 10 <= i < 20 and not 25 <= i < 30 for i in got)


# -- the order of an epoch -----------------------------------------------------------------------------------
def test_an_epoch_serves_every_training_row_once_mixing_shards(root):
    dm = module(root)
    batches = ids(loader(dm))
    assert np.array_equal(np.sort(np.concatenate(batches)), train_rows(dm))
    assert all(len(b) == 64 for b in batches[:-1])
    shard_of_first = np.searchsorted([700, 1200], batches[0], side="right")
    assert len(set(shard_of_first.tolist())) == 3  # one batch holds rows of every shard


def test_the_order_is_fixed_by_seed_and_epoch(root):
    dm = module(root)
    first = np.concatenate(ids(loader(dm, epoch=0)))
    assert np.array_equal(first, np.concatenate(ids(loader(dm, epoch=0))))
    assert np.array_equal(first, np.concatenate(ids(loader(dm, epoch=0, prefetch=False))))
    assert not np.array_equal(first, np.concatenate(ids(loader(dm, epoch=1))))
    assert not np.array_equal(first, np.concatenate(ids(loader(dm, epoch=0, seed=5))))


def test_chunks_group_the_same_batches(root):
    dm = module(root)
    one, chunked = loader(dm), loader(dm, chunk=8)
    with pytest.raises(TypeError):
        len(chunked)
    assert all(len(c) <= 8 for c in chunked)
    assert all(np.array_equal(a, b) for a, b in zip(ids(one), ids(chunked), strict=True))
    # chunks end on multiples of c counted from the global step the epoch starts at, and on max_steps
    lengths = [len(c) for c in loader(dm, chunk=8, step_fn=lambda: 5, max_steps=20)]
    assert lengths[:3] == [3, 8, 4] and sum(lengths) == len(one)


@pytest.mark.parametrize("steps", [1, 3])
def test_resume_mid_epoch_serves_exactly_the_remaining_batches(root, steps):
    dm = module(root)
    full = ids(loader(dm, chunk=steps))
    first = loader(dm, chunk=steps)
    it, taken = iter(first), []
    for _ in range(4):
        taken += ids([next(it)])
    state = first.state_dict()
    assert state == {"epoch": 0, "batch": 4 * steps}
    resumed = loader(dm, chunk=steps, step_fn=lambda: 4 * steps)
    resumed.load_state_dict(state)
    rest = ids(resumed)
    assert all(np.array_equal(a, b) for a, b in zip(taken + rest, full, strict=True))
    # a loaded position is where the next iteration begins, whatever epoch was set before it (a resumed fit
    # fetches its first batch before Lightning sets the epoch); the iteration after it is a whole epoch
    other = loader(dm, epoch=1, chunk=steps, step_fn=lambda: 4 * steps)
    other.load_state_dict(state)
    assert all(np.array_equal(a, b) for a, b in zip(ids(other), rest, strict=True))
    other.set_epoch(1)
    assert sum(len(b) for b in ids(other)) == dm.rows["train"].n


def test_with_a_step_clock_the_state_counts_the_steps_taken_not_the_chunks_fetched(root):
    """Lightning fetches one chunk ahead of the step it runs: a checkpoint must name the batches trained on."""
    dm = module(root)
    steps = [5]  # the Trainer's global step when the epoch starts
    lo = loader(dm, chunk=2, step_fn=lambda: steps[0])
    it = iter(lo)
    ahead = next(it)
    for _ in range(3):  # train on one chunk while the next one is already fetched
        current, ahead = ahead, next(it)
        steps[0] += len(current)
    assert lo.state_dict() == {"epoch": 0, "batch": steps[0] - 5}
    resumed = loader(dm, chunk=2, step_fn=lambda: steps[0])
    resumed.load_state_dict(lo.state_dict())
    full = ids(loader(dm))
    assert all(np.array_equal(a, b) for a, b in zip(ids(resumed), full[steps[0] - 5 :], strict=True))


@pytest.mark.parametrize("world", [2, 3, 4])
def test_ranks_read_disjoint_parts_of_each_global_batch(root, world):
    dm = module(root)
    single = ids(loader(dm))
    parts = [ids(loader(dm, rank=r, world_size=world)) for r in range(world)]
    n = len(parts[0])
    assert all(len(p) == n for p in parts)
    for k in range(n):
        assert np.array_equal(np.concatenate([p[k] for p in parts]), single[k])
        assert max(len(p[k]) for p in parts) - min(len(p[k]) for p in parts) <= 1  # as Tensor.tensor_split


def test_a_rank_may_get_no_row_of_a_small_last_batch(root):
    dm = module(root)
    n = dm.rows["train"].n
    parts = [ids(loader(dm, batch_size=n - 2, buffer_rows=2048, rank=r, world_size=4)) for r in range(4)]
    assert [len(p[-1]) for p in parts] == [1, 1, 0, 0]  # the last batch has 2 rows
    assert np.array_equal(np.sort(np.concatenate([b for p in parts for b in p])), train_rows(dm))


def test_the_last_partial_batch_follows_the_in_memory_rules(root):
    dm = module(root)
    n = dm.rows["train"].n
    assert n % 64 >= 2  # the data above leaves a partial batch
    sizes = [len(b) for b in ids(loader(dm))]
    assert sum(sizes) == n and sizes[-1] == n % 64
    dropped = [len(b) for b in ids(loader(dm, drop_last=True))]
    assert dropped == [64] * (n // 64)


def test_the_buffer_must_hold_a_batch(root):
    dm = module(root)
    with pytest.raises(ConfigError, match="less than one batch"):
        loader(dm, buffer_rows=60, block_rows=50)


@pytest.mark.parametrize("prefetch", [False, True])
def test_at_most_two_windows_are_held_and_each_is_read_once(root, monkeypatch, prefetch):
    dm = module(root)
    alive, reads, peak = set(), [], [0]
    original = ActivationLoader.read_window

    def tracked(self, epoch, w, blocks):
        raw, perm = original(self, epoch, w, blocks)
        alive.add(w)
        weakref.finalize(raw, alive.discard, w)
        reads.append(w)
        return raw, perm

    monkeypatch.setattr(ActivationLoader, "read_window", tracked)
    lo = loader(dm, prefetch=prefetch)
    for _ in lo:
        peak[0] = max(peak[0], len(alive))
    n_windows = len(lo.windows(0))
    assert n_windows > 3 and sorted(reads) == list(range(n_windows)) and peak[0] <= 2


# -- normalisation -------------------------------------------------------------------------------------------
def test_center_and_scale_give_unit_mean_norm(root):
    dm = module(root, normalization="center+scale")
    x = dm.splits["train"].x.double()
    assert x.mean(0).abs().max() < 1e-5 and abs(x.norm(dim=1).mean() - 1) < 1e-5
    c = module(root, normalization="center")
    assert c.splits["train"].x.double().mean(0).abs().max() < 1e-4 and c.normalization.scale is None
    raw = module(root)
    assert raw.normalization.mean is None and torch.equal(raw.splits["test"].x, raw._read_sample("test"))


def test_the_training_batches_are_normalised_like_the_splits(root):
    dm = module(root, normalization="center+scale")
    batch = next(iter(dm.train_dataloader()))[0]
    rows = torch.from_numpy(dm.shards.read(0, dm.shards.n_rows))
    index = dm.normalization.scale[0]  # column 0 is the row index, from which the raw row is looked up
    index = (batch[:, 0] / index + dm.normalization.mean[0]).round().long()
    assert torch.allclose(batch, dm.normalization(rows[index]), atol=1e-5)


def test_normalisation_round_trips_through_a_checkpoint(root, tmp_path):
    dm = module(root, normalization="center+scale")
    path = tmp_path / "state.pt"
    torch.save(dm.state_dict(), path)
    other = module(root, normalization="center+scale", seed=3)  # another sample: another fit
    assert not torch.equal(other.normalization.mean, dm.normalization.mean)
    other.load_state_dict(torch.load(path))
    for k, v in dm.state_dict()["normalization"].items():
        assert (v is None and other.normalization.state_dict()[k] is None) or torch.equal(
            other.normalization.state_dict()[k], v
        )
    # the evaluation samples are normalised again with the restored transform
    assert torch.allclose(other.splits["test"].x, dm.normalization(other._read_sample("test")), atol=1e-6)
    assert torch.equal(other.device_split("test").x, other.splits["test"].x)


# -- settings and bad data -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,key",
    [
        ({"normalization": "whiten"}, "data.normalization"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "data.val_fraction"),
        ({"block_rows": 0}, "data.block_rows"),
        ({"buffer_rows": 10}, "data.buffer_rows"),
        ({"eval_test_rows": 1}, "data.eval_test_rows"),
    ],
)
def test_invalid_settings(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        ActivationsDataModule(root="x", **kwargs)


def test_no_root_is_a_config_error():
    with pytest.raises(ConfigError, match="pass --data.root DIR"):
        ActivationsDataModule().setup()


def test_labels_of_the_wrong_length(root):
    np.save(root / "labels.npy", np.zeros(10, np.int64))
    with pytest.raises(DataError, match=r"labels.npy: has 10 labels but the shards hold 2100 rows"):
        module(root)


def test_doc_ids_of_the_wrong_length(root):
    np.save(root / "doc_ids.npy", np.zeros(2101, np.int64))
    with pytest.raises(DataError, match=r"doc_ids.npy: has 2101 doc ids"):
        module(root)


def test_a_bad_label_names_file(root):
    (root / "label_names.json").write_text("[oops")
    with pytest.raises(DataError, match="label_names.json: not valid JSON"):
        module(root)


def test_non_finite_rows_are_named_by_shard_and_row(tmp_path):
    write_shards(tmp_path / "a", sizes=(100, 100), docs=False)
    x = np.load(tmp_path / "a" / "shard-00001.npy")
    x[:, 3] = np.nan  # every row: whichever the samples draw, the first one is named
    np.save(tmp_path / "a" / "shard-00001.npy", x)
    with pytest.raises(DataError, match=r"shard-00001.npy: row \d+ has non-finite values"):
        module(tmp_path / "a", batch_size=16, buffer_rows=64, block_rows=16)


def test_a_batch_larger_than_the_training_rows(root):
    with pytest.raises(DataError, match="lower --data.batch_size"):
        module(root, batch_size=4096, buffer_rows=4096)


def test_dims_come_from_the_headers_alone(root):
    assert ActivationsDataModule(root=str(root)).dims == D


# -- through scripts/train.py --------------------------------------------------------------------------------
def test_training_on_shards_end_to_end(train, tmp_path):
    root = tmp_path / "classes"
    write_shards(root, index=False)
    run = train(
        "--config", "configs/data/activations.yaml", "--data.root", str(root), "--data.batch_size", "128",
        "--data.block_rows", "64", "--data.buffer_rows", "256", "--model.n_components", "8",
        "--trainer.max_epochs", "2",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    m = run.metrics
    assert m["data"] == "activations" and m["probe_accuracy"] > 0.9
    assert 1400 < m["n_train"] + m["n_test"] < 2100  # small splits: their evaluation samples are whole
    ckpt = torch.load(m["checkpoint"], weights_only=False)
    norm = ckpt["ActivationsDataModule"]["normalization"]
    assert norm["mean"].shape == norm["scale"].shape == (D,) and (norm["scale"] > 0).all()


def test_a_truncated_shard_stops_train_py_with_one_line(train, root):
    data = (root / "shard-00001.npy").read_bytes()
    (root / "shard-00001.npy").write_bytes(data[:1000])
    run = train("--config", "configs/data/activations.yaml", "--data.root", str(root), "--trainer.max_epochs", "1")
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "shard-00001.npy: truncated" in lines[-1], run.stderr[-2000:]
    assert "Traceback" not in run.stderr


E2E = ["--config", "configs/data/activations.yaml", "--data.batch_size", "128", "--data.block_rows", "64",
       "--data.buffer_rows", "256", "--model.n_components", "8", "--seed_everything", "3"]  # fmt: skip


def _weights(run) -> dict[str, torch.Tensor]:
    state = torch.load(run.metrics["checkpoint"], weights_only=False)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("model.")}


# A 2-process DDP run on shards (each rank reads its part of every global batch) ends with the one-process
# weights: tests/core/test_distributed.py, whose two-node launch trains on write_shards' folder with E2E.


def test_a_run_stopped_mid_epoch_resumes_exactly(train, tmp_path):
    """Stopped by max_steps inside epoch 0 with a checkpoint there; resumed with --ckpt_path last, it ends with
    the weights of an uninterrupted run (the loader continues the epoch's order; normalisation comes back)."""
    root = tmp_path / "classes"
    write_shards(root, index=False)
    every = ["--checkpoint.every_n_epochs", "0", "--checkpoint.every_n_train_steps", "4"]
    whole = train(*E2E, "--data.root", root, "--trainer.max_epochs", "2", *every)
    assert whole.returncode == 0, whole.stderr[-2000:]
    part_root = ["--trainer.default_root_dir", str(tmp_path / "parts")]
    first = train(*E2E, "--data.root", root, "--trainer.max_epochs", "2", "--trainer.max_steps", "8", *every,
                  *part_root)  # fmt: skip
    assert first.returncode == 0, first.stderr[-2000:]
    ckpt = torch.load(first.metrics["checkpoint"], weights_only=False)
    assert ckpt["global_step"] == 8 and ckpt["epoch"] == 0  # inside the first epoch (12 steps)
    rest = train(*E2E, "--data.root", root, "--trainer.max_epochs", "2", *every, *part_root, "--trainer.max_steps", "-1",
                 "--ckpt_path", "last")  # fmt: skip
    assert rest.returncode == 0, rest.stderr[-2000:]
    a, b = _weights(rest), _weights(whole)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), (k, float((a[k] - b[k]).abs().max()))
