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

from implicit_em.errors import ConfigError
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
    """The evaluation splits every row shares, the map back to raw activation units, the causal LM's splice
    (None unless the data is a causal LM's harvest) and the DataModule they come from (the rows a peer trains
    on: :func:`implicit_em.lm.peers.train_peer`)."""

    splits: dict  # name -> Split(x, y, groups), normalised x
    to_raw: Callable[[Tensor], Tensor] | None
    splice: Any = None
    normalize: Callable[[Tensor], Tensor] | None = None  # raw -> normalised (None: the identity)
    datamodule: Any = None

    @property
    def dims(self) -> int:
        return int(self.splits["train"].x.shape[1])

    @classmethod
    def of(cls, datamodule, lm_windows: int | None = 0, split: str = "test", lm_tokens: int = 20_480) -> Data:
        """The splits and normalisation of a DataModule set up by a fit (nothing is loaded or fitted again), with
        the causal LM's splice over the held-out documents of ``split`` where the data is a causal LM's harvest
        and the splice runs (:attr:`ReportConfig.splices <implicit_em.run.report.ReportConfig.splices>` of
        ``lm_tokens`` and ``lm_windows``: ``lm_windows`` 0, the default here, turns it off; None counts tokens)."""
        from implicit_em.run.report import LanguageModelSplice, ReportConfig

        config = ReportConfig(lm_tokens=lm_tokens, lm_windows=lm_windows, split=split)
        splice = LanguageModelSplice.of(datamodule, config) if config.splices else None
        norm = datamodule.normalization
        return cls(dict(datamodule.splits), norm.inverse(), splice, norm, datamodule)

    @classmethod
    def configured(
        cls, args: Sequence[str], lm_windows: int | None = 0, split: str = "test", lm_tokens: int = 20_480
    ) -> Data:
        """:meth:`of` the DataModule of ``scripts/train.py ARGS`` built and set up here, without a fit
        (:func:`implicit_em.run.app.configure`): the same splits and normalisation as that command's fit, for
        rows judged when no fit of this process made them (every trained row taken from an earlier run)."""
        from implicit_em.run.app import configure

        datamodule = configure(args).datamodule
        datamodule.setup("fit")
        return cls.of(datamodule, lm_windows, split, lm_tokens)


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
    batch_size: int | None, data_root: str | None, probe_method: str, lm_windows: int | None, split: str,
    *extra: str, lm_tokens: int | None = None,
) -> list[str]:  # fmt: skip
    """The ``scripts/train.py`` arguments of one trained row (the same flags a user would type). Its end-of-run
    report is the experiment's evaluation (``probe_method``, the SAE numbers, the splice on ``lm_tokens``
    predicted tokens or ``lm_windows`` windows, each passed only when not None, scored on ``split``; no KMeans),
    so the row's numbers are the fit's own."""
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
        "--report.split", split,
        "--probe.every_n_epochs", "0",
        "--components.every_n_epochs", "0",
        *extra,
    ]  # fmt: skip
    args += ["--report.lm_tokens", str(lm_tokens)] if lm_tokens is not None else []
    args += ["--report.lm_windows", str(lm_windows)] if lm_windows is not None else []
    if batch_size:
        args += ["--data.batch_size", str(batch_size)]
    if data_root:
        args += ["--data.root", str(data_root)]
    return args


def training_epoch(args: Sequence[str]) -> tuple[int, int, bool]:
    """(rows, batch size, drop_last) of one training epoch of ``scripts/train.py ARGS``: what
    :func:`~implicit_em.data.memory.rows_of_steps` and :func:`~implicit_em.data.memory.steps_for_rows` count
    with. A harvest (or a stream) knows its training rows from its settings and document ids, no row read; an
    in-memory source is loaded and split to count them."""
    from implicit_em.run.app import configure

    datamodule = configure(args).datamodule
    if not hasattr(datamodule, "split_rows"):
        datamodule.setup("fit")
    return int(datamodule.train_rows), int(datamodule.batch_size), bool(datamodule.drop_last)


