"""The patches experiment: the implicit-EM model and k-means as patch dictionaries in the Coates, Lee & Ng
(2011) pipeline on CIFAR-10, side by side, differing only in the dictionary.

Per seed: the model trains on the whitened 6 x 6 patches of :class:`CIFAR10PatchesDataModule` through the
ordinary training path (:func:`implicit_em.run.app.fit_module`, which hands back the trained model and its
patches); k-means (:func:`implicit_em.eval.coates.kmeans`) runs on
the same patches; both are applied at every position of every image, encoded, quadrant-pooled and judged
by the fast linear probe (:func:`implicit_em.eval.probe.torch_probe`), fit on all 50,000 training images and scored on
the 10,000 test images, twice: at C = 1 (``probe_accuracy``: the paper's protocol, what the name means in every
result of this project) and at the C chosen from :data:`PROBE_C` on the 5,000 held-out training images (fit on
the other 45,000) for each dictionary and encoding alike (``probe_accuracy_tuned``; Coates, Lee & Ng
cross-validate their SVM's C the same way). Writes ``<out>/cifar10/patches.json``, ``patches.md`` and
``patches_filters.png``; the training runs go to ``<out>/cifar10/runs``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from implicit_em.eval.coates import (
    extract_features,
    kmeans,
    kmeans_encoder,
    mixture_encoder,
    plot_dictionaries,
)
from implicit_em.eval.probe import torch_probe_path
from implicit_em.experiments.tables import markdown_table, summarize, write_results

#: k-means iterations (Coates, Lee & Ng use 10)
KMEANS_ITERATIONS = 10
#: the model's encodings here: its distances themselves, the triangle code's form and depth, the three best on
#: the held-out training images at K = 400 (the settings tried are listed in configs/experiment/patches.yaml;
#: :data:`~implicit_em.eval.coates.MIXTURE_ENCODINGS` has them all)
ENCODINGS = ("distance", "depth", "signed_contrast")
#: the probe's inverse regularisation strengths; 4K features want more regularisation as K grows (at K = 1600
#: both dictionaries chose 0.01, the end of a grid that started there, so it goes down to 0.003)
PROBE_C = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
#: the paper's probe C, reported as ``probe_accuracy``
PAPER_C = 1.0
#: lambda_tc at K <= 400, scaled by 400 / K above: the decorrelation term sums K^2 pairs whose sample
#: correlations never vanish, so its pull on each component grows with K; at K = 1600 (seed 1, 3 epochs, batch
#: 128, lambda_lse 1) lambda_tc 1 left 1319 of 1600 components dead, 0.25 left 8 (12 at batch 64, lambda_lse 4)
LAMBDA_TC_AT_400 = 1.0
#: the table's columns after model and encoding: header and number format
COLUMNS = {
    "components": ("K", "d"), "probe_accuracy": ("probe accuracy, C = 1", ".4f"),
    "probe_accuracy_tuned": ("probe accuracy, C chosen", ".4f"), "probe_c": ("chosen C", "g"),
    "dead_components": ("dead components", ".1f"), "seconds": ("seconds", ".0f"),
}  # fmt: skip


def decorrelation_weight(components: int) -> float:
    """lambda_tc for K components: :data:`LAMBDA_TC_AT_400` x min(1, 400 / K)."""
    return LAMBDA_TC_AT_400 * min(1.0, 400 / components)


def train_args(data_root: str, components: int, seed: int, epochs: int | None, runs: Path, configs: Path) -> list[str]:
    """The ``scripts/train.py`` arguments of one run of the model on the patches. The settings are
    configs/experiment/patches.yaml's (``configs``: the project's configs/ folder) with lambda_tc from
    :func:`decorrelation_weight`; ``epochs`` None keeps its epochs."""
    return [
        "--config", str(configs / "default.yaml"), "--config", str(configs / "data" / "cifar10_patches.yaml"),
        "--config", str(configs / "experiment" / "patches.yaml"),
        "--data.root", str(data_root), "--data.seed", str(seed), "--seed_everything", str(seed),
        "--model.n_components", str(components), "--model.net.lambda_tc", str(decorrelation_weight(components)),
        *(["--trainer.max_epochs", str(epochs)] if epochs else []),
        "--trainer.default_root_dir", str(runs), "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
    ]  # fmt: skip


def probe_encodings(
    encoder, n_maps: int, images: dict[str, tuple], validation: bool, log: Callable[[str], None], probe_threads
) -> tuple[dict[str, dict], float]:
    """Each encoding's probes (see the module docstring): ``{encoding: {"accuracy", "tuned", "probe_c",
    "validation", "seconds"}}`` (``accuracy`` at C = 1, ``tuned`` at ``probe_c``, ``validation`` the held-out
    accuracy at each C) and the seconds of the feature extraction they share. ``images`` maps "train", "val",
    "test" to (uint8 images, labels); with ``validation`` the results are held-out accuracies and the test
    images are not touched."""
    start = time.perf_counter()
    parts = ("train", "val") if validation else ("train", "val", "test")
    features = {p: extract_features(images[p][0], encoder, n_maps, log=log if p == "train" else None) for p in parts}
    extraction = time.perf_counter() - start
    (_, y_train), (_, y_val), (_, y_test) = images["train"], images["val"], images["test"]
    results = {}
    for name in list(features["train"]):
        start = time.perf_counter()
        f_train, f_val = features["train"].pop(name), features["val"].pop(name)  # freed after their probes
        scores = torch_probe_path(f_train, y_train, f_val, y_val, PROBE_C, cpu_threads=probe_threads)
        best = max(scores, key=scores.get)
        final = scores
        if not validation:
            f_all, y_all = torch.cat([f_train, f_val]), torch.cat([y_train, y_val])
            del f_train, f_val
            test = features["test"].pop(name)
            final = torch_probe_path(f_all, y_all, test, y_test, {best, PAPER_C}, cpu_threads=probe_threads)
            del f_all
        results[name] = {"accuracy": final[PAPER_C], "tuned": final[best], "probe_c": best, "validation": scores,
                         "seconds": time.perf_counter() - start}  # fmt: skip
        held_out = ", ".join(f"C={c}: {a:.4f}" for c, a in scores.items())
        log(f"  {name}: probe accuracy {final[PAPER_C]:.4f} at C = 1, {final[best]:.4f} at C = {best} chosen on "
            f"the held-out images ({held_out})")  # fmt: skip
    return results, extraction


def run_patches(
    data_root: str,
    components: int,
    seeds: list[int],
    out: Path,
    epochs: int | None = None,
    log: Callable[[str], None] = print,
    *,
    configs: Path = Path("configs"),
    encodings: Sequence[str] = ENCODINGS,
    extra_args: Sequence[str] = (),
    validation: bool = False,
    probe_threads: int | None = None,
    command: str = "",
) -> Path:
    """Both dictionaries at K = ``components`` for each seed; returns the path of ``patches.json``.

    ``configs`` is the project's configs/ folder (default.yaml, data/cifar10_patches.yaml,
    experiment/patches.yaml: the model's settings and epochs, unless ``epochs`` is given); ``encodings`` are
    the model's (any of :data:`~implicit_em.eval.coates.MIXTURE_ENCODINGS`; default :data:`ENCODINGS`), one row each.
    ``extra_args`` are appended to the training arguments (e.g. ``--data.n_patches 20000``); with
    ``validation`` the test images are not touched: the rows hold held-out accuracies. The rows of patches.json
    are the mean and std over seeds (:func:`~implicit_em.experiments.tables.summarize`), each seed's under
    ``per_seed``.
    """
    from implicit_em.run.app import fit_module

    folder = Path(out) / "cifar10"
    rows, pictures = [], {}
    for seed in seeds:
        log(f"patches: seed {seed}, K = {components}: training the implicit-EM model")
        start = time.perf_counter()
        args = [*train_args(data_root, components, seed, epochs, folder / "runs", configs), *extra_args]
        fitted = fit_module(args)  # the trained model and the patches it trained on, as the fit left them
        metrics, dm, normalization = fitted.metrics, fitted.datamodule, fitted.datamodule.normalization
        epochs_run = metrics["epochs"]
        train_seconds = time.perf_counter() - start
        net = fitted.module.model
        weight, bias = net.first_layer().weight.detach().float(), net.first_layer().bias.detach().float()
        encoder = mixture_encoder(normalization, weight, bias, net.activation, encodings)
        probes, extraction = probe_encodings(
            encoder, (len(encodings) + 2) * components, dm.images, validation, log, probe_threads
        )
        for name, p in probes.items():
            rows.append(row("implicit_em", name, components, seed, p, metrics["dead_components"],
                            train_seconds + extraction))  # fmt: skip

        log(f"patches: seed {seed}: k-means on the same {len(dm.train_patches)} patches")
        start = time.perf_counter()
        centroids, counts = kmeans(dm.train_patches, components, KMEANS_ITERATIONS, seed=seed)
        kmeans_seconds = time.perf_counter() - start
        probes, extraction = probe_encodings(
            kmeans_encoder(normalization, centroids), 2 * components + weight.shape[1], dm.images, validation, log,
            probe_threads,
        )  # fmt: skip
        rows.append(row("kmeans", "triangle", components, seed, probes["triangle"], int((counts == 0).sum()),
                        kmeans_seconds + extraction))  # fmt: skip
        if not pictures:
            pictures = {"implicit-EM (ours)": weight, "k-means": centroids[counts.argsort(descending=True)]}
            patch_size = normalization.patch_size
    header = {
        "data": "cifar10",
        "data_root": str(data_root),
        "components": components,
        "seeds": list(seeds),
        "epochs": epochs_run,
        "command": command,
        "train_args": [*train_args(data_root, components, seeds[0], epochs, folder / "runs", configs), *extra_args],
        "kmeans_iterations": KMEANS_ITERATIONS,
        "probe": "torch_probe (L2 logistic regression on standardised features) at C = 1 (probe_accuracy) and at "
        f"C from {', '.join(map(str, PROBE_C))} chosen on the held-out training images (probe_accuracy_tuned)",
        "probe_split": "held-out training images" if validation else "test images",
        "columns": ["model", "encoding", *COLUMNS],
    }
    summary = summarize(rows, ["model", "encoding"])
    figure = plot_dictionaries(pictures, patch_size, folder / "patches_filters.png")
    protocol = (
        f"{{seeds}}. Probe: {header['probe']}, scored on the {header['probe_split']}. Seconds: training (or "
        "k-means), feature extraction of all images, and that encoding's probe."
    )
    notes = "Training arguments: `" + " ".join(header["train_args"]) + "`"
    title = f"# CIFAR-10 patch dictionaries, K = {components} (Coates, Lee & Ng pipeline)"
    return write_results(folder, header, "patches", {"rows": summary}, markdown_table(summary, ["model", "encoding"],
                         COLUMNS), [figure], notes, protocol, title)  # fmt: skip


def row(model, encoding, components, seed, probe: dict, dead, seconds) -> dict:
    """One table row; ``probe`` is one encoding's result from :func:`probe_encodings`, ``seconds`` the
    training (or k-means) and extraction seconds, to which its probe's are added."""
    return {
        "model": model,
        "encoding": encoding,
        "components": components,
        "seed": seed,
        "probe_accuracy": probe["accuracy"],
        "probe_accuracy_tuned": probe["tuned"],
        "probe_c": probe["probe_c"],
        "validation_accuracy": {str(c): a for c, a in probe["validation"].items()},
        "dead_components": int(dead),
        "seconds": round(seconds + probe["seconds"], 3),
    }


def run_patches_experiment(s, runs=None) -> Path:
    """The ``patches`` entry of :data:`implicit_em.experiments.EXPERIMENTS` (``--data cifar10``): :func:`run_patches`
    with one ``reproduce.py`` call's settings; ``--epochs`` is used when given explicitly."""
    epochs = s.epochs if s.command and "--epochs" in s.command else None
    return run_patches(s.data_root, s.components, list(s.seeds), Path(s.out), epochs,
                       log=runs.log if runs is not None else print, configs=s.configs, command=s.command)  # fmt: skip
