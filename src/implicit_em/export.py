"""Export a trained run in the layout SAELens loads, and load it back as a torch module on raw activations.

An export directory holds ``sae_weights.safetensors`` (``W_enc`` d_in x K, ``b_enc`` K, ``W_dec`` K x d_in,
``b_dec`` d_in) and ``cfg.json``. The data's normalisation x' = ((x - mean) * scale) @ matrix is folded into
the weights, so raw activations go in and raw activations come out:

    features = relu(x W_enc + b_enc)        reconstruction = features W_dec + b_dec

For the decoder-free model W_dec, b_dec are the ridge readout the evaluation fitted (``readout.safetensors``
in the run directory: ``R`` K x D, ``c`` D, in the normalised space); an SAE baseline exports its own decoder
(or, asked, the readout). Everything is read with ``weights_only=True`` or from safetensors: no code runs.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from implicit_em.errors import ConfigError, DataError

WEIGHTS = "sae_weights.safetensors"
CONFIG = "cfg.json"
READOUT = "readout.safetensors"


# -- the normalisation, folded --------------------------------------------------------------------------
def normalization_parts(state: dict | None, dims: int) -> tuple[Tensor, Tensor, Tensor]:
    """(mean D, scale D, matrix D x D') of x' = ((x - mean) * scale) @ matrix in float64, each missing part
    the identity (mean 0, scale 1, matrix I)."""
    state = state or {}
    mean, scale, matrix = (state.get(k) for k in ("mean", "scale", "matrix"))
    mean = torch.zeros(dims, dtype=torch.float64) if mean is None else mean.double().cpu().reshape(dims)
    scale = torch.ones(dims, dtype=torch.float64) if scale is None else scale.double().cpu().expand(dims)
    matrix = torch.eye(dims, dtype=torch.float64) if matrix is None else matrix.double().cpu()
    return mean, scale, matrix


def fold_encoder(weight: Tensor, bias: Tensor, norm: dict | None) -> tuple[Tensor, Tensor]:
    """W_enc (D x K), b_enc (K) with x W_enc + b_enc = x' W^T + b for x' the normalised x.

    x' W^T = ((x - m) * s) M W^T, so W_enc = diag(s) M W^T and b_enc = b - (m * s) M W^T.
    """
    mean, scale, matrix = normalization_parts(norm, matrix_rows(norm, weight.shape[1]))
    mw = matrix @ weight.double().T
    return scale.unsqueeze(1) * mw, bias.double() - (mean * scale) @ mw


def unfold_readout(r: Tensor, c: Tensor, norm: dict | None) -> tuple[Tensor, Tensor]:
    """W_dec (K x D), b_dec (D) with f W_dec + b_dec = unnormalise(f R + c), the readout in raw units.

    x = (x' M^-1) / s + m, so W_dec = (R M^-1) / s and b_dec = (c M^-1) / s + m (M^-1 the pseudo-inverse
    when M is not square).
    """
    mean, scale, matrix = normalization_parts(norm, matrix_rows(norm, r.shape[1]))
    inverse = _inverse(matrix)
    return (r.double() @ inverse) / scale, (c.double() @ inverse) / scale + mean


def normalization_inverse(norm: dict | None) -> Callable[[Tensor], Tensor] | None:
    """x' -> x, the inverse of the normalisation (``to_raw`` for :func:`implicit_em.sae_metrics.sae_evaluation`);
    None when there is nothing to invert. ``norm``: ``Normalization.state_dict()``."""
    if not norm or all(norm.get(k) is None for k in ("mean", "scale", "matrix")):
        return None
    dims = matrix_rows(norm, next(len(v) for v in norm.values() if isinstance(v, torch.Tensor)))
    mean, scale, matrix = normalization_parts(norm, dims)
    inverse = _inverse(matrix)

    def to_raw(x: Tensor) -> Tensor:
        return ((x.double() @ inverse.to(x.device)) / scale.to(x.device) + mean.to(x.device)).to(x.dtype)

    return to_raw


def matrix_rows(norm: dict | None, default: int) -> int:
    """D, the raw dimension: the matrix's rows when there is one, else ``default``."""
    matrix = (norm or {}).get("matrix")
    return int(matrix.shape[0]) if matrix is not None else default


def _inverse(matrix: Tensor) -> Tensor:
    if matrix.shape[0] == matrix.shape[1]:
        return torch.linalg.inv(matrix)
    return torch.linalg.pinv(matrix)


# -- reading a run --------------------------------------------------------------------------------------
def find_normalization(checkpoint: dict) -> dict | None:
    """The DataModule's normalisation state in a checkpoint: the ``"normalization"`` entry of the top-level
    value that has one (Lightning stores the DataModule's ``state_dict()`` under its class name)."""
    for value in checkpoint.values():
        if isinstance(value, dict) and isinstance(value.get("normalization"), dict):
            return value["normalization"]
    return None


def run_paths(path: str | Path) -> tuple[Path, Path]:
    """(run directory, checkpoint) of a run directory or of a checkpoint file inside one."""
    path = Path(path)
    if path.is_file():
        return path.resolve().parent.parent, path
    if not path.is_dir():
        raise DataError(f"{path} does not exist; pass a run directory (with checkpoints/) or a .ckpt file")
    last = path / "checkpoints" / "last.ckpt"
    found = [last] if last.is_file() else sorted((path / "checkpoints").glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise DataError(f"{path} holds no checkpoints/*.ckpt; pass the run directory scripts/train.py printed")
    return path, found[-1]


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise DataError(f"{path} is not a readable safetensors file ({e.__class__.__name__}); re-create it") from None


def _data_provenance(run_dir: Path) -> dict[str, Any]:
    """The run's config data section (config.yaml), and the data root's manifest.json when there is one."""
    import yaml

    out: dict[str, Any] = {"data": None, "manifest": None}
    config = run_dir / "config.yaml"
    if config.is_file():
        out["data"] = (yaml.safe_load(config.read_text()) or {}).get("data")
    root = ((out["data"] or {}).get("init_args") or {}).get("root")
    if root and (Path(root) / "manifest.json").is_file():
        try:
            out["manifest"] = json.loads((Path(root) / "manifest.json").read_text())
        except (OSError, ValueError):
            out["manifest"] = None
    return out


def export_tensors(path: str | Path, use_readout: bool | None = None) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The SAELens tensors (float32) and cfg.json contents of a run directory or checkpoint, in memory.

    ``use_readout``: for an SAE, True exports the fitted readout instead of the SAE's own decoder; the
    decoder-free model always exports the readout (it has no decoder).
    """
    from implicit_em.checkpoints import load_checkpoint

    run_dir, ckpt_path = run_paths(path)
    ckpt = load_checkpoint(ckpt_path)
    state, hparams = ckpt.get("state_dict") or {}, ckpt.get("hyper_parameters") or {}
    norm = find_normalization(ckpt)
    if "model.linear.weight" in state:
        kind, weight, bias = "implicit_em", state["model.linear.weight"], state["model.linear.bias"]
        activation = hparams.get("activation", "relu")
        if activation != "relu":
            raise ConfigError(
                f"{ckpt_path}: activation {activation!r} cannot be exported: SAELens's standard architecture "
                "computes relu(x W_enc + b_enc); export a run trained with --model.activation relu"
            )
    elif "model.encoder.weight" in state and "model.decoder.weight" in state:
        kind, weight, bias = "sae", state["model.encoder.weight"], state["model.encoder.bias"]
    else:
        raise DataError(
            f"{ckpt_path} holds neither model.linear.* (the decoder-free model) nor model.encoder/decoder.* "
            "(an SAE); pass a checkpoint written by scripts/train.py"
        )
    k = hparams.get("k") if kind == "sae" else None
    readout_path = run_dir / READOUT
    if kind == "implicit_em" or use_readout:
        if not readout_path.is_file():
            raise DataError(
                f"{readout_path} is missing: the decoder-free model exports the ridge readout that the "
                "end-of-run evaluation saves; re-evaluate the run with this version of implicit-em"
            )
        readout = _read_safetensors(readout_path)
        if "R" not in readout or "c" not in readout:
            raise DataError(f"{readout_path} lacks R or c; re-evaluate the run to re-create it")
        r, c, decoder = readout["R"], readout["c"], "ridge readout (readout.safetensors)"
    else:
        r, c, decoder = state["model.decoder.weight"].T, state["model.decoder.bias"], "the SAE's own decoder"
    w_enc, b_enc = fold_encoder(weight, bias, norm)
    w_dec, b_dec = unfold_readout(r, c, norm)
    tensors = {
        name: t.float().contiguous()
        for name, t in {"W_enc": w_enc, "b_enc": b_enc, "W_dec": w_dec, "b_dec": b_dec}.items()
    }
    metrics_path = run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    cfg = sae_lens_config(
        d_in=w_enc.shape[0], d_sae=w_enc.shape[1], k=k, provenance=_data_provenance(run_dir),
        extra={
            "model": hparams.get("_class_path", kind), "activation": "topk" if k else "relu",
            "n_components": int(weight.shape[0]), "decoder": decoder, "run_dir": str(run_dir.resolve()),
            "checkpoint": str(ckpt_path.resolve()), "global_step": ckpt.get("global_step"),
            "normalization_folded": {p: (norm or {}).get(p) is not None for p in ("mean", "scale", "matrix")},
            "metrics": {m: metrics.get(m) for m in ("fvu", "explained_variance", "l0", "dead_fraction")
                        if m in metrics},
        },
    )  # fmt: skip
    return tensors, cfg


def sae_lens_config(d_in: int, d_sae: int, k: int | None, provenance: dict, extra: dict) -> dict[str, Any]:
    """cfg.json in SAELens's pre-6.0 flat layout, which SAELens 3-5 read as is and 6.x converts on load.

    ``hook_name`` is a string even when unknown (""): SAELens 6 tests ``"hook_z" in hook_name`` on
    pre-6.0 configs. The activations' manifest, when there is one, gives the model name and layer.
    """
    manifest = provenance.get("manifest") or {}
    layer = manifest.get("layer")
    return {
        "architecture": "topk" if k else "standard",
        "d_in": int(d_in),
        "d_sae": int(d_sae),
        "dtype": "float32",
        "device": "cpu",
        "activation_fn_str": "topk" if k else "relu",
        "activation_fn_kwargs": {"k": int(k)} if k else {},
        "apply_b_dec_to_input": False,
        "finetuning_scaling_factor": False,
        "normalize_activations": "none",  # the data's normalisation is folded into the weights
        "model_name": str(manifest.get("model") or ""),
        "hook_name": f"hidden_states.{layer}" if layer is not None else "",
        "hook_layer": int(layer) if layer is not None else None,
        "hook_head_index": None,
        "context_size": manifest.get("context"),
        "prepend_bos": None,
        "dataset_path": str(((provenance.get("data") or {}).get("init_args") or {}).get("root") or ""),
        "dataset_trust_remote_code": False,
        "model_from_pretrained_kwargs": {},
        "sae_lens_training_version": None,
        "neuronpedia_id": None,
        "implicit_em": {**extra, "data": provenance.get("data"), "manifest": provenance.get("manifest")},
    }


# -- the exported module --------------------------------------------------------------------------------
class ExportedSAE(nn.Module):
    """An exported model on raw activations: encode(x) = relu(x W_enc + b_enc) (TopK kept when the cfg says
    so), decode(f) = f W_dec + b_dec, forward = decode(encode(x)); ``cfg`` is cfg.json."""

    def __init__(self, tensors: dict[str, Tensor], cfg: dict[str, Any]):
        super().__init__()
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            if name not in tensors:
                raise DataError(f"the exported weights lack {name}; re-export the run with scripts/export.py")
            setattr(self, name, nn.Parameter(tensors[name].float().clone(), requires_grad=False))
        self.cfg = cfg
        self.k = (cfg.get("activation_fn_kwargs") or {}).get("k") if cfg.get("activation_fn_str") == "topk" else None

    def encode(self, x: Tensor) -> Tensor:
        z = torch.relu(x.to(self.W_enc) @ self.W_enc + self.b_enc)
        if self.k is not None:
            from implicit_em.models import keep_top_k

            z = keep_top_k(z, int(self.k))
        return z

    def decode(self, f: Tensor) -> Tensor:
        return f.to(self.W_dec) @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    def save(self, out_dir: str | Path) -> Path:
        """Write sae_weights.safetensors and cfg.json into ``out_dir`` (created), atomically each."""
        from safetensors.torch import save

        from implicit_em.files import atomic_write

        out = Path(out_dir)
        tensors = {
            n: getattr(self, n).detach().float().contiguous().cpu() for n in ("W_enc", "b_enc", "W_dec", "b_dec")
        }
        blob = save(tensors)
        atomic_write(out / WEIGHTS, lambda f: f.write(blob))
        text = json.dumps(self.cfg, indent=2, default=str) + "\n"
        atomic_write(out / CONFIG, lambda f: f.write(text.encode()))
        return out


def export_run(run_dir: str | Path, out_dir: str | Path, use_readout: bool | None = None) -> Path:
    """Write the SAELens layout of a run (directory or checkpoint) into ``out_dir``; returns ``out_dir``."""
    return ExportedSAE(*export_tensors(run_dir, use_readout)).save(out_dir)


def load(path: str | Path) -> ExportedSAE:
    """The model of an export directory (sae_weights.safetensors + cfg.json), or of a run directory or
    checkpoint (exported in memory), as a module with ``encode``/``decode`` on raw activations."""
    path = Path(path)
    if path.is_dir() and (path / WEIGHTS).is_file():
        if not (path / CONFIG).is_file():
            raise DataError(f"{path} has {WEIGHTS} but no {CONFIG}; re-export the run with scripts/export.py")
        try:
            cfg = json.loads((path / CONFIG).read_text())
        except ValueError:
            raise DataError(f"{path / CONFIG} is not valid JSON; re-export the run with scripts/export.py") from None
        return ExportedSAE(_read_safetensors(path / WEIGHTS), cfg)
    return ExportedSAE(*export_tensors(path))


def save_readout(readout_state: dict[str, Tensor], run_dir: str | Path) -> Path:
    """Write ``readout.safetensors`` (``R`` K x D, ``c`` D, normalised space) into a run directory, atomically;
    ``readout_state``: :meth:`implicit_em.sae_metrics.Readout.state_dict`."""
    from safetensors.torch import save

    from implicit_em.files import atomic_write

    blob = save({k: v.float().contiguous().cpu() for k, v in readout_state.items()})
    return atomic_write(Path(run_dir) / READOUT, lambda f: f.write(blob))
