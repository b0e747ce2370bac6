"""The DataModule base classes and the in-memory batch loader the in-memory sources share.

Each in-memory split is one tensor on the training device; a batch is an index slice of one random
permutation per epoch. No per-sample Python, no collate, no worker processes. ``batch_size`` is the *global*
batch: with DDP each rank takes its own contiguous part of every global batch, so the objective's batch
statistics are those of the single-device run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor

from implicit_em.data.normalization import NORMALIZATIONS, Normalization
from implicit_em.errors import DataError, check, check_choice
from implicit_em.training.steps import ChunkedEpochs, TrainPosition, step_clock


def epoch_permutation(n: int, seed: int, epoch: int) -> Tensor:
    """The data order of one epoch: a permutation of range(n) fixed by (seed, epoch), independent of any RNG."""
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    return torch.randperm(n, generator=g)


def batches_per_epoch(n: int, batch_size: int, drop_last: bool) -> int:
    """Global batches per epoch: the last, partial one is kept unless ``drop_last`` or it has fewer than 2
    samples (the batch variance needs 2). The same for any number of processes."""
    last = n % batch_size
    return n // batch_size + int(not drop_last and last >= 2)


def epoch_sizes(n_rows: int, batch_size: int, drop_last: bool) -> list[int]:
    """The rows of each global batch of one epoch of ``n_rows`` rows: full batches, then the last, partial one
    where it is kept (:func:`batches_per_epoch`)."""
    sizes = [batch_size] * (n_rows // batch_size)
    return sizes + [n_rows % batch_size] if batches_per_epoch(n_rows, batch_size, drop_last) > len(sizes) else sizes


def rows_of_steps(steps: int, n_rows: int, batch_size: int, drop_last: bool) -> int:
    """The rows that ``steps`` optimiser steps train on, one batch each, epoch after epoch of ``n_rows`` rows
    (:func:`epoch_sizes`): with s = len(sizes) batches of R = sum(sizes) rows an epoch,
    rows(steps) = (steps // s) R + sum(sizes[: steps % s])."""
    sizes = epoch_sizes(n_rows, batch_size, drop_last)
    if not sizes:
        return 0
    epochs, rest = divmod(int(steps), len(sizes))
    return epochs * sum(sizes) + sum(sizes[:rest])


def steps_for_rows(rows: int, n_rows: int, batch_size: int, drop_last: bool) -> int:
    """The fewest optimiser steps whose rows (:func:`rows_of_steps`) reach ``rows``."""
    sizes = epoch_sizes(n_rows, batch_size, drop_last)
    if rows <= 0:
        return 0
    if not sizes:
        raise DataError(f"an epoch of {n_rows} rows in batches of {batch_size} has no batch; lower the batch size")
    epochs, left = divmod(int(rows), sum(sizes))
    steps, seen = epochs * len(sizes), 0
    for size in sizes if left else ():
        seen, steps = seen + size, steps + 1
        if seen >= left:
            break
    return steps


def rank_rows(batch: Tensor, rank: int, world_size: int) -> Tensor:
    """This rank's contiguous part of a global batch (parts differ by at most one row)."""
    return batch.tensor_split(world_size)[rank] if world_size > 1 else batch


@dataclass
class Split:
    x: Tensor  # N x D float32
    y: Tensor  # N int64 (-1: no label)
    groups: Tensor | None = None  # N int64: the document each row came from, where known


class InMemoryLoader(ChunkedEpochs):
    """Yields training chunks: lists of micro-batches of one in-memory tensor, one exact optimiser step each.

    Each epoch is one permutation fixed by (seed, epoch); ``batch_size`` is the global batch and every rank
    reads its contiguous part of it. Chunk lengths follow :func:`~implicit_em.training.steps.chunk_lengths` from
    the Trainer's global step when the epoch starts. Stateful, so a run resumed mid-epoch continues the epoch
    exactly. Has a length only when every chunk is one step (then it is the number of steps).
    """

    def __init__(
        self,
        x: Tensor,
        batch_size: int,
        seed: int,
        step_fn: Callable[[], int] = lambda: 0,
        chunk: int = 1,
        max_steps: int = -1,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ):
        super().__init__(batches_per_epoch(len(x), batch_size, drop_last), step_fn, chunk, max_steps)
        self.x, self.batch_size, self.seed = x, batch_size, seed
        self.rank, self.world_size = rank, world_size

    def __iter__(self) -> Iterator[list[Tensor]]:
        epoch, position, lengths = self.start_epoch()
        perm = epoch_permutation(len(self.x), self.seed, epoch).to(self.x.device)
        batches = perm.split(self.batch_size)[: self.n_batches]
        for length in lengths:
            idx = [rank_rows(b, self.rank, self.world_size) for b in batches[position : position + length]]
            position += length
            self.handed_out(epoch, position)
            gathered = self.x[torch.cat(idx)]  # one gather per chunk, then views
            yield list(gathered.split([len(i) for i in idx]))


class EvalLoader:
    """Sequential (x, y) batches of one split; with DDP each rank takes a contiguous part of the split."""

    def __init__(self, x: Tensor, y: Tensor, batch_size: int, rank: int = 0, world_size: int = 1):
        self.x, self.y = x.tensor_split(world_size)[rank], y.tensor_split(world_size)[rank]
        self.batch_size = batch_size

    def __len__(self) -> int:
        return -(-len(self.x) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        yield from zip(self.x.split(self.batch_size), self.y.split(self.batch_size))


def stratified_split(x: np.ndarray, y: np.ndarray, fraction: float, seed: int, key: str):
    """Split off ``fraction`` of the samples, stratified by label, reproducibly from ``seed``."""
    from sklearn.model_selection import train_test_split

    n_classes, n_out = len(np.unique(y)), int(np.ceil(fraction * len(y)))
    if not n_classes <= n_out <= len(y) - n_classes:
        raise DataError(
            f"{key} {fraction} puts {n_out} of {len(y)} samples aside; each side needs at least {n_classes} (one per class)"
        )
    return train_test_split(x, y, test_size=fraction, stratify=y, random_state=seed)


class ComponentDataModule(L.LightningDataModule):
    """What every DataModule offers the modules, the report and the callbacks.

    ``splits`` holds in-memory (CPU) evaluation samples ``train``, ``val`` and ``test``; ``normalization``
    is the transform fitted on training rows, saved in checkpoints (``state_dict``). Subclasses fill both in
    ``setup`` and implement ``train_dataloader`` (chunks; see :mod:`implicit_em.training.steps`).

    Args:
        root: where the data files are (each dataset documents the layouts it accepts).
        batch_size: the global batch size (divided across DDP ranks).
        val_fraction: fraction of the training split held out for validation.
        test_fraction: fraction held out for testing when the source has no test split.
        seed: fixes the splits.
        normalization: none, center, center+scale, standardize (per feature) or zca (whitening), fitted on
            training rows.
        shuffle_seed: fixes the data order (linked from ``--seed_everything``).
        eval_batch_size: batch size of the validation pass (metrics are exact over the split regardless).
        steps_per_call: the most optimiser steps per Lightning batch (speed only; step settings stay exact).
        drop_last: drop each epoch's last, partial batch.
    """

    #: the shape of one sample as an image, for component images; () when the rows are not images
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
        steps_per_call: int = 50,
        drop_last: bool = False,
        shuffle_seed: int = 0,
    ):
        super().__init__()
        check(isinstance(batch_size, int) and batch_size >= 2, "data.batch_size",
              "an integer >= 2 (the variance term needs 2 samples)", batch_size)  # fmt: skip
        check(0 < val_fraction < 1, "data.val_fraction", "in (0, 1)", val_fraction)
        check(0 < test_fraction < 1, "data.test_fraction", "in (0, 1)", test_fraction)
        check_choice(normalization, "data.normalization", NORMALIZATIONS)
        check(eval_batch_size >= 1, "data.eval_batch_size", ">= 1", eval_batch_size)
        check(steps_per_call >= 1, "data.steps_per_call", ">= 1", steps_per_call)
        self.root, self.val_fraction, self.test_fraction = root, val_fraction, test_fraction
        self.batch_size, self.seed, self.shuffle_seed, self.eval_batch_size = (
            batch_size,
            seed,
            shuffle_seed,
            eval_batch_size,
        )
        self.steps_per_call, self.drop_last = steps_per_call, drop_last
        self.normalization_kind = normalization
        self.splits: dict[str, Split] = {}
        self.normalization = Normalization()
        self.position = TrainPosition()
        self._device_splits: dict[str, Split] = {}

    @property
    def dims(self) -> int:
        """Input dimension D, known from the settings alone (no data loaded)."""
        return int(np.prod(self.image_shape))

    @property
    def train_rows(self) -> int:
        """The rows one training epoch reads (after ``setup``): the training split here; a source whose
        ``splits["train"]`` is an evaluation sample of a larger training set says how many it trains on."""
        return len(self.splits["train"].x)

    def device_split(self, name: str) -> Split:
        """Split ``name`` (train, val, test) as tensors on the training device, moved once and cached."""
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        cached = self._device_splits.get(name)
        if cached is None or cached.x.device != device:
            s = self.splits[name]
            cached = self._device_splits[name] = Split(s.x.to(device), s.y.to(device), s.groups)
        return cached

    def rank_world(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def step_clock(self) -> dict[str, Any]:
        """What a training loader reads from the Trainer (see :func:`implicit_em.training.steps.step_clock`)."""
        return step_clock(self.trainer, self.steps_per_call)

    def val_dataloader(self) -> EvalLoader:
        s = self.device_split("val")
        return EvalLoader(s.x, s.y, self.eval_batch_size, *self.rank_world())

    def state_dict(self) -> dict[str, Any]:
        return {"normalization": self.normalization.state_dict(), **self.position.state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "normalization" in state:
            self.normalization = Normalization.from_state_dict(state["normalization"])
        self.position.restore(state)


class InMemoryDataModule(ComponentDataModule):
    """Base of the in-memory sources: subclasses implement :meth:`load`; this class splits, normalises and
    serves every split as one tensor on the training device.

    The arguments are :class:`ComponentDataModule`'s (validation split stratified by label; normalisation
    ``none`` keeps pixels in [0, 1]).
    """

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
        tensors = {k: torch.as_tensor(np.asarray(x, dtype=np.float32)) for k, (x, _) in parts.items()}
        self.normalization = Normalization.fit(tensors["train"], self.normalization_kind)
        self.splits = {
            k: Split(self.normalization(tensors[k]), torch.as_tensor(y, dtype=torch.long))
            for k, (_, y) in parts.items()
        }
        if len(self.splits["train"].x) < self.batch_size:
            raise DataError(
                f"data.batch_size {self.batch_size} exceeds the {len(self.splits['train'].x)} training samples of "
                f"{self.name}; lower --data.batch_size"
            )

    def train_dataloader(self) -> InMemoryLoader:
        rank, world = self.rank_world()
        return self.position.track(InMemoryLoader(
            self.device_split("train").x, self.batch_size, self.shuffle_seed, rank=rank, world_size=world,
            drop_last=self.drop_last, **self.step_clock(),
        ))  # fmt: skip


def check_finite(x: np.ndarray, what: str) -> None:
    """Reject NaN/inf in loaded data, naming the first bad sample."""
    bad = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1)
    if bad.any():
        raise DataError(f"{what}: sample {int(np.argmax(bad))} has non-finite values (NaN or inf); fix the data files")
