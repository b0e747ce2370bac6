"""The paper's experiments behind ``scripts/reproduce.py``: what to train, how to summarise it, what to draw.

Every model is trained by :class:`implicit_em.cli.ImplicitEMCLI` (the LightningModule and Trainer of
``scripts/train.py``); an experiment's configurations x seeds train together as one ensemble run
(``--model.members``). Each experiment writes ``<out>/<data>/<experiment>.json`` (raw numbers, per seed),
``<experiment>.md`` (mean +- std over seeds) and PNG figures; the training runs go to ``<out>/<data>/runs``.

The first part of the module is pure (member lists, aggregation, tables); the second trains and draws.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from implicit_em.objective import lse_loss_autograd, responsibilities

EXPERIMENTS = ("theorem", "ablation", "benchmark", "features", "dynamics")
DATASETS = ("mnist", "fashion_mnist", "digits", "cifar10", "synthetic")

#: the ablation: which loss terms are on (lambda 1) or off (lambda 0)
ABLATION_CONFIGS: dict[str, dict[str, float]] = {
    "lse": {"lambda_lse": 1.0, "lambda_var": 0.0, "lambda_tc": 0.0},
    "lse+var": {"lambda_lse": 1.0, "lambda_var": 1.0, "lambda_tc": 0.0},
    "lse+var+tc": {"lambda_lse": 1.0, "lambda_var": 1.0, "lambda_tc": 1.0},
    "var+tc": {"lambda_lse": 0.0, "lambda_var": 1.0, "lambda_tc": 1.0},
}
DYNAMICS_OPTIMIZERS = ("sgd", "adam")
DYNAMICS_LRS = (1e-4, 1e-3, 1e-2, 1e-1)
#: the theorem's random distances: N samples x K components
THEOREM_SHAPE = (64, 128)

ABLATION_METRICS = ("dead_components", "redundancy", "responsibility_entropy", "probe_accuracy")
BENCHMARK_METRICS = (
    "probe_accuracy", "l0_density", "n_parameters", "reconstruction_mse", "reconstruction_mse_scaled",
    "cluster_accuracy", "nmi",
)  # fmt: skip
DYNAMICS_METRICS = ("final_loss", "probe_accuracy")
FEATURES_METRICS = ("weight_redundancy", "effective_rank")

#: column headers and number formats of the tables
LABELS = {
    "dead_components": ("dead components", ".1f"),
    "redundancy": ("redundancy", ".2f"),
    "responsibility_entropy": ("responsibility entropy", ".3f"),
    "probe_accuracy": ("probe accuracy", ".4f"),
    "l0_density": ("L0 density", ".3f"),
    "n_parameters": ("parameters", ".0f"),
    "reconstruction_mse": ("reconstruction MSE", ".4f"),
    "reconstruction_mse_scaled": ("reconstruction MSE (scaled)", ".4f"),
    "cluster_accuracy": ("cluster accuracy", ".4f"),
    "nmi": ("NMI", ".4f"),
    "final_loss": ("final loss", ".3f"),
    "weight_redundancy": ("weight redundancy", ".2f"),
    "effective_rank": ("effective rank", ".2f"),
    "max_abs_error": ("max abs error", ".2e"),
    "mean_abs_error": ("mean abs error", ".2e"),
    "correlation": ("correlation", ".12f"),
}


# -- pure: members, aggregation, tables -------------------------------------------------------------------
def expand_experiments(names: Sequence[str]) -> list[str]:
    """The experiments to run, in the canonical order, ``all`` expanded, duplicates dropped."""
    wanted = set(EXPERIMENTS) if "all" in names else set(names)
    return [e for e in EXPERIMENTS if e in wanted]


def seed_members(seeds: Sequence[int]) -> list[dict[str, Any]]:
    """One member per seed with the model's default settings."""
    return [{"seed": int(s)} for s in seeds]


def ablation_members(seeds: Sequence[int]) -> list[tuple[str, dict[str, Any]]]:
    """(config name, member spec) for every seed x ablation config. Seed-major: the members sharing a seed
    (and so a data order) are adjacent, which the ensemble stores and multiplies as one block."""
    return [(name, {"seed": int(s), **lams}) for s in seeds for name, lams in ABLATION_CONFIGS.items()]


