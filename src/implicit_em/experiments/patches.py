"""The patches experiment: the implicit-EM model and k-means as patch dictionaries in the Coates, Lee & Ng
(2011) pipeline on CIFAR-10, side by side, differing only in the dictionary.

Per seed: the model trains on the whitened 6 x 6 patches of :class:`CIFAR10PatchesDataModule` through the
ordinary training path (:func:`implicit_em.cli.fit_run`); k-means (:func:`implicit_em.coates.kmeans`) runs on
the same patches; both are applied at every position of every image, encoded, quadrant-pooled and judged
by the fast linear probe (:func:`implicit_em.probe.torch_probe`), fit on the 50,000 training images and
scored on the 10,000 test images. Writes ``<out>/cifar10/patches.json``, ``patches.md`` and
``patches_filters.png``; the training runs go to ``<out>/cifar10/runs``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from implicit_em.checkpoints import load_checkpoint
from implicit_em.coates import (
    MIXTURE_ENCODINGS,
    extract_features,
    kmeans,
    kmeans_encoder,
    mixture_encoder,
    plot_dictionaries,
)
from implicit_em.data.cifar10_patches import CIFAR10PatchesDataModule, patch_normalization_from_checkpoint
from implicit_em.errors import DataError
from implicit_em.probe import torch_probe
from implicit_em.report import write_metrics

#: k-means iterations (Coates, Lee & Ng use 10)
KMEANS_ITERATIONS = 10
COLUMNS = ("model", "encoding", "components", "seed", "probe_accuracy", "dead_components", "seconds")


def train_args(data_root: str, components: int, seed: int, epochs: int | None, runs: Path, configs: Path) -> list[str]:
    """The ``scripts/train.py`` arguments of one run of the model on the patches. The settings are
    configs/experiment/patches.yaml's (``configs``: the project's configs/ folder); ``epochs`` None keeps its
    epochs."""
    return [
        "--config", str(configs / "default.yaml"), "--config", str(configs / "data" / "cifar10_patches.yaml"),
        "--config", str(configs / "experiment" / "patches.yaml"),
        "--data.root", str(data_root), "--data.seed", str(seed), "--seed_everything", str(seed),
        "--model.n_components", str(components), *(["--trainer.max_epochs", str(epochs)] if epochs else []),
        "--trainer.default_root_dir", str(runs), "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
    ]  # fmt: skip


def checkpoint_dictionary(path: str | Path) -> tuple[Tensor, Tensor, dict]:
    """W (K x D), b (K) and the whole checkpoint of a trained run."""
    state = load_checkpoint(path)
    return state["state_dict"]["model.linear.weight"].float(), state["state_dict"]["model.linear.bias"].float(), state


def probe_splits(dm: CIFAR10PatchesDataModule, validation: bool) -> tuple[tuple, tuple]:
    """(train images, labels), (test images, labels): all training images and the test images; with
    ``validation``, the training images but the held-out ones, and the held-out ones (for choosing settings)."""
    if validation:
        return dm.images["train"], dm.images["val"]
    (x, y), (x_val, y_val) = dm.images["train"], dm.images["val"]
    return (torch.cat([x, x_val]), torch.cat([y, y_val])), dm.images["test"]


def probe_encodings(
    encoder, n_maps: int, train: tuple, test: tuple, log: Callable[[str], None], probe_threads: int | None
) -> tuple[dict[str, float], dict[str, float], float]:
    """Probe accuracy and probe seconds of each encoding, and the extraction seconds they share."""
    start = time.perf_counter()
    f_train = extract_features(train[0], encoder, n_maps, log=log)
    f_test = extract_features(test[0], encoder, n_maps)
    extraction = time.perf_counter() - start
    accuracy, seconds = {}, {}
    for name in list(f_train):
        start = time.perf_counter()
        features = f_train.pop(name)  # freed after its probe: at K = 1600 each is 50,000 x 6,400 floats
        accuracy[name] = torch_probe(features, train[1], f_test.pop(name), test[1], cpu_threads=probe_threads)
        seconds[name] = time.perf_counter() - start
        log(f"  {name}: probe accuracy {accuracy[name]:.4f} ({features.shape[1]} features)")
        del features
    return accuracy, seconds, extraction


def run_patches(
    data_root: str,
    components: int,
    seeds: list[int],
    out: Path,
    epochs: int | None = None,
    log: Callable[[str], None] = print,
    *,
    configs: Path = Path("configs"),
    encodings: Sequence[str] = MIXTURE_ENCODINGS,
    extra_args: Sequence[str] = (),
    validation: bool = False,
    probe_threads: int | None = None,
) -> Path:
    """Both dictionaries at K = ``components`` for each seed; returns the path of ``patches.json``.

    ``configs`` is the project's configs/ folder (default.yaml, data/cifar10_patches.yaml,
    experiment/patches.yaml: the model's settings and epochs, unless ``epochs`` is given); ``encodings`` are
    the model's (:data:`~implicit_em.coates.MIXTURE_ENCODINGS`), one row each.
    ``extra_args`` are appended to the training arguments (e.g. ``--data.n_patches 20000``); with
    ``validation`` the probe is scored on the held-out training images instead of the test images.
    """
    from implicit_em.cli import fit_run

    folder = Path(out) / "cifar10"
    rows, pictures = [], {}
    for seed in seeds:
        log(f"patches: seed {seed}, K = {components}: training the implicit-EM model")
        start = time.perf_counter()
        args = [*train_args(data_root, components, seed, epochs, folder / "runs", configs), *extra_args]
        metrics = json.loads(fit_run(args).read_text())
        epochs_run = metrics["epochs"]
        train_seconds = time.perf_counter() - start
        weight, bias, state = checkpoint_dictionary(metrics["checkpoint"])
        dm = datamodule_of_run(Path(metrics["run_dir"]))
        dm.setup()
        normalization = patch_normalization_from_checkpoint(state)
        if not torch.allclose(normalization.whiten, dm.normalization.whiten):
            raise DataError(f"the patches of {metrics['run_dir']} changed since it trained; run it again")
        train, test = probe_splits(dm, validation)
        activation = state["hyper_parameters"].get("activation", "relu")
        encoder = mixture_encoder(normalization, weight, bias, activation, encodings)
        accuracy, probe_seconds, extraction = probe_encodings(
            encoder, (len(encodings) + 2) * components, train, test, log, probe_threads
        )
        for name in accuracy:
            rows.append(row("implicit_em", name, components, seed, accuracy[name], metrics["dead_components"],
                            train_seconds + extraction + probe_seconds[name]))  # fmt: skip

        log(f"patches: seed {seed}: k-means on the same {len(dm.train_patches)} patches")
        start = time.perf_counter()
        centroids, counts = kmeans(dm.train_patches, components, KMEANS_ITERATIONS, seed=seed)
        kmeans_seconds = time.perf_counter() - start
        accuracy, probe_seconds, extraction = probe_encodings(
            kmeans_encoder(normalization, centroids), 2 * components + weight.shape[1], train, test, log, probe_threads
        )
        rows.append(row("kmeans", "triangle", components, seed, accuracy["triangle"], int((counts == 0).sum()),
                        kmeans_seconds + extraction + probe_seconds["triangle"]))  # fmt: skip
        if not pictures:
            pictures = {"implicit-EM (ours)": weight, "k-means": centroids[counts.argsort(descending=True)]}
            patch_size = normalization.patch_size
    header = {
        "experiment": "patches",
        "data": "cifar10",
        "data_root": str(data_root),
        "components": components,
        "seeds": list(seeds),
        "epochs": epochs_run,
        "train_args": [*train_args(data_root, components, seeds[0], epochs, folder / "runs", configs), *extra_args],
        "kmeans_iterations": KMEANS_ITERATIONS,
        "probe": "torch_probe (L2 logistic regression, C = 1, standardised features)",
        "probe_split": "held-out training images" if validation else "test images",
        "columns": list(COLUMNS),
    }
    path = write_metrics({**header, "rows": rows}, folder / "patches.json")
    (folder / "patches.md").write_text(markdown(header, rows))
    plot_dictionaries(pictures, patch_size, folder / "patches_filters.png")
    return path


def datamodule_of_run(run_dir: Path) -> CIFAR10PatchesDataModule:
    """The run's DataModule, rebuilt from its saved config.yaml: the same patches, images and splits."""
    import yaml

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    return CIFAR10PatchesDataModule(**config["data"]["init_args"])


