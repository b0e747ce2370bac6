"""SAE folders read as :class:`implicit_em.export.ExportedSAE`: SAELens's layout (which scripts/export.py writes
too) and sparsify's (EleutherAI), so that any SAE in either is judged beside the project's own.

SAELens: ``cfg.json`` + ``sae_weights.safetensors`` (``W_enc`` d_in x K, ``b_enc`` K, ``W_dec`` K x d_in, ``b_dec``
d_in; ``threshold`` K for JumpReLU, the scalar ``topk_threshold`` for a BatchTopK SAE saved in training form):

    z = ((x - b_dec [apply_b_dec_to_input, default true]) W_enc + b_enc) ||W_dec_j|| [rescale_acts_by_decoder_norm]
    standard: f = relu(z)    topk: the k largest of relu(z) kept    jumprelu: f = relu(z) * 1[z > threshold]
    batchtopk: at inference SAELens runs it as JumpReLU with threshold = topk_threshold for every component
    x_hat = (f / ||W_dec_j|| [rescale]) W_dec + b_dec

cfg.json in SAELens 6's layout (``architecture``, ``k``, ``metadata``) or the flat pre-6.0 one (``activation_fn_str``
``"topk"`` with ``activation_fn_kwargs.k``). A JumpReLU folder that SAELens converted from a BatchTopK SAE
(``metadata.training_architecture``) keeps the name batchtopk and its mean k as the L0 target.

sparsify: ``cfg.json`` (``d_in``, ``k``, ``num_latents`` or ``expansion_factor``, ``activation``) + ``sae.safetensors``
(``encoder.weight`` K x d_in, ``encoder.bias`` K, ``W_dec`` K x d_in, ``b_dec`` d_in):

    f = the k largest of relu((x - b_dec) encoder.weight^T + encoder.bias) kept;    x_hat = f W_dec + b_dec

Refused with one line: SAELens architectures other than these four, per-input normalisation (``layer_norm``,
``constant_norm_rescale``: decoding needs the input, not the codes alone), scaling or whitening not folded into the
weights, sparsify's transcoders, skip connections and groupmax. Weights are read as float32 whatever their dtype;
inputs are rows N x d_in (a hook_z SAE's heads flattened, as SAELens flattens them).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from implicit_em.errors import DataError
from implicit_em.export import CONFIG, WEIGHTS, ExportedSAE
from implicit_em.files import read_safetensors

#: sparsify's weights file
SPARSIFY_WEIGHTS = "sae.safetensors"
#: the SAELens architectures read (batchtopk runs as jumprelu)
SAE_LENS_ARCHITECTURES = ("standard", "topk", "batchtopk", "jumprelu")
FOLDERS = f"an SAE folder ({CONFIG} with {WEIGHTS}: SAELens or scripts/export.py; with {SPARSIFY_WEIGHTS}: sparsify)"


def folder_format(path: str | Path) -> str | None:
    """``"sae_lens"`` or ``"sparsify"`` for an SAE folder, None for anything else (a run directory, a file); a
    folder with a weights file and no cfg.json, or the reverse, is refused with one line."""
    path = Path(path)
    if not path.is_dir():
        return None
    found = [name for name in (WEIGHTS, SPARSIFY_WEIGHTS) if (path / name).is_file()]
    has_cfg = (path / CONFIG).is_file()
    if found and not has_cfg:
        raise DataError(
            f"{path} has {found[0]} but no {CONFIG}; copy the cfg.json saved with those weights beside them"
        )
    if has_cfg and not found:
        if (path / "checkpoints").is_dir():
            return None
        raise DataError(f"{path} has {CONFIG} but neither {WEIGHTS} (SAELens) nor {SPARSIFY_WEIGHTS} (sparsify); "
                        "copy the weights saved with it beside it")  # fmt: skip
    if len(found) == 2:
        raise DataError(f"{path} holds both {WEIGHTS} (SAELens) and {SPARSIFY_WEIGHTS} (sparsify); keep one per folder")
    return None if not found else ("sae_lens" if found[0] == WEIGHTS else "sparsify")


def nested_folders(path: str | Path) -> list[str]:
    """The names of the SAE folders directly inside ``path`` (sparsify saves one per hookpoint), sorted."""
    found = []
    for sub in sorted(Path(path).iterdir()) if Path(path).is_dir() else []:
        try:
            if folder_format(sub) is not None:
                found.append(sub.name)
        except DataError:
            continue
    return found


def read_folder(path: str | Path) -> ExportedSAE:
    """The SAE of a SAELens or sparsify folder (see the module docstring)."""
    path = Path(path)
    kind = folder_format(path)
    if kind is None:
        raise DataError(f"{path} is not {FOLDERS}; pass one")
    try:
        cfg = json.loads((path / CONFIG).read_text())
    except ValueError as e:
        raise DataError(f"{path / CONFIG} is not valid JSON ({e}); save the SAE again") from None
    if not isinstance(cfg, dict):
        raise DataError(f"{path / CONFIG} holds {type(cfg).__name__}, not an object; save the SAE again")
    if kind == "sparsify":
        return sparsify_model(read_safetensors(path / SPARSIFY_WEIGHTS), cfg, path)
    return sae_lens_model(read_safetensors(path / WEIGHTS), cfg, path)


# -- SAELens --------------------------------------------------------------------------------------------------
def sae_lens_model(tensors: dict[str, Tensor], cfg: dict[str, Any], path: str | Path | None = None) -> ExportedSAE:
    """The SAE of SAELens's tensors and cfg.json (either layout; an export of a run is one too)."""
    where = f"{path / CONFIG}" if path is not None else "the export's cfg.json"
    own = cfg.get("implicit_em") if isinstance(cfg.get("implicit_em"), dict) else None
    metadata = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    architecture = cfg.get("architecture") or "standard"
    activation = cfg.get("activation_fn", cfg.get("activation_fn_str"))
    k = cfg.get("k")
    if activation == "topk" and (cfg.get("activation_fn_kwargs") or {}).get("k") is not None:
        architecture, k = "topk", cfg["activation_fn_kwargs"]["k"]  # the pre-6.0 layout
    if architecture not in SAE_LENS_ARCHITECTURES:
        raise DataError(f"{where}: architecture {architecture!r} is not read here (known: "
                        f"{', '.join(SAE_LENS_ARCHITECTURES)}); convert the SAE to one of those")  # fmt: skip
    _check_normalization(cfg.get("normalize_activations"), where)
    scaling = tensors.get("scaling_factor")
    if scaling is not None and not torch.all(scaling == 1):
        raise DataError(f"{where}: a finetuning scaling_factor (pre-6.0 SAELens) is not read here; fold it into W_dec "
                        "(W_dec * scaling_factor[:, None]) and save again")  # fmt: skip
    d_in, d_sae = cfg.get("d_in"), cfg.get("d_sae")
    w_enc = tensors.get("W_enc")
    if w_enc is not None and (d_in, d_sae) != (None, None) and tuple(w_enc.shape) != (d_in, d_sae):
        raise DataError(f"{where}: d_in {d_in}, d_sae {d_sae}, but W_enc is {tuple(w_enc.shape)}; the files do not "
                        "belong together")  # fmt: skip
    tensors = dict(tensors)
    name, run_as = architecture, architecture
    rescale = bool(cfg.get("rescale_acts_by_decoder_norm", architecture == "batchtopk"))
    if architecture == "batchtopk":  # saved in training form: SAELens's inference form is JumpReLU
        if "topk_threshold" not in tensors:
            raise DataError(f"{where}: a batchtopk SAE's weights lack topk_threshold; save it with SAELens again")
        if w_enc is not None:
            tensors["threshold"] = torch.full((w_enc.shape[1],), float(tensors["topk_threshold"]))
        run_as = "jumprelu"
    elif architecture == "jumprelu":
        if "threshold" not in tensors and "log_threshold" in tensors:  # older SAELens checkpoints
            tensors["threshold"] = tensors["log_threshold"].exp()
        # a BatchTopK SAE in its inference form keeps its name and mean k (our export's, or SAELens's metadata)
        details = own if own is not None else (metadata.get("training_architecture_details") or {})
        trained = own.get("trained_as") if own is not None else metadata.get("training_architecture")
        if trained == "batchtopk":
            name, k = "batchtopk", details.get("k")
        else:
            k = None
    elif architecture == "standard":
        k = None
    k = _as_k(k, where) if k is not None else None
    return ExportedSAE(
        tensors, cfg, run_as, k, name=name, source="implicit_em" if own is not None else "sae_lens",
        apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)), rescale_acts_by_decoder_norm=rescale,
        path=path,
    )  # fmt: skip


