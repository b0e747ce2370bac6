"""Activation shards on disk: a directory of 2-D arrays (rows x d_model) read as one row space, never whole.

A shard is a ``.npy`` file (what ``numpy.save`` writes: float16, float32 or float64, C order) or a
``.safetensors`` file holding one 2-D tensor (F16, BF16, F32 or F64). Rows are numbered across the shards in
sorted file-name order. Only the headers are read when the directory is opened; rows are then read on demand
with positioned reads (``os.preadv``) straight into the caller's buffer. Unlike a memory map, nothing read stays
mapped into the process, so its resident memory is the buffers it holds, not the part of the data set it has
visited (the kernel's page cache still speeds up repeated reads, outside the process's memory).
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import threading
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from implicit_em.errors import DataError

SHARD_SUFFIXES = (".npy", ".safetensors")
#: a harvest's per-token and per-window files (token ids, window ids, positions; each window's tokens and
#: document) live in this subfolder, so every .npy beside labels.npy and doc_ids.npy is a shard
TOKEN_DIR = "tokens"
TOKEN_FILES = ("tokens.npy", "windows.npy", "positions.npy", "window_tokens.npy", "window_doc_ids.npy")
#: files beside the shards that are not shards (the token files too, where a harvest of an earlier version
#: wrote them beside the shards)
SIDECARS = ("labels.npy", "doc_ids.npy", *TOKEN_FILES)
SAFETENSORS_DTYPES = {"F16": "<f2", "F32": "<f4", "F64": "<f8", "BF16": "<u2"}
#: most file descriptors kept open at once (shards are reopened as needed)
OPEN_FILES = 32


def token_file(root: str | Path, name: str) -> Path:
    """Where a harvest in ``root`` keeps ``name`` (one of :data:`TOKEN_FILES`): ``root/tokens/name``, or
    ``root/name`` for a harvest written before the token files had their folder."""
    if name not in TOKEN_FILES:
        raise ValueError(f"{name} is not one of a harvest's token files {TOKEN_FILES}")
    path = Path(root) / TOKEN_DIR / name
    return Path(root) / name if not path.exists() and (Path(root) / name).is_file() else path


@dataclass(frozen=True)
class Shard:
    """Where one shard's rows are: ``rows`` x ``width`` values of ``dtype`` from byte ``offset`` of ``path``
    (``bfloat16``: the values are bfloat16 stored as uint16, which numpy lacks)."""

    path: Path
    rows: int
    width: int
    dtype: np.dtype
    offset: int
    bfloat16: bool = False

    @property
    def row_bytes(self) -> int:
        return self.width * self.dtype.itemsize


def _corrupt(path: Path, what: str) -> DataError:
    return DataError(f"{path}: {what}; the file is corrupt or truncated, write it again")


def _check_size(path: Path, shape: tuple, dtype: np.dtype, offset: int) -> None:
    need = offset + int(np.prod(shape)) * dtype.itemsize
    have = path.stat().st_size
    if have < need:
        raise DataError(
            f"{path}: truncated: the header promises {' x '.join(map(str, shape))} {dtype.name} values "
            f"({need} bytes) but the file has {have} bytes; write the shard again"
        )


def _check_shape(path: Path, shape: tuple) -> None:
    if len(shape) != 2:
        raise DataError(
            f"{path}: holds a {len(shape)}-D array of shape {tuple(shape)}; a shard must be 2-D (rows x d_model): "
            "reshape it to (-1, d_model) and save it again"
        )


def npy_header(path: Path) -> tuple[tuple, np.dtype, bool, int]:
    """Shape, dtype, Fortran order and data offset of a ``.npy`` file, from its header alone."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            if version not in read:
                raise ValueError(f"unsupported .npy version {version}")
            shape, fortran, dtype = read[version](f)
            return tuple(shape), np.dtype(dtype), bool(fortran), f.tell()
    except Exception as e:  # ValueError, SyntaxError, tokenize.TokenError... from a damaged header
        raise _corrupt(path, f"not a readable .npy file ({e.__class__.__name__}: {e})") from None


def read_npy_shard(path: Path) -> Shard:
    shape, dtype, fortran, offset = npy_header(path)
    _check_shape(path, shape)
    if dtype.kind != "f":
        raise DataError(
            f"{path}: holds {dtype} values; shards hold floats (float16, float32 or float64): save x.astype(np.float32)"
        )
    if fortran and shape[0] > 1 and shape[1] > 1:
        raise DataError(f"{path}: is stored in Fortran order; save np.ascontiguousarray(x) instead")
    _check_size(path, shape, dtype, offset)
    return Shard(path, int(shape[0]), int(shape[1]), dtype, offset)


