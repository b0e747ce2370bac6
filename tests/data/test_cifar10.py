"""CIFAR-10: torchvision's pickled batches and JPEG folders written by the tests (everywhere), the real JPEG
folders of the archive (where it exists; skipped with the reason where not), the decoded-image cache, and the
one-line errors for missing or damaged files."""

import os
import pickle
import time

import numpy as np
import pytest
from PIL import Image

from implicit_em.data import CIFAR10DataModule
from implicit_em.data import cifar10 as cifar10_module
from implicit_em.errors import DataError
from tests.data.conftest import assert_one_line_error, small_image_folder, write_cifar_batches, write_jpeg_folders

SMALL = ["--config", "configs/data/cifar10.yaml", "--data.batch_size", "8", "--trainer.max_epochs", "1"]


def expected_from_batches(written):
    train = [written[f"data_batch_{i}"] for i in range(1, 6)]
    x = np.concatenate([d for d, _ in train]).astype(np.float64) / 255
    y = np.concatenate([labels for _, labels in train])
    return x, y, written["test_batch"][0].astype(np.float64) / 255, written["test_batch"][1]


@pytest.mark.parametrize("inside", ["cifar-10-batches-py", "."])
def test_pickled_batches_in_torchvision_layout_or_directly(tmp_path, inside):
    written = write_cifar_batches(tmp_path / inside, n_per_batch=20)
    dm = CIFAR10DataModule(root=str(tmp_path), batch_size=8)
    raw = dm.load()
    x, y, x_test, y_test = expected_from_batches(written)
    assert raw["train"][0].shape == (100, 3072) and raw["test"][0].shape == (20, 3072)
    np.testing.assert_allclose(raw["train"][0], x, atol=1e-6)  # C x H x W order, as pickled
    np.testing.assert_allclose(raw["test"][0], x_test, atol=1e-6)
    assert np.array_equal(raw["train"][1], y) and np.array_equal(raw["test"][1], y_test)
    assert dm.dims == 3072 and dm.image_shape == (3, 32, 32)


def test_grayscale_is_luma_with_1024_dims(tmp_path):
    written = write_cifar_batches(tmp_path, n_per_batch=20)
    dm = CIFAR10DataModule(root=str(tmp_path), grayscale=True, batch_size=8)
    assert dm.dims == 1024 and dm.image_shape == (32, 32)
    x = dm.load()["test"][0]
    rgb = written["test_batch"][0].reshape(-1, 3, 1024).astype(np.float64) / 255
    np.testing.assert_allclose(x, 0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2], atol=1e-5)
    assert x.shape == (20, 1024) and 0 <= x.min() and x.max() <= 1


def test_one_epoch_through_the_cli_on_pickles(train, tmp_path):
    write_cifar_batches(tmp_path / "c" / "cifar-10-batches-py", n_per_batch=40)
    run = train(*SMALL, "--data.root", str(tmp_path / "c"), "--report.kmeans", "false", "--model.n_components", "8")
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.metrics["data"] == "cifar10" and run.metrics["n_parameters"] == 8 * 3072 + 8


# -- the real images of the archive (skipped where it is absent) ------------------------------------------------


def test_the_shared_archive_lists_every_image_and_decodes_its_test_split(cifar10_jpeg):
    """The archive's folders as the loader reads them: 5,000 training and 1,000 test images per class, labels in
    CIFAR-10's (torchvision's) class order, and the 10,000 test images decoded by the loader's own decoder to the
    pixels PIL gives (C x H x W). The whole archive through a one-epoch run is ../shared/checks/data's; the cache
    and the loader's other paths are tested on folders the tests write, below."""
    train = (cifar10_jpeg / "train.txt").read_text().split()
    per_class = [sum(f"/{c}/" in f"/{name}" for name in train) for c in cifar10_module.CLASSES]
    assert per_class == [5000] * 10
    paths, y_test, _ = cifar10_module.list_image_folder(cifar10_jpeg / "test")
    assert np.bincount(y_test).tolist() == [1000] * 10 and (np.diff(y_test) >= 0).all()
    x_test = cifar10_module.decode_images(paths)
    assert x_test.shape == (10_000, 3, 32, 32) and x_test.dtype == np.uint8 and 0.3 < x_test.mean() / 255 < 0.6
    first_cat = int(np.argmax(y_test == cifar10_module.CLASSES.index("cat")))
    path = sorted((cifar10_jpeg / "test" / "cat").iterdir())[0]
    assert paths[first_cat] == str(path)
    np.testing.assert_array_equal(x_test[first_cat], np.asarray(Image.open(path).convert("RGB")).transpose(2, 0, 1))


# -- JPEG folders the tests write: the loader, the cache and the errors, everywhere -----------------------------


@pytest.fixture
def small(tmp_path):
    """Six random JPEGs per class and split, in CIFAR-10's image-folder layout."""
    return write_jpeg_folders(tmp_path / "small", per_class=6)


def test_jpeg_folders_decode_to_the_images_in_class_order(small):
    raw = CIFAR10DataModule(root=str(small), cache=False).load()
    (x, y), (x_test, y_test) = raw["train"], raw["test"]
    assert x.shape == (60, 3072) and x_test.shape == (60, 3072) and x.dtype == np.float32
    assert np.bincount(y).tolist() == [6] * 10 and np.bincount(y_test).tolist() == [6] * 10
    # labels follow CIFAR-10's class order; pixels are C x H x W in [0, 1], as decoded by PIL
    first_cat = int(np.argmax(y == cifar10_module.CLASSES.index("cat")))
    path = sorted((small / "train" / "cat").iterdir())[0]
    image = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / 255
    np.testing.assert_allclose(x[first_cat], image.reshape(-1), atol=1e-6)


