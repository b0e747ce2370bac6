"""Shards on disk: every format reads back exactly, across shard boundaries; each bad file is one clear error."""

from __future__ import annotations

import json
import pickle
import struct

import numpy as np
import pytest
import torch

from implicit_em.errors import DataError
from implicit_em.lm.shards import RowVector, ShardSet, token_file


def write_safetensors(path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path))


@pytest.fixture
def mixed(tmp_path):
    """Three shards in three formats (float32 .npy, float16 .npy, bfloat16 .safetensors), values exact in each."""
    rng = np.random.default_rng(0)
    parts = [rng.integers(-64, 64, size=(n, 6)).astype(np.float32) / 4 for n in (5, 7, 4)]
    np.save(tmp_path / "a.npy", parts[0])
    np.save(tmp_path / "b.npy", parts[1].astype(np.float16))
    write_safetensors(tmp_path / "c.safetensors", {"acts": torch.from_numpy(parts[2]).bfloat16()})
    return tmp_path, np.concatenate(parts)


def test_rows_read_back_across_shards_and_formats(mixed):
    root, x = mixed
    s = ShardSet(root)
    assert (s.n_rows, s.width, s.dtype) == (16, 6, np.float32)  # mixed dtypes are held as float32
    assert np.array_equal(s.read(0, 16), x)
    assert np.array_equal(s.read(3, 14), x[3:14])  # spans all three files
    assert np.array_equal(s.read_ranges([(1, 2), (11, 16)], s.empty(6)), x[[1, 11, 12, 13, 14, 15]])
    assert [p.path.name for p in s.shards] == ["a.npy", "b.npy", "c.safetensors"]


@pytest.mark.parametrize("kind", ["float16", "bfloat16", "float64"])
def test_one_dtype_is_held_as_stored_and_widened_per_batch(tmp_path, kind):
    x = np.arange(24, dtype=np.float32).reshape(4, 6)
    if kind == "bfloat16":
        write_safetensors(tmp_path / "x.safetensors", {"x": torch.from_numpy(x).bfloat16()})
    else:
        np.save(tmp_path / "x.npy", x.astype(kind))
    s = ShardSet(tmp_path)
    raw = s.read(0, 4)
    assert raw.dtype.itemsize == np.dtype(kind if kind != "bfloat16" else np.uint16).itemsize
    t = s.to_float32(raw)
    assert t.dtype == torch.float32 and torch.equal(t, torch.from_numpy(x))


def test_labels_and_doc_ids_are_not_shards(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((3, 2), np.float32))
    np.save(tmp_path / "labels.npy", np.zeros(3, np.int64))
    np.save(tmp_path / "doc_ids.npy", np.zeros(3, np.int64))
    assert [p.path.name for p in ShardSet(tmp_path).shards] == ["x.npy"]


def test_token_files_are_in_their_folder_or_beside_the_shards_in_an_earlier_harvest(tmp_path):
    np.save(tmp_path / "shard-00000.npy", np.zeros((4, 2), np.float32))
    (tmp_path / "tokens").mkdir()
    np.save(tmp_path / "tokens" / "windows.npy", np.zeros(4, np.int64))
    np.save(tmp_path / "positions.npy", np.zeros(4, np.int32))  # written by an earlier scripts/harvest.py
    assert token_file(tmp_path, "windows.npy") == tmp_path / "tokens" / "windows.npy"
    assert token_file(tmp_path, "positions.npy") == tmp_path / "positions.npy"
    assert token_file(tmp_path, "tokens.npy") == tmp_path / "tokens" / "tokens.npy"  # missing: where it belongs
    assert [s.path.name for s in ShardSet(tmp_path).shards] == ["shard-00000.npy"]
    with pytest.raises(ValueError, match="not one of"):
        token_file(tmp_path, "labels.npy")


def test_a_shard_set_pickles_without_its_open_files(mixed):
    root, x = mixed
    s = ShardSet(root)
    s.read(0, 3)
    t = pickle.loads(pickle.dumps(s))
    assert np.array_equal(t.read(0, 16), x)


def _error(root) -> str:
    with pytest.raises(DataError) as e:
        ShardSet(root)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_no_directory_or_no_shards(tmp_path):
    assert "no such directory" in _error(tmp_path / "absent")
    (tmp_path / "notes.txt").write_text("x")
    m = _error(tmp_path)
    assert str(tmp_path) in m and "no .npy or .safetensors shards" in m and "harvest.py" in m


