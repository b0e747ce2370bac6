"""Model activations on disk, bigger than memory: shards streamed through a shuffle buffer.

``--data.root DIR`` holds shards (see :mod:`.shards`) and optionally, beside them, ``labels.npy`` (one integer
per row), ``doc_ids.npy`` (the document of each row), ``label_names.json`` and ``manifest.json`` (what
``scripts/harvest.py`` writes). Nothing is read whole:

- **Splits.** Validation and test rows are held out by document when ``doc_ids.npy`` exists (no document in two
  splits), else as runs of ``block_rows`` consecutive rows; both fixed by ``seed``.
- **Training order.** The training rows are cut into blocks of ``block_rows``; each epoch permutes the blocks
  (fixed by shuffle_seed and epoch), reads them a window of ``buffer_rows`` at a time, permutes the rows inside the
  window and serves consecutive global batches. Every training row comes once per epoch; batches mix rows of
  many blocks and shards. Only this rank's part of each batch becomes float32. While one window is served the
  next is read in a background thread, so at most two windows are resident.
- **Evaluation.** ``splits`` holds bounded random samples (``eval_train_rows``, ``eval_val_rows``,
  ``eval_test_rows``) read at setup, drawn as runs of 64 consecutive rows.
- **Normalisation** is fitted on (a subset of) the training sample and kept in :meth:`state_dict`, so a checkpoint carries
  it (Lightning stores a DataModule's state) and a resumed or evaluated run uses the same transform.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from implicit_em.data.memory import ComponentDataModule, Split, batches_per_epoch
from implicit_em.data.normalization import Normalization
from implicit_em.errors import ConfigError, DataError, check
from implicit_em.lm.shards import RowVector, ShardSet
from implicit_em.training.steps import ChunkedEpochs

#: evaluation samples are drawn as runs of this many consecutive rows (few reads, many places)
EVAL_RUN_ROWS = 64
#: without doc_ids, held-out runs are at most block_rows long, and at least this many runs split the data
MIN_SPLIT_UNITS = 64
#: evaluation samples are read, widened to float32 and normalised this many rows at a time
READ_ROWS = 16_384
#: the normalisation is fitted on at most this many values (rows x d_model) of the training sample
FIT_VALUES = 1 << 24
# tags that keep the random streams of one seed apart
_SPLIT, _ORDER, _SAMPLE = 0, 1, 2


# -- row runs and splits -------------------------------------------------------------------------------------
def merge_runs(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Sorted disjoint [lo, hi) runs as a k x 2 array, touching runs merged into one."""
    if len(lo) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    order = np.argsort(lo, kind="stable")
    lo, hi = lo[order], hi[order]
    new = np.ones(len(lo), dtype=bool)
    new[1:] = lo[1:] != hi[:-1]
    starts = np.flatnonzero(new)
    ends = np.r_[starts[1:], len(lo)] - 1
    return np.stack([lo[starts], hi[ends]], axis=1).astype(np.int64)


def document_runs(doc_ids: RowVector, chunk_rows: int = 1 << 20) -> tuple[np.ndarray, np.ndarray]:
    """Runs of consecutive rows of one document: their start rows and document ids, read in chunks."""
    starts, docs, previous = [], [], None
    for lo in range(0, doc_ids.n_rows, chunk_rows):
        d = doc_ids.read(lo, min(lo + chunk_rows, doc_ids.n_rows))
        change = np.flatnonzero(np.r_[previous is None or d[0] != previous, d[1:] != d[:-1]])
        starts.append(change + lo)
        docs.append(d[change])
        previous = d[-1]
    return np.concatenate(starts), np.concatenate(docs)


def split_by_document(
    starts: np.ndarray, docs: np.ndarray, n_rows: int, val_fraction: float, test_fraction: float, seed: int, where
) -> dict[str, np.ndarray]:
    """Train/val/test row runs with every document in exactly one split.

    Documents are taken in a random order fixed by ``seed``: into test until it holds ``test_fraction`` of the
    rows, then into validation until it holds ``val_fraction``, the rest into train.
    """
    unique, inverse = np.unique(docs, return_inverse=True)
    if len(unique) < 3:
        raise DataError(
            f"{where}: names {len(unique)} document(s); holding out validation and test documents needs at least 3: "
            "harvest more documents, or remove doc_ids.npy to split by rows"
        )
    ends = np.r_[starts[1:], n_rows]
    rows = np.bincount(inverse, weights=ends - starts, minlength=len(unique))
    order = np.random.default_rng([seed, _SPLIT]).permutation(len(unique))
    placed = np.cumsum(rows[order])
    before = placed - rows[order]  # rows already placed when each document comes
    n_test = max(1, int((before < test_fraction * n_rows).sum()))
    n_val = max(1, int((before[n_test:] - placed[n_test - 1] < val_fraction * n_rows).sum()))
    if n_test + n_val >= len(unique):
        raise DataError(
            f"{where}: no document is left for training ({len(unique)} documents); lower --data.val_fraction / "
            "--data.test_fraction, or harvest more documents"
        )
    split_of_doc = np.full(len(unique), 2, dtype=np.int64)  # 0 test, 1 val, 2 train
    split_of_doc[order[:n_test]], split_of_doc[order[n_test : n_test + n_val]] = 0, 1
    split_of_run = split_of_doc[inverse]
    out = {name: merge_runs(starts[split_of_run == s], ends[split_of_run == s]) for s, name in
           enumerate(("test", "val", "train"))}  # fmt: skip
    return out