def read_safetensors_shard(path: Path) -> Shard:
    """The one tensor of a ``.safetensors`` file: 8-byte little-endian header length, JSON header, data."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > min(size - 8, 100_000_000):
                raise ValueError(f"header length {n} exceeds the file")
            header = json.loads(f.read(n))
        tensors = {k: v for k, v in header.items() if k != "__metadata__"}
        if len(tensors) != 1:
            raise DataError(
                f"{path}: holds {len(tensors)} tensors ({', '.join(sorted(tensors)) or 'none'}); a shard holds "
                "exactly one 2-D tensor (rows x d_model): save one per file"
            )
        ((name, info),) = tensors.items()
        shape, code, (begin, end) = tuple(info["shape"]), info["dtype"], info["data_offsets"]
    except DataError:
        raise
    except (ValueError, KeyError, TypeError, struct.error, UnicodeDecodeError) as e:
        raise _corrupt(path, f"not a readable .safetensors file ({e.__class__.__name__}: {e})") from None
    _check_shape(path, shape)
    if code not in SAFETENSORS_DTYPES:
        raise DataError(
            f"{path}: tensor '{name}' is {code}; shards hold floats (F16, BF16, F32 or F64): save it as float32"
        )
    dtype = np.dtype(SAFETENSORS_DTYPES[code])
    if end - begin != int(np.prod(shape)) * dtype.itemsize:
        raise _corrupt(path, f"tensor '{name}' of shape {shape} {code} spans {end - begin} bytes")
    _check_size(path, shape, dtype, 8 + n + begin)
    return Shard(path, int(shape[0]), int(shape[1]), dtype, 8 + n + begin, bfloat16=code == "BF16")


def list_shards(root: str | Path) -> list[Path]:
    """The shard files of ``root`` in sorted name order (the sidecars, e.g. ``labels.npy``, are not shards)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such directory; pass --data.root DIR holding .npy or .safetensors shards")
    files = sorted(p for p in root.iterdir() if p.suffix in SHARD_SUFFIXES and p.name not in SIDECARS and p.is_file())
    if not files:
        raise DataError(
            f"{root}: no .npy or .safetensors shards; pass --data.root DIR holding shards "
            "(scripts/harvest.py writes them)"
        )
    return files


