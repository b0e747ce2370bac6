"""The IDX reader: round trips of the format, and one clear error naming the file for every kind of damage."""

import gzip

import numpy as np
import pytest

from implicit_em.data.idx import read_idx, read_image_label_pair
from implicit_em.errors import DataError
from tests.data.conftest import write_idx


@pytest.mark.parametrize("name", ["a-idx3-ubyte", "a-idx3-ubyte.gz"])
@pytest.mark.parametrize("dtype", [np.uint8, ">i4", ">f4"])
def test_round_trip(tmp_path, name, dtype):
    a = (np.arange(2 * 3 * 5) * 7 % 251).reshape(2, 3, 5).astype(dtype)
    got = read_idx(write_idx(tmp_path / name, a))
    assert got.shape == (2, 3, 5) and np.array_equal(got, a)


def test_image_label_pair_scales_pixels_to_unit_range(tmp_path):
    x = np.array([[[0, 255], [128, 1]]] * 3, dtype=np.uint8)
    y = np.array([0, 9, 4], dtype=np.uint8)
    fx, fy = read_image_label_pair(write_idx(tmp_path / "i.gz", x), write_idx(tmp_path / "l.gz", y))
    assert fx.dtype == np.float32 and fx.shape == (3, 4)
    assert fx.min() == 0.0 and fx.max() == 1.0 and fx[0, 2] == pytest.approx(128 / 255)
    assert fy.dtype == np.int64 and fy.tolist() == [0, 9, 4]


def _expect(path, *fragments):
    with pytest.raises(DataError) as e:
        read_idx(path)
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg
    for f in fragments:
        assert f in msg, msg


def test_truncated_data_names_the_file(tmp_path):
    path = write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((10, 28, 28), np.uint8))
    path.write_bytes(path.read_bytes()[:-100])
    _expect(path, "truncated", "(10, 28, 28)")


def test_extra_bytes_are_rejected(tmp_path):
    path = write_idx(tmp_path / "x-idx1-ubyte", np.zeros(5, np.uint8))
    path.write_bytes(path.read_bytes() + b"\0")
    _expect(path, "holds 6")


def test_truncated_header(tmp_path):
    path = tmp_path / "h-idx3-ubyte"
    path.write_bytes(bytes([0, 0, 8, 3, 0, 0]))
    _expect(path, "header")


def test_bad_magic_number(tmp_path):
    path = tmp_path / "m-idx3-ubyte"
    path.write_bytes(b"PK\x03\x04" + bytes(100))
    _expect(path, "magic")


def test_truncated_gzip_names_the_file(tmp_path):
    path = write_idx(
        tmp_path / "train-images-idx3-ubyte.gz", np.random.default_rng(0).integers(0, 255, (50, 28, 28), dtype=np.uint8)
    )
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    _expect(path, "corrupt or truncated")


def test_corrupt_gzip_names_the_file(tmp_path):
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    data = bytearray(gzip.compress(bytes([0, 0, 8, 1, 0, 0, 0, 200]) + bytes(range(200))))
    data[30:40] = b"\xff" * 10  # damaged deflate stream (or CRC)
    path.write_bytes(bytes(data))
    _expect(path, "cannot be read")


def test_not_gzip_at_all(tmp_path):
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(b"this is not gzip")
    _expect(path, "cannot be read")


def test_counts_that_disagree_name_both_files(tmp_path):
    images = write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((5, 28, 28), np.uint8))
    labels = write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(4, np.uint8))
    with pytest.raises(DataError, match="5 images .* 4 labels") as e:
        read_image_label_pair(images, labels)
    assert str(images) in str(e.value) and str(labels) in str(e.value)


@pytest.mark.parametrize(
    "x, y, fragment",
    [
        (np.zeros((3, 28, 28), np.uint8), np.array([0, 10, 1], np.uint8), "labels outside 0..9"),
        (np.zeros(3, np.uint8), np.zeros(3, np.uint8), "not N images"),
        (np.zeros((3, 28, 28), np.uint8), np.zeros((3, 1, 1), np.uint8), "not N labels"),
        (np.zeros((3, 28, 28), ">f4"), np.zeros(3, np.uint8), "unsigned bytes"),
    ],
)
def test_files_that_do_not_hold_images_and_labels(tmp_path, x, y, fragment):
    images, labels = write_idx(tmp_path / "i-idx", x), write_idx(tmp_path / "l-idx", y)
    with pytest.raises(DataError, match=fragment):
        read_image_label_pair(images, labels)
