"""The end-of-run evaluation written to metrics.json: probe, clustering and diagnostics on frozen features."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from implicit_em.errors import check_choice
from implicit_em.metrics import component_diagnostics
from implicit_em.probe import PROBE_METHODS, clustering_scores, kmeans_scores, linear_probe, responsibility_assignments


@dataclass
class ReportConfig:
    """What the final evaluation computes.

    Args:
        probe_method: ``sklearn`` (the paper's protocol) or ``torch`` (the fast full-batch solver).
        kmeans: also fit scikit-learn KMeans with the same K on the raw inputs, for comparison.
        reconstruction: also report reconstruction MSE (through W^T for the decoder-free model).
    """

    probe_method: str = "sklearn"
    kmeans: bool = True
    reconstruction: bool = False

    def __post_init__(self):
        check_choice(self.probe_method, "report.probe_method", PROBE_METHODS)


@torch.no_grad()
def features(module, x: Tensor, fn=None, batch_size: int = 8192) -> Tensor:
    """Frozen features S x N x K of ``x`` (or ``fn``'s outputs), computed in chunks on the module's device."""
    module.eval()
    fn = fn or module
    return torch.cat([fn(chunk.to(module.device)) for chunk in x.split(batch_size)], dim=-2)


def reconstruction_errors(module, x: Tensor, f: Tensor) -> dict[str, list[float]]:
    """MSE of the reconstruction: the decoder's for an SAE, x_hat = d W for the decoder-free model; and
    the scale-normalised MSE after the best single scale a = <x, x_hat> / <x_hat, x_hat>."""
    x = x.to(f.device).double()
    if hasattr(module.model, "decode"):
        x_hat = module.model.decode(f).double()
    else:
        x_hat = f.double() @ module.model.component_weights().double()
    raw = (x_hat - x).pow(2).mean(dim=(-2, -1))
    scale = (x_hat * x).sum(dim=(-2, -1)) / x_hat.pow(2).sum(dim=(-2, -1)).clamp_min(1e-300)
    normalised = (scale[:, None, None] * x_hat - x).pow(2).mean(dim=(-2, -1))
    return {"reconstruction_mse": raw.tolist(), "reconstruction_mse_scaled": normalised.tolist()}


def evaluate(module, datamodule, config: ReportConfig | None = None) -> dict:
    """Every number of metrics.json except timing: per member, then member 0's values at the top level.

    Diagnostics are over the test split; the probe is fit on train and scored on test; clustering assigns
    each test input to its most responsible component.
    """
    config = config or ReportConfig()
    train, test = datamodule.splits["train"], datamodule.splits["test"]
    f_train, f_test = features(module, train.x), features(module, test.x)
    z_test = features(module, test.x, module.model.pre_activation)
    diag = component_diagnostics(f_test, module.model.component_weights())
    recon = reconstruction_errors(module, test.x, f_test) if config.reconstruction else {}
    k = f_test.shape[-1]
    shared = kmeans_scores(train.x, test.x, test.y, k) if config.kmeans else {}
    members = []
    for s in range(module.n_members):
        row = {
            "probe_accuracy": linear_probe(f_train[s].cpu(), train.y, f_test[s].cpu(), test.y, config.probe_method),
            "probe_method": config.probe_method,
            **clustering_scores(responsibility_assignments(f_test[s], z_test[s]).cpu(), test.y),
            **{name: _number(v[s]) for name, v in diag.items() if name != "usage"},
            "n_parameters": module.n_parameters(),
            "n_components": k,
            **{name: v[s] for name, v in recon.items()},
            **shared,
            **module.member_specs[s],
        }
        for term, values in module.epoch_means.items():
            row["final_loss" if term == "loss" else f"final_{term}"] = values[s]
        members.append(row)
    return {**members[0], "members": members} if len(members) > 1 else members[0]


def _number(v: Tensor) -> float | int:
    return float(v) if v.dtype.is_floating_point else int(v)


def write_metrics(metrics: dict, path: str | Path) -> Path:
    """Write metrics.json atomically (never a half-written file); non-finite numbers become null."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_finite(metrics), indent=2) + "\n")
    tmp.replace(path)
    return path.resolve()


def _finite(v):
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v
