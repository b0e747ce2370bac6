"""The comparison SAE users expect: this model and the usual baselines, judged the same way on the same data.

``reproduce.py --experiment compare`` writes ``<out>/<data>/compare.json`` (``rows``: one per model, each with
``model``, ``components``, every metric of :func:`implicit_em.eval.sae_metrics.sae_evaluation`, the full linear
probe ``probe_accuracy`` and ``seconds``), ``compare.md`` and ``compare.png``. Rows:

- ``implicit_em``: this model (``configs/model/implicit_em.yaml``);
- ``sae``: the standard SAE, MSE + L1 (``configs/model/sae.yaml``);
- ``topk_sae_l0``, ``topk_sae_32``: TopK SAEs (``configs/model/topk_sae.yaml``), k = this model's L0
  (rounded) and k = 32;
- ``kmeans``: scikit-learn MiniBatchKMeans with the same K on the training rows (random starts); features: the
  one-hot hard assignment (L0 = 1; the readout then learns one reconstruction per cluster, vector quantisation);
- ``pca``: the top min(K, D) principal directions; features: the centred projections (dense, signed);
- ``random_encoder``: this model's architecture at its start (seeded init and data-aware start), untrained;
- ``raw``: the (normalised) inputs as features, for the probes only.

The trained models go through :func:`implicit_em.run.app.fit_run` (the path of ``scripts/train.py``) and are
reloaded from their checkpoints; every row's features then meet one evaluation: the ridge readout (fit on
train, strength on val, scored on test in raw activation units), L0 and dead fraction over all evaluation
rows, k-sparse probing (per document where the data has document ids) and the full linear probe.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from implicit_em.eval.sae_metrics import SPARSE_PROBE_KS

ROWS = (
    "implicit_em",
    "sae",
    "topk_sae_l0",
    "topk_sae_32",
    "batchtopk_sae_32",
    "kmeans",
    "pca",
    "random_encoder",
    "raw",
)
TOPK_FIXED = 32
METRICS = ("l0", "dead_fraction", "fvu", "explained_variance", "cosine", "l2_ratio", "probe_accuracy")
#: column header and number format of compare.md
COLUMNS = {
    "components": ("K", "d"), "l0": ("L0", ".1f"), "dead_fraction": ("dead", ".3f"), "fvu": ("FVU", ".3f"),
    "explained_variance": ("expl. var.", ".3f"), "cosine": ("cosine", ".3f"), "l2_ratio": ("l2 ratio", ".3f"),
    "probe_accuracy": ("probe", ".3f"), "ce_loss_recovered": ("CE rec.", ".3f"), "kl_div": ("KL", ".3f"),
    "seconds": ("seconds", ".0f"),
}  # fmt: skip


@dataclass
class Data:
    """The evaluation splits every row shares, the map back to raw activation units, and the causal LM's splice
    (None unless the data is a causal LM's harvest)."""

    splits: dict  # name -> Split(x, y, groups), normalised x
    to_raw: Callable[[Tensor], Tensor] | None
    splice: Any = None

    @property
    def dims(self) -> int:
        return int(self.splits["train"].x.shape[1])


@dataclass
class Row:
    """One row to judge: its codes from ``encode`` (normalised x -> codes), and ``decode`` (codes -> normalised
    x) where the row has its own decoder (else the fitted readout reconstructs)."""

    encode: Callable[[Tensor], Tensor]
    decode: Callable[[Tensor], Tensor] | None = None

    def features(self, data: Data) -> dict[str, Tensor]:
        with torch.no_grad():
            return {name: torch.cat([self.encode(x) for x in s.x.split(8192)]) for name, s in data.splits.items()}


# -- training and reloading -------------------------------------------------------------------------------
def train_args(
    configs: Path, data: str, model: str, run_root: Path, epochs: int, seed: int, components: int,
    batch_size: int | None, data_root: str | None, *extra: str,
) -> list[str]:  # fmt: skip
    """The ``scripts/train.py`` arguments of one compare run (the same flags a user would type). The run's own
    end-of-run report is the short one (fast torch probe, no SAE metrics, no splice): compare judges every row
    itself afterwards."""
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
        "--report.probe_method", "torch",
        "--report.kmeans", "false",
        "--report.sae_metrics", "false",
        "--report.lm_windows", "0",
        "--probe.every_n_epochs", "0",
        "--components.every_n_epochs", "0",
        *extra,
    ]  # fmt: skip
    if batch_size:
        args += ["--data.batch_size", str(batch_size)]
    if data_root:
        args += ["--data.root", str(data_root)]
    return args