def dynamics_members(seeds: Sequence[int]) -> list[dict[str, Any]]:
    """Every optimiser x learning rate x seed."""
    return [
        {"seed": int(s), "optimizer": opt, "lr": lr}
        for opt in DYNAMICS_OPTIMIZERS
        for lr in DYNAMICS_LRS
        for s in seeds
    ]


def member_results(metrics: dict) -> list[dict]:
    """The per-member dicts of a metrics.json (a lone run is its own single member)."""
    return metrics.get("members", [metrics])


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation over seeds (0 for one seed); None when any value is missing."""
    if not values or any(v is None or not math.isfinite(v) for v in values):
        return None, None
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(
    results: Sequence[dict], by: Sequence[str], metrics: Sequence[str], extra: Sequence[str] = ()
) -> list[dict]:
    """One row per distinct value of the ``by`` keys (in first-seen order): the ``by`` values, ``seeds``,
    each metric's mean over seeds, ``<metric>_std``, and ``per_seed``: metric -> values in seed order
    (the ``extra`` keys there too, without a mean)."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault(tuple(r[k] for k in by), []).append(r)
    rows = []
    for key, members in groups.items():
        row: dict[str, Any] = dict(zip(by, key))
        row["seeds"] = [m.get("seed") for m in members]
        for metric in metrics:
            row[metric], row[f"{metric}_std"] = mean_std([m.get(metric) for m in members])
        row["per_seed"] = {k: [m.get(k) for m in members] for k in (*metrics, *extra)}
        rows.append(row)
    return rows


def format_cell(mean: float | None, std: float | None, n: int, fmt: str) -> str:
    """``mean ± std`` (``mean`` alone for one seed; ``n/a`` when missing)."""
    if mean is None:
        return "n/a"
    return f"{mean:{fmt}} ± {std:{fmt}}" if n > 1 and std is not None else f"{mean:{fmt}}"


def markdown_table(rows: Sequence[dict], label_keys: Sequence[str], metrics: Sequence[str]) -> str:
    """A GitHub markdown table: the label columns, then one ``mean ± std`` column per metric."""
    headers = [*label_keys, *(LABELS.get(m, (m, ".4g"))[0] for m in metrics)]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        n = len(row.get("seeds") or [None])
        cells = [str(row.get(k, "")) for k in label_keys]
        cells += [format_cell(row.get(m), row.get(f"{m}_std"), n, LABELS.get(m, (m, ".4g"))[1]) for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


#: experiment -> (label columns, metric columns) of its table, read from its JSON's ``rows``
TABLES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "theorem": (("quantity",), ("max_abs_error", "mean_abs_error", "correlation")),
    "ablation": (("config",), ABLATION_METRICS),
    "benchmark": (("model",), BENCHMARK_METRICS),
    "features": (("model",), FEATURES_METRICS),
    "dynamics": (("optimizer", "lr"), DYNAMICS_METRICS),
}


def table(experiment: str, result: dict) -> str:
    """The markdown table of an experiment's results JSON (what ``<experiment>.md`` shows)."""
    labels, metrics = TABLES[experiment]
    return markdown_table(result["rows"], labels, metrics)


def identity_errors(d: Tensor) -> dict[str, Any]:
    """The paper's theorem on distances ``d`` (N x K): dL_LSE/dd_ij = r_ij. Gradient by autograd of the
    textbook formula (not the project's own E-step backward), responsibilities by softmax(-d); their max
    and mean absolute difference and Pearson correlation."""
    d = d.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(lse_loss_autograd(d), d)
    r = responsibilities(d).detach()
    err = (grad - r).abs()
    g, q = grad.flatten().double(), r.flatten().double()
    corr = float(torch.corrcoef(torch.stack([g, q]))[0, 1])
    return {
        "max_abs_error": float(err.max()),
        "mean_abs_error": float(err.mean()),
        "correlation": corr,
        "gradient": grad,
        "responsibilities": r,
    }