def _check_normalization(kind, where: str) -> None:
    """normalize_activations: "none" runs; anything else is refused with the reason and the fix."""
    if kind in (None, False, "none"):
        return
    if kind is True or kind == "expected_average_only_in":
        raise DataError(f"{where}: normalize_activations {kind!r}: the SAE expects inputs scaled by a factor its folder "
                        "does not hold; fold it (SAELens: sae.fold_activation_norm_scaling_factor) and save again")  # fmt: skip
    if kind == "covariance_whitening":
        raise DataError(f"{where}: normalize_activations 'covariance_whitening': the whitening is not in the folder; "
                        "fold it (SAELens: sae.fold_activation_whitening) and save again")  # fmt: skip
    raise DataError(f"{where}: normalize_activations {kind!r} rescales each input as it runs, so decoding needs the "
                    "input as well as the codes; only SAEs with normalize_activations 'none' are read")  # fmt: skip


def _as_k(k, where: str) -> int | float:
    """k as an int when whole (top-k's k), else the float mean k of a BatchTopK SAE."""
    if isinstance(k, bool) or not isinstance(k, int | float) or not math.isfinite(k) or k <= 0:
        raise DataError(f"{where}: k must be a positive number (got {k!r}); fix it")
    return int(k) if float(k).is_integer() else float(k)


