"""Random colour patches of the CIFAR-10 training images, normalised as in Coates, Lee & Ng (2011).

Each patch (p x p x 3, flattened C x p x p like the images) gets its own brightness and contrast normalisation,
u = (x - mean(x)) / sqrt(var(x) + e) with e = 10 on the 0..255 pixel scale, and then ZCA whitening fitted on
the training patches, x_w = (u - mu) P with P = U diag(1 / sqrt(lambda + eps)) U^T. The fitted
normalisation travels with the model (the DataModule's ``state_dict``), and :mod:`implicit_em.eval.coates` folds
it into the convolution that applies the components at every position of an image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from implicit_em.data.cifar10 import CIFAR10DataModule, read_image_folder, read_pickle_folder
from implicit_em.data.memory import ComponentDataModule, InMemoryLoader, Split, stratified_split
from implicit_em.errors import DataError, check

#: Coates' contrast constant, 10 on the 0..255 scale, here on the [0, 1] pixel scale
CONTRAST_EPS = 10 / 255**2


def check_patch_size(patch_size: int, image_size: int) -> None:
    """One-line :class:`ConfigError` unless 1 <= patch_size <= image_size."""
    check(
        isinstance(patch_size, int) and 1 <= patch_size <= image_size,
        "data.patch_size",
        f"an integer from 1 to the image size {image_size}",
        patch_size,
    )


def sample_patches(images: Tensor, n: int, patch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``n`` patches at uniformly random images and positions, and the index of each patch's image:
    N x C x H x W -> n x (C p p), rows in C x p x p order, same dtype as ``images``."""
    _, c, h, w = images.shape
    check_patch_size(patch_size, min(h, w))
    i = torch.randint(len(images), (n,), generator=generator)
    r = torch.randint(h - patch_size + 1, (n,), generator=generator)
    s = torch.randint(w - patch_size + 1, (n,), generator=generator)
    offsets = torch.arange(patch_size)
    rows = (r[:, None] + offsets)[:, None, :, None]  # n x 1 x p x 1
    cols = (s[:, None] + offsets)[:, None, None, :]  # n x 1 x 1 x p
    channels = torch.arange(c)[None, :, None, None]
    return images[i[:, None, None, None], channels, rows, cols].reshape(n, -1), i


def contrast_normalize(patches: Tensor, eps: float = CONTRAST_EPS) -> Tensor:
    """Brightness and contrast normalisation of each row: u = (x - mean(x)) / sqrt(var(x) + eps), the
    variance unbiased (over the row's D values, the last dimension), as Coates, Lee & Ng do."""
    centred = patches - patches.mean(dim=-1, keepdim=True)
    return centred / (centred.pow(2).sum(dim=-1, keepdim=True) / (patches.shape[-1] - 1) + eps).sqrt()


def zca_matrix(cov: Tensor, eps: float) -> Tensor:
    """The ZCA whitening matrix P = U diag(1 / sqrt(lambda + eps)) U^T of a covariance U diag(lambda) U^T.

    Directions with lambda ~ 0 (the patch-mean direction, which contrast normalisation removes) are mapped
    to 0 rather than scaled by 1 / sqrt(eps): then for eps = 0, Cov(x P) is the projection onto the data's
    span, identity on it.
    """
    lam, u = torch.linalg.eigh(cov.double())
    null = lam <= 1e-9 * lam.max().clamp_min(1e-300)
    scale = torch.where(null, torch.zeros_like(lam), (lam.clamp_min(0) + eps).rsqrt())
    return (u * scale) @ u.T