def random_distances(seed: int, shape: tuple[int, int] = THEOREM_SHAPE) -> Tensor:
    """Random ReLU activations in float64, like an encoder's output: max(0, z), z ~ N(0, 2^2), seeded."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.relu(2.0 * torch.randn(*shape, generator=g, dtype=torch.float64))


def loss_curves(metrics_csv: str | Path, n_members: int, key: str = "train/loss") -> list[list[float]]:
    """Per-member training loss per epoch from a run's metrics.csv (``key/m<s>``; ``key`` for one member)."""
    keys = [key] if n_members == 1 else [f"{key}/m{s}" for s in range(n_members)]
    by_epoch: dict[int, list[float]] = {}
    with open(metrics_csv, newline="") as f:
        for row in csv.DictReader(f):
            if row.get(keys[0]) not in (None, ""):
                by_epoch[int(row["epoch"])] = [float(row[k]) for k in keys]
    epochs = sorted(by_epoch)
    return [[by_epoch[e][s] for e in epochs] for s in range(n_members)]


# -- training -----------------------------------------------------------------------------------------
@dataclass
class Settings:
    """What every run of one ``reproduce.py`` call shares (the paper's protocol by default)."""

    data: str = "digits"
    out: Path = Path("results")
    epochs: int = 100
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    components: int = 64
    batch_size: int = 128
    probe_method: str = "sklearn"
    data_root: str | None = None
    command: str = ""

    @property
    def folder(self) -> Path:
        return Path(self.out) / self.data

    def header(self) -> dict[str, Any]:
        """The settings every results JSON records."""
        return {
            "data": self.data, "epochs": self.epochs, "seeds": list(self.seeds), "components": self.components,
            "batch_size": self.batch_size, "probe_method": self.probe_method, "command": self.command,
        }  # fmt: skip


@dataclass
class Run:
    """A finished ensemble run: its metrics.json, the per-member results, and the trained objects."""

    metrics: dict
    path: Path
    module: Any
    datamodule: Any

    @property
    def members(self) -> list[dict]:
        return member_results(self.metrics)

    @property
    def run_dir(self) -> Path:
        return self.path.parent


def cli_args(
    s: Settings, name: str, members: list[dict], model: str = "implicit_em", kmeans=False, reconstruction=False
) -> list[str]:
    """The ``scripts/train.py`` arguments of one ensemble run (the same flags a user would type)."""
    from implicit_em.cli import REPO

    configs = [REPO / "configs" / "data" / f"{s.data}.yaml", REPO / "configs" / "logger" / "csv.yaml"]
    if model == "sae":
        configs.append(REPO / "configs" / "model" / "sae.yaml")
    args = [a for c in configs for a in ("--config", str(c))]
    args += [
        "--trainer.default_root_dir", str(s.folder / "runs" / name),
        "--trainer.max_epochs", str(s.epochs),
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--seed_everything", str(members[0]["seed"]),
        "--model.n_components", str(s.components),
        "--model.members", json.dumps(members),
        "--data.batch_size", str(s.batch_size),
        "--report.probe_method", s.probe_method,
        "--report.kmeans", str(kmeans).lower(),
        "--report.reconstruction", str(reconstruction).lower(),
        "--probe.every_n_epochs", "0",
        "--features.every_n_epochs", "0",
    ]  # fmt: skip
    if s.data_root:
        args += ["--data.root", s.data_root]
    return args


def train(s: Settings, name: str, members: list[dict], log: Callable[[str], None] = print, **kwargs) -> Run:
    """Train ``members`` as one ensemble run through ImplicitEMCLI (in this process) and evaluate it."""
    from implicit_em.cli import DEFAULT_CONFIG, ImplicitEMCLI

    log(f"[{name}] {len(members)} member(s) x {s.epochs} epochs on {s.data}")
    with warnings.catch_warnings():  # the args are ours, not sys.argv's: LightningCLI's warning does not apply
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        cli = ImplicitEMCLI(cli_args(s, name, members, **kwargs), default_config_files=[DEFAULT_CONFIG])
    path = cli.fit()
    if path is None:
        raise RuntimeError(f"run {name} was interrupted")
    return Run(json.loads(Path(path).read_text()), Path(path), cli.model, cli.datamodule)