def test_one_epoch_through_the_cli_on_jpeg_folders(train, small):
    run = train(*SMALL, "--data.root", str(small), "--data.val_fraction", "0.2", "--report.kmeans", "false",
                "--model.n_components", "8")  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.metrics["data"] == "cifar10" and run.metrics["n_train"] == 48 and run.metrics["n_test"] == 60


def test_a_changed_folder_is_decoded_again(small, private_cache):
    first = CIFAR10DataModule(root=str(small)).load()
    assert len(list(private_cache.glob("*.npz"))) == 1
    # replace one image by another class's image: same name and count, new size and mtime
    target = sorted((small / "test" / "dog").iterdir())[0]
    target.write_bytes(sorted((small / "test" / "ship").iterdir())[0].read_bytes())
    os.utime(target, ns=(1, 1))
    second = CIFAR10DataModule(root=str(small)).load()
    i = int(np.argmax(second["test"][1] == cifar10_module.CLASSES.index("dog")))
    j = int(np.argmax(second["test"][1] == cifar10_module.CLASSES.index("ship")))
    assert not np.array_equal(first["test"][0][i], second["test"][0][i])
    assert np.array_equal(second["test"][0][i], second["test"][0][j])


def test_a_corrupt_cache_is_ignored_and_rebuilt(small, private_cache, capsys):
    first = CIFAR10DataModule(root=str(small)).load()
    (path,) = private_cache.glob("*.npz")
    data = bytearray(path.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = b"\x5a" * 64
    path.write_bytes(bytes(data))
    second = CIFAR10DataModule(root=str(small)).load()
    assert "ignoring the unreadable cache" in capsys.readouterr().err
    assert np.array_equal(first["train"][0], second["train"][0])
    third = CIFAR10DataModule(root=str(small)).load()  # the rebuilt cache is good again
    assert "ignoring" not in capsys.readouterr().err and np.array_equal(first["train"][0], third["train"][0])


def test_a_cache_of_other_data_is_never_used(small, private_cache, tmp_path):
    CIFAR10DataModule(root=str(small)).load()
    other = small_image_folder(small, tmp_path / "other", per_class=3)
    fresh = CIFAR10DataModule(root=str(other), cache=False).load()
    # the cache of `small` put where `other`'s belongs (a stale or misplaced file)
    (private_cache / "x").mkdir()
    cifar10_module.cache_path(small).rename(private_cache / "x" / "c.npz")
    (private_cache / "x" / "c.npz").rename(cifar10_module.cache_path(other))
    got = CIFAR10DataModule(root=str(other)).load()
    assert got["train"][0].shape == (30, 3072)
    assert np.array_equal(got["train"][0], fresh["train"][0]) and np.array_equal(got["test"][1], fresh["test"][1])


def test_cache_can_be_turned_off(small, private_cache):
    CIFAR10DataModule(root=str(small), cache=False).load()
    assert not private_cache.exists() or not list(private_cache.iterdir())


def test_class_folders_must_be_the_cifar10_classes(small):
    (small / "train" / "truck").rename(small / "train" / "lorry")
    with pytest.raises(DataError, match="class folders .*lorry.* are not the ten CIFAR-10 classes"):
        CIFAR10DataModule(root=str(small), cache=False).load()


# -- bad input, as users meet it ------------------------------------------------------------------------------


def test_truncated_jpeg_names_the_file(train, small):
    bad = sorted((small / "train" / "frog").iterdir())[2]
    bad.write_bytes(bad.read_bytes()[:300])
    assert_one_line_error(train(*SMALL, "--data.root", str(small), timeout=60), str(bad), "corrupt or truncated")


def test_truncated_pickle_names_the_file(train, tmp_path):
    write_cifar_batches(tmp_path, n_per_batch=20)
    bad = tmp_path / "data_batch_3"
    bad.write_bytes(bad.read_bytes()[:4000])
    assert_one_line_error(train(*SMALL, "--data.root", str(tmp_path), timeout=60), str(bad), "corrupt or truncated")


def test_image_and_label_counts_that_disagree(train, tmp_path):
    write_cifar_batches(tmp_path, n_per_batch=20)
    bad = tmp_path / "test_batch"
    batch = pickle.loads(bad.read_bytes(), encoding="bytes")
    batch[b"labels"] = batch[b"labels"][:-1]
    bad.write_bytes(pickle.dumps(batch, protocol=2))
    assert_one_line_error(train(*SMALL, "--data.root", str(tmp_path), timeout=60), str(bad), "20 images but 19 labels")


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    write_cifar_batches(tmp_path, n_per_batch=20)

    class Exploit:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    (tmp_path / "data_batch_1").write_bytes(pickle.dumps({b"data": Exploit()}))
    with pytest.raises(DataError, match="data_batch_1: not a readable CIFAR-10 batch .*system"):
        CIFAR10DataModule(root=str(tmp_path)).load()
    assert not (tmp_path / "pwned").exists()


def test_missing_data_offline_fails_fast_naming_every_place(train, tmp_path):
    empty = tmp_path / "none"
    empty.mkdir()
    start = time.monotonic()
    run = train(*SMALL, "--data.root", str(empty), "--data.download", "true", timeout=60)
    assert time.monotonic() - start < 60  # no network wait (Python and torch start in well under that)
    assert_one_line_error(
        run, "cifar10", str(empty / "cifar-10-batches-py"), str(empty / "train"), str(empty / "test"), "--data.root"
    )
