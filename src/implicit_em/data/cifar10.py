"""CIFAR-10: torchvision's pickled batches, or a folder of images per class.

``--data.root DIR`` may hold torchvision's ``DIR/cifar-10-batches-py/`` (``data_batch_1`` .. ``data_batch_5``,
``test_batch``), those six files directly, or an image-folder layout ``DIR/train/<class>/*.jpg`` and
``DIR/test/<class>/*.jpg`` whose ten folder names are the CIFAR-10 classes. Decoded image folders are
cached in ``$IEM_CACHE_DIR`` (default ``$XDG_CACHE_HOME/implicit_em``, i.e. ``~/.cache/implicit_em``), one
file per folder, keyed by the folder's absolute path and every image's name, size and mtime.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from implicit_em.data.download import fetch
from implicit_em.data.memory import InMemoryDataModule
from implicit_em.errors import DataError
from implicit_em.files import atomic_write

#: the ten classes in torchvision's label order, which is also their sorted order
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
PICKLE_FILES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
PIXELS = 3 * 32 * 32
#: ITU-R 601-2 luma weights (what PIL's convert("L") uses)
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
HOW_TO_GET = (
    "pass --data.root DIR holding torchvision's cifar-10-batches-py/ or train/<class>/*.jpg and test/<class>/*.jpg, "
    "or --data.download true on a machine with internet"
)


def cache_dir() -> Path:
    """Where decoded image folders are cached: ``$IEM_CACHE_DIR`` or ``$XDG_CACHE_HOME/implicit_em``."""
    if os.environ.get("IEM_CACHE_DIR"):
        return Path(os.environ["IEM_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "implicit_em"


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: a batch file cannot run code when loaded."""

    ALLOWED = {
        ("_codecs", "encode"),  # bytes in protocol-2 pickles written by Python 3
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refers to {module}.{name}, which a CIFAR-10 batch never does")
        return super().find_class(module, name)


def read_pickle_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One pickled batch as uint8 N x 3 x 32 x 32 images and int64 labels; :class:`DataError` names the file."""
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
    except Exception as e:  # UnpicklingError, EOFError, ValueError, ... from a damaged stream
        raise DataError(
            f"{path}: not a readable CIFAR-10 batch ({e.__class__.__name__}: {e}); the file is corrupt or truncated, "
            "replace it"
        ) from None
    if not isinstance(batch, dict):
        raise DataError(f"{path}: holds a {type(batch).__name__}, not a CIFAR-10 batch (a dict); replace the file")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise DataError(f"{path}: lacks the 'data' or 'labels' entry of a CIFAR-10 batch; replace the file")
    x = batch["data"]
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != PIXELS:
        shape = getattr(x, "shape", type(x).__name__)
        raise DataError(f"{path}: 'data' is {shape}, not N x {PIXELS} uint8 pixels; replace the file")
    try:
        y = np.asarray(batch["labels"], dtype=np.int64).reshape(-1)
    except (TypeError, ValueError):
        raise DataError(f"{path}: 'labels' are not integers; replace the file") from None
    if len(y) != len(x):
        raise DataError(f"{path}: holds {len(x)} images but {len(y)} labels; the file is corrupt, replace it")
    if y.size and (y.min() < 0 or y.max() > 9):
        raise DataError(f"{path}: labels outside 0..9; replace the file")
    return x.reshape(-1, 3, 32, 32), y


def read_pickle_folder(folder: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = {}
    for split, names in PICKLE_FILES.items():
        parts = [read_pickle_batch(folder / n) for n in names]
        out[split] = (np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts]))
    return out


def list_image_folder(split_dir: Path) -> tuple[list[str], np.ndarray, list[tuple[str, int, int]]]:
    """Image paths (class by class, sorted), their labels, and (relative name, size, mtime) of each."""
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir())
    if tuple(classes) != CLASSES:
        raise DataError(
            f"{split_dir}: class folders {', '.join(classes) or '(none)'} are not the ten CIFAR-10 classes "
            f"({', '.join(CLASSES)})"
        )
    paths, labels, stats = [], [], []
    for label, name in enumerate(classes):
        entries = sorted(
            (e for e in os.scandir(split_dir / name) if e.name.lower().endswith(IMAGE_SUFFIXES) and e.is_file()),
            key=lambda e: e.name,
        )
        if not entries:
            raise DataError(f"{split_dir / name}: no images ({', '.join('*' + s for s in IMAGE_SUFFIXES)})")
        for e in entries:
            st = e.stat()
            paths.append(e.path)
            stats.append((f"{name}/{e.name}", st.st_size, st.st_mtime_ns))
        labels += [label] * len(entries)
    return paths, np.asarray(labels, dtype=np.int64), stats


def _decode_with_pil(path: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            a = np.asarray(im.convert("RGB"))
    except Exception as e:  # OSError (truncated, unidentified), SyntaxError, DecompressionBombError...
        raise DataError(f"{path}: cannot be decoded ({e}); the image is corrupt or truncated, replace it") from None
    if a.shape != (32, 32, 3):
        raise DataError(f"{path}: is {a.shape[1]} x {a.shape[0]} pixels; CIFAR-10 images are 32 x 32")
    return a.transpose(2, 0, 1)


def _decode_chunk(paths: list[str], out: np.ndarray) -> None:
    """Decode ``paths`` into ``out``: torchvision's batched JPEG decoder, or PIL file by file when that fails
    (other formats, a damaged file: PIL then names the first bad file)."""
    try:
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg

        data = [torch.frombuffer(bytearray(Path(p).read_bytes()), dtype=torch.uint8) for p in paths]
        out[:] = torch.stack(decode_jpeg(data, mode=ImageReadMode.RGB)).numpy()
    except Exception:
        for i, p in enumerate(paths):
            out[i] = _decode_with_pil(p)


def decode_images(paths: list[str], workers: int | None = None) -> np.ndarray:
    """Decode 32 x 32 images into uint8 N x 3 x 32 x 32 (RGB), in chunks on a thread pool.

    The first unreadable image in ``paths`` order raises a :class:`DataError` naming it.
    """
    out = np.empty((len(paths), 3, 32, 32), dtype=np.uint8)
    step = 1024
    with ThreadPoolExecutor(workers or min(4, os.cpu_count() or 1)) as pool:
        futures = [
            pool.submit(_decode_chunk, paths[lo : lo + step], out[lo : lo + step]) for lo in range(0, len(paths), step)
        ]
        try:
            for f in futures:
                f.result()
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return out


def cache_path(root: Path) -> Path:
    """The cache file of an image folder: one per absolute path, replaced when the folder changes."""
    return cache_dir() / f"cifar10-{hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:16]}.npz"


def folder_key(root: Path, stats: dict[str, list]) -> str:
    """A digest of the folder's absolute path and every image's relative name, size and mtime."""
    h = hashlib.sha256(str(root.resolve()).encode())
    for split in sorted(stats):
        for name, size, mtime in stats[split]:
            h.update(f"\0{split}/{name}\0{size}\0{mtime}".encode())
    return h.hexdigest()


def read_image_folder(root: Path, cache: bool = True) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Both splits of an image-folder layout as uint8 N x 3 x 32 x 32 and int64 labels, via the cache."""
    listing = {split: list_image_folder(root / split) for split in ("train", "test")}
    key = folder_key(root, {split: stats for split, (_, _, stats) in listing.items()})
    path = cache_path(root)
    if cache and path.is_file():
        cached = _read_cache(path, key, {split: labels for split, (_, labels, _) in listing.items()})
        if cached is not None:
            return cached
    out = {split: (decode_images(paths), labels) for split, (paths, labels, _) in listing.items()}
    if cache:
        _write_cache(path, key, out)
    return out


def _read_cache(path: Path, key: str, labels: dict[str, np.ndarray]) -> dict | None:
    """The cached arrays if the file is intact and made from exactly this folder's files, else None."""
    try:
        with np.load(path, allow_pickle=False) as f:
            if str(f["key"]) != key:
                return None
            out = {}
            for split, y in labels.items():
                x, y_cached = f[f"x_{split}"], f[f"y_{split}"]
                if x.dtype != np.uint8 or x.shape != (len(y), 3, 32, 32) or not np.array_equal(y_cached, y):
                    raise ValueError(f"{split} arrays do not match the folder")
                out[split] = (x, y)
            return out
    except Exception as e:  # a damaged cache is never used: zip CRC errors, truncation, wrong shapes...
        print(
            f"warning: ignoring the unreadable cache {path} ({e.__class__.__name__}: {e}); rebuilding it",
            file=sys.stderr,
        )
        return None


def _write_cache(path: Path, key: str, data: dict) -> None:
    arrays = {f"{k}_{split}": v for split, xy in data.items() for k, v in zip(("x", "y"), xy)}
    try:
        atomic_write(path, lambda f: np.savez(f, key=np.array(key), **arrays))
    except OSError as e:  # a read-only or full disk only costs the next run the decoding time
        print(f"warning: could not write the cache {path} ({e}); continuing without it", file=sys.stderr)


class CIFAR10DataModule(InMemoryDataModule):
    """CIFAR-10 (Krizhevsky, 2009): 50,000 training and 10,000 test images of 32 x 32, ten classes.

    Samples are flattened C x H x W pixels in [0, 1] (3,072 dims), or 1,024 luma values with ``grayscale``.

    Args:
        root: torchvision's root (holding ``cifar-10-batches-py``), a folder holding the six batch files, or
            an image folder with ``train/<class>/`` and ``test/<class>/``. Default: ``data``.
        download: fetch torchvision's batches into ``root`` when no layout is found (needs internet).
        grayscale: convert to luma (0.299 R + 0.587 G + 0.114 B): 32 x 32 = 1,024 dims.
        cache: keep decoded image folders in the user cache directory (see the module docstring).
        **kwargs: the common options of :class:`InMemoryDataModule`.
    """

    name = "cifar10"

    def __init__(
        self, root: str | None = None, download: bool = False, grayscale: bool = False, cache: bool = True, **kwargs
    ):
        super().__init__(root=root, **kwargs)
        self.download, self.grayscale, self.cache = download, grayscale, cache
        self.image_shape = (32, 32) if grayscale else (3, 32, 32)

    def roots(self) -> list[Path]:
        return [Path(self.root) if self.root else Path("data")]

    def locate(self) -> tuple[str, Path] | None:
        """``("pickle", folder)`` or ``("images", root)`` for the first layout found, else None."""
        for root in self.roots():
            for folder in (root / "cifar-10-batches-py", root):
                if all((folder / n).is_file() for names in PICKLE_FILES.values() for n in names):
                    return "pickle", folder
            if (root / "train").is_dir() and (root / "test").is_dir():
                return "images", root
        return None

    def _looked_in(self) -> str:
        parts = []
        for root in self.roots():
            for folder in (root / "cifar-10-batches-py", root):
                names = [n for names in PICKLE_FILES.values() for n in names]
                missing = [n for n in names if not (folder / n).is_file()]
                note = f" (lacks {', '.join(missing)})" if 0 < len(missing) < len(names) else ""
                parts.append(f"{folder.resolve()}{note}")
            for split in ("train", "test"):
                parts.append(str((root / split).resolve()) + "/<class>/")
        return ", ".join(parts)

    def prepare_data(self) -> None:
        if self.download and self.locate() is None:
            import torchvision

            root = str(self.roots()[0])

            def download():
                torchvision.datasets.CIFAR10(root, train=True, download=True)

            fetch(self.name, [URL], download, self._looked_in(), HOW_TO_GET)

    def load(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        found = self.locate()
        if found is None:
            raise DataError(f"{self.name}: no CIFAR-10 data in any of: {self._looked_in()}; {HOW_TO_GET}")
        kind, folder = found
        raw = read_pickle_folder(folder) if kind == "pickle" else read_image_folder(folder, self.cache)
        return {split: (self._pixels(x), y) for split, (x, y) in raw.items()}

    def _pixels(self, x: np.ndarray) -> np.ndarray:
        """uint8 N x 3 x 32 x 32 -> float32 N x D in [0, 1], through luma when ``grayscale``."""
        x = np.multiply(x, np.float32(1 / 255), dtype=np.float32)  # exact 0 and 1; faster than / 255
        if self.grayscale:
            x = np.einsum("nchw,c->nhw", x, LUMA)
        return x.reshape(len(x), -1)