class Runs:
    """Trains each named run once per process, so experiments that share a run (benchmark, features)
    train it once."""

    def __init__(self, settings: Settings, log: Callable[[str], None] = print):
        self.settings, self.log, self._done = settings, log, {}

    def get(self, name: str, members: list[dict], **kwargs) -> Run:
        if name not in self._done:
            self._done[name] = train(self.settings, name, members, self.log, **kwargs)
        return self._done[name]

    def implicit_em(self) -> Run:
        return self.get("implicit_em", seed_members(self.settings.seeds), kmeans=True, reconstruction=True)

    def sae(self) -> Run:
        return self.get("sae", seed_members(self.settings.seeds), model="sae", reconstruction=True)


# -- figures ------------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def plot_identity(r: Tensor, grad: Tensor, path: Path, title: str) -> Path:
    """Scatter of dL_LSE/dd against the responsibilities, with the line y = x."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.scatter(r.flatten().numpy(), grad.flatten().numpy(), s=4, alpha=0.4)
    top = float(max(r.max(), grad.max())) * 1.05
    ax.plot([0, top], [0, top], "k--", lw=1, label="y = x")
    ax.set(xlabel="responsibility $r_{ij}$", ylabel=r"$\partial L_{LSE} / \partial d_{ij}$", title=title)
    ax.legend(loc="upper left")
    return _save(fig, path)


def plot_bars(rows: Sequence[dict], label: str, metrics: Sequence[str], path: Path, title: str) -> Path:
    """One panel per metric: a bar per row (mean over seeds, error bar = std)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.4), squeeze=False)
    names = [str(r[label]) for r in rows]
    for ax, metric in zip(axes[0], metrics):
        means = [r.get(metric) for r in rows]
        stds = [r.get(f"{metric}_std") or 0.0 for r in rows]
        ok = [i for i, m in enumerate(means) if m is not None]
        ax.bar([names[i] for i in ok], [means[i] for i in ok], yerr=[stds[i] for i in ok], capsize=3, color="C0")
        ax.set_title(LABELS.get(metric, (metric,))[0])
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_loss_curves(rows: Sequence[dict], path: Path, title: str) -> Path:
    """Training loss per epoch, one panel per optimiser, one line per learning rate (mean over seeds)."""
    import numpy as np

    plt = _pyplot()
    optimizers = list(dict.fromkeys(r["optimizer"] for r in rows))
    fig, axes = plt.subplots(1, len(optimizers), figsize=(5 * len(optimizers), 3.8), squeeze=False)
    for ax, opt in zip(axes[0], optimizers):
        for i, row in enumerate(r for r in rows if r["optimizer"] == opt):
            curves = np.asarray(row["per_seed"]["loss_curve"], dtype=float)  # seeds x epochs
            epochs = np.arange(1, curves.shape[1] + 1)
            mean, std = curves.mean(0), curves.std(0)
            ax.plot(epochs, mean, color=f"C{i}", label=f"lr {row['lr']:g}")
            ax.fill_between(epochs, mean - std, mean + std, color=f"C{i}", alpha=0.2)
        ax.set(title=opt.upper() if opt == "sgd" else opt.capitalize(), xlabel="epoch", ylabel="training loss")
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def side_by_side(images: Sequence[Path], path: Path) -> Path:
    """Place saved PNGs (each with its own title) next to each other in one figure."""
    import matplotlib.image

    plt = _pyplot()
    fig, axes = plt.subplots(1, len(images), figsize=(6 * len(images), 6), squeeze=False)
    for ax, image in zip(axes[0], images):
        ax.imshow(matplotlib.image.imread(image))
        ax.set_axis_off()
    fig.tight_layout()
    return _save(fig, path)


