"""Harvest rows in batches of whole windows; a harvest without tokens is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from implicit_em.errors import DataError
from implicit_em.lm.dashboard.source import TokenSource, default_batch_rows, limit_ranges


def _harvest(root, lengths=(3, 1, 12, 2, 5, 30, 4)):
    """Shards with row i = [i, -i], windows of ``lengths`` (one longer than the batches below)."""
    n = sum(lengths)
    x = np.stack([np.arange(n), -np.arange(n)], axis=1).astype(np.float32)
    np.save(root / "shard-00000.npy", x[:20])
    np.save(root / "shard-00001.npy", x[20:])
    (root / "tokens").mkdir(exist_ok=True)
    np.save(root / "tokens" / "tokens.npy", (np.arange(n) % 7).astype(np.int32))
    np.save(root / "tokens" / "windows.npy", np.repeat(np.arange(len(lengths)), lengths).astype(np.int64))
    return root, np.repeat(np.arange(len(lengths)), lengths)


@pytest.mark.parametrize("batch_rows", [1, 4, 7, 100])
def test_batches_hold_whole_windows_in_order(tmp_path, batch_rows):
    root, windows = _harvest(tmp_path)
    source = TokenSource(root, lambda x: x * 2)  # the normalisation is applied
    rows, starts = [], []
    for b in source.batches([(0, len(windows))], batch_rows):
        r = b.rows.numpy()
        assert np.array_equal(b.x[:, 0].numpy(), 2 * r)
        w = windows[r]
        assert np.array_equal(b.new_context.numpy(), np.r_[True, w[1:] != w[:-1]])
        # a batch ends at a window's end (or the data's): no window continues into the next batch
        assert r[-1] + 1 == len(windows) or windows[r[-1] + 1] != windows[r[-1]]
        if len(np.unique(w)) > 1:
            assert len(r) <= batch_rows
        rows += r.tolist()
        starts += r[b.new_context.numpy()].tolist()
    assert rows == list(range(len(windows)))
    assert starts == np.flatnonzero(np.r_[True, windows[1:] != windows[:-1]]).tolist()


def test_a_range_end_ends_a_context(tmp_path):
    root, windows = _harvest(tmp_path)
    source = TokenSource(root, lambda x: x)
    batches = list(source.batches([(0, 10), (25, 40)], 6))
    got = torch.cat([b.rows for b in batches]).tolist()
    assert got == list(range(10)) + list(range(25, 40))
    assert all(b.new_context[0] for b in batches)


def test_missing_tokens_or_windows_are_named(tmp_path):
    root, _ = _harvest(tmp_path)
    (root / "tokens" / "tokens.npy").unlink()
    with pytest.raises(DataError, match="tokens.npy"):
        TokenSource(root, lambda x: x)
    _harvest(tmp_path)
    (root / "tokens" / "windows.npy").unlink()
    with pytest.raises(DataError, match="windows.npy"):
        TokenSource(root, lambda x: x)
    _harvest(tmp_path)
    np.save(root / "tokens" / "tokens.npy", np.zeros(5, np.int32))
    with pytest.raises(DataError, match="harvest again"):
        TokenSource(root, lambda x: x)


def test_a_harvest_of_the_earlier_layout_token_files_beside_the_shards_is_read(tmp_path):
    root, windows = _harvest(tmp_path)
    for name in ("tokens.npy", "windows.npy"):
        (root / "tokens" / name).rename(root / name)
    (root / "tokens").rmdir()
    source = TokenSource(root, lambda x: x)
    assert np.array_equal(source.windows, windows) and source.shards.n_rows == len(windows)


def test_row_limits_and_batch_sizes():
    assert limit_ranges([(0, 10), (20, 30)], 15) == [(0, 10), (20, 25)]
    assert limit_ranges([(0, 10)], None) == [(0, 10)]
    assert default_batch_rows(16_384) == 1024 and default_batch_rows(64) == 16_384 and default_batch_rows(10**6) == 256
