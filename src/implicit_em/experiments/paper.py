"""The paper's experiments behind ``scripts/reproduce.py``: the theorem, the ablation, the benchmark against the
SAE, the component images and the training dynamics. Each writes ``<out>/<data>/<experiment>.json``, ``.md``
and PNG figures; the runs are ``configs/experiment/*.yaml`` trained by the path of ``scripts/train.py``.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from implicit_em.core.objective import autograd_lse_gradient, responsibilities
from implicit_em.experiments.plots import plot_bars, plot_identity, plot_loss_curves, side_by_side
from implicit_em.experiments.runs import Runs, Settings, loss_curves, with_names
from implicit_em.experiments.tables import markdown_table, summarize, write_results

#: the theorem's random distances: N samples x K components
THEOREM_SHAPE = (64, 128)
ABLATION_METRICS = ("dead_components", "redundancy", "responsibility_entropy", "probe_accuracy")
BENCHMARK_METRICS = (
    "probe_accuracy", "l0_density", "n_parameters", "reconstruction_mse", "reconstruction_mse_scaled",
    "cluster_accuracy", "nmi",
)  # fmt: skip
DYNAMICS_METRICS = ("final_loss", "probe_accuracy")
COMPONENTS_METRICS = ("weight_redundancy", "effective_rank")

#: experiment -> (label columns, metric columns) of its table, read from its JSON's ``rows``
TABLES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "theorem": (("quantity",), ("max_abs_error", "mean_abs_error", "correlation")),
    "ablation": (("config",), ABLATION_METRICS),
    "benchmark": (("model", "start"), BENCHMARK_METRICS),
    "components": (("model",), COMPONENTS_METRICS),
    "dynamics": (("optimizer", "lr"), DYNAMICS_METRICS),
}


def table(experiment: str, result: dict) -> str:
    """The markdown table of an experiment's results JSON (what ``<experiment>.md`` shows)."""
    labels, metrics = TABLES[experiment]
    return markdown_table(result["rows"], labels, metrics)


def write(s: Settings, experiment: str, result: dict, figures, notes: str = "", protocol: str = "") -> Path:
    return write_results(s.folder, s.header(), experiment, result, table(experiment, result), figures, notes, protocol)


def identity_errors(d: Tensor) -> dict[str, Any]:
    """The paper's theorem on distances ``d`` (N x K): dL_LSE/dd_ij = r_ij. Gradient by autograd of the
    textbook formula (not the project's own E-step backward), responsibilities by softmax(-d); their max
    and mean absolute difference and Pearson correlation."""
    grad = autograd_lse_gradient(d).to(d.dtype)
    r = responsibilities(d.detach())
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
    return write(s, "theorem", result, [fig], protocol=protocol)


def run_ablation(s: Settings, runs: Runs) -> Path:
    """The four loss configurations (configs/experiment/ablation.yaml) x seeds as one ensemble run."""
    run = runs.get("ablation", "ablation")
    rows = summarize(with_names(run.members), ["config"], ABLATION_METRICS,
                     extra=("l0_density", "final_loss", "never_active"))  # fmt: skip
    for row, member in zip(rows, run.members[:: len(s.seeds)]):
        row.update({k: member[k] for k in ("lambda_lse", "lambda_var", "lambda_tc")})
    fig = plot_bars(rows, "config", ABLATION_METRICS, s.folder / "ablation.png", f"Ablation on {s.data}")
    return write(s, "ablation", {"rows": rows, "run_dirs": [str(run.run.path)]}, [fig])


