"""MNIST and Fashion-MNIST: the original IDX files, in torchvision's layout or a plain folder.

``--data.root DIR`` may hold the four files (``train-images-idx3-ubyte[.gz]``, ``train-labels-idx1-ubyte``,
``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``) directly, or torchvision's ``DIR/MNIST/raw`` /
``DIR/FashionMNIST/raw``. With ``download: true`` torchvision fetches them into ``DIR`` when missing.
Fashion-MNIST is also found, without download, where Debian's ``dataset-fashion-mnist`` puts it.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from implicit_em.data.idx import read_image_label_pair
from implicit_em.data.memory import InMemoryDataModule
from implicit_em.errors import DataError
from implicit_em.loggers import reachable

FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _find(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


class IDXDataModule(InMemoryDataModule):
    """Shared by MNIST and Fashion-MNIST: 28 x 28 grey images, 60,000 train and 10,000 test.

    Args:
        root: a folder with the four IDX files, or torchvision's root. Default: ``data`` and the
            dataset's system folders.
        download: fetch the files with torchvision when they are missing (needs internet).
        **kwargs: the common options of :class:`InMemoryDataModule`.
    """

    image_shape = (28, 28)
    torchvision_name = ""
    system_roots: tuple[str, ...] = ()
    how_to_get = ""

    def __init__(self, root: str | None = None, download: bool = False, **kwargs):
        super().__init__(root=root, **kwargs)
        self.download = download

    def candidate_folders(self) -> list[Path]:
        roots = [Path(self.root)] if self.root else [Path("data"), *map(Path, self.system_roots)]
        return [f for r in roots for f in (r, r / self.torchvision_name / "raw")]

    def locate(self) -> dict[str, tuple[Path, Path]] | None:
        """The image and label files of each split, from the first folder that has all four."""
        for folder in self.candidate_folders():
            found = {split: tuple(_find(folder, stem) for stem in stems) for split, stems in FILES.items()}
            if all(p is not None for pair in found.values() for p in pair):
                return found
        return None

    def prepare_data(self) -> None:
        if self.locate() is None and self.download:
            self._download()

    def _download(self) -> None:
        import torchvision

        dataset = getattr(torchvision.datasets, self.torchvision_name)
        root = Path(self.root or "data")
        hosts = {urlparse(m).hostname for m in getattr(dataset, "mirrors", [])} or {"ossci-datasets.s3.amazonaws.com"}
        if not any(reachable((h, 443), timeout=5) for h in hosts):
            raise DataError(
                f"{self.name}: files not found and no network to download them (tried {', '.join(sorted(hosts))}); "
                f"looked in {self._looked_in()}; {self.how_to_get}"
            )
        try:
            for train in (True, False):
                dataset(str(root), train=train, download=True)
        except Exception as e:  # torchvision raises RuntimeError/URLError/OSError variously
            raise DataError(f"{self.name}: download into {root.resolve()} failed ({e}); {self.how_to_get}") from None

    def _looked_in(self) -> str:
        return ", ".join(str(f.resolve()) for f in self.candidate_folders())

    def load(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        files = self.locate()
        if files is None:
            raise DataError(
                f"{self.name}: the four IDX files (train-images-idx3-ubyte[.gz], ...) are not in any of: {self._looked_in()}; "
                f"{self.how_to_get}"
            )
        return {split: read_image_label_pair(*pair) for split, pair in files.items()}


class MNISTDataModule(IDXDataModule):
    """MNIST handwritten digits (LeCun et al.), via torchvision or the original IDX files."""

    name = "mnist"
    torchvision_name = "MNIST"
    how_to_get = "pass --data.root DIR holding the four files, or --data.download true on a machine with internet"


class FashionMNISTDataModule(IDXDataModule):
    """Fashion-MNIST (Xiao et al.), found without download in Debian's ``/usr/share/datasets/fashion-mnist``."""

    name = "fashion_mnist"
    torchvision_name = "FashionMNIST"
    system_roots = ("/usr/share/datasets/fashion-mnist",)
    how_to_get = (
        "install Debian's package (apt-get install dataset-fashion-mnist), pass --data.root DIR holding the four "
        "files, or --data.download true on a machine with internet"
    )
