"""A finished run and the rows its dashboard reads: harvest windows of tokens, or images.

:class:`LoadedRun` is a finished run (module, DataModule, the normalisation it was trained with, the readout), as
:func:`implicit_em.run.app.load_run` rebuilds it. A :class:`TokenSource` reads a harvest folder (shards, ``tokens.npy``, ``windows.npy``,
``labels.npy``, ``doc_ids.npy``, ``label_names.json``, ``manifest.json``) in batches of whole windows; an
:class:`ImageSource` reads the rows of an in-memory image dataset (one context per image).
"""

from __future__ import annotations

import json
import logging
import resource
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from implicit_em.data.normalization import Normalization
from implicit_em.errors import ConfigError, DataError
from implicit_em.lm.dashboard.stream import ComponentStats, ComponentStream, StreamConfig

SPLITS = ("all", "train", "val", "test")


@dataclass
class LoadedRun:
    """A finished run: its module (trained weights, eval mode), DataModule, the normalisation of its
    checkpoint (raw rows -> model inputs) and the readout (R K x D, c D, normalised space) when saved."""

    run_dir: Path
    module: torch.nn.Module
    datamodule: object
    normalization: Normalization
    readout: tuple[Tensor, Tensor] | None

    @property
    def n_components(self) -> int:
        return int(self.module.model.component_weights().shape[0])


class SAECodes(torch.nn.Module):
    """An SAE folder's model as the dashboard reads a run's module: ``module(x)`` the codes, ``module.model`` the
    :class:`implicit_em.sae_folders.ExportedSAE` (``component_weights``, ``decoder_directions``)."""

    def __init__(self, sae):
        super().__init__()
        self.model = sae

    def forward(self, x: Tensor) -> Tensor:
        return self.model.encode(x)


def load_sae_folder(folder: Path, kind: str, data_root: str | Path | None) -> LoadedRun:
    """An SAE folder over a harvest's raw activations, as a :class:`LoadedRun` (identity normalisation)."""
    import implicit_em
    from implicit_em.lm.activations import ActivationsDataModule
    from implicit_em.lm.shards import ShardSet

    if data_root is None:
        raise ConfigError(f"{folder} is an SAE folder ({kind}) and holds no activations; pass --data-root DIR, the "
                          "harvest (shards and tokens) to read it over")  # fmt: skip
    sae = implicit_em.load(folder)
    width = ShardSet(data_root).width
    if width != sae.d_in:
        raise DataError(f"{data_root} holds {width}-wide activations but the SAE in {folder} reads d_in {sae.d_in}; "
                        "pass the harvest of the layer it was trained on")  # fmt: skip
    datamodule = ActivationsDataModule(root=str(data_root), normalization="none")
    return LoadedRun(folder, SAECodes(sae).eval(), datamodule, Normalization(), None)


