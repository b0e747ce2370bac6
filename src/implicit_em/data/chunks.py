"""How many exact optimiser steps one Lightning batch (a *chunk*) carries, so step settings stay exact.

Several steps per Lightning batch remove Lightning's per-batch overhead from the step. Every step setting of
the Trainer still counts optimiser steps because no chunk crosses a step the Trainer acts on: chunk lengths
divide ``log_every_n_steps`` and every checkpoint's ``every_n_train_steps``, chunks end on multiples of that
length and on ``max_steps``. Settings that Lightning counts in batches (``limit_train_batches``, an
integer or fractional ``val_check_interval``) and DDP (one backward per DDP forward) get one step per chunk.
"""

from __future__ import annotations

import math


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