class ShardSet:
    """The rows of all shards of a directory as one row space [0, n_rows), read on demand.

    Reads are thread-safe: one background thread may fill a buffer while the caller uses another.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.shards = [read_safetensors_shard(p) if p.suffix == ".safetensors" else read_npy_shard(p) for p in
                       list_shards(root)]  # fmt: skip
        first = self.shards[0]
        for s in self.shards[1:]:
            if s.width != first.width:
                raise DataError(
                    f"{s.path}: has {s.width} columns but {first.path.name} has {first.width}; every shard must "
                    "have the same width (d_model): move shards of other layers or models to their own directory"
                )
        self.width = first.width
        same = len({(s.dtype, s.bfloat16) for s in self.shards}) == 1
        #: how rows are held in buffers: the shards' own dtype when they share one, else float32
        self.dtype = first.dtype if same else np.dtype(np.float32)
        self.bfloat16 = first.bfloat16 and same
        self.starts = np.cumsum([0] + [s.rows for s in self.shards]).tolist()
        self.n_rows = self.starts[-1]
        if self.n_rows == 0:
            raise DataError(f"{self.root}: the shards hold no rows; pass a directory of non-empty shards")
        self._fds: OrderedDict[Path, int] = OrderedDict()
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:  # open files do not travel to other processes
        state = dict(self.__dict__)
        state["_fds"], state["_lock"] = OrderedDict(), None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __del__(self):
        with contextlib.suppress(Exception):  # at interpreter exit os may already be gone
            self.close()

    def close(self) -> None:
        for fd in getattr(self, "_fds", {}).values():
            os.close(fd)
        if hasattr(self, "_fds"):
            self._fds.clear()

    def shard_of(self, row: int) -> tuple[Shard, int]:
        """The shard holding global row ``row`` and the row's index inside it."""
        i = bisect_right(self.starts, row) - 1
        return self.shards[i], row - self.starts[i]

    def empty(self, rows: int) -> np.ndarray:
        return np.empty((rows, self.width), dtype=self.dtype)

    def _fd(self, path: Path) -> int:
        with self._lock:
            fd = self._fds.pop(path, None)
            if fd is None:
                fd = os.open(path, os.O_RDONLY)
                while len(self._fds) >= OPEN_FILES:
                    os.close(self._fds.popitem(last=False)[1])
            self._fds[path] = fd
            return fd

    def _read_shard_rows(self, shard: Shard, lo: int, hi: int, out: np.ndarray) -> None:
        """Rows [lo, hi) of one shard into ``out`` (hi - lo rows, C-contiguous)."""
        offset, nbytes = shard.offset + lo * shard.row_bytes, (hi - lo) * shard.row_bytes
        direct = out.dtype == shard.dtype
        target = out if direct else np.empty((hi - lo, shard.width), dtype=shard.dtype)
        view, done = memoryview(target).cast("B"), 0
        fd = self._fd(shard.path)
        while done < nbytes:
            n = os.preadv(fd, [view[done:]], offset + done) if hasattr(os, "preadv") else _pread_into(
                fd, view[done:], offset + done)  # fmt: skip
            if n == 0:
                raise DataError(
                    f"{shard.path}: ended after {offset + done} bytes while reading rows {lo}..{hi}; the file is "
                    "truncated (changed since it was opened?), write it again"
                )
            done += n
        if not direct:
            out[:] = to_numpy_float32(target, shard.bfloat16)

    def read(self, lo: int, hi: int, out: np.ndarray | None = None) -> np.ndarray:
        """Global rows [lo, hi) (across shard boundaries) into ``out`` or a new array of :attr:`dtype`."""
        out = self.empty(hi - lo) if out is None else out
        pos = lo
        while pos < hi:
            shard, local = self.shard_of(pos)
            take = min(hi - pos, shard.rows - local)
            self._read_shard_rows(shard, local, local + take, out[pos - lo : pos - lo + take])
            pos += take
        return out

    def read_ranges(self, ranges: Iterable[tuple[int, int]], out: np.ndarray) -> np.ndarray:
        """The rows of consecutive ``(lo, hi)`` ranges, one after another, into ``out``."""
        at = 0
        for lo, hi in ranges:
            self.read(lo, hi, out[at : at + hi - lo])
            at += hi - lo
        return out

    def to_float32(self, raw: np.ndarray, device: torch.device | str | None = None) -> Tensor:
        """Rows as read (:attr:`dtype`) as a float32 tensor on ``device``: the only float32 copy made."""
        if raw.dtype.isnative:
            t = torch.from_numpy(raw)
            if device is not None:
                t = t.to(device, non_blocking=False)
            return (t.view(torch.bfloat16) if self.bfloat16 else t).float()
        return torch.from_numpy(to_numpy_float32(raw, False)).to(device or "cpu")


def _pread_into(fd: int, view: memoryview, offset: int) -> int:
    data = os.pread(fd, len(view), offset)
    view[: len(data)] = data
    return len(data)


def to_numpy_float32(raw: np.ndarray, bfloat16: bool) -> np.ndarray:
    """float32 values of ``raw`` (bfloat16 bit patterns in uint16 are widened to the float32 they stand for)."""
    if bfloat16:
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32)


class RowVector:
    """A 1-D integer array with one value per row (``labels.npy``, ``doc_ids.npy``), read in ranges on demand."""

    def __init__(self, path: str | Path, n_rows: int, what: str):
        self.path = Path(path)
        shape, dtype, _, self.offset = npy_header(self.path)
        if len(shape) != 1 or dtype.kind not in "iu":
            raise DataError(
                f"{self.path}: holds a {dtype} array of shape {tuple(shape)}; {what} must be a 1-D integer array, "
                "one value per row"
            )
        if shape[0] != n_rows:
            raise DataError(
                f"{self.path}: has {shape[0]} {what} but the shards hold {n_rows} rows (counted in sorted file "
                f"order); write one value per row"
            )
        _check_size(self.path, shape, dtype, self.offset)
        self.dtype, self.n_rows = dtype, n_rows

    def read(self, lo: int, hi: int) -> np.ndarray:
        """Values [lo, hi) as int64."""
        x = np.fromfile(self.path, dtype=self.dtype, count=hi - lo, offset=self.offset + lo * self.dtype.itemsize)
        if len(x) != hi - lo:
            raise DataError(f"{self.path}: ended before row {hi}; the file is truncated, write it again")
        return x.astype(np.int64)

    def read_ranges(self, ranges: Iterable[tuple[int, int]]) -> np.ndarray:
        parts = [self.read(lo, hi) for lo, hi in ranges]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