# -- a finished row kept beside its run (the frontier goes on row by row) ------------------------------------
#: the file in a row's run folder holding its numbers and the arguments that made it
ROW_FILE = "row.json"
#: flags that say how a run saves or was resumed, not what it trains: left out when a row's arguments are compared
BOOKKEEPING = ("--checkpoint.", "--ckpt_path")


def row_identity(args: Any) -> Any:
    """What must match for a saved row to stand for a new one: ``args`` as JSON reads it back, a list of flags
    without the :data:`BOOKKEEPING` flags and their values (a dict: each entry the same way)."""
    import json

    args = json.loads(json.dumps(args))
    if isinstance(args, dict):
        return {k: row_identity(v) for k, v in args.items()}
    if not isinstance(args, list):
        return args
    kept, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif isinstance(a, str) and a.startswith(BOOKKEEPING):
            skip = "=" not in a
        else:
            kept.append(a)
    return kept


def save_row(run_root: Path, args: Any, row: dict) -> Path:
    """Write a judged row and the arguments that made it (``scripts/train.py``'s, or what a row without a run
    was made from) to ``<run_root>/row.json``, atomically (non-finite numbers as null)."""
    from implicit_em.run.report import write_metrics

    return write_metrics({"args": args, "row": row}, Path(run_root) / ROW_FILE)


def saved_row(run_root: Path, args: Any) -> dict | None:
    """The row an earlier run judged and saved in ``<run_root>/row.json`` (:func:`save_row`), when it was made
    with the same ``args`` (:func:`row_identity`); None when there is none. A row made with other arguments, or
    a file that does not read, is refused (ConfigError naming the folder and the fix)."""
    import json

    path = Path(run_root) / ROW_FILE
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
        old, row = saved["args"], dict(saved["row"])
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path} is not a saved row this code can read ({e}); remove {run_root} to run the row "
                         "again") from None  # fmt: skip
    if (then := row_identity(old)) != (now := row_identity(args)):
        raise ConfigError(f"{path} holds a row made with other arguments ({first_difference(then, now)}); pass "
                         f"another --out, or remove {run_root} to run the row again")  # fmt: skip
    return row


def first_difference(then: Any, now: Any) -> str:
    """Where two arguments (flag lists, or dicts of them) first differ, as ``X there, Y now``."""
    if isinstance(then, dict) and isinstance(now, dict):
        key = next(k for k in sorted(set(then) | set(now)) if then.get(k) != now.get(k))
        return f"{key}: {first_difference(then.get(key), now.get(key))}"
    if isinstance(then, list) and isinstance(now, list):
        i = next((i for i, (a, b) in enumerate(zip(then, now)) if a != b), min(len(then), len(now)))
        if i > 0 and str(then[i - 1]).startswith("--"):  # the flag (the same in both) with its value
            i -= 1
        shown = [" ".join(map(str, a[i : i + 2])) or "nothing" for a in (then, now)]
        return f"{shown[0]} there, {shown[1]} now"
    return f"{then} there, {now} now"


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
    row: Row, data: Data, probe_method: str, probes_only: bool = False, lm_windows: int | None = None,
    split: str = "test", lm_tokens: int = 20_480,
) -> dict:  # fmt: skip
    """One row through the evaluation every run meets (:func:`implicit_em.run.report.evaluate_codes`), with the
    causal LM's splice where the data has one (on ``lm_tokens`` predicted tokens, or ``lm_windows`` windows when
    not None); ``probes_only`` (the raw inputs): the probes and the splice (the exact activations back: CE clean,
    the check that cannot be faked), the reconstruction numbers left empty. ``split``: where the row is scored
    (``val`` to choose settings without touching the test split)."""
    from implicit_em.run.report import Codes, ReportConfig, evaluate_codes, has_labels

    feats = row.features(data)
    train, test = data.splits["train"], data.splits[split]
    config = ReportConfig(probe_method=probe_method, kmeans=False, sae_metrics=not probes_only, lm_windows=lm_windows,
                          lm_tokens=lm_tokens, split=split)  # fmt: skip
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