# -- the experiments ----------------------------------------------------------------------------------
def write_results(
    s: Settings, experiment: str, result: dict, figures: Sequence[Path], notes: str = "", protocol: str = ""
) -> Path:
    """``<experiment>.json`` (header + result) and ``<experiment>.md`` (the command, the protocol, the
    table, notes and figures)."""
    from implicit_em.report import write_metrics

    result = {"experiment": experiment, **s.header(), **result, "figures": [p.name for p in figures]}
    path = write_metrics(result, s.folder / f"{experiment}.json")
    n = len(s.seeds)
    seeds = f"{'mean ± std over ' + str(n) + ' seeds' if n > 1 else '1 seed'} ({', '.join(map(str, s.seeds))})"
    protocol = protocol or (
        f"{s.epochs} epochs, K = {s.components}, batch {s.batch_size}, {seeds}; probe: {s.probe_method}."
    )
    md = [
        f"# {experiment}: {s.data}",
        "",
        *([f"Produced by `{s.command}`.", ""] if s.command else []),
        protocol.replace("{seeds}", seeds),
        "",
        table(experiment, result),
        "",
        *([notes, ""] if notes else []),
        *(f"![{p.stem}]({p.name})" for p in figures),
        "",
    ]
    (s.folder / f"{experiment}.md").write_text("\n".join(md))
    return path


def run_theorem(s: Settings, runs: Runs) -> Path:
    """dL_LSE/dd = softmax(-d) on 64 x 128 random float64 activations per seed: no training."""
    per_seed, last = [], None
    for seed in s.seeds:
        last = identity_errors(random_distances(seed))
        per_seed.append({"seed": seed, **{k: last[k] for k in ("max_abs_error", "mean_abs_error", "correlation")}})
    rows = summarize([{**r, "quantity": "dL/dd vs r"} for r in per_seed], ["quantity"], TABLES["theorem"][1])
    fig = plot_identity(
        last["responsibilities"], last["gradient"], s.folder / "theorem.png",
        f"LSE gradient vs responsibilities ({THEOREM_SHAPE[0]} x {THEOREM_SHAPE[1]}, seed {s.seeds[-1]})",
    )  # fmt: skip
    result = {
        "shape": list(THEOREM_SHAPE),
        "dtype": "float64",
        # worst case over seeds: the largest errors, the smallest correlation
        "max_abs_error": max(r["max_abs_error"] for r in per_seed),
        "mean_abs_error": statistics.fmean(r["mean_abs_error"] for r in per_seed),
        "correlation": min(r["correlation"] for r in per_seed),
        "per_seed": per_seed,
        "rows": rows,
    }
    protocol = (
        f"{THEOREM_SHAPE[0]} x {THEOREM_SHAPE[1]} random activations max(0, z), z ~ N(0, 2^2), float64, {{seeds}}. "
        "JSON top level: the largest max error, the mean mean error and the smallest correlation over seeds."
    )
    return write_results(s, "theorem", result, [fig], protocol=protocol)


def run_ablation(s: Settings, runs: Runs) -> Path:
    """The four loss configurations x seeds as one ensemble run."""
    specs = ablation_members(s.seeds)
    run = runs.get("ablation", [m for _, m in specs])
    results = [{**r, "config": name} for (name, _), r in zip(specs, run.members)]
    rows = summarize(results, ["config"], ABLATION_METRICS, extra=("l0_density", "final_loss", "never_active"))
    for row in rows:
        row.update(ABLATION_CONFIGS[row["config"]])
    fig = plot_bars(rows, "config", ABLATION_METRICS, s.folder / "ablation.png", f"Ablation on {s.data}")
    return write_results(s, "ablation", {"rows": rows, "run_dirs": [str(run.run_dir)]}, [fig])