def row(model, encoding, components, seed, accuracy, dead, seconds) -> dict:
    return {
        "model": model,
        "encoding": encoding,
        "components": components,
        "seed": seed,
        "probe_accuracy": accuracy,
        "dead_components": int(dead),
        "seconds": round(seconds, 3),
    }


def markdown(header: dict, rows: list[dict]) -> str:
    """patches.md: the rows as a table, with what produced them."""
    lines = [
        f"# CIFAR-10 patch dictionaries, K = {header['components']} (Coates, Lee & Ng pipeline)",
        "",
        f"Probe: {header['probe']}, scored on the {header['probe_split']}. Seconds: training (or k-means), "
        "feature extraction of all images, and that encoding's probe.",
        "",
        "| model | encoding | K | seed | probe accuracy | dead components | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['encoding']} | {r['components']} | {r['seed']} | {r['probe_accuracy']:.4f} "
            f"| {r['dead_components']} | {r['seconds']:.0f} |"
        )
    lines += ["", "Training arguments: `" + " ".join(header["train_args"]) + "`", ""]
    return "\n".join(lines)


def run_patches_experiment(s, runs=None) -> Path:
    """The ``patches`` entry of :data:`implicit_em.experiments.EXPERIMENTS` (``--data cifar10``): :func:`run_patches`
    with one ``reproduce.py`` call's settings; ``--epochs`` is used when given explicitly."""
    epochs = s.epochs if s.command and "--epochs" in s.command else None
    return run_patches(s.data_root, s.components, list(s.seeds), Path(s.out), epochs,
                       log=runs.log if runs is not None else print, configs=s.configs)  # fmt: skip
