"""How many optimiser steps a Lightning batch carries: chunks cover exactly the steps asked for, end on every
multiple of c and on max_steps, and c is forced to divide every step interval the Trainer acts on."""

from types import SimpleNamespace

import pytest

from implicit_em.training.steps import chunk_lengths, chunk_steps


def ends(first_step: int, lengths: list[int]) -> list[int]:
    """The global step after each chunk."""
    out, step = [], first_step
    for n in lengths:
        step += n
        out.append(step)
    return out


@pytest.mark.parametrize("n_steps", [1, 11, 51])
@pytest.mark.parametrize("first_step", [0, 3, 22, 49])
@pytest.mark.parametrize("c", [1, 5, 10, 50])
def test_chunks_cover_exactly_the_steps_and_end_on_every_multiple_of_c(n_steps, first_step, c):
    lengths = chunk_lengths(n_steps, first_step, c)
    assert sum(lengths) == n_steps and all(1 <= n <= c for n in lengths)
    stops = ends(first_step, lengths)
    # a chunk ends on every multiple of c inside the range, and nowhere else but the range's end
    multiples = [s for s in range(first_step + 1, first_step + n_steps + 1) if s % c == 0]
    assert set(multiples) <= set(stops)
    assert all(s % c == 0 for s in stops[:-1]), stops
    assert stops[-1] == first_step + n_steps
    # as few chunks as those rules allow
    assert len(lengths) == len(set(multiples) | {first_step + n_steps})


def test_chunks_by_hand():
    assert chunk_lengths(11, 0, 10) == [10, 1]  # digits' first epoch, 10 steps a chunk
    assert chunk_lengths(11, 11, 10) == [9, 2]  # the second epoch starts at step 11: realigned on 20
    assert chunk_lengths(11, 22, 5) == [3, 5, 3]
    assert chunk_lengths(0, 5, 10) == []
    assert chunk_lengths(4, 0, 1) == [1, 1, 1, 1]


@pytest.mark.parametrize("max_steps", [1, 7, 12, 37])
def test_a_chunk_ends_on_max_steps(max_steps):
    first = 0
    stops = []
    while first < 60:  # epochs of 11 steps, as the loader asks for them
        stops += ends(first, chunk_lengths(11, first, 10, max_steps))
        first += 11
    assert max_steps in stops
    before = [s for s in stops if s <= max_steps]
    assert all(s % 10 == 0 or s % 11 == 0 or s == max_steps for s in before)
    # max_steps <= 0 (Lightning's -1: no limit) adds no stop
    assert chunk_lengths(11, 0, 10, -1) == chunk_lengths(11, 0, 10, 0) == [10, 1]


def fake_trainer(**settings):
    defaults = {"limit_train_batches": 1.0, "val_check_interval": 1.0, "world_size": 1, "log_every_n_steps": 50,
                "checkpoint_callbacks": []}  # fmt: skip
    return SimpleNamespace(**{**defaults, **settings})


def checkpoint(every_n_train_steps: int):
    return SimpleNamespace(every_n_train_steps=every_n_train_steps)


@pytest.mark.parametrize(
    "settings, steps_per_call, c",
    [
        ({}, 10, 10),  # gcd(10, log_every_n_steps 50)
        ({}, 50, 50),
        ({}, 64, 2),  # gcd(64, 50)
        ({"log_every_n_steps": 5}, 50, 5),
        ({"log_every_n_steps": 3}, 10, 1),
        ({"log_every_n_steps": 0}, 64, 64),  # no step logging: no constraint
        ({"checkpoint_callbacks": [checkpoint(4)]}, 50, 2),  # gcd(50, 50, 4)
        ({"checkpoint_callbacks": [checkpoint(0)]}, 50, 50),  # a checkpoint without a step interval
        ({"checkpoint_callbacks": [checkpoint(25), checkpoint(10)]}, 50, 5),
        ({"checkpoint_callbacks": [SimpleNamespace()]}, 50, 1),  # a callback that says nothing: any step
        ({}, 0, 1),  # at least one step
    ],
)
def test_chunk_steps_divides_every_step_interval(settings, steps_per_call, c):
    assert chunk_steps(fake_trainer(**settings), steps_per_call) == c


@pytest.mark.parametrize(
    "settings",
    [
        {"world_size": 2},  # DDP: one backward per DDP forward
        {"limit_train_batches": 5},  # counted in batches
        {"limit_train_batches": 0.5},
        {"val_check_interval": 4},
        {"val_check_interval": 0.25},
    ],
)
def test_settings_counted_in_batches_force_one_step_per_batch(settings):
    assert chunk_steps(fake_trainer(**settings), 50) == 1


def test_without_a_trainer_the_loader_takes_steps_per_call():
    assert chunk_steps(None, 7) == 7 and chunk_steps(None, 0) == 1