def load_data(datamodule, lm_windows: int = 0, split: str = "test") -> Data:
    """The splits and normalisation inverse every row is judged on, with the causal LM's splice over the held-out
    documents of ``split`` (where the data is a causal LM's harvest and ``lm_windows`` > 0)."""
    from implicit_em.run.report import LanguageModelSplice, ReportConfig

    datamodule.setup("fit")
    config = ReportConfig(lm_windows=lm_windows, split=split)
    splice = LanguageModelSplice.of(datamodule, config) if lm_windows else None
    return Data(dict(datamodule.splits), datamodule.normalization.inverse(), splice)


def module_row(module) -> Row:
    """A trained (or untrained) module's row: its codes, and its decoder when its net has one."""
    module = module.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    net = module.model
    decode = (lambda f: net.decode(f.to(module.device)).cpu()) if net.has_decoder else None
    return Row(lambda x: net(x.to(module.device)).cpu(), decode)


@torch.no_grad()
def module_features(module, data: Data) -> dict[str, Tensor]:
    """Each split's frozen features (CPU), computed on a GPU when there is one."""
    return module_row(module).features(data)


# -- the baselines that need no training ------------------------------------------------------------------
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
    out = {key: v for key, v in out.items() if key not in ("log10_density", "probe_method", "scored_on")}
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


def compare_seed(
    configs: Path, data: str, folder: Path, components: int, epochs: int, seed: int, batch_size: int | None,
    data_root: str | None, probe_method: str, log: Callable[[str], None] = print, lm_windows: int = 50,
) -> list[dict]:  # fmt: skip
    """Every row of one seed: train what needs training, then judge each row the same way (with the causal LM's
    splice on ``lm_windows`` held-out windows where the data is a causal LM's harvest)."""
    from implicit_em.run.app import fit_run, rebuild

    def fit_and_reload(name: str, model: str, *extra: str):
        log(f"[compare] {name}: training {epochs} epochs, K = {components}, seed {seed}")
        run_root = folder / "runs" / name / f"seed{seed}"
        args = train_args(configs, data, model, run_root, epochs, seed, components, batch_size, data_root, *extra)
        run_dir = fit_run(args).parent
        return (*rebuild(run_dir), run_dir)

    def judge(name: str, n: int, row: Row, start: float, probes_only=False, **extra) -> dict:
        scores = evaluate_row(row, shared, probe_method, probes_only, lm_windows)
        return {"model": name, "components": n, **extra, **scores, "seconds": time.perf_counter() - start}

    # this model first: its run fixes the data (splits, normalisation) every other row is judged on
    start = time.perf_counter()
    module, datamodule, ours_dir = fit_and_reload("implicit_em", "implicit_em")
    shared = load_data(datamodule, lm_windows)
    ours = judge("implicit_em", components, module_row(module), start, run_dir=str(ours_dir))
    rows = [ours]
    k_l0, k_fixed = matched_k(ours["l0"], components), min(TOPK_FIXED, components)
    trained = (
        ("sae", "sae", (), None),
        ("topk_sae_l0", "topk_sae", ("--model.k", str(k_l0)), k_l0),
        ("topk_sae_32", "topk_sae", ("--model.k", str(k_fixed)), k_fixed),
        ("batchtopk_sae_32", "batchtopk_sae", ("--model.k", str(k_fixed)), k_fixed),
    )
    for name, model, extra, k in trained:
        start = time.perf_counter()
        module, _, run_dir = fit_and_reload(name, model, *extra)
        rows.append(judge(name, components, module_row(module), start, run_dir=str(run_dir), **({"k": k} if k else {})))

    log("[compare] kmeans, pca, random_encoder, raw")
    start = time.perf_counter()
    n_train = len(shared.splits["train"].x)
    if components <= n_train:
        rows.append(judge("kmeans", components, kmeans_row(shared, components, seed), start))
    else:
        rows.append({"model": "kmeans", "components": components, **{m: None for m in METRICS}, "seconds": 0.0,
                     "note": f"K = {components} exceeds the {n_train} training rows"})  # fmt: skip
    start = time.perf_counter()
    n_pca = min(components, shared.dims)
    rows.append(judge("pca", n_pca, pca_row(shared, n_pca), start))
    start = time.perf_counter()
    random_module, _ = rebuild(ours_dir, trained=False)
    random_module.fit_to_data(shared.splits["train"].x)  # the data-aware start that training begins from
    rows.append(judge("random_encoder", components, module_row(random_module), start))
    start = time.perf_counter()
    identity = Row(lambda x: x, lambda x: x)  # the exact activations, spliced back: CE clean
    rows.append(judge("raw", shared.dims, identity, start, probes_only=True))
    return rows


