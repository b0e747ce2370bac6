"""Export a trained run in the layout SAELens loads, and load it back as a torch module on raw activations.

An export directory holds ``sae_weights.safetensors`` (``W_enc`` d_in x K, ``b_enc`` K, ``W_dec`` K x d_in,
``b_dec`` d_in, and ``threshold`` K for JumpReLU) and ``cfg.json``. The run's model is found from its saved
config through the registry (:meth:`implicit_em.run.rundir.RunDir.net_class`), and its inference form
(:meth:`implicit_em.models.base.Net.inference_form`) says what SAELens runs:

    standard: f = relu(x W_enc + b_enc)    topk: the k largest of those kept    jumprelu: f = z * 1[z > threshold]
    reconstruction = f W_dec + b_dec

The data's normalisation x' = ((x - mean) * scale) @ matrix is folded into the weights, so raw activations go
in and raw activations come out. For the decoder-free model W_dec, b_dec are the ridge readout the evaluation
fitted (``readout.safetensors`` in the run directory); an SAE exports its own decoder (or, asked, the readout).
Everything is read with ``weights_only=True`` or from safetensors: no code runs. :func:`load` also reads other
libraries' SAE folders (SAELens, sparsify) through :mod:`implicit_em.sae_folders`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor

from implicit_em.errors import ConfigError, DataError
from implicit_em.run.rundir import RunDir
from implicit_em.sae_folders import (
    FOLDERS,
    ExportedSAE,
    folder_format,
    nested_folders,
    read_folder,
    sae_lens_model,
)

if TYPE_CHECKING:  # the data package imports Lightning: loading an SAE folder needs neither
    from implicit_em.data.normalization import Normalization


def find_normalization(checkpoint: dict) -> Normalization:
    """The DataModule's normalisation in a checkpoint: the ``"normalization"`` entry of the top-level value that
    has one (Lightning stores the DataModule's ``state_dict()`` under its class name); the identity if none."""
    from implicit_em.data.normalization import Normalization

    for value in checkpoint.values():
        if isinstance(value, dict) and isinstance(value.get("normalization"), dict):
            return Normalization.from_state_dict(value["normalization"])
    return Normalization()


def trained_net(run: RunDir, checkpoint: dict):
    """The run's net with its trained weights, built from its config through the registry (no data needed)."""
    cls = run.net_class()
    hparams = checkpoint.get("hyper_parameters") or {}
    state = checkpoint.get("state_dict") or {}
    if str(hparams.get("_class_path", "")).endswith("Ensemble") or any(k.startswith("members.") for k in state):
        raise ConfigError(f"{run.path} is an ensemble run; export trains one model: train it alone and export that")
    model = (run.config().get("model") or {}).get("init_args") or {}
    net_args = (model.get("net") or {}).get("init_args") or {} if isinstance(model.get("net"), dict) else {}
    shared = {key: hparams.get(key, model.get(key)) for key in ("in_features", "n_components", "k", "seed")}
    net = cls(
        int(shared["in_features"]), int(shared["n_components"]), shared["k"], int(shared["seed"] or 0), **net_args
    )
    own = {key[len("model.") :]: v for key, v in state.items() if key.startswith("model.")}
    net.load_state_dict(own)
    return net


def export_tensors(path: str | Path, use_readout: bool | None = None) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The SAELens tensors (float32) and cfg.json contents of a run directory or checkpoint, in memory.

    ``use_readout``: for an SAE, True exports the fitted readout instead of the SAE's own decoder; the
    decoder-free model always exports the readout (it has no decoder).
    """
    from implicit_em.run.checkpoints import load_checkpoint

    run, ckpt_path = RunDir.of(path)
    ckpt = load_checkpoint(ckpt_path)
    net = trained_net(run, ckpt)
    form = net.inference_form()
    norm = find_normalization(ckpt)
    if form.decoder is None or use_readout:
        readout = run.readout()
        (r, c), decoder = (readout["R"], readout["c"]), "ridge readout (readout.safetensors)"
    else:
        (r, c), decoder = form.decoder, "the model's own decoder"
    w_enc, b_enc = norm.fold_encoder(form.weight.detach(), form.bias.detach())
    w_dec, b_dec = norm.unfold_decoder(r.detach(), c.detach())
    tensors = {"W_enc": w_enc, "b_enc": b_enc, "W_dec": w_dec, "b_dec": b_dec}
    if form.threshold is not None:
        tensors["threshold"] = form.threshold.detach()
    tensors = {name: t.float().contiguous() for name, t in tensors.items()}
    metrics = run.metrics()
    cfg = sae_lens_config(form.architecture, int(w_enc.shape[0]), int(w_enc.shape[1]), form.k, run, extra={
        "model": net.name, "settings": net.settings(), **form.extra, "decoder": decoder,
        "run_dir": str(run.path.resolve()), "checkpoint": str(Path(ckpt_path).resolve()),
        "global_step": ckpt.get("global_step"),
        "normalization_folded": {p: v is not None for p, v in norm.state_dict().items()},
        "metrics": {m: metrics.get(m) for m in ("fvu", "explained_variance", "l0", "dead_fraction", "ce_loss_recovered")
                    if m in metrics},
    })  # fmt: skip
    return tensors, cfg


def sae_lens_config(
    architecture: str, d_in: int, d_sae: int, k: int | None, run: RunDir, extra: dict
) -> dict[str, Any]:
    """cfg.json in SAELens's pre-6.0 flat layout, which SAELens 3-5 read as is and 6.x converts on load.

    ``hook_name`` is a string even when unknown (""): SAELens 6 tests ``"hook_z" in hook_name`` on pre-6.0
    configs. The activations' manifest, when there is one, gives the model, the hook and the context.
    """
    manifest = run.manifest() or {}
    layer = manifest.get("layer")
    hook = manifest.get("hook_name") or (f"hidden_states.{layer}" if layer is not None else "")
    root = run.data_root()
    return {
        "architecture": architecture,
        "d_in": int(d_in),
        "d_sae": int(d_sae),
        "dtype": "float32",
        "device": "cpu",
        "activation_fn_str": "topk" if architecture == "topk" else "relu",
        "activation_fn_kwargs": {"k": int(k)} if architecture == "topk" else {},
        "apply_b_dec_to_input": False,
        "finetuning_scaling_factor": False,
        "normalize_activations": "none",  # the data's normalisation is folded into the weights
        "model_name": str(manifest.get("model") or ""),
        "hook_name": str(hook),
        "hook_layer": int(layer) if layer is not None else None,
        "hook_head_index": None,
        "context_size": manifest.get("context_size", manifest.get("context")),
        "prepend_bos": manifest.get("prepend_bos"),
        "dataset_path": str(root or ""),
        "dataset_trust_remote_code": False,
        "model_from_pretrained_kwargs": {},
        "sae_lens_training_version": None,
        "neuronpedia_id": None,
        "implicit_em": {**extra, "data": run.config().get("data"), "manifest": run.manifest()},
    }


def export_run(
    run_dir: str | Path, out_dir: str | Path, use_readout: bool | None = None, overwrite: bool = False
) -> Path:
    """Write the SAELens layout of a run (directory or checkpoint) into ``out_dir``; returns ``out_dir``. A
    folder that already holds files is refused unless ``overwrite`` (then only the export's two files change)."""
    out = Path(out_dir)
    if not overwrite and out.is_dir() and any(out.iterdir()):
        raise DataError(f"{out} is not empty; pass --overwrite to replace the export there, or another --out")
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} is a file; pass a folder as --out")
    return sae_lens_model(*export_tensors(run_dir, use_readout)).save(out)


def load(path: str | Path) -> ExportedSAE:
    """The SAE of a folder (SAELens's layout, which :func:`export_run` writes, or sparsify's: see
    :mod:`implicit_em.sae_folders`), or of a run directory or checkpoint (exported in memory), as a module with
    ``encode``/``decode`` on raw activations."""
    path = Path(path)
    if folder_format(path) is not None:
        return read_folder(path)
    if path.is_dir() and not (path / "checkpoints").is_dir():
        inside = nested_folders(path)
        if inside:
            shown = ", ".join(inside[:4]) + (f" and {len(inside) - 4} more" if len(inside) > 4 else "")
            raise DataError(f"{path} holds SAE folders ({shown}); pass one of them")
        raise DataError(f"{path} is neither {FOLDERS} nor a run directory (checkpoints/*.ckpt); pass one of those")
    return sae_lens_model(*export_tensors(path))