def split_by_rows(
    n_rows: int, block_rows: int, val_fraction: float, test_fraction: float, seed: int, where
) -> dict[str, np.ndarray]:
    """Train/val/test as runs of consecutive rows (at most ``block_rows``, at least 64 runs in all), fixed by
    ``seed``: neighbouring rows (often one document) stay together, keeping held-out rows apart from train."""
    unit = max(1, min(block_rows, n_rows // MIN_SPLIT_UNITS))
    n_units = -(-n_rows // unit)
    n_test, n_val = max(1, round(test_fraction * n_units)), max(1, round(val_fraction * n_units))
    if n_units - n_test - n_val < 1:
        raise DataError(f"{where}: {n_rows} rows are too few to hold out validation and test rows; add rows")
    order = np.random.default_rng([seed, _SPLIT]).permutation(n_units)
    parts = {"test": order[:n_test], "val": order[n_test : n_test + n_val], "train": order[n_test + n_val :]}
    return {name: merge_runs(units * unit, np.minimum((units + 1) * unit, n_rows)) for name, units in parts.items()}


class RowRuns:
    """The rows of one split, numbered 0..n-1 in file order (a 'virtual' row space over its runs)."""

    def __init__(self, runs: np.ndarray):
        self.lo = runs[:, 0].astype(np.int64)
        self.lengths = (runs[:, 1] - runs[:, 0]).astype(np.int64)
        self.cum = np.r_[0, np.cumsum(self.lengths)]
        self.n = int(self.cum[-1])

    def ranges(self, a: int, b: int) -> list[tuple[int, int]]:
        """The global row ranges of split rows [a, b)."""
        out, pos = [], a
        i = int(np.searchsorted(self.cum, a, side="right")) - 1
        while pos < b:
            offset = pos - int(self.cum[i])
            take = min(b - pos, int(self.lengths[i]) - offset)
            lo = int(self.lo[i]) + offset
            if out and out[-1][1] == lo:
                out[-1] = (out[-1][0], lo + take)
            else:
                out.append((lo, lo + take))
            pos, i = pos + take, i + 1
        return out

    def sample(self, cap: int, rng: np.random.Generator, run: int = EVAL_RUN_ROWS) -> list[tuple[int, int]]:
        """Global row ranges of ``cap`` rows drawn as random runs of ``run`` split rows (all rows when fewer)."""
        if self.n <= cap:
            return self.ranges(0, self.n)
        n_runs = -(-self.n // run)
        order = rng.permutation(n_runs)
        sizes = np.minimum(run, self.n - order * run)
        k = int(np.searchsorted(np.cumsum(sizes), cap))  # runs order[:k + 1] hold cap rows
        take = sizes[: k + 1].copy()
        take[k] -= int(take.sum()) - cap
        out = []
        for r, size in sorted(zip(order[: k + 1].tolist(), take.tolist())):
            for lo, hi in self.ranges(r * run, r * run + size):
                if out and out[-1][1] == lo:
                    out[-1] = (out[-1][0], hi)
                else:
                    out.append((lo, hi))
        return out


# -- the training loader -------------------------------------------------------------------------------------
class ActivationLoader(ChunkedEpochs):
    """Training chunks (lists of micro-batches, one exact optimiser step each) streamed from the shards.

    See the module docstring for the order. Each micro-batch is this rank's contiguous part of one global batch
    of ``batch_size`` rows (parts differ by at most one row), as float32 on ``device`` after ``transform``. Chunk
    lengths and the last, partial batch follow the in-memory loader (:mod:`implicit_em.training.steps`,
    :func:`~implicit_em.data.memory.batches_per_epoch`). Stateful: ``state_dict`` / ``load_state_dict``
    continue an epoch exactly where it stopped.
    """

    def __init__(
        self,
        shards: ShardSet,
        rows: RowRuns,
        batch_size: int,
        seed: int,
        step_fn: Callable[[], int] | None = None,
        chunk: int = 1,
        max_steps: int = -1,
        transform: Callable[[Tensor], Tensor] = lambda x: x,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        block_rows: int = 4096,
        buffer_rows: int = 131_072,
        device: torch.device | str | None = None,
        prefetch: bool = True,
    ):
        self.shards, self.rows, self.batch_size, self.seed = shards, rows, batch_size, seed
        super().__init__(batches_per_epoch(rows.n, batch_size, drop_last), step_fn, chunk, max_steps)
        self.transform, self.rank, self.world_size = transform, rank, world_size
        self.device, self.prefetch, self.block_rows = device, prefetch, block_rows
        self.blocks_per_window = max(1, buffer_rows // block_rows)
        if self.blocks_per_window * block_rows < batch_size:
            raise ConfigError(
                f"data.buffer_rows {buffer_rows} holds {self.blocks_per_window * block_rows} rows in whole blocks of "
                f"{block_rows}, less than one batch ({batch_size}); raise --data.buffer_rows"
            )
        self.n_blocks = -(-rows.n // block_rows)

    def windows(self, epoch: int) -> list[np.ndarray]:
        """The blocks of each window of ``epoch``, in reading order."""
        order = np.random.default_rng([self.seed, _ORDER, epoch]).permutation(self.n_blocks)
        return [order[i : i + self.blocks_per_window] for i in range(0, self.n_blocks, self.blocks_per_window)]

    def _block(self, block: int) -> tuple[int, int]:
        lo = block * self.block_rows
        return lo, min(lo + self.block_rows, self.rows.n)

    def read_window(self, epoch: int, w: int, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The rows of one window as stored (blocks one after another) and the permutation that serves them."""
        ranges = [r for blk in blocks for r in self.rows.ranges(*self._block(blk))]
        raw = self.shards.read_ranges(ranges, self.shards.empty(sum(hi - lo for lo, hi in ranges)))
        return raw, np.random.default_rng([self.seed, _ORDER, epoch, w]).permutation(len(raw))

    def _part(self, k: int) -> tuple[int, int]:
        """Epoch positions [p0, p1) of this rank's part of global batch ``k`` (as ``Tensor.tensor_split``)."""
        start = k * self.batch_size
        size = min(self.batch_size, self.rows.n - start)
        q, r = divmod(size, self.world_size)
        p0 = start + self.rank * q + min(self.rank, r)
        return p0, p0 + q + int(self.rank < r)

    def __iter__(self) -> Iterator[list[Tensor]]:
        epoch, start, lengths = self.start_epoch()
        windows = self.windows(epoch)
        sizes = [sum(hi - lo for lo, hi in map(self._block, blocks)) for blocks in windows]
        bounds = np.cumsum([0, *sizes])
        pool = ThreadPoolExecutor(1, thread_name_prefix="shard-reader") if self.prefetch else None
        held: dict[int, Future | tuple] = {}

        def submit(w: int) -> None:
            if w < len(windows) and w not in held:
                args = (epoch, w, windows[w])
                held[w] = pool.submit(self.read_window, *args) if pool else self.read_window(*args)

        def window(w: int) -> tuple[np.ndarray, np.ndarray]:
            submit(w)
            if isinstance(held[w], Future):
                held[w] = held[w].result()
            if len(held) < 2:  # at most two windows resident: the one served and the next being read
                submit(w + 1)
            return held[w]

        def micro_batch(k: int) -> Tensor:
            p0, p1 = self._part(k)
            for w in [w for w in held if bounds[w + 1] <= p0]:  # windows already served
                del held[w]
            pieces, pos = [], p0
            while pos < p1:
                w = int(np.searchsorted(bounds, pos, side="right")) - 1
                raw, perm = window(w)
                hi = min(p1, int(bounds[w + 1]))
                pieces.append(raw[perm[pos - bounds[w] : hi - bounds[w]]])
                pos = hi
            rows = pieces[0] if len(pieces) == 1 else np.concatenate(pieces) if pieces else self.shards.empty(0)
            return self.transform(self.shards.to_float32(rows, self.device))

        try:
            position = start
            for length in lengths:
                chunk = [micro_batch(k) for k in range(position, position + length)]
                position += length
                self.handed_out(epoch, position)
                yield chunk
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)


# -- the DataModule ------------------------------------------------------------------------------------------
class ActivationsDataModule(ComponentDataModule):
    """Activations (or any vectors) in shards under ``root``, streamed; see the module docstring.

    The arguments of :class:`ComponentDataModule` (``root``: the directory of shards, required; held-out rows
    are whole documents when doc_ids.npy exists; ``seed`` also fixes the evaluation samples; the normalisation
    is fitted on the training sample), with the defaults of ``configs/data/activations.yaml``: batch 1024,
    ``center+scale`` (unit mean row norm), ``steps_per_call`` 10 (a chunk holds its micro-batches as float32,
    steps x batch_size x d_model x 4 bytes, and Lightning holds the next too); and:

    Args:
        block_rows: rows per block, the unit of reading and shuffling.
        buffer_rows: rows per shuffle window; two windows are in memory (one served, one being read).
        eval_train_rows: rows of the training sample (the final probe fits on it; the normalisation too).
        eval_val_rows: rows of the validation sample.
        eval_test_rows: rows of the test sample (the final probe scores on it).
        prefetch: read the next window in a background thread.
    """

    name = "activations"
    image_shape: tuple[int, ...] = ()

    def __init__(
        self,
        block_rows: int = 4096,
        buffer_rows: int = 131_072,
        eval_train_rows: int = 100_000,
        eval_val_rows: int = 20_000,
        eval_test_rows: int = 20_000,
        prefetch: bool = True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        val_fraction, test_fraction, batch_size = self.val_fraction, self.test_fraction, self.batch_size
        check(val_fraction + test_fraction < 1, "data.val_fraction + data.test_fraction", "< 1",
              val_fraction + test_fraction)  # fmt: skip
        check(isinstance(block_rows, int) and block_rows >= 1, "data.block_rows", "an integer >= 1", block_rows)
        check(
            isinstance(buffer_rows, int) and buffer_rows >= max(block_rows, batch_size),
            "data.buffer_rows",
            f"an integer >= data.block_rows and >= data.batch_size ({max(block_rows, batch_size)})",
            buffer_rows,
        )
        for key, v in (("eval_train_rows", eval_train_rows), ("eval_val_rows", eval_val_rows),
                       ("eval_test_rows", eval_test_rows)):  # fmt: skip
            check(isinstance(v, int) and v >= 2, f"data.{key}", "an integer >= 2", v)
        self.block_rows, self.buffer_rows, self.prefetch = block_rows, buffer_rows, prefetch
        self.eval_rows = {"train": eval_train_rows, "val": eval_val_rows, "test": eval_test_rows}
        self._shards: ShardSet | None = None
        self.rows: dict[str, RowRuns] = {}
        self._sample_ranges: dict[str, list[tuple[int, int]]] = {}
        self.label_names: list[str] | None = None
        self.manifest: dict | None = None

    # -- files ------------------------------------------------------------------------------------------
    @property
    def shards(self) -> ShardSet:
        if self._shards is None:
            if not self.root:
                raise ConfigError("data.root is not set; pass --data.root DIR holding .npy or .safetensors shards")
            self._shards = ShardSet(self.root)
        return self._shards

    @property
    def dims(self) -> int:
        """d_model, from the shards' headers (no rows read)."""
        return self.shards.width

    @property
    def train_rows(self) -> int:
        """Every training row of the shards (streamed each epoch; ``splits["train"]`` is a sample of them); known
        before ``setup`` too (the split reads no shard rows)."""
        return (self.rows or self.split_rows())["train"].n

    def _read_json(self, name: str):
        path = Path(self.root) / name
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: not valid JSON ({e}); fix or delete the file") from None

    # -- setup ------------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        shards, root = self.shards, Path(self.root)
        n = shards.n_rows
        labels = RowVector(root / "labels.npy", n, "labels") if (root / "labels.npy").is_file() else None
        docs = RowVector(root / "doc_ids.npy", n, "doc ids") if (root / "doc_ids.npy").is_file() else None
        self.label_names, self.manifest = self._read_json("label_names.json"), self._read_json("manifest.json")
        self.rows = self.split_rows(docs)
        if self.rows["train"].n < self.batch_size:
            raise DataError(
                f"data.batch_size {self.batch_size} exceeds the {self.rows['train'].n} training rows of {root}; "
                "lower --data.batch_size"
            )
        for i, name in enumerate(("train", "val", "test")):
            rng = np.random.default_rng([self.seed, _SAMPLE, i])
            ranges = self._sample_ranges[name] = self.rows[name].sample(self.eval_rows[name], rng)
            x = self._read_sample(name)
            if name == "train":
                self.normalization = Normalization.fit(self._fit_rows(x), self.normalization_kind)
            y = labels.read_ranges(ranges) if labels is not None else np.full(len(x), -1, dtype=np.int64)
            groups = torch.from_numpy(docs.read_ranges(ranges)) if docs is not None else None
            self.splits[name] = Split(self._normalize_(x), torch.from_numpy(y), groups)
        self._device_splits = {}

    def split_rows(self, docs: RowVector | None = None) -> dict[str, RowRuns]:
        """The rows of ``train``, ``val`` and ``test`` (see the module docstring), fixed by ``seed``: by document
        when ``docs`` (doc_ids.npy, read here when not given) exists, else by runs of rows. Reads no shard rows."""
        root, n = Path(self.root), self.shards.n_rows
        if docs is None and (root / "doc_ids.npy").is_file():
            docs = RowVector(root / "doc_ids.npy", n, "doc ids")
        if docs is not None:
            starts, doc = document_runs(docs)
            runs = split_by_document(starts, doc, n, self.val_fraction, self.test_fraction, self.seed, docs.path)
        else:
            runs = split_by_rows(n, self.block_rows, self.val_fraction, self.test_fraction, self.seed, root)
        return {name: RowRuns(r) for name, r in runs.items()}

    def _normalize_(self, x: Tensor) -> Tensor:
        """Normalise ``x`` in place, a block of rows at a time."""
        for block in x.split(READ_ROWS):
            block.copy_(self.normalization(block))
        return x

    def _fit_rows(self, x: Tensor) -> Tensor:
        """The rows of the training sample the normalisation is fitted on: a random subset of at most
        :data:`FIT_VALUES` values (and at least 4 D rows), since the fit holds float64 copies of them."""
        n = min(len(x), max(FIT_VALUES // x.shape[1], 4 * x.shape[1]))
        if n == len(x):
            return x
        keep = np.sort(np.random.default_rng([self.seed, _SAMPLE, 3]).choice(len(x), size=n, replace=False))
        return x[torch.from_numpy(keep)]

    def _read_sample(self, name: str) -> Tensor:
        """The rows of evaluation sample ``name`` as float32 (read and widened a block at a time), checked to be
        finite."""
        pieces = [
            (lo, min(lo + READ_ROWS, hi)) for a, hi in self._sample_ranges[name] for lo in range(a, hi, READ_ROWS)
        ]
        x = torch.empty(sum(hi - lo for lo, hi in pieces), self.shards.width)
        at, p = 0, 0
        while p < len(pieces):
            group, size = [], 0
            while p < len(pieces) and size + pieces[p][1] - pieces[p][0] <= READ_ROWS:
                group.append(pieces[p])
                size, p = size + pieces[p][1] - pieces[p][0], p + 1
            block = x[at : at + size]
            block.copy_(self.shards.to_float32(self.shards.read_ranges(group, self.shards.empty(size))))
            bad = ~torch.isfinite(block.sum(dim=1, dtype=torch.float64))  # NaN and inf survive a sum; no N x D mask
            if bad.any():
                i = int(bad.nonzero()[0])
                for lo, hi in group:
                    if i < hi - lo:
                        shard, local = self.shards.shard_of(lo + i)
                        raise DataError(f"{shard.path}: row {local} has non-finite values (NaN or inf); fix the shard")
                    i -= hi - lo
            at += size
        return x

    def load_state_dict(self, state: dict) -> None:
        """Restore a checkpoint's normalisation; evaluation samples already read are normalised again with it."""
        before = self.normalization.state_dict()
        super().load_state_dict(state)
        after = self.normalization.state_dict()
        same = all((a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
                   for a, b in zip(before.values(), after.values()))  # fmt: skip
        if self.splits and not same:
            for name, s in self.splits.items():
                self.splits[name] = Split(self._normalize_(self._read_sample(name)), s.y, s.groups)
            self._device_splits = {}

    # -- loaders ----------------------------------------------------------------------------------------
    def train_dataloader(self) -> ActivationLoader:
        rank, world = self.rank_world()
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        norm = Normalization(*(None if v is None else v.to(device) for v in self.normalization.state_dict().values()))
        clock = self.step_clock()
        if self.trainer is None:  # no step clock: the state counts the chunks handed out
            clock["step_fn"] = None
        return self.position.track(ActivationLoader(
            self.shards, self.rows["train"], self.batch_size, self.shuffle_seed, transform=norm, rank=rank,
            world_size=world, drop_last=self.drop_last, block_rows=self.block_rows, buffer_rows=self.buffer_rows,
            device=device, prefetch=self.prefetch, **clock,
        ))  # fmt: skip
