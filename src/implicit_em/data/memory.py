"""The in-memory batch loader every dataset shares, and the DataModule base class around it.

Each split is one tensor on the training device; a batch is an index slice of one random permutation per
epoch. No per-sample Python, no collate, no worker processes. ``batch_size`` is the *global* batch: with
DDP each rank takes its own contiguous shard of every global batch, so the objective's batch statistics
are those of the single-device run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import lightning as L
import numpy as np
import torch
from torch import Tensor

from implicit_em.errors import DataError, check, check_choice
from implicit_em.models import first_appearance

NORMALIZATIONS = ("none", "standardize", "zca")


def epoch_permutation(n: int, seed: int, epoch: int) -> Tensor:
    """The data order of one epoch: a permutation of range(n) fixed by (seed, epoch), independent of any RNG."""
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    return torch.randperm(n, generator=g)


class InMemoryLoader:
    """Yields training chunks: lists of up to ``steps_per_call`` micro-batches, each one optimiser step.

    Several exact optimiser steps per Lightning batch amortise Lightning's per-batch overhead; the
    sequence of batches is the same whatever ``steps_per_call`` is. With U > 1 ``seeds`` there are U data
    orders (an ensemble's members with different seeds) and a micro-batch is U x B x D. The last, partial batch is
    kept unless ``drop_last``, or it has fewer than 2 samples per rank (variance undefined), or it does
    not split evenly across ranks. Stateful, so a run resumed mid-epoch continues the epoch.
    """

    def __init__(
        self,
        x: Tensor,
        batch_size: int,
        seeds: Sequence[int],
        epoch_fn: Callable[[], int],
        steps_per_call: int = 1,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ):
        self.x, self.batch_size, self.seeds = x, batch_size, list(seeds)
        self.epoch_fn, self.steps_per_call = epoch_fn, max(1, steps_per_call)
        self.rank, self.world_size = rank, world_size
        n, b = len(x), batch_size
        last = n % b
        keep_last = not drop_last and last >= 2 * world_size and last % world_size == 0
        self.n_batches = n // b + int(keep_last)
        self._resume: dict | None = None
        self._position = (0, 0)

    def __len__(self) -> int:
        return -(-self.n_batches // self.steps_per_call)

    def _batch_indices(self, epoch: int) -> list[Tensor]:
        perms = torch.stack([epoch_permutation(len(self.x), s, epoch) for s in self.seeds])
        perms = perms[:, : min(self.n_batches * self.batch_size, perms.shape[1])].to(self.x.device)
        batches = perms.split(self.batch_size, dim=1)[: self.n_batches]
        shards = [b.chunk(self.world_size, dim=1)[self.rank] for b in batches]
        return [s[0] if len(self.seeds) == 1 else s for s in shards]

    def __iter__(self) -> Iterator[list[Tensor]]:
        epoch = self.epoch_fn()
        start = 0
        if self._resume is not None and self._resume["epoch"] == epoch:
            start = self._resume["chunk"]
        self._resume = None
        batches = self._batch_indices(epoch)
        for c in range(start, len(self)):
            idx = batches[c * self.steps_per_call : (c + 1) * self.steps_per_call]
            self._position = (epoch, c + 1)
            sizes = [i.shape[-1] for i in idx]
            gathered = self.x[torch.cat(idx, dim=-1)]  # one gather per chunk, then views
            yield list(gathered.split(sizes, dim=-2))

    def state_dict(self) -> dict:
        return {"epoch": self._position[0], "chunk": self._position[1]}

    def load_state_dict(self, state: dict) -> None:
        self._resume = dict(state)


class EvalLoader:
    """Sequential (x, y) batches of one split; with DDP each rank takes a contiguous part of the split."""

    def __init__(self, x: Tensor, y: Tensor, batch_size: int, rank: int = 0, world_size: int = 1):
        self.x, self.y = x.tensor_split(world_size)[rank], y.tensor_split(world_size)[rank]
        self.batch_size = batch_size

    def __len__(self) -> int:
        return -(-len(self.x) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        yield from zip(self.x.split(self.batch_size), self.y.split(self.batch_size))


@dataclass
class Split:
    x: Tensor  # N x D float32
    y: Tensor  # N int64


def stratified_split(x: np.ndarray, y: np.ndarray, fraction: float, seed: int, key: str):
    """Split off ``fraction`` of the samples, stratified by label, reproducibly from ``seed``."""
    from sklearn.model_selection import train_test_split

    n_classes, n_out = len(np.unique(y)), int(np.ceil(fraction * len(y)))
    if not n_classes <= n_out <= len(y) - n_classes:
        raise DataError(
            f"{key} {fraction} puts {n_out} of {len(y)} samples aside; each side needs at least {n_classes} (one per class)"
        )
    return train_test_split(x, y, test_size=fraction, stratify=y, random_state=seed)


class InMemoryDataModule(L.LightningDataModule):
    """Base DataModule: subclasses implement :meth:`load`; this class splits, normalises and serves.

    Args:
        root: where the data files are (each dataset documents the layouts it accepts).
        batch_size: the global batch size (divided across DDP ranks; must divide evenly).
        val_fraction: fraction of the training split held out for validation (stratified).
        test_fraction: fraction held out for testing when the source has no test split.
        seed: fixes the splits, and the data order unless the model gives per-member seeds.
        normalization: ``none`` (pixels in [0, 1]), ``standardize`` (per feature) or ``zca`` (whitening),
            fitted on the training split.
        eval_batch_size: batch size of the validation pass (metrics are exact over the split regardless).
        steps_per_call: optimiser steps per Lightning batch (speed only; forced to 1 under DDP).
        drop_last: drop each epoch's last, partial batch.
    """

    #: the shape of one sample as an image, for feature images; subclasses set it
    image_shape: tuple[int, ...] = ()
    name = "data"

    def __init__(
        self,
        root: str | None = None,
        batch_size: int = 128,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        seed: int = 0,
        normalization: str = "none",
        eval_batch_size: int = 4096,
        steps_per_call: int = 8,
        drop_last: bool = False,
    ):
        super().__init__()
        check_data_args(batch_size, val_fraction, test_fraction, normalization, eval_batch_size, steps_per_call)
        self.root, self.batch_size, self.val_fraction, self.test_fraction = (
            root,
            batch_size,
            val_fraction,
            test_fraction,
        )
        self.seed, self.normalization = seed, normalization
        self.eval_batch_size, self.steps_per_call, self.drop_last = eval_batch_size, steps_per_call, drop_last
        self.splits: dict[str, Split] = {}
        self._device_splits: dict[str, Split] = {}

    @property
    def dims(self) -> int:
        """Input dimension D, known from the settings alone (no data loaded)."""
        return int(np.prod(self.image_shape))

    def load(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Return ``{"train": (x, y), "test": (x, y)}`` (test optional), x float32 N x D in [0, 1]."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        raw = self.load()
        for name, (x, _) in raw.items():  # before splitting, so the index is the sample's place in the source
            check_finite(np.asarray(x), f"{self.name} {name} data")
        x_train, y_train = raw["train"]
        if "test" in raw:
            x_test, y_test = raw["test"]
        else:
            x_train, x_test, y_train, y_test = stratified_split(
                x_train, y_train, self.test_fraction, self.seed, "data.test_fraction"
            )
        x_train, x_val, y_train, y_val = stratified_split(
            x_train, y_train, self.val_fraction, self.seed, "data.val_fraction"
        )
        parts = {"train": (x_train, y_train), "val": (x_val, y_val), "test": (x_test, y_test)}
        transform = fit_normalization(np.asarray(x_train, dtype=np.float64), self.normalization)
        self.splits = {
            name: Split(
                torch.as_tensor(transform(np.asarray(x, dtype=np.float32))), torch.as_tensor(y, dtype=torch.long)
            )
            for name, (x, y) in parts.items()
        }
        if len(self.splits["train"].x) < self.batch_size:
            raise DataError(
                f"data.batch_size {self.batch_size} exceeds the {len(self.splits['train'].x)} training samples of "
                f"{self.name}; lower --data.batch_size"
            )

    def device_split(self, name: str) -> Split:
        """Split ``name`` (train, val, test) as tensors on the training device, moved once and cached."""
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        cached = self._device_splits.get(name)
        if cached is None or cached.x.device != device:
            s = self.splits[name]
            cached = self._device_splits[name] = Split(s.x.to(device), s.y.to(device))
        return cached

    def _rank_world(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def train_dataloader(self) -> InMemoryLoader:
        rank, world = self._rank_world()
        if self.batch_size % world:
            raise DataError(f"data.batch_size {self.batch_size} must divide evenly across {world} devices")
        module = self.trainer.lightning_module if self.trainer is not None else None
        # one data order per distinct member seed, in order of first appearance (how the model reads them)
        seeds = first_appearance(getattr(module, "member_seeds", None) or [self.seed])[0]
        return InMemoryLoader(
            self.device_split("train").x,
            self.batch_size,
            seeds,
            epoch_fn=(lambda: self.trainer.current_epoch) if self.trainer is not None else (lambda: 0),
            steps_per_call=self.steps_per_call if world == 1 else 1,
            rank=rank,
            world_size=world,
            drop_last=self.drop_last,
        )

    def val_dataloader(self) -> EvalLoader:
        s = self.device_split("val")
        return EvalLoader(s.x, s.y, self.eval_batch_size, *self._rank_world())


def check_data_args(batch_size, val_fraction, test_fraction, normalization, eval_batch_size, steps_per_call) -> None:
    """Validate the DataModule settings (called by the CLI before anything is built)."""
    check(
        isinstance(batch_size, int) and batch_size >= 2,
        "data.batch_size",
        "an integer >= 2 (the variance term needs 2 samples)",
        batch_size,
    )
    check(0 < val_fraction < 1, "data.val_fraction", "in (0, 1)", val_fraction)
    check(0 < test_fraction < 1, "data.test_fraction", "in (0, 1)", test_fraction)
    check_choice(normalization, "data.normalization", NORMALIZATIONS)
    check(eval_batch_size >= 1, "data.eval_batch_size", ">= 1", eval_batch_size)
    check(steps_per_call >= 1, "data.steps_per_call", ">= 1", steps_per_call)


def check_finite(x: np.ndarray, what: str) -> None:
    """Reject NaN/inf in loaded data, naming the first bad sample."""
    bad = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1)
    if bad.any():
        raise DataError(f"{what}: sample {int(np.argmax(bad))} has non-finite values (NaN or inf); fix the data files")


def fit_normalization(x_train: np.ndarray, kind: str) -> Callable[[np.ndarray], np.ndarray]:
    """A transform fitted on the training split: identity, per-feature standardisation, or ZCA whitening."""
    if kind == "none":
        return lambda x: x
    mean = x_train.mean(axis=0)
    if kind == "standardize":
        std = x_train.std(axis=0)
        std[std < 1e-8] = 1.0
        return lambda x: ((x - mean) / std).astype(np.float32)
    cov = np.cov(x_train - mean, rowvar=False)
    evals, evecs = np.linalg.eigh(cov)
    whiten = (evecs / np.sqrt(np.maximum(evals, 0) + 0.1 * evals.mean())) @ evecs.T
    return lambda x: ((x - mean) @ whiten).astype(np.float32)