# -- sparsify -------------------------------------------------------------------------------------------------
#: sparsify options this module does not run, and why
SPARSIFY_REFUSED = {
    "transcode": "a transcoder predicts another module's output, not its own input",
    "skip_connection": "its reconstruction adds x W_skip, so decoding needs the input as well as the codes",
    "signed": "signed codes are not run here",
}


def sparsify_model(tensors: dict[str, Tensor], cfg: dict[str, Any], path: str | Path) -> ExportedSAE:
    """The SAE of sparsify's tensors and cfg.json (see the module docstring)."""
    where = Path(path) / CONFIG
    for option, why in SPARSIFY_REFUSED.items():
        if cfg.get(option):
            raise DataError(f"{where}: sparsify's {option} is set: {why}; load sparse autoencoders only")
    activation = cfg.get("activation", "topk")
    if activation != "topk":
        raise DataError(f"{where}: sparsify's activation {activation!r} is not read here (only topk); train with topk")
    if "d_in" not in cfg:
        raise DataError(f"{where} lacks d_in (sparsify writes it); save the SAE again with save_to_disk")
    names = {"encoder.weight": "W_enc", "encoder.bias": "b_enc", "W_dec": "W_dec", "b_dec": "b_dec"}
    missing = [n for n in names if n not in tensors]
    if missing:
        raise DataError(f"{Path(path) / SPARSIFY_WEIGHTS} lacks {', '.join(missing)}; save the SAE again with "
                        "save_to_disk (with its decoder)")  # fmt: skip
    if "W_skip" in tensors:
        raise DataError(f"{where}: {SPARSIFY_REFUSED['skip_connection']} (W_skip); load sparse autoencoders only")
    d_in = cfg["d_in"]
    n_latents = cfg.get("num_latents") or d_in * cfg.get("expansion_factor", 32)
    weight = tensors["encoder.weight"]
    if tuple(weight.shape) != (n_latents, d_in):
        raise DataError(f"{where}: d_in {d_in} and {n_latents} latents, but encoder.weight is {tuple(weight.shape)}; "
                        "the files do not belong together")  # fmt: skip
    own = {mine: tensors[theirs] for theirs, mine in names.items()}
    own["W_enc"] = weight.float().T  # a view: z is F.linear(x - b_dec, encoder.weight, encoder.bias), as sparsify's
    k = _as_k(cfg.get("k", 32), where)
    return ExportedSAE(own, cfg, "topk", k, source="sparsify", apply_b_dec_to_input=True, bias_in_product=True,
                       path=path)  # fmt: skip
