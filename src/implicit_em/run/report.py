"""The end-of-run evaluation written to metrics.json: probe, clustering and diagnostics on frozen features."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from implicit_em.errors import check, check_choice
from implicit_em.eval.diagnostics import component_diagnostics
from implicit_em.eval.probe import (
    PROBE_METHODS,
    clustering_scores,
    kmeans_scores,
    linear_probe,
    responsibility_assignments,
)
from implicit_em.eval.sae_metrics import log10_density, readout_scores, sae_evaluation, write_density_histogram
from implicit_em.files import atomic_write
from implicit_em.run.rundir import DENSITY_PNG, RunDir


@dataclass
class ReportConfig:
    """What the final evaluation computes.

    Args:
        probe_method: ``sklearn`` (the paper's protocol) or ``torch`` (the fast full-batch solver).
        kmeans: also fit scikit-learn KMeans with the same K on the raw inputs, for comparison.
        reconstruction: also report reconstruction MSE (through W^T for the decoder-free model).
        split: where the features are scored: ``test``, or ``val`` to choose settings without touching the
            test split.
        sae_metrics: also the SAE users' numbers (L0, dead fraction, FVU and the rest through a fitted ridge
            readout, k-sparse probing; ``readout.safetensors`` and ``component_density.png`` in the run dir).
        lm_tokens: where the data is a causal LM's harvest, the predicted tokens of the held-out windows the LM
            runs again with the layer's output replaced by the reconstruction (CE loss recovered, KL, their 95%
            bootstrap intervals over windows; SAEBench's 20,480 by default; 0: off).
        lm_windows: that many held-out windows instead of ``lm_tokens`` (quick runs; 0: off; None: by tokens).
    """

    probe_method: str = "sklearn"
    kmeans: bool = True
    reconstruction: bool = False
    split: str = "test"
    sae_metrics: bool = True
    lm_tokens: int = 20_480
    lm_windows: int | None = None

    def __post_init__(self):
        check_choice(self.probe_method, "report.probe_method", PROBE_METHODS)
        check(self.lm_tokens >= 0, "report.lm_tokens", "an integer >= 0", self.lm_tokens)
        check(self.lm_windows is None or self.lm_windows >= 0, "report.lm_windows", "an integer >= 0 or null",
              self.lm_windows)  # fmt: skip
        check_choice(self.split, "report.split", ("test", "val"))

    @property
    def splices(self) -> bool:
        """Whether the causal LM's splice runs (neither setting is 0)."""
        return bool(self.lm_tokens) and self.lm_windows != 0


@torch.no_grad()
def features(module, x: Tensor, fn=None, batch_size: int = 8192) -> Tensor:
    """Frozen features N x K of ``x`` (or ``fn``'s outputs), computed in chunks on the module's device."""
    module.eval()
    fn = fn or module
    return torch.cat([fn(chunk.to(module.device)) for chunk in x.split(batch_size)])


def reconstruction_errors(module, x: Tensor, f: Tensor) -> dict[str, float]:
    """MSE of the reconstruction: the decoder's for an SAE, x_hat = d W for the decoder-free model; and
    the scale-normalised MSE after the best single scale a = <x, x_hat> / <x_hat, x_hat>."""
    x = x.to(f.device).double()
    if module.model.has_decoder:
        x_hat = module.model.decode(f).double()
    else:
        x_hat = f.double() @ module.model.component_weights().double()
    scale = (x_hat * x).sum() / x_hat.pow(2).sum().clamp_min(1e-300)
    return {
        "reconstruction_mse": float((x_hat - x).pow(2).mean()),
        "reconstruction_mse_scaled": float((scale * x_hat - x).pow(2).mean()),
    }


def has_labels(*splits) -> bool:
    """Whether every split has labelled rows (labels -1 mean none: unlabelled activation shards)."""
    return all(bool((s.y >= 0).any()) for s in splits)


#: what metrics.json says when the data has no labels
NO_LABELS = "no labels in the data (labels.npy): the linear, sparse and clustering probes were skipped"


#: the numbers metrics.json also holds as ``val_<name>`` when scored on the validation split (report.split val)
VALIDATION_KEYS = ("probe_accuracy", "fvu", "explained_variance", "ce_loss_recovered", "kl_div")


@dataclass
class Codes:
    """One model's (or baseline's) codes on the evaluation splits; ``name`` labels the density figure."""

    train: Tensor
    val: Tensor
    test: Tensor
    name: str = ""

    def scored(self, split: str) -> Tensor:
        return getattr(self, split)


