"""Training by token budget: how long each of the frontier's trained rows trains, how often it saves, and the
curve of the frontier over budgets (``reproduce.py --experiment frontier --tokens N [N ...]``).

A budget of N tokens (a harvest's rows) trains each row for the fewest optimiser steps S whose rows reach N
(:func:`implicit_em.data.memory.steps_for_rows`: full batches, and each epoch's last, partial one where the
loader keeps it), so every trained row of a budget sees the same rows, in the same order for the same seed.
With several budgets, each is its own frontier in ``<out>/<data>/tokens_<N>/``; :func:`write_curve` then
gathers them into ``<out>/<data>/frontier_tokens.json`` (per model and target L0, one point per budget: the
rows trained and the numbers of :data:`CURVE_METRICS`), ``frontier_tokens.md`` and one PNG per metric
against the tokens trained (``frontier_tokens_<metric>.png``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from implicit_em.data.memory import epoch_sizes, steps_for_rows
from implicit_em.errors import ConfigError
from implicit_em.experiments.plots import draw_against_tokens, panels
from implicit_em.experiments.tables import markdown_table, write_results

#: a trained row's checkpoint interval is a multiple of this many steps: the log interval (configs/default.yaml),
#: a multiple of every data config's ``steps_per_call``, so chunks of steps stay whole
CHECKPOINT_MULTIPLE = 50
#: about how many checkpoints a trained row saves when the interval is not given
CHECKPOINTS = 20


@dataclass(frozen=True)
class Length:
    """How long every trained row of one frontier trains and how often it saves: ``max_epochs``; with a token
    budget, ``max_steps`` (the run stops there, mid-epoch as a rule); a checkpoint every ``checkpoint_every``
    optimiser steps (and ``last.ckpt`` at the end), or None for the command's default (every epoch)."""

    max_epochs: int
    max_steps: int | None = None
    checkpoint_every: int | None = None

    @property
    def args(self) -> list[str]:
        """The ``scripts/train.py`` flags beside ``--trainer.max_epochs``: the steps and the checkpoint interval
        (Lightning takes one of a step and an epoch interval: the epoch one is turned off)."""
        args = ["--trainer.max_steps", str(self.max_steps)] if self.max_steps is not None else []
        if self.checkpoint_every is not None:
            args += ["--checkpoint.every_n_train_steps", str(self.checkpoint_every), "--checkpoint.every_n_epochs", "0"]
        return args

    def described(self) -> str:
        """``3 epochs`` or ``977 steps``, for the log."""
        if self.max_steps is None:
            return f"{self.max_epochs} epochs"
        return f"{self.max_steps:,} steps"


def default_checkpoint_every(steps: int) -> int:
    """About :data:`CHECKPOINTS` checkpoints over ``steps``: ceil(steps / 20) rounded up to a multiple of
    :data:`CHECKPOINT_MULTIPLE` (so a short run saves only at its end)."""
    return CHECKPOINT_MULTIPLE * max(1, math.ceil(steps / CHECKPOINTS / CHECKPOINT_MULTIPLE))


def training_length(
    epoch: tuple[int, int, bool] | None, epochs: int, tokens: int | None = None, checkpoint_every: int | None = None
) -> Length:
    """The :class:`Length` of the rows trained on ``tokens`` rows (None: ``epochs`` epochs), over training epochs
    of ``epoch`` = (rows, batch size, drop_last) (:func:`~implicit_em.experiments.rows.training_epoch`; None when
    not counted, which only an epochs run may leave). ``checkpoint_every``: steps between checkpoints; None:
    :func:`default_checkpoint_every` of the run's steps where they are known, else every epoch."""
    if tokens is not None:
        if epoch is None:
            raise ConfigError("--tokens: the training rows of an epoch are needed to count the steps")
        steps = steps_for_rows(tokens, *epoch)
        max_epochs = max(1, math.ceil(steps / len(epoch_sizes(*epoch))))
    else:
        steps = epochs * len(epoch_sizes(*epoch)) if epoch is not None else None
        max_epochs = epochs
    if checkpoint_every is not None and checkpoint_every < 1:
        raise ConfigError(f"checkpoint_every must be a number of steps >= 1 (got {checkpoint_every})")
    every = checkpoint_every or (default_checkpoint_every(steps) if steps else None)
    return Length(max_epochs, steps if tokens is not None else None, every)


