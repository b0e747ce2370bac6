"""MNIST and Fashion-MNIST: the original IDX files, in torchvision's layout or a plain folder.

``--data.root DIR`` may hold the four files (``train-images-idx3-ubyte[.gz]``, ``train-labels-idx1-ubyte``,
``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``) directly, or torchvision's ``DIR/MNIST/raw`` /
``DIR/FashionMNIST/raw``. With ``download: true`` torchvision fetches them into ``DIR`` when missing.
Fashion-MNIST is also found, without download, where Debian's ``dataset-fashion-mnist`` puts it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from implicit_em.data.download import fetch
from implicit_em.data.idx import read_image_label_pair
from implicit_em.data.memory import InMemoryDataModule
from implicit_em.errors import DataError

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
            import torchvision

            dataset = getattr(torchvision.datasets, self.torchvision_name)
            root = Path(self.root or "data")
            urls = getattr(dataset, "mirrors", None) or ["https://ossci-datasets.s3.amazonaws.com/mnist/"]

            def download():
                for train in (True, False):
                    dataset(str(root), train=train, download=True)

            fetch(self.name, urls, download, self._looked_in(), self.how_to_get)

    def _looked_in(self) -> str:
        """The folders searched, each with the files it lacks when it holds some of the four."""
        parts = []
        for folder in self.candidate_folders():
            stems = [stem for pair in FILES.values() for stem in pair]
            missing = [stem for stem in stems if _find(folder, stem) is None]
            note = f" (lacks {', '.join(missing)})" if 0 < len(missing) < len(stems) else ""
            parts.append(f"{folder.resolve()}{note}")
        return ", ".join(parts)

    def load(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        files = self.locate()
        if files is None:
            raise DataError(
                f"{self.name}: the four IDX files (train-images-idx3-ubyte[.gz], ...) are not in any of: "
                f"{self._looked_in()}; {self.how_to_get}"
            )
        out = {split: read_image_label_pair(*pair) for split, pair in files.items()}
        for split, (x, _) in out.items():
            if x.shape[1] != self.dims:
                raise DataError(
                    f"{files[split][0]}: images of {x.shape[1]} pixels; {self.name} images are "
                    f"{' x '.join(map(str, self.image_shape))} ({self.dims}); replace the file"
                )
        return out


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
