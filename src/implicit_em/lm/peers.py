"""A peer's SAE beside ours: sparsify's SparseCoder (EleutherAI, PyPI ``eai-sparsify``) trained by sparsify's own
Trainer on the very rows our runs train on, saved in sparsify's layout by sparsify.

sparsify's ``Trainer`` runs a transformers model and trains on what a hooked layer outputs; it takes no harvested
activations. :func:`train_sparsify` hands it a stand-in model whose one layer outputs the next batch of rows given
(raw units: sparsify's recipe normalises nothing), one batch per optimiser step, so that everything else is
sparsify's, unchanged. What its ``Trainer.fit`` then does (read from eai-sparsify 1.3.3):

- **init**: ``torch.manual_seed(seed)``; ``SparseCoder``: encoder ``nn.Linear``'s default init, encoder bias 0,
  ``W_dec`` the encoder's weight with rows scaled to unit norm, ``b_dec`` 0;
- **first step**: ``b_dec`` set to the mean of the first batch;
- **every step**: decoder rows set to unit norm before the forward; loss = FVU
  ``sum ||x - x_hat||^2 / sum ||x - mean(x)||^2`` over the batch, plus ``auxk_alpha`` x AuxK (the top d_in / 2
  dead components, those silent for ``dead_feature_threshold`` tokens, predicting the residual); the gradient
  along each decoder row removed; one optimiser step;
- **optimiser** (its ``TrainConfig`` defaults): ``signum``, sign descent in a schedule-free wrapper (momentum
  0.95), lr = 5e-3 / sqrt(K / 2^14), no warm-up; or ``adam``: lr = 2e-4 / sqrt(K / 2^14) (Gao et al. 2024) with a
  linear warm-up of ``lr_warmup_steps`` (1,000) and a linear decay to 0 at the last step; AuxK off
  (``auxk_alpha`` 0), dead after 10,000,000 tokens;
- **save**: the schedule-free average of the iterates (``optimizer.eval()``), written by
  ``SparseCoder.save_to_disk``: ``cfg.json`` + ``sae.safetensors``. The average of unit-norm rows is not unit norm:
  the saved decoder rows are a few percent short of it, as in every SAE sparsify's Trainer saves.

What is ours, not sparsify's: the data (the rows and order of an :class:`ActivationsDataModule`'s runs, see
:func:`training_batches`) and so the batch, in rows per step (our runs' batch; sparsify's own is 32 sequences of
2,048 tokens, 65,536 rows a step, which would give a run of 0.7M tokens about ten steps).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import shutil
import sys
import tempfile
import types
from collections.abc import Iterable, Iterator
from importlib.metadata import version
from pathlib import Path

import torch
from torch import Tensor, nn

from implicit_em.data.memory import epoch_sizes
from implicit_em.errors import ConfigError, DataError, check
from implicit_em.lm.activations import ActivationLoader, ActivationsDataModule

#: the provenance file written beside sparsify's two files (what trained it, on what)
PEER_FILE = "peer.json"
#: sparsify's TrainConfig fields a caller may set (the rest are fixed here: the data, the batch, the saving)
TRAIN_OPTIONS = ("optimizer", "lr", "lr_warmup_steps", "auxk_alpha", "dead_feature_threshold", "k_decay_steps")
#: the hookpoint the stand-in model offers sparsify's Trainer (its one layer)
HOOKPOINT = "layers.0"


# -- our rows, in our order ----------------------------------------------------------------------------------
def training_batches(datamodule: ActivationsDataModule) -> Iterator[Tensor]:
    """The training batches of ``datamodule``'s runs, epoch after epoch without end, raw (float32, no
    normalisation): the rows and order its ``train_dataloader`` serves (same split, ``batch_size``,
    ``shuffle_seed``, ``block_rows``, ``buffer_rows``, ``drop_last``), read from its shards."""
    rows = datamodule.split_rows()["train"]
    if rows.n < datamodule.batch_size:
        raise DataError(f"data.batch_size {datamodule.batch_size} exceeds the {rows.n} training rows of "
                        f"{datamodule.root}; lower the batch size")  # fmt: skip
    loader = ActivationLoader(
        datamodule.shards, rows, datamodule.batch_size, datamodule.shuffle_seed, drop_last=datamodule.drop_last,
        block_rows=datamodule.block_rows, buffer_rows=datamodule.buffer_rows, prefetch=datamodule.prefetch,
    )  # fmt: skip
    for epoch in itertools.count():
        loader.set_epoch(epoch)
        for chunk in loader:
            yield from chunk


def tokens_per_epoch(datamodule: ActivationsDataModule) -> int:
    """The rows one epoch of ``datamodule``'s runs trains on (its training rows, less the last, partial batch
    where it is dropped: ``drop_last``, or a single row): ``epochs`` x this is the ``tokens`` of a run as long as
    theirs."""
    return sum(epoch_sizes(datamodule.split_rows()["train"].n, datamodule.batch_size, datamodule.drop_last))


def batch_sizes(n_rows: int, batch_size: int, drop_last: bool, tokens: int) -> list[int]:
    """The rows of each step of a run of ``tokens`` rows over epochs of ``n_rows`` rows in batches of
    ``batch_size`` (as :func:`training_batches` serves them), the last cut to end at ``tokens``."""
    per_epoch = epoch_sizes(n_rows, batch_size, drop_last)
    sizes, left = [], tokens
    while left >= 2:
        for size in per_epoch:
            if left < 2:
                break
            sizes.append(min(size, left))
            left -= sizes[-1]
    return sizes


# -- the stand-in model sparsify's Trainer runs ----------------------------------------------------------------
class _Replay(nn.Module):
    """A 'layer' whose output is the batch handed to it last (1 x rows x d_in), zeros when none is waiting (the
    Trainer's width probe)."""

    def __init__(self, d_in: int, device: torch.device):
        super().__init__()
        self.d_in, self.device, self.waiting = d_in, device, None

    def forward(self, input_ids: Tensor) -> Tensor:
        if self.waiting is None:
            return torch.zeros(*input_ids.shape, self.d_in, device=self.device)
        rows, self.waiting = self.waiting, None
        return rows.to(self.device).unsqueeze(0)


class _StandIn(nn.Module):
    """What sparsify's Trainer asks of a transformers model: ``config.num_hidden_layers``, ``base_model`` with
    a ModuleList of that many layers, ``device``, ``dummy_inputs``, and a forward over ``input_ids``."""

    def __init__(self, d_in: int, device: torch.device):
        super().__init__()
        self.layers = nn.ModuleList([_Replay(d_in, device)])
        self.config = types.SimpleNamespace(num_hidden_layers=1)
        self.dummy_inputs = {"input_ids": torch.zeros(1, 2, dtype=torch.long)}
        self._device = device

    @property
    def base_model(self) -> nn.Module:
        return self

    @property
    def device(self) -> torch.device:
        return self._device

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.layers[0](input_ids)


class _Feed(torch.utils.data.IterableDataset):
    """One item per optimiser step: token ids (zeros, one per row) for the Trainer, the rows for the stand-in's
    layer; stops after ``tokens`` rows (the last batch cut to end there; a last piece under 2 rows is dropped,
    as FVU needs two)."""

    def __init__(self, batches: Iterable[Tensor], replay: _Replay, d_in: int, tokens: int, steps: int):
        self.batches, self.replay, self.d_in, self.tokens, self.steps = batches, replay, d_in, tokens, steps
        self.seen = 0

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for rows in self.batches:
            left = self.tokens - self.seen
            if left < 2:
                return
            rows = torch.as_tensor(rows)
            if rows.dim() != 2 or rows.shape[1] != self.d_in:
                raise DataError(f"a batch of shape {tuple(rows.shape)} where rows x {self.d_in} (d_in) were "
                                "expected; pass batches of the width the coder is built for")  # fmt: skip
            rows = rows[:left].float()
            if len(rows) < 2:
                continue
            self.seen += len(rows)
            self.replay.waiting = rows
            yield {"input_ids": torch.zeros(len(rows), dtype=torch.long)}


@contextlib.contextmanager
def _quiet_stdout():
    """sparsify prints its progress on stdout; send it to stderr (a script's stdout stays its own)."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


# -- training ------------------------------------------------------------------------------------------------
def train_sparsify(
    batches: Iterable[Tensor], d_in: int, num_latents: int, k: int, tokens: int, seed: int, out_dir: str | Path,
    *, steps: int | None = None, device: str | torch.device = "cpu", **train_options,
) -> Path:  # fmt: skip
    """Train sparsify's SparseCoder with sparsify's Trainer (see the module docstring) on ``tokens`` rows of
    ``batches`` (raw activations, rows x ``d_in``, one optimiser step each; the last cut to end at ``tokens``),
    with ``num_latents`` components and top-``k`` codes, initialised from ``seed``; write sparsify's folder
    (``cfg.json``, ``sae.safetensors``, by its ``save_to_disk``) and :data:`PEER_FILE` into ``out_dir``
    (replacing an earlier peer there; any other non-empty folder is refused) and return it.

    ``steps``: the optimiser steps ``tokens`` make (the Trainer reads it as its run's length: the ``adam``
    schedule decays to 0 there); None: ``tokens`` over the first batch's rows, rounded up. ``train_options``:
    fields of sparsify's ``TrainConfig`` among :data:`TRAIN_OPTIONS`, its defaults where not given. ``device``:
    where the coder trains (on a CPU, sparsify's Triton decoder is turned off: ``SPARSIFY_DISABLE_TRITON=1``
    unless set, read when sparsify is first imported). sparsify's Trainer seeds torch's global generator; its
    state is restored afterwards.
    """
    out = Path(out_dir)
    for name, value, low in (("d_in", d_in, 1), ("num_latents", num_latents, 1), ("k", k, 1), ("tokens", tokens, 2)):
        check(isinstance(value, int) and not isinstance(value, bool) and value >= low, name, f"an integer >= {low}",
              value)  # fmt: skip
    check(k <= num_latents, "k", f"at most the number of components ({num_latents})", k)
    if unknown := sorted(set(train_options) - set(TRAIN_OPTIONS)):
        raise ConfigError(f"sparsify options {unknown} are not set here; choose from {', '.join(TRAIN_OPTIONS)}")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / PEER_FILE).is_file())):
        raise ConfigError(f"{out} exists and is not an earlier peer folder; pass a new --out or remove it")
    iterator = iter(batches)
    first = next(iterator, None)
    if first is None:
        raise DataError("no batches to train on; pass a non-empty iterable of rows x d_in batches")
    if steps is None:
        steps = math.ceil(tokens / max(len(first), 1))
    check(isinstance(steps, int) and steps >= 1, "steps", "an integer >= 1", steps)

    try:
        device = torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"device {device!r}: {e}; pass cpu or cuda") from None
    if device.type == "cpu":
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    with _quiet_stdout():
        from sparsify import SparseCoderConfig
        from sparsify.config import TrainConfig
        from sparsify.trainer import Trainer

    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        # saved once, at the end (its loop saves when step + 1 is a multiple of save_every, steps counted from 1)
        cfg = TrainConfig(
            SparseCoderConfig(num_latents=num_latents, k=k), batch_size=1, layers=[0], init_seeds=[seed],
            log_to_wandb=False, save_dir=str(scratch), run_name="run", save_every=steps + 2, **train_options,
        )  # fmt: skip
        model = _StandIn(d_in, device)
        feed = _Feed(itertools.chain([first], iterator), model.layers[0], d_in, tokens, steps)
        precision = torch.get_float32_matmul_precision()  # fit sets it to "high"
        try:
            with _quiet_stdout(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                trainer = Trainer(cfg, feed, model)
                group = trainer.optimizers[0].param_groups[0]
                lr = float(group.get("initial_lr", group["lr"]))
                trainer.fit()
        finally:
            torch.set_float32_matmul_precision(precision)
        if feed.seen < tokens - 1:
            raise DataError(f"the batches held {feed.seen} rows, fewer than the {tokens} tokens asked for; "
                            "pass fewer tokens or more batches")  # fmt: skip
        saved = scratch / "run" / HOOKPOINT
        provenance = {
            "trained_by": f"sparsify {version('eai-sparsify')} Trainer",
            "tokens": feed.seen, "steps": trainer.global_step, "seed": seed, "d_in": d_in,
            "num_latents": num_latents, "k": k, "lr": lr,
            "train_config": {f: getattr(cfg, f) for f in TRAIN_OPTIONS},
        }  # fmt: skip
        (saved / PEER_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        saved.rename(out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return out


def train_peer(
    datamodule: ActivationsDataModule, num_latents: int, k: int, tokens: int, seed: int, out_dir: str | Path,
    device: str | torch.device = "cpu", **train_options,
) -> Path:  # fmt: skip
    """:func:`train_sparsify` on ``tokens`` rows of ``datamodule``'s training batches (:func:`training_batches`:
    the rows and order its runs train on), its exact number of steps given; :data:`PEER_FILE` gains the data
    root, batch size, shuffle seed, data seed and training rows. Returns the folder."""
    check(isinstance(tokens, int) and not isinstance(tokens, bool) and tokens >= 2, "tokens", "an integer >= 2",
          tokens)  # fmt: skip
    rows = datamodule.split_rows()["train"]
    sizes = batch_sizes(rows.n, datamodule.batch_size, datamodule.drop_last, tokens)
    batches = training_batches(datamodule)
    try:
        folder = train_sparsify(batches, datamodule.dims, num_latents, k, tokens, seed, out_dir, steps=len(sizes),
                                device=device, **train_options)  # fmt: skip
    finally:
        batches.close()  # stops the loader's reading thread
    provenance = json.loads((folder / PEER_FILE).read_text())
    provenance.update(data_root=str(Path(datamodule.root).resolve()), batch_size=datamodule.batch_size,
                      shuffle_seed=datamodule.shuffle_seed, data_seed=datamodule.seed, train_rows=rows.n)  # fmt: skip
    (folder / PEER_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
    return folder