@dataclass
class PatchNormalization:
    """The fitted patch normalisation: x -> (contrast_normalize(x, contrast_eps) - mean) @ whiten.

    Args:
        patch_size: p; patches are C x p x p, flattened.
        channels: C.
        contrast_eps: e in sqrt(var + e), on the [0, 1] pixel scale.
        mean: mu (D), the mean contrast-normalised training patch.
        whiten: P (D x D), symmetric.
    """

    patch_size: int
    channels: int
    contrast_eps: float
    mean: Tensor
    whiten: Tensor

    @classmethod
    def fit(
        cls, patches: Tensor, patch_size: int, channels: int = 3, contrast_eps: float = CONTRAST_EPS, zca_eps=0.1
    ) -> PatchNormalization:
        """Fit mu and P (eps = ``zca_eps``) on raw training patches (n x D, pixels in [0, 1])."""
        u = contrast_normalize(patches.double(), contrast_eps)
        mean = u.mean(0)
        centred = u - mean
        cov = centred.T @ centred / (len(u) - 1)
        return cls(patch_size, channels, contrast_eps, mean.float(), zca_matrix(cov, zca_eps).float())

    @property
    def dims(self) -> int:
        return self.channels * self.patch_size**2

    def inverse(self) -> None:
        """None: each patch's own brightness and contrast are divided out, so no map leads back to raw pixels (the
        SAE metrics are then in the whitened space)."""
        return None

    def __call__(self, patches: Tensor) -> Tensor:
        """Normalised, whitened patches (float32) of raw patches n x D with pixels in [0, 1]."""
        u = contrast_normalize(patches.double(), self.contrast_eps)
        return ((u - self.mean.double()) @ self.whiten.double()).float()

    def state_dict(self) -> dict:
        return {
            "patch_size": self.patch_size,
            "channels": self.channels,
            "contrast_eps": self.contrast_eps,
            "mean": self.mean.clone(),
            "whiten": self.whiten.clone(),
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> PatchNormalization:
        return cls(
            int(state["patch_size"]),
            int(state["channels"]),
            float(state["contrast_eps"]),
            torch.as_tensor(state["mean"]).float(),
            torch.as_tensor(state["whiten"]).float(),
        )


def read_cifar10_images(root: str | None, download: bool = False, cache: bool = True) -> dict[str, tuple]:
    """CIFAR-10 as uint8 tensors N x 3 x 32 x 32 and int64 labels: ``{"train": (x, y), "test": (x, y)}``,
    from any layout :class:`CIFAR10DataModule` reads."""
    images = CIFAR10DataModule(root=root, download=download, cache=cache)
    images.prepare_data()
    found = images.locate()
    if found is None:
        raise DataError(f"cifar10: no CIFAR-10 data in any of: {images._looked_in()}; pass --data.root DIR")
    kind, folder = found
    raw = read_pickle_folder(folder) if kind == "pickle" else read_image_folder(folder, cache)
    return {split: (torch.as_tensor(x), torch.as_tensor(y)) for split, (x, y) in raw.items()}


class CIFAR10PatchesDataModule(ComponentDataModule):
    """Random p x p colour patches of CIFAR-10's training images, contrast-normalised and ZCA-whitened.

    The model trains on ``n_patches`` patches of the training images (those left after ``val_fraction`` of
    them, stratified, are held out). ``splits`` hold ``n_eval`` patches each of the training, held-out and test
    images, labelled with their image's class (the training one is the first ``n_eval`` training patches), for
    the diagnostics, the data-aware start and the end-of-run evaluation; ``images`` holds the uint8 images of
    the three splits for :mod:`implicit_em.eval.coates`. ``normalization`` is the fitted
    :class:`PatchNormalization`, saved in checkpoints.

    Args:
        root: as :class:`CIFAR10DataModule` (torchvision's batches or train/<class>/ and test/<class>/ folders).
        patch_size: p (default 6: 108 dims).
        n_patches: training patches, drawn once (seeded by ``seed``).
        n_eval: patches in each evaluation split.
        contrast_eps: e in u = (x - mean) / sqrt(var + e), on the 0..255 pixel scale (Coates: 10).
        zca_eps: eps in P = U diag(1 / sqrt(lambda + eps)) U^T (Coates: 0.1).
        val_fraction: fraction of the training images held out (stratified).
        download: fetch torchvision's batches when no layout is found.
        cache: keep decoded image folders in the user cache directory.
        (the other arguments: see :class:`ComponentDataModule`)
    """

    name = "cifar10_patches"

    def __init__(
        self,
        patch_size: int = 6,
        n_patches: int = 400_000,
        n_eval: int = 20_000,
        contrast_eps: float = 10.0,
        zca_eps: float = 0.1,
        download: bool = False,
        cache: bool = True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        check_patch_size(patch_size, 32)
        check(isinstance(n_patches, int) and n_patches >= self.batch_size, "data.n_patches",
              f"an integer >= data.batch_size {self.batch_size}", n_patches)  # fmt: skip
        check(isinstance(n_eval, int) and n_eval >= 2, "data.n_eval", "an integer >= 2", n_eval)
        check(contrast_eps > 0, "data.contrast_eps", "> 0", contrast_eps)
        check(zca_eps >= 0, "data.zca_eps", ">= 0", zca_eps)
        self.patch_size, self.n_patches, self.n_eval = patch_size, n_patches, n_eval
        self.contrast_eps, self.zca_eps = contrast_eps, zca_eps
        self.download, self.cache = download, cache
        self.image_shape = (3, patch_size, patch_size)
        self.images: dict[str, tuple[Tensor, Tensor]] = {}
        self.normalization: PatchNormalization | None = None
        self.train_patches: Tensor | None = None
        self._device_train: Tensor | None = None

    def prepare_data(self) -> None:
        if self.download:
            CIFAR10DataModule(root=self.root, download=True).prepare_data()

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        raw = read_cifar10_images(self.root, cache=self.cache)
        x, y = raw["train"]
        x_train, x_val, y_train, y_val = stratified_split(
            x.numpy(), y.numpy(), self.val_fraction, self.seed, "data.val_fraction"
        )
        self.images = {
            "train": (torch.as_tensor(x_train), torch.as_tensor(y_train)),
            "val": (torch.as_tensor(x_val), torch.as_tensor(y_val)),
            "test": raw["test"],
        }
        g = torch.Generator().manual_seed(self.seed)
        patches, labels = {}, {}
        for split, n in (("train", self.n_patches), ("val", self.n_eval), ("test", self.n_eval)):
            images, y_images = self.images[split]
            patches[split], index = sample_patches(images, n, self.patch_size, g)
            labels[split] = y_images[index].long()
        self.normalization = PatchNormalization.fit(
            patches["train"].float() / 255, self.patch_size, 3, self.contrast_eps / 255**2, self.zca_eps
        )
        normalized = {s: self._normalize(p) for s, p in patches.items()}
        self.train_patches = normalized["train"]
        self.splits = {s: Split(normalized[s][: self.n_eval], labels[s][: self.n_eval]) for s in normalized}

    def _normalize(self, patches: Tensor, chunk: int = 65536) -> Tensor:
        return torch.cat([self.normalization(p.float() / 255) for p in patches.split(chunk)])

    @property
    def train_rows(self) -> int:
        """All ``n_patches`` training patches (``splits["train"]`` is the evaluation sample of them)."""
        return len(self.train_patches)

    def train_dataloader(self) -> InMemoryLoader:
        """All ``n_patches`` training patches (``splits["train"]`` is the evaluation sample of them)."""
        device = self.device_split("train").x.device
        if self._device_train is None or self._device_train.device != device:
            self._device_train = self.train_patches.to(device)
        rank, world = self.rank_world()
        return self.position.track(InMemoryLoader(
            self._device_train, self.batch_size, self.shuffle_seed, rank=rank,
            world_size=world, drop_last=self.drop_last, **self.step_clock(),
        ))  # fmt: skip

    def state_dict(self) -> dict:
        normalization = self.normalization.state_dict() if self.normalization is not None else None
        return {"normalization": normalization, **self.position.state()}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict.get("normalization") is not None:
            self.normalization = PatchNormalization.from_state_dict(state_dict["normalization"])
        self.position.restore(state_dict)


def patch_normalization_from_checkpoint(checkpoint: dict) -> PatchNormalization:
    """The fitted :class:`PatchNormalization` saved in a Lightning checkpoint by the DataModule."""
    for key, value in checkpoint.items():
        if key.endswith(CIFAR10PatchesDataModule.__qualname__) and isinstance(value, dict):
            return PatchNormalization.from_state_dict(value["normalization"])
    raise DataError(f"the checkpoint holds no {CIFAR10PatchesDataModule.__qualname__} state; train on patches")
