"""Reading the IDX files of MNIST and Fashion-MNIST (gzipped or not), with errors that name the file."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from implicit_em.errors import DataError

#: IDX type codes -> numpy dtypes (big-endian), from the format's specification
IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """The array stored in one IDX file (``.gz`` decompressed on the fly).

    Raises :class:`DataError` naming the file when it is unreadable, truncated, or not IDX.
    """
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path) as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(
            f"{path}: cannot be read ({e.__class__.__name__}: {e}); the file is corrupt or truncated, replace it"
        ) from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_TYPES:
        raise DataError(f"{path}: not an IDX file (bad magic number); replace it with the original file")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header; replace the file")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(IDX_TYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(
            f"{path}: truncated or corrupt: the header promises {shape} ({expected} bytes of data) but the file holds "
            f"{len(raw) - header}; replace the file"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def read_image_label_pair(images: Path, labels: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images as float32 N x D in [0, 1] and labels as int64, checking that the counts agree."""
    x, y = read_idx(images), read_idx(labels)
    if x.ndim != 3:
        raise DataError(f"{images}: holds an array of shape {x.shape}, not N images of H x W; is it a labels file?")
    if x.dtype != np.uint8:
        raise DataError(f"{images}: pixels of type {x.dtype}; the images of an IDX dataset are unsigned bytes (0..255)")
    if y.ndim != 1:
        raise DataError(f"{labels}: holds an array of shape {y.shape}, not N labels; is it an images file?")
    if len(x) != len(y):
        raise DataError(
            f"{images} holds {len(x)} images but {labels} holds {len(y)} labels; the files do not belong together"
        )
    if y.size and (y.min() < 0 or y.max() > 9):
        raise DataError(f"{labels}: labels outside 0..9; replace the file")
    return np.multiply(x.reshape(len(x), -1), np.float32(1 / 255), dtype=np.float32), y.astype(np.int64)