@dataclass
class LanguageModelSplice:
    """What the spliced evaluation needs from the data: the harvest's folder, the held-out documents, the
    normalisation (raw -> model input) and its inverse, and the training mean in raw units (mean ablation)."""

    root: Path
    heldout_docs: Tensor
    normalize: Callable[[Tensor], Tensor]
    to_raw: Callable[[Tensor], Tensor]
    train_mean: Tensor

    @classmethod
    def of(cls, datamodule, config: ReportConfig) -> LanguageModelSplice | None:
        """The splice of a DataModule whose data is a causal LM's harvest (its manifest says so), else None."""
        root = getattr(datamodule, "root", None)
        test = datamodule.splits[config.split]
        if not config.splices or root is None or test.groups is None or not is_causal_harvest(root):
            return None
        to_raw = datamodule.normalization.inverse() or (lambda x: x)
        train = datamodule.splits["train"].x
        return cls(Path(root), test.groups.unique(), datamodule.normalization, to_raw, to_raw(train).double().mean(0))

    def scores(
        self, reconstruct: Callable[[Tensor], Tensor], n_windows: int | None = None, n_tokens: int | None = None
    ) -> dict:
        """CE clean, spliced, zero- and mean-ablated, the recovered fractions, KL and their intervals (see
        :func:`implicit_em.lm.causal_lm.splice_scores`) of ``reconstruct`` (normalised x -> normalised x_hat), on
        ``n_windows`` held-out windows or enough for ``n_tokens`` predicted tokens (default 20,480)."""
        from implicit_em.lm.causal_lm import lm_scores

        def raw_to_raw(x_raw: Tensor) -> Tensor:
            with torch.no_grad():
                return self.to_raw(reconstruct(self.normalize(x_raw.float())).float()).to(x_raw.dtype)

        found = lm_scores(self.root, self.heldout_docs.numpy(), raw_to_raw, self.train_mean.float(), n_windows,
                          n_tokens=n_tokens)  # fmt: skip
        return found or {}


def is_causal_harvest(root) -> bool:
    manifest = Path(root) / "manifest.json"
    return manifest.is_file() and json.loads(manifest.read_text()).get("model_kind") == "causal_lm"


def evaluate_codes(codes: Codes, splits: dict, config: ReportConfig, to_raw=None, run_dir: Path | None = None,
                   splice: LanguageModelSplice | None = None, encode=None, decode=None):  # fmt: skip
    """The evaluation every model and every baseline meets, on its codes: the SAE users' numbers
    (:func:`implicit_em.eval.sae_metrics.sae_evaluation`, in raw units through ``to_raw``) and the full linear
    probe, scored on ``config.split``, and with ``decode`` the FVU of the row's own decoder (``fvu_decoder``).
    Returns (row, readout or None); the row holds ``log10_density`` (a
    tensor, for the loggers). With ``run_dir``, the readout and ``component_density.png`` are saved there.
    Scored on test, the readout's ridge is chosen on val; scored on val, on the last tenth of the training rows.
    With ``splice`` (a causal LM's harvest) and ``encode`` (normalised x -> codes), the LM runs again with the
    layer's output replaced by ``decode(encode(x))`` (the fitted readout when ``decode`` is None), in raw units.
    """
    train, val, scored = splits["train"], splits["val"], splits[config.split]
    f_train, f_scored = codes.train.cpu(), codes.scored(config.split).cpu()
    labelled = has_labels(train, scored)
    row: dict = {"probe_method": config.probe_method, "scored_on": config.split}
    readout = None
    if config.sae_metrics:
        choose = (codes.val.cpu(), val.x) if config.split == "test" else (None, None)
        numbers, readout = sae_evaluation(
            f_train, train.x, *choose, f_scored, scored.x, train.y if labelled else None,
            scored.y if labelled else None, train.groups, scored.groups, to_raw=to_raw,
        )  # fmt: skip
        density = log10_density([codes.train, codes.val] + ([codes.test] if config.split == "test" else []))
        row.update(numbers, log10_density=density.cpu())
        if encode is not None and decode is not None:  # its own decoder too, on the same rows and units
            row["fvu_decoder"] = decoder_fvu(encode, decode, scored.x, to_raw)
        if run_dir is not None:
            RunDir(run_dir).save_readout(readout.state_dict())
            write_density_histogram(density, RunDir(run_dir) / DENSITY_PNG, title=codes.name)
    if labelled:
        keep_train, keep_test = train.y >= 0, scored.y >= 0
        row["probe_accuracy"] = linear_probe(
            f_train[keep_train], train.y[keep_train], f_scored[keep_test], scored.y[keep_test], config.probe_method
        )
    else:
        row["probes_skipped"] = NO_LABELS
    if splice is not None and encode is not None and (decode is not None or readout is not None):
        decoder = decode or readout
        row.update(splice.scores(lambda x: decoder(encode(x)), config.lm_windows, config.lm_tokens))
    if config.split == "val":  # also under names that say so: what a sweep optimises, never a test number
        row.update({f"val_{k}": row[k] for k in VALIDATION_KEYS if isinstance(row.get(k), (int, float))})
    return row, readout


