"""SAE folders read as :class:`ExportedSAE` (the SAE on raw activations that scripts/export.py also writes): SAELens's layout (which scripts/export.py writes
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
import torch.nn.functional as F
from torch import Tensor, nn

from implicit_em.errors import ConfigError, DataError
from implicit_em.files import read_safetensors

#: sparsify's weights file
WEIGHTS = "sae_weights.safetensors"
CONFIG = "cfg.json"
#: the SAELens architectures ``load`` runs
ARCHITECTURES = ("standard", "topk", "jumprelu")
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


# -- the exported module --------------------------------------------------------------------------------
class ExportedSAE(nn.Module):
    """An SAE on raw activations: a run exported (:func:`export_run`), or another library's folder read by
    :mod:`implicit_em.sae_folders` (SAELens, sparsify). With n_j = ||W_dec_j|| when ``rescale_acts_by_decoder_norm``
    (else 1) and b = b_dec when ``apply_b_dec_to_input`` (else 0):

        z = ((x - b) W_enc + b_enc) n
        standard: f = relu(z)    topk: the k largest of relu(z) kept    jumprelu: f = relu(z) * 1[z > threshold]
        decode(f) = (f / n) W_dec + b_dec;    forward(x) = decode(encode(x))

    ``bias_in_product``: z summed as sparsify's nn.Linear sums it (b_enc inside the matrix product) rather than
    as SAELens does (added after it); both are the same z but for rounding, which can swap near-tied top-k picks.

    What a frozen row reads: ``n_components`` (K), ``d_in``, ``k`` (the L0 target: top-k's k or BatchTopK's mean
    k; None for standard and JumpReLU SAEs), ``name`` (what it was trained as: standard, topk, batchtopk or
    jumprelu), ``architecture`` (how it runs: standard, topk or jumprelu), ``source`` (implicit_em, sae_lens or
    sparsify), ``path`` (its folder; None when a run is exported in memory) and ``cfg`` (its cfg.json).
    """

    def __init__(
        self, tensors: dict[str, Tensor], cfg: dict[str, Any], architecture: str, k: int | float | None = None, *,
        name: str | None = None, source: str = "implicit_em", apply_b_dec_to_input: bool = False,
        rescale_acts_by_decoder_norm: bool = False, bias_in_product: bool = False, path: str | Path | None = None,
    ):  # fmt: skip
        super().__init__()
        if architecture not in ARCHITECTURES:
            raise DataError(f"architecture {architecture!r} cannot be loaded; known: {', '.join(ARCHITECTURES)}")
        self.architecture, self.name, self.source = architecture, name or architecture, source
        self.path = Path(path) if path is not None else None
        where = f"{self.path}" if self.path is not None else "the export"
        names = ("W_enc", "b_enc", "W_dec", "b_dec") + (("threshold",) if architecture == "jumprelu" else ())
        for n in names:
            if n not in tensors:
                raise DataError(f"{where}: the weights lack {n}; save the SAE again (scripts/export.py for a run)")
            setattr(self, n, nn.Parameter(tensors[n].detach().float().clone(), requires_grad=False))
        d_in, n_components = self.W_enc.shape if self.W_enc.dim() == 2 else (-1, -1)
        shapes = {"W_enc": (d_in, n_components), "b_enc": (n_components,), "W_dec": (n_components, d_in),
                  "b_dec": (d_in,), "threshold": (n_components,)}  # fmt: skip
        for n in names:
            if tuple(getattr(self, n).shape) != shapes[n] or d_in < 1:
                raise DataError(
                    f"{where}: {n} is {tuple(getattr(self, n).shape)} where W_enc {tuple(self.W_enc.shape)} needs "
                    f"{shapes[n]}; the weights do not belong together: save the SAE again"
                )
        if architecture == "topk" and k is None:
            raise DataError(f"{where}: a top-k SAE needs its k; set k in its cfg.json")
        if k is not None and not 0 < k <= n_components:
            raise DataError(f"{where}: k = {k} must be in (0, {n_components}]; fix k in its cfg.json")
        self.k = k
        self.cfg = cfg
        self.apply_b_dec_to_input = bool(apply_b_dec_to_input)
        self.rescale_acts_by_decoder_norm = bool(rescale_acts_by_decoder_norm)
        self.bias_in_product = bool(bias_in_product)

    @property
    def d_in(self) -> int:
        return int(self.W_enc.shape[0])

    @property
    def n_components(self) -> int:
        return int(self.W_enc.shape[1])

    def pre_activation(self, x: Tensor) -> Tensor:
        """z (N x K) of the class docstring, from raw activations x (N x d_in)."""
        x = x.to(self.W_enc)
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        z = F.linear(x, self.W_enc.T, self.b_enc) if self.bias_in_product else x @ self.W_enc + self.b_enc
        return z * self.W_dec.norm(dim=-1) if self.rescale_acts_by_decoder_norm else z

    def encode(self, x: Tensor) -> Tensor:
        """The codes f (N x K, dense) of raw activations x (N x d_in)."""
        from implicit_em.models.base import jump_relu, keep_top_k

        z = self.pre_activation(x)
        if self.architecture == "jumprelu":
            return jump_relu(torch.relu(z), self.threshold)
        return keep_top_k(z, int(self.k)) if self.architecture == "topk" else torch.relu(z)

    def decode(self, f: Tensor) -> Tensor:
        """x_hat (N x d_in, raw units) from codes f (N x K)."""
        f = f.to(self.W_dec)
        if self.rescale_acts_by_decoder_norm:
            f = f * (1 / self.W_dec.norm(dim=-1))
        return f @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    def component_weights(self) -> Tensor:
        """K x d_in: the encoder's rows, the components (as :meth:`implicit_em.models.base.Net.component_weights`)."""
        return self.W_enc.T

    def decoder_directions(self) -> Tensor:
        """K x d_in: what one unit of each code adds to x_hat, W_dec_j / n_j."""
        w = self.W_dec.detach()
        return w / w.norm(dim=-1, keepdim=True) if self.rescale_acts_by_decoder_norm else w

    def extra_repr(self) -> str:
        k = f", k={self.k}" if self.k is not None else ""
        trained = f" (trained as {self.name})" if self.name != self.architecture else ""
        hook = self.cfg.get("hook_name") or (self.cfg.get("metadata") or {}).get("hook_name") or "no hook"
        return (f"architecture={self.architecture}{trained}, d_in={self.d_in}, d_sae={self.n_components}{k}, "
                f"source={self.source}, {hook}")  # fmt: skip

    def save(self, out_dir: str | Path) -> Path:
        """Write sae_weights.safetensors and cfg.json into ``out_dir`` (created), atomically each: an export's
        own files (another library's SAE stays in its own folder)."""
        from safetensors.torch import save

        from implicit_em.files import atomic_write

        if self.source != "implicit_em":
            raise ConfigError(f"a {self.source} SAE is not saved again here; its folder is {self.path}")
        out = Path(out_dir)
        tensors = {n: p.detach().float().contiguous().cpu() for n, p in self.named_parameters()}
        blob = save(tensors)
        atomic_write(out / WEIGHTS, lambda f: f.write(blob))
        text = json.dumps(self.cfg, indent=2, default=str) + "\n"
        atomic_write(out / CONFIG, lambda f: f.write(text.encode()))
        return out