def run_benchmark(s: Settings, runs: Runs) -> Path:
    """The decoder-free model vs the standard SAE with the same K, and KMeans with K clusters."""
    ours, sae = runs.implicit_em(), runs.sae()
    sae_metrics = [m for m in BENCHMARK_METRICS if m not in ("cluster_accuracy", "nmi")]
    rows = summarize([{**r, "model": "implicit_em"} for r in ours.members], ["model"], BENCHMARK_METRICS)
    rows += summarize([{**r, "model": "sae"} for r in sae.members], ["model"], sae_metrics)
    kmeans = [
        {"model": "kmeans", "cluster_accuracy": r["kmeans_cluster_accuracy"], "nmi": r["kmeans_nmi"]}
        for r in ours.members[:1]
    ]
    rows += summarize(kmeans, ["model"], ("cluster_accuracy", "nmi"))
    rows[-1]["seeds"] = []  # KMeans has its own fixed seed (0), not the members'
    rows += summarize([raw_pixel_probe(ours.datamodule, s.probe_method)], ["model"], ("probe_accuracy", "n_parameters"))
    rows[-1]["seeds"] = []  # no training, nothing random
    fig = plot_bars(
        rows, "model", ("probe_accuracy", "l0_density", "reconstruction_mse_scaled", "cluster_accuracy", "nmi"),
        s.folder / "benchmark.png", f"Decoder-free model vs SAE on {s.data}",
    )  # fmt: skip
    notes = (
        "Reconstruction: x_hat = d W (through W^T) for the decoder-free model, the decoder for the SAE; "
        "'scaled' after the best single scale factor. Clustering assigns each test input to its most "
        "responsible component (argmin d; ReLU's ties at d = 0 go to the smallest pre-activation); the SAE has "
        "no responsibilities, so no clustering scores. "
        "KMeans: scikit-learn, K clusters on the raw inputs (n_init 1, seed 0). raw_pixels: the same "
        "linear probe on the raw inputs."
    )
    result = {"rows": rows, "run_dirs": [str(ours.run_dir), str(sae.run_dir)]}
    return write_results(s, "benchmark", result, [fig], notes)


def raw_pixel_probe(datamodule, method: str) -> dict:
    """The same linear probe on the raw inputs: what a feature must beat to be worth having."""
    from implicit_em.probe import linear_probe

    train, test = datamodule.splits["train"], datamodule.splits["test"]
    acc = linear_probe(train.x, train.y, test.x, test.y, method)
    return {"model": "raw_pixels", "probe_accuracy": acc, "n_parameters": 0}


def run_features(s: Settings, runs: Runs) -> Path:
    """The components of both models (member 0, the first seed) as images, side by side (Figure 4)."""
    from implicit_em.figures import save_feature_grid

    ours, sae = runs.implicit_em(), runs.sae()
    shape = tuple(getattr(ours.datamodule, "image_shape", ()) or (1, ours.module.model.component_weights().shape[-1]))
    seed = s.seeds[0]
    grids = []
    for key, run, title in (("implicit_em", ours, "decoder-free model: rows of W"), ("sae", sae, "SAE encoder")):
        weights = run.module.model.component_weights()[0]
        grids.append(save_feature_grid(weights, shape, s.folder / f"features_{key}.png", f"{title} (seed {seed})"))
    both = side_by_side(grids, s.folder / "features.png")
    rows = summarize([{**r, "model": "implicit_em"} for r in ours.members], ["model"], FEATURES_METRICS)
    rows += summarize([{**r, "model": "sae"} for r in sae.members], ["model"], FEATURES_METRICS)
    result = {
        "image_shape": list(shape),
        "shown_seed": seed,
        "rows": rows,
        "run_dirs": [str(ours.run_dir), str(sae.run_dir)],
    }
    return write_results(s, "features", result, [both, *grids])


def run_dynamics(s: Settings, runs: Runs) -> Path:
    """SGD and Adam x four learning rates x seeds as one ensemble run; loss curves from metrics.csv."""
    members = dynamics_members(s.seeds)
    run = runs.get("dynamics", members)
    curves = loss_curves(run.run_dir / "metrics.csv", len(members))
    results = [{**r, "loss_curve": c} for r, c in zip(run.members, curves)]
    rows = summarize(results, ["optimizer", "lr"], DYNAMICS_METRICS, extra=("loss_curve",))
    fig = plot_loss_curves(rows, s.folder / "dynamics.png", f"Training loss on {s.data}")
    return write_results(s, "dynamics", {"rows": rows, "run_dirs": [str(run.run_dir)]}, [fig])


RUNNERS: dict[str, Callable[[Settings, Runs], Path]] = {
    "theorem": run_theorem,
    "ablation": run_ablation,
    "benchmark": run_benchmark,
    "features": run_features,
    "dynamics": run_dynamics,
}


def reproduce(s: Settings, experiments: Sequence[str], log: Callable[[str], None] = print) -> list[Path]:
    """Run the named experiments (``all`` for every one); returns the JSON paths written."""
    runs = Runs(s, log)
    written = []
    for name in expand_experiments(experiments):
        path = RUNNERS[name](s, runs)
        log(f"[{name}] wrote {path}")
        written.append(path)
    return written