# -- summary, table, figure -------------------------------------------------------------------------------
def _mean(values: Sequence) -> Any:
    numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if len(numbers) != len(values):
        return values[0] if len({json.dumps(v, sort_keys=True) for v in values}) == 1 else None
    mean = statistics.fmean(numbers)
    return int(mean) if all(isinstance(v, int) for v in numbers) and mean == int(mean) else mean


def summarize(per_seed: Sequence[Sequence[dict]], seeds: Sequence[int]) -> list[dict]:
    """One row per model: each number the mean over seeds (``sparse_probe_accuracy`` per k), the seeds'
    own rows under ``per_seed`` when there are several."""
    out = []
    for i, first in enumerate(per_seed[0]):
        rows = [seed_rows[i] for seed_rows in per_seed]
        row: dict[str, Any] = {}
        for key in first:
            if key in ("run_dir", "note", "train_curve"):
                row[key] = first[key]
            elif isinstance(first[key], dict):
                row[key] = {k: _mean([r[key][k] for r in rows]) for k in first[key]}
            else:
                row[key] = _mean([r.get(key) for r in rows])
        if len(rows) > 1:
            row["per_seed"] = [{"seed": s, **r} for s, r in zip(seeds, rows)]
        out.append(row)
    return out


def _cell(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return format(value, fmt)


def markdown(rows: Sequence[dict], header: dict) -> str:
    """compare.md: the table, the command, and how to read it."""
    ks = [str(k) for k in SPARSE_PROBE_KS]
    names = ["model", *(COLUMNS[c][0] for c in COLUMNS if c != "seconds"), *(f"sparse k={k}" for k in ks), "seconds"]
    lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    for r in rows:
        label = r["model"] + (f" (k={r['k']})" if r.get("k") else "")
        cells = [label, *(_cell(r.get(c), COLUMNS[c][1]) for c in COLUMNS if c != "seconds")]
        sparse = r.get("sparse_probe_accuracy") or {}
        cells += [_cell(sparse.get(k), ".3f") for k in ks] + [_cell(r.get("seconds"), ".0f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join([
        f"# SAE comparison on {header['data']}", "",
        f"`{header['command']}`" if header.get("command") else "", "",
        f"K = {header['components']}, {header['epochs']} epochs, seeds {header['seeds']} (means over seeds).", "",
        *lines, "",
        "FVU, explained variance (1 - FVU, pooled), cosine and l2 ratio: a ridge readout x ~ f R + c fitted on "
        "the training rows of each model's features (strength chosen on validation rows), scored on test rows in "
        "raw activation units. L0 and dead: components with |f| > 0.01, over all evaluation rows. sparse k: "
        "k-sparse probing, one vs rest per label, balanced accuracy (chance 0.5); per document where the data has "
        "document ids. probe: the full linear probe (multiclass accuracy). kmeans features are one-hot "
        "assignments; pca features are signed projections; raw: the inputs themselves (probes only).", "",
    ])  # fmt: skip


def plot(rows: Sequence[dict], path: Path, title: str) -> Path:
    """compare.png: FVU against L0 (the usual sparsity-fidelity plane), and k-sparse probing against k.
    matplotlib's object API: the process's backend is left alone."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax_fvu, ax_probe = fig.subplots(1, 2)
    for i, r in enumerate(rows):
        label, color = r["model"] + (f" (k={r['k']})" if r.get("k") else ""), f"C{i % 10}"
        if isinstance(r.get("l0"), (int, float)) and isinstance(r.get("fvu"), (int, float)):
            ax_fvu.scatter(max(r["l0"], 1e-2), r["fvu"], label=label, s=40, color=color)
        sparse = r.get("sparse_probe_accuracy") or {}
        ks = [int(k) for k, v in sparse.items() if isinstance(v, (int, float)) and math.isfinite(v)]
        if ks:
            ax_probe.plot(ks, [sparse[str(k)] for k in ks], marker="o", label=label, color=color)
    ax_fvu.set(xscale="log", xlabel="L0 (active components per input)", ylabel="FVU (test, ridge readout)",
               title="reconstruction vs sparsity (lower left is better)")  # fmt: skip
    ax_fvu.legend(fontsize=7)
    ax_probe.set(xscale="log", xlabel="k", ylabel="balanced accuracy", title="k-sparse probing")
    ax_probe.set_xticks(list(SPARSE_PROBE_KS), [str(k) for k in SPARSE_PROBE_KS])
    ax_probe.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def run_compare(
    data: str,
    out: str | Path,
    components: int = 64,
    epochs: int = 100,
    seeds: Sequence[int] = (1,),
    data_root: str | None = None,
    batch_size: int | None = None,
    probe_method: str = "torch",
    configs: str | Path = "configs",
    command: str = "",
    log: Callable[[str], None] = print,
    lm_windows: int = 50,
) -> Path:
    """Train and judge every row on ``data`` once per seed; write compare.json, compare.md and compare.png
    into ``<out>/<data>/`` and return compare.json's path. ``lm_windows``: held-out windows of the causal LM's
    splice (causal harvests only; 0: off)."""
    from implicit_em.run.report import write_metrics

    folder = Path(out) / data
    per_seed = [
        compare_seed(
            Path(configs), data, folder, components, epochs, seed, batch_size, data_root, probe_method, log, lm_windows
        )  # fmt: skip
        for seed in seeds
    ]
    header = {"data": data, "components": components, "epochs": epochs, "seeds": list(seeds),
              "batch_size": batch_size, "probe_method": probe_method, "lm_windows": lm_windows,
              "command": command}  # fmt: skip
    rows = summarize(per_seed, seeds)
    path = write_metrics({**header, "rows": rows}, folder / "compare.json")
    (folder / "compare.md").write_text(markdown(rows, header))
    plot(rows, folder / "compare.png", f"{data}: K = {components}, {epochs} epochs")
    log(f"[compare] wrote {path}")
    return path


def run_compare_experiment(s, runs=None) -> Path:
    """The ``compare`` entry of :data:`implicit_em.experiments.EXPERIMENTS`: :func:`run_compare` with one
    ``reproduce.py`` call's settings (its own plain runs: the shared ensemble runs do not apply)."""
    return run_compare(
        s.data, s.out, s.components, s.epochs, s.seeds, s.data_root, s.batch_size, s.probe_method, s.configs,
        s.command, log=runs.log if runs is not None else print, lm_windows=s.lm_windows,
    )  # fmt: skip