@contextmanager
def quiet_lightning():
    """No "Seed set", "GPU available" or tip lines from rebuilding the run's Trainer (it trains nothing here)."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


# -- the rows ------------------------------------------------------------------------------------------------
@dataclass
class Batch:
    x: Tensor  # M x D, normalised (the model's inputs)
    rows: Tensor  # M, global row indices
    new_context: Tensor  # M, bool: the first row of each context


class TokenSource:
    """The rows of a harvest folder, in batches of whole windows (contexts), normalised."""

    kind = "text"

    def __init__(self, root: str | Path, normalization: Callable[[Tensor], Tensor]):
        from implicit_em.lm.shards import ShardSet, token_file

        self.root = Path(root)
        self.shards = ShardSet(self.root)
        n = self.shards.n_rows
        for name, what in (("tokens.npy", "the token id of each row"), ("windows.npy", "the window id of each row")):
            if not token_file(self.root, name).is_file():
                raise DataError(
                    f"{self.root} has no tokens/{name} ({what}); the dashboard shows tokens: harvest again with a "
                    "scripts/harvest.py that writes tokens/tokens.npy and tokens/windows.npy"
                )
        self.tokens = self._vector(token_file(self.root, "tokens.npy"), n)
        self.windows = self._vector(token_file(self.root, "windows.npy"), n)
        self.labels = self._vector(self.root / "labels.npy", n) if (self.root / "labels.npy").is_file() else None
        self.doc_ids = self._vector(self.root / "doc_ids.npy", n) if (self.root / "doc_ids.npy").is_file() else None
        self.manifest = self._json("manifest.json") or {}
        self.label_names = self._json("label_names.json")
        self.normalization = normalization
        self.n_rows = n

    def _vector(self, path: Path, n: int) -> np.ndarray:
        try:
            v = np.load(path, mmap_mode="r")
        except (ValueError, OSError) as e:
            raise DataError(f"{path}: not a readable .npy ({e}); harvest again") from None
        if v.ndim != 1 or len(v) != n:
            raise DataError(f"{path} holds {v.shape} values for {n} rows; harvest again")
        return v

    def _json(self, name: str):
        path = self.root / name
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except ValueError as e:
            raise DataError(f"{path}: not valid JSON ({e}); fix or delete it") from None

    def batches(self, ranges: list[tuple[int, int]], batch_rows: int) -> Iterator[Batch]:
        """Batches of about ``batch_rows`` rows of ``ranges``, cut at window ends (a window longer than a batch
        makes its batch longer); a range's end also ends a context."""
        for lo, hi in ranges:
            at = lo
            while at < hi:
                end = min(hi, at + batch_rows)
                if end < hi:
                    w = np.asarray(self.windows[at : end + 1])
                    cuts = np.flatnonzero(w[1:] != w[:-1]) + 1  # window starts inside (at, end]
                    if len(cuts):
                        end = at + int(cuts[-1])
                    else:  # one window longer than a batch: read to its end
                        end = self._window_end(at, hi, batch_rows)
                raw = self.shards.read(at, end)
                x = self.normalization(self.shards.to_float32(raw))
                w = torch.from_numpy(np.array(self.windows[at:end], dtype=np.int64))  # a copy: writable
                new = torch.ones(end - at, dtype=torch.bool)
                new[1:] = w[1:] != w[:-1]
                yield Batch(x, torch.arange(at, end, dtype=torch.int64), new)
                at = end

    def _window_end(self, at: int, hi: int, step: int) -> int:
        """The end of the window that row ``at`` is in (at most ``hi``), scanned ``step`` rows at a time."""
        first, pos = self.windows[at], at + 1
        while pos < hi:
            chunk = np.asarray(self.windows[pos : min(hi, pos + step)])
            other = np.flatnonzero(chunk != first)
            if len(other):
                return pos + int(other[0])
            pos += len(chunk)
        return hi

    def token_ids(self, starts: np.ndarray, lengths: np.ndarray) -> list[np.ndarray]:
        return [np.asarray(self.tokens[s : s + n], dtype=np.int64) for s, n in zip(starts, lengths)]


class ImageSource:
    """The rows of an in-memory image dataset (one context per row), normalised as at training."""

    kind = "image"

    def __init__(self, x: Tensor, raw: Tensor, image_shape: tuple[int, ...], labels: Tensor | None = None,
                 label_names: list[str] | None = None):  # fmt: skip
        self.x, self.raw, self.image_shape = x, raw, tuple(image_shape)
        self.labels, self.label_names = labels, label_names
        self.n_rows = len(x)
        self.manifest: dict = {}

    def batches(self, ranges: list[tuple[int, int]], batch_rows: int) -> Iterator[Batch]:
        for lo, hi in ranges:
            for at in range(lo, hi, batch_rows):
                end = min(hi, at + batch_rows)
                yield Batch(self.x[at:end], torch.arange(at, end), torch.ones(end - at, dtype=torch.bool))


