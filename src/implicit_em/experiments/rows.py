"""The rows compare and frontier judge, and the one evaluation every row meets.

A trained row is fitted once through the path of ``scripts/train.py`` (:func:`implicit_em.run.app.fit_module`) with
the experiment's evaluation as its end-of-run report, so its numbers are the fit's own (:func:`fitted_numbers`),
never a second pass over a run read back from disk. Every other row (the baselines that need no training, the
random frozen encoder, a saved SAE brought in with ``--sae``) is a :class:`Row`, its codes judged by
:func:`evaluate_row` on the data of the first fit: :func:`implicit_em.run.report.evaluate_codes`, the same function
the end-of-run report calls.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from implicit_em.eval.sae_metrics import SPARSE_PROBE_KS

#: the numbers of the SAE users' evaluation a row shows; a row without them (the raw inputs) has them as None
METRICS = ("l0", "dead_fraction", "fvu", "explained_variance", "cosine", "l2_ratio", "probe_accuracy")
#: the keys of :func:`implicit_em.run.report.evaluate_codes`'s row that a results row keeps: the SAE numbers,
#: the probes, the decoder's FVU ...
CODES_KEYS = (*METRICS, "readout_ridge", "fvu_decoder", "sparse_probe_accuracy", "probes_skipped")
#: ... and the causal LM's splice (CE, KL, their intervals and counts, what was run)
SPLICE_PREFIXES = ("ce_", "kl_", "n_windows", "n_tokens", "n_replaced", "lm_", "hook_name")


@dataclass
class Data:
    """The evaluation splits every row shares, the map back to raw activation units, and the causal LM's splice
    (None unless the data is a causal LM's harvest)."""

    splits: dict  # name -> Split(x, y, groups), normalised x
    to_raw: Callable[[Tensor], Tensor] | None
    splice: Any = None
    normalize: Callable[[Tensor], Tensor] | None = None  # raw -> normalised (None: the identity)

    @property
    def dims(self) -> int:
        return int(self.splits["train"].x.shape[1])

    @classmethod
    def of(cls, datamodule, lm_windows: int = 0, split: str = "test") -> Data:
        """The splits and normalisation of a DataModule set up by a fit (nothing is loaded or fitted again), with
        the causal LM's splice over the held-out documents of ``split`` (where the data is a causal LM's harvest
        and ``lm_windows`` > 0)."""
        from implicit_em.run.report import LanguageModelSplice, ReportConfig

        config = ReportConfig(lm_windows=lm_windows, split=split)
        splice = LanguageModelSplice.of(datamodule, config) if lm_windows else None
        norm = datamodule.normalization
        return cls(dict(datamodule.splits), norm.inverse(), splice, norm)


@dataclass
class Row:
    """One row to judge: its codes from ``encode`` (normalised x -> codes), and ``decode`` (codes -> normalised
    x) where the row has its own decoder (else the fitted readout reconstructs)."""

    encode: Callable[[Tensor], Tensor]
    decode: Callable[[Tensor], Tensor] | None = None

    def features(self, data: Data) -> dict[str, Tensor]:
        with torch.no_grad():
            return {name: torch.cat([self.encode(x) for x in s.x.split(8192)]) for name, s in data.splits.items()}


# -- the experiments' training runs -----------------------------------------------------------------------
def train_args(
    configs: Path, data: str, model: str, run_root: Path, epochs: int, seed: int, components: int,
    batch_size: int | None, data_root: str | None, probe_method: str, lm_windows: int, split: str, *extra: str,
) -> list[str]:  # fmt: skip
    """The ``scripts/train.py`` arguments of one trained row (the same flags a user would type). Its end-of-run
    report is the experiment's evaluation (``probe_method``, the SAE numbers, the splice on ``lm_windows``
    windows, scored on ``split``; no KMeans), so the row's numbers are the fit's own."""
    args = [
        "--config", str(configs / "default.yaml"),
        "--config", str(configs / "data" / f"{data}.yaml"),
        "--config", str(configs / "model" / f"{model}.yaml"),
        "--trainer.default_root_dir", str(run_root),
        "--trainer.max_epochs", str(epochs),
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--seed_everything", str(seed),
        "--model.n_components", str(components),
        "--report.probe_method", probe_method,
        "--report.kmeans", "false",
        "--report.sae_metrics", "true",
        "--report.lm_windows", str(lm_windows),
        "--report.split", split,
        "--probe.every_n_epochs", "0",
        "--components.every_n_epochs", "0",
        *extra,
    ]  # fmt: skip
    if batch_size:
        args += ["--data.batch_size", str(batch_size)]
    if data_root:
        args += ["--data.root", str(data_root)]
    return args


def fitted_numbers(metrics: dict) -> dict:
    """The numbers of the one evaluation in a fit's metrics (what :func:`evaluate_row` gives for the same
    module): :data:`CODES_KEYS` and the splice's."""
    return {k: v for k, v in metrics.items() if k in CODES_KEYS or k.startswith(SPLICE_PREFIXES)}


def random_encoder(args: Sequence[str], data: Data):
    """The module that ``scripts/train.py ARGS`` trains, as it is before training: its seeded init and the
    data-aware start that training begins from, on ``data``'s training rows (built from the same settings,
    not read back from a run)."""
    from implicit_em.run.app import configure

    module = configure(args).model
    module.fit_to_data(data.splits["train"].x)
    return module.eval()


# -- rows that need no training ---------------------------------------------------------------------------
def module_row(module) -> Row:
    """A trained (or untrained) module's row: its codes, and its decoder when its net has one."""
    module = module.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    net = module.model
    decode = (lambda f: net.decode(f.to(module.device)).cpu()) if net.has_decoder else None
    return Row(lambda x: net(x.to(module.device)).cpu(), decode)


def kmeans_row(data: Data, k: int, seed: int) -> Row:
    """One-hot assignments to the nearest of K MiniBatchKMeans centroids fit on the training rows.

    Started from random training rows (3 starts): k-means++ seeding costs minutes at K = 768 on a CPU
    (52 CPU-seconds for one start on 40k x 384 rows, against 3.5 for a random start, which ended at a lower
    inertia there)."""
    from sklearn.cluster import MiniBatchKMeans

    km = MiniBatchKMeans(n_clusters=k, init="random", n_init=3, random_state=seed, batch_size=max(1024, 4 * k))
    km.fit(data.splits["train"].x.numpy())

    def encode(x: Tensor) -> Tensor:
        idx = torch.as_tensor(km.predict(x.double().numpy().astype(km.cluster_centers_.dtype)), dtype=torch.long)
        return torch.nn.functional.one_hot(idx, k).float()

    return Row(encode)


def pca_row(data: Data, k: int) -> Row:
    """Projections (x - mean) V onto the top min(K, D) eigenvectors V of the training covariance (float64)."""
    x = data.splits["train"].x.double()
    mean = x.mean(0)
    centred = x - mean
    evals, evecs = torch.linalg.eigh(centred.T @ centred / max(len(x) - 1, 1))
    v = evecs[:, torch.argsort(evals, descending=True)[: min(k, x.shape[1])]]
    return Row(lambda z: ((z.double() - mean) @ v).float())


#: the raw inputs as codes, their own reconstruction: spliced back, the exact activations (CE clean)
RAW = Row(lambda x: x, lambda x: x)


# -- a saved SAE brought in (``--sae DIR``) ----------------------------------------------------------------
def load_saes(folders: Sequence[str | Path]) -> dict[str, Any]:
    """The SAEs of ``folders`` (:func:`implicit_em.load`: SAELens, sparsify or ``scripts/export.py`` folders) by row
    name: the folder's name (its parent's too where two folders share a name). Read before anything trains, so a
    folder that does not load is refused at once."""
    import implicit_em

    names = [Path(f).name for f in folders]

    def row_name(f) -> str:
        return Path(f).name if names.count(Path(f).name) == 1 else f"{Path(f).parent.name}/{Path(f).name}"

    return {row_name(f): implicit_em.load(f) for f in folders}


def sae_keys(sae) -> dict:
    """What a saved SAE's row says about it beside its numbers: its k (the L0 target; None without one), what it was
    trained as, where it comes from, its folder, and its parameters counted both ways (where it says them)."""
    path = getattr(sae, "path", None)
    return {"k": getattr(sae, "k", None), "architecture": getattr(sae, "name", None),
            "source": getattr(sae, "source", None), "path": str(path) if path else None, **sae_parameters(sae)}  # fmt: skip


def sae_row(sae, data: Data) -> Row:
    """A saved SAE as a frozen row, judged through its own decoder: ``sae.encode`` takes raw activations (the
    normalised rows mapped back), ``sae.decode`` gives them (mapped to the normalised space the evaluation scores
    in, and back to raw units there). Uses only ``encode`` and ``decode`` (and ``d_in``, where the SAE has one, to
    refuse an SAE of another width with one line)."""
    from implicit_em.errors import ConfigError

    d_in = getattr(sae, "d_in", None)
    if d_in is not None and d_in != data.dims:
        raise ConfigError(f"--sae: an SAE on {d_in}-dimensional inputs cannot read this data ({data.dims} dimensions); "
                          "pass an SAE trained on the same layer")  # fmt: skip
    to_raw = data.to_raw or (lambda x: x)
    normalize = data.normalize or (lambda x: x)
    weights = list(sae.parameters()) if hasattr(sae, "parameters") else []
    device = weights[0].device if weights else torch.device("cpu")

    def encode(x: Tensor) -> Tensor:
        return sae.encode(to_raw(x).float().to(device)).cpu()

    def decode(f: Tensor) -> Tensor:
        return normalize(sae.decode(f.to(device)).cpu().float()).float()

    return Row(encode, decode)


# -- parameters, counted both ways --------------------------------------------------------------------------
def parameter_counts(code: int, decoder: int | None, components: int, dims: int) -> dict[str, int]:
    """``parameters_code``: what computes the codes (the encoder alone); ``parameters_reconstruction``: what CE and
    FVU need, the encoder and its own decoder, or for a row without one the ridge readout x ~ f R + c
    (K x D + D) fitted to it."""
    return {"parameters_code": int(code),
            "parameters_reconstruction": int(code + (decoder if decoder is not None else components * dims + dims))}  # fmt: skip


def module_parameters(module) -> dict[str, int]:
    """:func:`parameter_counts` of a module: its first layer (the components) is the code, the rest its decoder."""
    net = module.model
    code = sum(p.numel() for p in net.first_layer().parameters())
    total = sum(p.numel() for p in net.parameters())
    return parameter_counts(code, total - code if net.has_decoder else None, net.n_components, net.in_features)


def sae_parameters(sae) -> dict[str, int]:
    """:func:`parameter_counts` of a loaded SAE: ``W_dec`` and ``b_dec`` are its decoder, the rest its code ({} for
    an SAE that names no parameters)."""
    sizes = {name: p.numel() for name, p in sae.named_parameters()} if hasattr(sae, "named_parameters") else {}
    if not sizes:
        return {}
    decoder = sum(n for name, n in sizes.items() if name in ("W_dec", "b_dec"))
    return parameter_counts(sum(sizes.values()) - decoder, decoder, sae.n_components, sae.d_in)


# -- one evaluation for every row -------------------------------------------------------------------------
def evaluate_row(
    row: Row, data: Data, probe_method: str, probes_only: bool = False, lm_windows: int = 0, split: str = "test"
) -> dict:
    """One row through the evaluation every run meets (:func:`implicit_em.run.report.evaluate_codes`), with the
    causal LM's splice where the data has one; ``probes_only`` (the raw inputs): the probes and the splice (the
    exact activations back: CE clean, the check that cannot be faked), the reconstruction numbers left empty.
    ``split``: where the row is scored (``val`` to choose settings without touching the test split)."""
    from implicit_em.run.report import Codes, ReportConfig, evaluate_codes, has_labels

    feats = row.features(data)
    train, test = data.splits["train"], data.splits[split]
    config = ReportConfig(probe_method=probe_method, kmeans=False, sae_metrics=not probes_only, lm_windows=lm_windows,
                          split=split)  # fmt: skip
    codes = Codes(feats["train"], feats["val"], feats["test"])
    out, _ = evaluate_codes(codes, data.splits, config, data.to_raw, splice=data.splice, encode=row.encode,
                            decode=row.decode)  # fmt: skip
    out = fitted_numbers(out)
    if probes_only:
        from implicit_em.eval.sae_metrics import sparse_probe_accuracy

        out.update({m: None for m in METRICS if m != "probe_accuracy"})
        if has_labels(train, test):
            out["sparse_probe_accuracy"] = sparse_probe_accuracy(
                feats["train"], train.y, feats[split], test.y, SPARSE_PROBE_KS, train.groups, test.groups
            )
    return out


def matched_k(l0: float, n_components: int) -> int:
    """The TopK k matching a model's L0: round(L0), within 1..K (NaN or 0 gives 1)."""
    return min(max(int(round(l0)) if math.isfinite(l0) else 1, 1), n_components)


# -- what the rows trained on ----------------------------------------------------------------------------
def tokens_trained(rows: Sequence[dict]) -> int | None:
    """The rows (a harvest's tokens) every trained row saw: its training rows x epochs (``rows_trained``), the same
    for each; None when no row was trained here."""
    seen = [r["rows_trained"] for r in rows if isinstance(r.get("rows_trained"), (int, float))]
    return int(max(seen)) if seen else None


def trained_on(header: dict) -> str:
    """How a table says what its models saw: ``each trained model saw 668,484 rows (a harvest's tokens)``."""
    n = header.get("tokens_trained")
    return "rows seen unknown" if n is None else f"each trained model saw {n:,} rows (a harvest's tokens)"