@torch.no_grad()
def decoder_fvu(encode, decode, x: Tensor, to_raw=None, batch_size: int = 8192) -> float:
    """FVU of a model's own decoder on rows ``x``: sum ||x - decode(encode(x))||^2 / sum ||x - mean(x)||^2 over
    every row and dimension (sparsify's ``fvu``), in raw units through ``to_raw``."""
    x_hat = torch.cat([decode(encode(chunk)).cpu() for chunk in x.split(batch_size)])
    return readout_scores(x, x_hat, to_raw)["fvu"]


def module_codes(module, splits: dict) -> Codes:
    """A module's frozen codes on the train, val and test splits."""
    return Codes(*(features(module, splits[n].x) for n in ("train", "val", "test")), name=module.model.name)


def evaluate(module, datamodule, config: ReportConfig | None = None, run_dir: Path | None = None) -> dict:
    """Every number of metrics.json for one model except timing and losses: :func:`evaluate_codes` on its codes,
    and what only a model has: clustering by its most responsible component, the diagnostics (over the scored
    split), parameters, settings, reconstruction errors and KMeans (skipped, with a note, when K exceeds the
    training samples). Unlabelled data skips every probe and says so in ``probes_skipped``."""
    config = config or ReportConfig()
    splits = datamodule.splits
    train, test = splits["train"], splits[config.split]
    codes = module_codes(module, splits)
    net = module.model
    row, _ = evaluate_codes(
        codes, splits, config, datamodule.normalization.inverse(), run_dir, LanguageModelSplice.of(datamodule, config),
        encode=lambda x: net(x.to(module.device)).cpu(), decode=(lambda f: net.decode(f.to(module.device)).cpu())
        if net.has_decoder else None,
    )  # fmt: skip
    f_test = codes.scored(config.split)
    k = f_test.shape[-1]
    weights = module.model.component_weights()
    row.update({
        **{name: _number(v) for name, v in component_diagnostics(f_test, weights).items() if name != "usage"},
        "n_parameters": module.n_parameters(),
        **(reconstruction_errors(module, test.x, f_test) if config.reconstruction else {}),
        **module.settings(),
        "n_components": k,
    })  # fmt: skip
    if has_labels(train, test):
        z_test = features(module, test.x, module.model.pre_activation)
        row.update(clustering_scores(responsibility_assignments(f_test, z_test).cpu(), test.y))
        if config.kmeans and k > len(train.x):
            row["kmeans_skipped"] = f"K = {k} exceeds the {len(train.x)} training samples"
        elif config.kmeans:
            row.update(kmeans_scores(train.x, test.x, test.y, k))
    return row


def final_losses(callback_metrics: dict, suffix: str = "") -> dict[str, float]:
    """``final_loss`` and ``final_<term>``: the last epoch's mean of each training term (``train/<term><suffix>``)."""
    out = {}
    for key, value in callback_metrics.items():
        if key.startswith("train/") and key.endswith(suffix) and "loss_step" not in key:
            term = key[len("train/") : len(key) - len(suffix)]
            if "/" not in term:
                out["final_loss" if term == "loss" else f"final_{term}"] = float(value)
    return out


def evaluate_run(
    module, datamodule, config: ReportConfig | None, callback_metrics: dict, run_dir: Path | None = None
) -> dict:
    """:func:`evaluate` and the final losses of a run's model; for an ensemble, of every member (``members``,
    with when a member stopped), member 0's values at the top level."""
    members = getattr(module, "members", None)
    if members is None:
        return {**evaluate(module, datamodule, config, run_dir), **final_losses(callback_metrics)}
    rows = []
    for s, m in enumerate(members):
        status = module.member_status(s)
        # a stopped member's weights may have diverged before its loss did: its status, not its features
        scores = {} if status["stopped_at_step"] else evaluate(m, datamodule, config)
        scores.pop("log10_density", None)  # the loggers show member 0's
        rows.append({**scores, **final_losses(callback_metrics, f"/m{s}"), **status})
    return {**rows[0], "members": rows}


def _number(v: Tensor) -> float | int:
    return float(v) if v.dtype.is_floating_point else int(v)


def write_metrics(metrics: dict, path: str | Path) -> Path:
    """Write metrics.json atomically (never a half-written file); non-finite numbers become null."""
    text = json.dumps(_finite(metrics), indent=2) + "\n"
    return atomic_write(path, lambda f: f.write(text.encode())).resolve()


def _finite(v):
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v
