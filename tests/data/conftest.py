"""Fixtures for the data tests: files written in the original formats (IDX, pickled CIFAR-10 batches, JPEG
folders), the real CIFAR-10 archive where it exists (skipped with the reason where not), and a private cache
directory so no test reads or writes the user's ~/.cache."""

from __future__ import annotations

import gzip
import os
import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO

#: the real CIFAR-10 images (train/<class>/*.jpg, test/<class>/*.jpg) as a .tar.gz: IEM_CIFAR10_ARCHIVE, or the
#: archive shared beside the repository; the tests on it are skipped, with this reason, when it is absent
CIFAR10_ARCHIVE = Path(os.environ.get("IEM_CIFAR10_ARCHIVE") or REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz")
CIFAR10_MISSING = f"the real CIFAR-10 archive is not at {CIFAR10_ARCHIVE} (set IEM_CIFAR10_ARCHIVE to its path)"
IDX_CODES = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D}


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch) -> Path:
    """Every data test (and the scripts it runs) caches under tmp_path, and never downloads."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("IEM_CACHE_DIR", str(cache))
    monkeypatch.setenv("IEM_OFFLINE", "1")
    return cache


def write_idx(path: Path, array: np.ndarray) -> Path:
    """Write ``array`` as an IDX file (gzipped when the name ends in .gz), as LeCun's site serves them."""
    array = np.asarray(array)
    array = array.astype(array.dtype.newbyteorder(">")) if array.dtype.itemsize > 1 else array
    header = bytes([0, 0, IDX_CODES[array.dtype], array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    data = header + array.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def write_mnist(folder: Path, n_train: int = 60, n_test: int = 20, gz: bool = True, seed: int = 0) -> dict:
    """The four MNIST files with random 28 x 28 images and labels 0..9; returns the arrays written."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        y = (np.arange(n) % 10).astype(np.uint8)
        rng.shuffle(y)
        suffix = ".gz" if gz else ""
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", x)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", y)
        arrays[prefix] = (x, y)
    return arrays


def write_cifar_batches(folder: Path, n_per_batch: int = 20, seed: int = 0) -> dict:
    """torchvision's six pickled CIFAR-10 batches (random pixels); returns {file name: (data, labels)}."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.permutation(np.arange(n_per_batch) % 10)]
        batch = {
            b"batch_label": name.encode(),
            b"labels": labels,
            b"data": data,
            b"filenames": [b"x.png"] * n_per_batch,
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
        written[name] = (data, np.asarray(labels))
    return written


def write_jpeg_folders(root: Path, per_class: int = 6, seed: int = 0) -> Path:
    """CIFAR-10's image-folder layout, root/{train,test}/<class>/NNNN.jpg, with random 32 x 32 RGB JPEGs."""
    from PIL import Image

    from implicit_em.data.cifar10 import CLASSES

    rng = np.random.default_rng(seed)
    for split in ("train", "test"):
        for cls in CLASSES:
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:04d}.jpg", quality=90)
    return root


@pytest.fixture(scope="session")
def cifar10_jpeg(tmp_path_factory) -> Path:
    """The real CIFAR-10 test images of the archive (test/<class>/*.jpg), extracted, and ``train.txt``: the names
    of its training images (extracting all 60,000 files would take most of the test's time)."""
    if not CIFAR10_ARCHIVE.is_file():
        pytest.skip(CIFAR10_MISSING)
    root = tmp_path_factory.mktemp("cifar10-jpeg")
    train = []
    with tarfile.open(CIFAR10_ARCHIVE) as tar:
        for member in tar:
            parts = Path(member.name).parts
            if "train" in parts and member.isfile():
                train.append(member.name)
            elif "test" in parts:
                tar.extract(member, root, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    (root / "train.txt").write_text("\n".join(train) + "\n")
    return root


def small_image_folder(source: Path, dest: Path, per_class: int = 6) -> Path:
    """A copy of the first ``per_class`` images of every class of each split of ``source``."""
    for split in ("train", "test"):
        for cls in sorted(p for p in (source / split).iterdir() if p.is_dir()):
            (dest / split / cls.name).mkdir(parents=True)
            for f in sorted(cls.iterdir())[:per_class]:
                shutil.copy2(f, dest / split / cls.name / f.name)
    return dest


def assert_one_line_error(run, *fragments: str, max_seconds: float | None = None) -> str:
    """The run failed with exit code 2 and a single ``error:`` line naming every fragment, no traceback."""
    assert run.returncode == 2, (run.returncode, run.stderr[-2000:])
    assert "Traceback" not in run.stderr, run.stderr[-2000:]
    errors = [ln for ln in run.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, run.stderr[-2000:]
    for f in fragments:
        assert f in errors[0], (f, errors[0])
    assert "metrics.json" not in run.stdout
    return errors[0]