def make_source(run: LoadedRun, split: str):
    """The run's rows as a source, and the row ranges of ``split`` (all, train, val or test)."""
    from implicit_em.lm.activations import ActivationsDataModule

    if split not in SPLITS:
        raise ConfigError(f"--split must be one of {', '.join(SPLITS)} (got {split!r})")
    dm = run.datamodule
    if isinstance(dm, ActivationsDataModule):
        source = TokenSource(dm.root, run.normalization)
        if split == "all":
            return source, [(0, source.n_rows)]
        dm.setup("fit")  # the run's document split (its seed and fractions)
        rows = dm.rows[split]
        return source, rows.ranges(0, rows.n)
    shape = tuple(getattr(dm, "image_shape", ()) or ())
    if not shape:
        raise DataError(
            f"{type(dm).__name__} rows are neither tokens (a harvest folder) nor images; the dashboard shows one "
            "of those"
        )
    dm.setup("fit")
    dm.load_state_dict({"normalization": run.normalization.state_dict()})  # the checkpoint's, should setup refit it
    names = ("train", "val", "test") if split == "all" else (split,)
    parts = [dm.splits[n] for n in names if n in dm.splits]
    x = torch.cat([p.x for p in parts])
    y = torch.cat([p.y for p in parts])
    to_raw = run.normalization.inverse()
    raw = to_raw(x) if to_raw is not None else x
    return ImageSource(x, raw, shape, y, getattr(dm, "label_names", None)), [(0, len(x))]


def limit_ranges(ranges: list[tuple[int, int]], max_rows: int | None) -> list[tuple[int, int]]:
    """The first ``max_rows`` rows of ``ranges`` (all when None)."""
    if max_rows is None:
        return ranges
    out, left = [], max_rows
    for lo, hi in ranges:
        if left <= 0:
            break
        out.append((lo, min(hi, lo + left)))
        left -= out[-1][1] - lo
    return out


# -- the pass ------------------------------------------------------------------------------------------------
@dataclass
class PassTiming:
    rows: int
    contexts: int
    components: int
    seconds: float
    peak_rss_mb: float
    buffer_mb: float

    def as_dict(self) -> dict:
        s = max(self.seconds, 1e-9)
        return {
            "rows": self.rows, "contexts": self.contexts, "components": self.components,
            "seconds": round(self.seconds, 3), "rows_per_s": round(self.rows / s, 1),
            "contexts_per_s": round(self.contexts / s, 1), "components_per_s": round(self.components / s, 1),
            "peak_rss_mb": round(self.peak_rss_mb, 1), "buffer_mb": round(self.buffer_mb, 1),
        }  # fmt: skip


def default_batch_rows(k: int) -> int:
    """Rows per batch: about 2^24 code values (64 MB of float32) per batch, 256 to 16384 rows."""
    return int(min(16384, max(256, (1 << 24) // max(k, 1))))


@torch.no_grad()
def stream_pass(
    run: LoadedRun, source, ranges: list[tuple[int, int]], config: StreamConfig, batch_rows: int | None = None,
    seed: int = 0, log: Callable[[str], None] = lambda s: None,
) -> tuple[ComponentStats, PassTiming]:  # fmt: skip
    """Run the module over ``ranges`` of ``source`` and keep what :class:`ComponentStream` keeps."""
    module = run.module
    k = run.n_components
    stream = ComponentStream(k, config, seed)
    batch_rows = batch_rows or default_batch_rows(k)
    device = next(module.parameters()).device
    started, contexts, rows, last = time.perf_counter(), 0, 0, time.perf_counter()
    total = sum(hi - lo for lo, hi in ranges)
    for b in source.batches(ranges, batch_rows):
        codes = module(b.x.to(device))
        stream.update(codes, b.rows, b.new_context)
        contexts += int(b.new_context.sum())
        rows += len(b.rows)
        if time.perf_counter() - last > 10:
            last = time.perf_counter()
            log(f"dashboard pass: {rows}/{total} rows, {last - started:.0f} s")
    seconds = time.perf_counter() - started
    slots = (config.top + config.samples) * k
    buffer_mb = slots * (config.context * 2 + 4 * 6 + 8) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return stream.finish(), PassTiming(rows, contexts, k, seconds, peak, buffer_mb)