def run_benchmark(s: Settings, runs: Runs) -> Path:
    """The decoder-free model vs the standard SAE with the same K, both from the same start (data-aware, and
    nn.Linear's as in the paper), KMeans with K clusters, and the raw inputs."""
    rows = []
    for start in ("data", "paper"):
        for kind in ("implicit_em", "sae"):
            run = runs.model(kind, start)
            metrics = BENCHMARK_METRICS if kind == "implicit_em" else BENCHMARK_METRICS[:5]
            rows += summarize([{**r, "model": kind, "start": start} for r in run.members], ["model", "start"], metrics)
    ours = runs.model("implicit_em").members[0]
    if "kmeans_nmi" in ours:
        kmeans = {"model": "kmeans", "start": "", "cluster_accuracy": ours["kmeans_cluster_accuracy"],
                  "nmi": ours["kmeans_nmi"]}  # fmt: skip
        rows += summarize([kmeans], ["model", "start"], ("cluster_accuracy", "nmi"))
        rows[-1]["seeds"] = []  # KMeans has its own fixed seed (0), not the members'
    rows += summarize([raw_input_probe(s, runs)], ["model", "start"], ("probe_accuracy", "n_parameters"))
    rows[-1]["seeds"] = []  # no training, nothing random
    fig = plot_bars(
        [r for r in rows if r["start"] != "paper"], "model",
        ("probe_accuracy", "l0_density", "reconstruction_mse_scaled", "cluster_accuracy", "nmi"),
        s.folder / "benchmark.png", f"Decoder-free model vs SAE on {s.data} (data-aware start)",
    )  # fmt: skip
    notes = (
        "start: data = both models' first layer moved through the training mean and scaled to pre-activation "
        "std 0.3 (the project's default); paper = nn.Linear's start for both. "
        "Reconstruction: x_hat = d W (through W^T) for the decoder-free model, the decoder for the SAE; "
        "'scaled' after the best single scale factor. Clustering assigns each test input to its most "
        "responsible component (argmin d; ReLU's ties at d = 0 go to the smallest pre-activation); the SAE has "
        "no responsibilities, so no clustering scores. KMeans: scikit-learn, K clusters on the raw inputs "
        "(n_init 1, seed 0). raw_inputs: the same linear probe on the raw inputs."
    )
    dirs = [str(runs.model(k, st).run.path) for st in ("data", "paper") for k in ("implicit_em", "sae")]
    return write(s, "benchmark", {"rows": rows, "run_dirs": dirs}, [fig], notes)


def raw_input_probe(s: Settings, runs: Runs) -> dict:
    """The same linear probe on the raw inputs (the model's run's splits, as it trained on them): what a
    feature must beat to be worth having."""
    from implicit_em.eval.probe import linear_probe

    dm = runs.model("implicit_em").datamodule
    train, test = dm.splits["train"], dm.splits["test"]
    acc = linear_probe(train.x, train.y, test.x, test.y, s.probe_method)
    return {"model": "raw_inputs", "start": "", "probe_accuracy": acc, "n_parameters": 0}


def member_weights(fitted, key: str) -> Tensor:
    """Member 0's trained ``model.<key>`` weights of a fitted ensemble."""
    return fitted.module.state_dict()[f"members.0.model.{key}"].detach().cpu()


def run_components(s: Settings, runs: Runs) -> Path:
    """The components of both models (member 0, the first seed) as images, side by side (Figure 4)."""
    from implicit_em.eval.figures import save_component_grid

    ours, sae = runs.model("implicit_em"), runs.model("sae")
    ours_w = member_weights(ours, "linear.weight")
    shape = tuple(getattr(ours.datamodule, "image_shape", ()) or (1, ours_w.shape[-1]))
    seed = s.seeds[0]
    grids = []
    for key, weights, title in (
        ("implicit_em", ours_w, "decoder-free model: rows of W"),
        ("sae", member_weights(sae, "encoder.weight"), "SAE encoder"),
    ):
        grids.append(save_component_grid(weights, shape, s.folder / f"components_{key}.png", f"{title} (seed {seed})"))
    both = side_by_side(grids, s.folder / "components.png")
    rows = summarize([{**r, "model": "implicit_em"} for r in ours.members], ["model"], COMPONENTS_METRICS)
    rows += summarize([{**r, "model": "sae"} for r in sae.members], ["model"], COMPONENTS_METRICS)
    result = {"image_shape": list(shape), "shown_seed": seed, "rows": rows,
              "run_dirs": [str(ours.run.path), str(sae.run.path)]}  # fmt: skip
    return write(s, "components", result, [both, *grids])


def run_dynamics(s: Settings, runs: Runs) -> Path:
    """SGD and Adam x four learning rates (configs/experiment/dynamics.yaml) x seeds as one ensemble run; loss
    curves from metrics.csv."""
    run = runs.get("dynamics", "dynamics")
    curves = loss_curves(run.run.metrics_csv_path, len(run.members))  # the training log, not a read-back
    results = [{**r, "loss_curve": c} for r, c in zip(run.members, curves)]
    rows = summarize(results, ["optimizer", "lr"], DYNAMICS_METRICS, extra=("loss_curve",))
    fig = plot_loss_curves(rows, s.folder / "dynamics.png", f"Training loss on {s.data}")
    return write(s, "dynamics", {"rows": rows, "run_dirs": [str(run.run.path)]}, [fig])
