"""Fashion-MNIST from the real files of Debian's dataset-fashion-mnist (installed by .ci/run), found with
no root and no download (skipped, with the reason, where the package is not installed; tests/data/test_mnist.py
covers the same loader on IDX files it writes); and the one-line error when they are missing."""

import time
from pathlib import Path

import numpy as np
import pytest

from implicit_em.data import FashionMNISTDataModule
from tests.conftest import FASHION_MNIST
from tests.data.conftest import assert_one_line_error, write_mnist


@pytest.fixture(scope="module")
def fashion(tmp_path_factory):
    """The module set up from the system files, loaded once for these tests (from a folder with no data/)."""
    if not (FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"Fashion-MNIST is not in {FASHION_MNIST}: apt-get install dataset-fashion-mnist (.ci/run does)")
    dm = FashionMNISTDataModule(batch_size=128)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path_factory.mktemp("cwd"))  # so a ./data folder cannot shadow the system copy
        found = dm.locate()
        raw = dm.load()
        dm.setup()
    return dm, found, raw


def test_found_in_the_debian_folder_without_download(fashion):
    _, found, _ = fashion
    assert found is not None
    assert {p.parent for pair in found.values() for p in pair} == {FASHION_MNIST}
    assert found["train"][0].name == "train-images-idx3-ubyte.gz"


def test_sizes_pixels_and_labels(fashion):
    dm, _, raw = fashion
    (x_train, y_train), (x_test, y_test) = raw["train"], raw["test"]
    assert x_train.shape == (60_000, 784) and x_test.shape == (10_000, 784) and x_train.dtype == np.float32
    for x in (x_train, x_test):
        assert x.min() == 0.0 and x.max() == 1.0
        assert 0.2 < x.mean() < 0.4  # clothing on black: Fashion-MNIST's mean pixel is about 0.29
    for y in (y_train, y_test):
        assert y.min() == 0 and y.max() == 9
    assert np.bincount(y_train).tolist() == [6000] * 10 and np.bincount(y_test).tolist() == [1000] * 10
    assert len(dm.splits["train"].x) + len(dm.splits["val"].x) == 60_000 and len(dm.splits["test"].x) == 10_000
    assert len(dm.splits["val"].x) == 6_000
    assert dm.dims == 784


@pytest.mark.parametrize("layout", ["debian", "torchvision"])
def test_found_with_no_root_in_a_system_folder_the_test_wrote(tmp_path, monkeypatch, layout):
    """The same search on IDX files written by the test (so it runs where Debian's package is absent)."""
    system = tmp_path / "usr-share-datasets-fashion-mnist"
    folder = system if layout == "debian" else system / "FashionMNIST" / "raw"
    written = write_mnist(folder, n_train=100, n_test=20, gz=True)
    monkeypatch.setattr(FashionMNISTDataModule, "system_roots", (str(system),))
    monkeypatch.chdir(tmp_path)  # no ./data folder here
    dm = FashionMNISTDataModule(batch_size=8)
    found = dm.locate()
    assert found is not None and {p.parent for pair in found.values() for p in pair} == {folder}
    raw = dm.load()
    np.testing.assert_allclose(raw["train"][0], written["train"][0].reshape(100, -1) / 255.0, atol=1e-7)
    assert np.array_equal(raw["test"][1], written["t10k"][1]) and dm.dims == 784


def test_missing_files_name_the_folder_and_the_debian_package(train, tmp_path):
    empty = tmp_path / "nothing-here"
    empty.mkdir()
    start = time.monotonic()
    run = train("--config", "configs/data/fashion_mnist.yaml", "--data.root", str(empty), timeout=60)
    assert time.monotonic() - start < 30
    assert_one_line_error(
        run, "fashion_mnist", str(empty), str(Path(empty) / "FashionMNIST" / "raw"), "dataset-fashion-mnist"
    )