# -- the curve over budgets ----------------------------------------------------------------------------------
#: the numbers each point of the curve holds, metric -> (axis label, whether lower is better), one PNG each
CURVE_METRICS = {
    "ce_loss_recovered": ("CE loss recovered", False),
    "fvu": ("FVU (ridge readout)", True),
    "fvu_decoder": ("FVU (own decoder)", True),
    "probe_accuracy": ("linear probe accuracy", False),
    "sparse_probe_mean": ("k-sparse probing, mean of k = 1, 2, 5", False),
    "dead_fraction": ("dead fraction", True),
    "l0": ("L0", None),
}
#: frontier_tokens.md's columns: key -> (header, format)
CURVE_COLUMNS = {
    "target_l0": ("target", "d"), "tokens": ("budget", "d"), "tokens_trained": ("tokens trained", "d"),
    "ce_loss_recovered": ("CE rec.", ".3f"), "ce_loss_recovered_ci": ("CE rec. 95%", ".3f"), "fvu": ("FVU", ".3f"),
    "fvu_decoder": ("FVU dec.", ".3f"), "probe_accuracy": ("probe", ".3f"),
    "sparse_probe_mean": ("probe k=1,2,5", ".3f"), "dead_fraction": ("dead", ".3f"), "l0": ("L0", ".1f"),
}  # fmt: skip


def curves(budgets: Sequence[tuple[dict, Sequence[dict]]]) -> list[dict]:
    """One curve per model and target L0 over the frontiers of ``budgets`` ((header, rows) each, the rows summed
    up over seeds): ``points``, one per budget holding the row, each with ``tokens`` (the budget),
    ``tokens_trained`` (the rows the row trained on; None for a row that did not train: the random encoder, a
    saved SAE, k-means, PCA), ``x`` (where it is drawn: those rows, or the budget's trained rows for a row that
    did not train), ``seeds``, and every number of :data:`CURVE_METRICS` (with ``_std``) and the CE interval."""
    by: dict[tuple, dict] = {}
    for header, rows in sorted(budgets, key=lambda b: b[0]["tokens"]):
        for r in rows:
            trained = r.get("rows_trained")
            point = {"tokens": header["tokens"], "tokens_trained": trained,
                     "x": trained if trained else header.get("tokens_trained"), "seeds": r.get("seeds"),
                     "ce_loss_recovered_ci": r.get("ce_loss_recovered_ci")}  # fmt: skip
            for m in CURVE_METRICS:
                point[m], point[f"{m}_std"] = r.get(m), r.get(f"{m}_std")
            key = (r["model"], r.get("target_l0"))
            by.setdefault(key, {"model": key[0], "target_l0": key[1], "points": []})["points"].append(point)
    return list(by.values())


def write_curve(budgets: Sequence[tuple[dict, Sequence[dict]]], header: dict, folder: Path) -> Path:
    """frontier_tokens.json (``header``, ``tokens``: the budgets, and :func:`curves`), frontier_tokens.md and the
    PNGs in ``folder``; returns the JSON's path."""
    found = curves(budgets)
    tokens = sorted(h["tokens"] for h, _ in budgets)
    title = f"{header['data']}: K = {header['components']}"
    figures = [
        panels(folder / f"frontier_tokens_{m}.png", title,
               lambda ax, m=m, label=label, lower=lower: draw_against_tokens(ax, found, m, label, lower))
        for m, (label, lower) in CURVE_METRICS.items()
    ]  # fmt: skip
    flat = [{"model": c["model"], "target_l0": c["target_l0"], **p} for c in found for p in c["points"]]
    protocol = (
        f"K = {header['components']}, target L0 {header['l0s']}, token budgets {', '.join(f'{n:,}' for n in tokens)} "
        f"(each its own frontier in tokens_<N>/), {{seeds}}, scored on {header.get('split', 'test')}."
    )
    notes = (
        "budget: the tokens (a harvest's rows) asked for; tokens trained: the rows a trained row saw (whole "
        "optimiser steps, the first to reach the budget; sparsify's peer the same rows). A row that did not train "
        "(the random encoder, k-means, PCA, a saved SAE) has none and is drawn at its budget's trained rows. The "
        "metrics are those of frontier.md."
    )
    written = {**header, "tokens": tokens,
               "tokens_trained": {str(h["tokens"]): h.get("tokens_trained") for h, _ in budgets}}  # fmt: skip
    return write_results(folder, written, "frontier_tokens", {"curves": found},
                         markdown_table(flat, ["model"], CURVE_COLUMNS), [f for f in figures if f], notes, protocol,
                         title=f"# Sparsity frontier over training tokens on {header['data']}")  # fmt: skip
