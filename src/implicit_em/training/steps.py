"""Several exact optimiser steps per Lightning batch (a *chunk*): everything that machinery needs, in one place.

Several steps per Lightning batch remove Lightning's per-batch overhead from the step (``data.steps_per_call``). Every step setting of
the Trainer still counts optimiser steps because no chunk crosses a step the Trainer acts on: chunk lengths
divide ``log_every_n_steps`` and every checkpoint's ``every_n_train_steps``, chunks end on multiples of that
length and on ``max_steps``. Settings that Lightning counts in batches (``limit_train_batches``, an
integer or fractional ``val_check_interval``) and DDP (one backward per DDP forward) get one step per chunk.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from lightning.pytorch.callbacks import ModelCheckpoint


def chunk_steps(trainer, steps_per_call: int) -> int:
    """c, the most optimiser steps one chunk may carry under ``trainer``'s settings (``steps_per_call`` at most)."""
    if trainer is None:
        return max(1, steps_per_call)
    counted_in_batches = (trainer.limit_train_batches, trainer.val_check_interval)
    if trainer.world_size > 1 or any(isinstance(v, int) or v != 1.0 for v in counted_in_batches):
        return 1
    # the project's Checkpoint says its step interval; a checkpoint callback that does not could save on any step
    intervals = [getattr(cb, "every_n_train_steps", 1) for cb in trainer.checkpoint_callbacks]
    c = max(1, steps_per_call)
    for every in (trainer.log_every_n_steps, *intervals):
        if every:
            c = math.gcd(c, int(every))
    return c


def chunk_lengths(n_steps: int, first_step: int, c: int, max_steps: int = -1) -> list[int]:
    """Lengths of the consecutive chunks that cover ``n_steps`` optimiser steps after global step ``first_step``:
    each ends on a multiple of ``c``, on ``max_steps`` (when > 0) or on the last step."""
    lengths, step, end = [], first_step, first_step + n_steps
    while step < end:
        stop = min(end, (step // c + 1) * c)
        if 0 < max_steps and step < max_steps < stop:
            stop = max_steps
        lengths.append(stop - step)
        step = stop
    return lengths


class Checkpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint (every argument is its own) that tells the training loaders its step
    interval, so that chunks of optimiser steps never jump over a step it saves on."""

    def __init__(self, *args, every_n_train_steps: int | None = None, **kwargs):
        super().__init__(*args, every_n_train_steps=every_n_train_steps, **kwargs)
        self.every_n_train_steps = every_n_train_steps or 0


def step_clock(trainer, steps_per_call: int) -> dict:
    """What a training loader reads from the Trainer (all public): the global step (a function), ``max_steps``
    and the chunk length c (:func:`chunk_steps`)."""
    if trainer is None:
        return {"step_fn": lambda: 0, "max_steps": -1, "chunk": max(1, steps_per_call)}
    return {"step_fn": lambda: trainer.global_step, "max_steps": trainer.max_steps,
            "chunk": chunk_steps(trainer, steps_per_call)}  # fmt: skip


class ChunkedEpochs:
    """What every training loader shares: the position in the epoch (to resume mid-epoch exactly) and the
    chunk lengths of an epoch's iteration.

    The epoch comes through the sampler protocol: Lightning calls ``loader.sampler.set_epoch(e)`` before every
    training epoch. A resumed fit fetches its first batch before that call, so its first iteration starts from
    the position the checkpoint saved (:meth:`load_state_dict`: the epoch, and the batch within it).
    ``step_fn`` reads the Trainer's global step. The saved position counts the
    batches trained on: with a step clock, the optimiser steps taken since the epoch began (Lightning fetches a
    chunk ahead of the one it trains on, so the chunks handed out are one more); without one, every chunk
    handed out counts. A loader has a length only when every chunk is one step.
    """

    def __init__(self, n_batches: int, step_fn: Callable[[], int] | None, chunk: int, max_steps: int):
        self.n_batches, self.step_fn, self.epoch = n_batches, step_fn, 0
        self.chunk, self.max_steps = max(1, chunk), max_steps
        self._resume: dict | None = None
        self._position = (0, 0)
        self._epoch_start: tuple[int, int, int] | None = None

    @property
    def sampler(self) -> ChunkedEpochs:
        """The object Lightning calls ``set_epoch`` on (this loader)."""
        return self

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        if self.chunk > 1:  # how many chunks an epoch has depends on the step it starts at
            raise TypeError("a chunked loader has no fixed length")
        return self.n_batches

    def start_epoch(self) -> tuple[int, int, list[int]]:
        """(epoch, first batch, chunk lengths) of the iteration that begins now, from a loaded position if any."""
        epoch, start = self.epoch, 0
        if self._resume is not None:  # a checkpoint's position: the first iteration of a resumed fit begins there
            epoch, start = int(self._resume["epoch"]), int(self._resume["batch"])
            if start >= self.n_batches:  # saved at the end of an epoch: the next one begins
                epoch, start = epoch + 1, 0
            self.epoch = epoch
        self._resume = None
        first_step = self.step_fn() if self.step_fn is not None else 0
        self._epoch_start, self._position = (epoch, start, first_step), (epoch, start)
        return epoch, start, chunk_lengths(self.n_batches - start, first_step, self.chunk, self.max_steps)

    def handed_out(self, epoch: int, position: int) -> None:
        """Note that the batches up to ``position`` of ``epoch`` have been handed out."""
        self._position = (epoch, position)

    def state_dict(self) -> dict:
        if self.step_fn is None or self._epoch_start is None:
            return {"epoch": self._position[0], "batch": self._position[1]}
        epoch, start, first_step = self._epoch_start
        return {"epoch": epoch, "batch": min(start + self.step_fn() - first_step, self.n_batches)}

    def load_state_dict(self, state: dict) -> None:
        self._resume = dict(state)


class TrainPosition:
    """Where the training loader stands, kept in the DataModule's state (which every checkpoint saves and every
    restore loads, end-of-epoch checkpoints included), so a resumed fit's first iteration starts where the
    checkpoint left off. A DataModule holds one; its ``train_dataloader`` returns ``position.track(loader)``."""

    KEY = "train_position"

    def __init__(self):
        self.loader: ChunkedEpochs | None = None
        self.saved: dict | None = None

    def track(self, loader: ChunkedEpochs) -> ChunkedEpochs:
        """Remember ``loader`` (its position goes into checkpoints) and start it at a restored position, once."""
        self.loader = loader
        if self.saved is not None:
            loader.load_state_dict(self.saved)
            self.saved = None
        return loader

    def state(self) -> dict:
        return {self.KEY: self.loader.state_dict()} if self.loader is not None else {}

    def restore(self, state: dict) -> None:
        if state.get(self.KEY) is not None:
            self.saved = dict(state[self.KEY])
