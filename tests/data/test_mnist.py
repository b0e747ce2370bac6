"""MNIST from IDX files the tests write (plain folder and torchvision's layout), and its bad-input errors,
checked the way users meet them: scripts/train.py exits 2 with one line, fast, and no traceback."""

import time

import numpy as np
import pytest

from implicit_em.data import MNISTDataModule
from implicit_em.data import download as download_module
from implicit_em.data import mnist as mnist_module
from implicit_em.errors import DataError
from tests.data.conftest import assert_one_line_error, write_idx, write_mnist

SMALL = ["--config", "configs/data/mnist.yaml", "--data.batch_size", "8", "--trainer.max_epochs", "1"]


@pytest.mark.parametrize(
    "layout, gz", [("plain", True), ("plain", False), ("torchvision", False), ("torchvision", True)]
)
def test_loads_the_files_the_test_wrote(tmp_path, layout, gz):
    folder = tmp_path if layout == "plain" else tmp_path / "MNIST" / "raw"
    written = write_mnist(folder, n_train=100, n_test=20, gz=gz)
    dm = MNISTDataModule(root=str(tmp_path), batch_size=8)
    raw = dm.load()
    for split, prefix in (("train", "train"), ("test", "t10k")):
        x, y = raw[split]
        wx, wy = written[prefix]
        assert x.shape == (len(wx), 784) and x.dtype == np.float32
        np.testing.assert_allclose(x, wx.reshape(len(wx), -1) / 255.0, atol=1e-7)
        assert np.array_equal(y, wy)
    assert dm.dims == 784 and dm.image_shape == (28, 28)
    dm.setup()
    assert len(dm.splits["train"].x) + len(dm.splits["val"].x) == 100 and len(dm.splits["test"].x) == 20


def test_one_epoch_through_the_cli(train, tmp_path):
    write_mnist(tmp_path / "mnist", n_train=200, n_test=50)
    run = train(*SMALL, "--data.root", str(tmp_path / "mnist"), "--report.kmeans", "false", "--model.n_components", "8")
    assert run.returncode == 0, run.stderr[-2000:]
    m = run.metrics
    assert m["data"] == "mnist" and m["n_parameters"] == 8 * 784 + 8


def test_missing_files_offline_fail_fast_naming_every_folder(train, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    start = time.monotonic()
    run = train(*SMALL, "--data.root", str(empty), "--data.download", "true", timeout=60)
    assert time.monotonic() - start < 30
    assert_one_line_error(run, "mnist", str(empty), str(empty / "MNIST" / "raw"), "--data.root")


def test_partial_folder_names_the_missing_files(tmp_path):
    write_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"lacks t10k-labels-idx1-ubyte"):
        MNISTDataModule(root=str(tmp_path)).load()


def test_no_network_is_detected_before_torchvision_tries(tmp_path, monkeypatch):
    monkeypatch.delenv("IEM_OFFLINE")
    monkeypatch.setattr(download_module, "reachable", lambda host, timeout=5: False)
    dm = MNISTDataModule(root=str(tmp_path), download=True)
    with pytest.raises(DataError, match="no network to download them") as e:
        dm.prepare_data()
    assert str(tmp_path) in str(e.value) and "ossci-datasets.s3.amazonaws.com" in str(e.value)


def test_files_present_mean_no_download(tmp_path, monkeypatch):
    write_mnist(tmp_path)
    monkeypatch.setattr(mnist_module, "fetch", lambda *a, **k: pytest.fail("tried to download"))
    MNISTDataModule(root=str(tmp_path), download=True).prepare_data()


def test_truncated_gzip_names_the_file(train, tmp_path):
    write_mnist(tmp_path, n_train=200)
    bad = tmp_path / "train-images-idx3-ubyte.gz"
    bad.write_bytes(bad.read_bytes()[:5000])
    assert_one_line_error(train(*SMALL, "--data.root", str(tmp_path), timeout=60), str(bad), "corrupt or truncated")


def test_truncated_idx_names_the_file(train, tmp_path):
    write_mnist(tmp_path, n_train=200, gz=False)
    bad = tmp_path / "t10k-images-idx3-ubyte"
    bad.write_bytes(bad.read_bytes()[:-784])
    assert_one_line_error(train(*SMALL, "--data.root", str(tmp_path), timeout=60), str(bad), "truncated")


def test_image_and_label_counts_that_disagree(train, tmp_path):
    write_mnist(tmp_path, n_train=200)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(199, dtype=np.uint8) % 10)
    line = assert_one_line_error(train(*SMALL, "--data.root", str(tmp_path), timeout=60), "200 images", "199 labels")
    assert "train-images-idx3-ubyte.gz" in line and "train-labels-idx1-ubyte.gz" in line


def test_images_of_the_wrong_size(tmp_path):
    write_mnist(tmp_path)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((60, 32, 32), np.uint8))
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz: images of 1024 pixels"):
        MNISTDataModule(root=str(tmp_path)).load()