@pytest.mark.parametrize("shape", [(10,), (2, 3, 4)])
def test_a_shard_not_2d(tmp_path, shape):
    np.save(tmp_path / "x.npy", np.zeros(shape, np.float32))
    m = _error(tmp_path)
    assert "x.npy" in m and "must be 2-D" in m and "reshape it to (-1, d_model)" in m


def test_a_safetensors_shard_not_2d_or_with_two_tensors(tmp_path):
    write_safetensors(tmp_path / "x.safetensors", {"a": torch.zeros(2, 3, 4)})
    assert "x.safetensors" in _error(tmp_path) and "must be 2-D" in _error(tmp_path)
    write_safetensors(tmp_path / "x.safetensors", {"a": torch.zeros(2, 3), "b": torch.zeros(2, 3)})
    m = _error(tmp_path)
    assert "holds 2 tensors (a, b)" in m and "one per file" in m


def test_shards_of_different_widths(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((4, 8), np.float32))
    np.save(tmp_path / "b.npy", np.zeros((4, 9), np.float32))
    m = _error(tmp_path)
    assert "b.npy: has 9 columns but a.npy has 8" in m and "same width" in m


def test_integer_shards_are_refused(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((4, 8), np.int32))
    assert "x.npy: holds int32 values" in _error(tmp_path)


def test_a_truncated_npy_shard(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((100, 8), np.float16))
    data = (tmp_path / "x.npy").read_bytes()
    (tmp_path / "x.npy").write_bytes(data[:-10])
    m = _error(tmp_path)
    assert "x.npy: truncated: the header promises 100 x 8 float16 values" in m and "write the shard again" in m


def test_a_truncated_safetensors_shard(tmp_path):
    write_safetensors(tmp_path / "x.safetensors", {"a": torch.zeros(100, 8)})
    data = (tmp_path / "x.safetensors").read_bytes()
    (tmp_path / "x.safetensors").write_bytes(data[:-100])
    assert "x.safetensors: truncated" in _error(tmp_path)


@pytest.mark.parametrize(
    "name,data",
    [
        ("x.npy", b"not an npy file at all"),
        ("x.npy", b"\x93NUMPY\x01\x00\x10\x00{'descr': '<f4',"),
        ("x.safetensors", b"\x05\x00\x00\x00\x00\x00\x00\x00{oops"),
        ("x.safetensors", struct.pack("<Q", 1 << 40) + b"{}"),
        ("x.safetensors", b"\x01"),
    ],
)
def test_a_corrupt_shard(tmp_path, name, data):
    (tmp_path / name).write_bytes(data)
    m = _error(tmp_path)
    assert name in m and "corrupt or truncated" in m and "write it again" in m


def test_a_safetensors_shard_whose_offsets_disagree_with_its_shape(tmp_path):
    header = json.dumps({"a": {"dtype": "F32", "shape": [4, 2], "data_offsets": [0, 16]}}).encode()
    (tmp_path / "x.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(32))
    assert "spans 16 bytes" in _error(tmp_path)


def test_a_shard_that_shrinks_after_opening_is_named_when_read(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((100, 8), np.float32))
    s = ShardSet(tmp_path)
    (tmp_path / "x.npy").write_bytes((tmp_path / "x.npy").read_bytes()[:500])
    with pytest.raises(DataError, match="x.npy: ended after"):
        s.read(0, 100)


def test_row_vectors_check_their_length_and_type(tmp_path):
    np.save(tmp_path / "labels.npy", np.arange(5))
    assert np.array_equal(RowVector(tmp_path / "labels.npy", 5, "labels").read_ranges([(0, 2), (4, 5)]), [0, 1, 4])
    with pytest.raises(DataError, match="labels.npy: has 5 labels but the shards hold 6 rows.*one value per row"):
        RowVector(tmp_path / "labels.npy", 6, "labels")
    np.save(tmp_path / "labels.npy", np.zeros((5, 2), np.int64))
    with pytest.raises(DataError, match="1-D integer array"):
        RowVector(tmp_path / "labels.npy", 5, "labels")
    np.save(tmp_path / "labels.npy", np.zeros(5, np.float32))
    with pytest.raises(DataError, match="1-D integer array"):
        RowVector(tmp_path / "labels.npy", 5, "labels")
