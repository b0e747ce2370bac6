"""Launching the experiments' training runs: the flags ``scripts/train.py`` takes, trained in this process."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from implicit_em.run.app import Fitted


@dataclass
class Settings:
    """What every run of one ``reproduce.py`` call shares (the paper's protocol by default)."""

    configs: Path  # the project's configs/ folder
    data: str = "digits"
    out: Path = Path("results")
    epochs: int = 100
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    components: int = 64
    batch_size: int | None = None  # None: the data config's
    probe_method: str = "sklearn"
    data_root: str | None = None
    command: str = ""
    l0s: list[int] | None = None  # the frontier's target L0s (None: its defaults)
    lm_tokens: int = 20_480  # predicted tokens of the causal LM's splice in compare and frontier (0: off)
    lm_windows: int | None = None  # that many held-out windows instead (None: by tokens; 0: off)
    tokens: list[int] | None = None  # frontier: train every row on each of these token budgets (None: by epochs)
    split: str = "test"  # where frontier scores its rows: test, or val to choose settings without touching test
    model_args: list[str] = field(default_factory=list)  # extra scripts/train.py flags for this model's frontier runs
    rows: list[str] | None = None  # the frontier's rows to run (None: all)
    wandb_project: str | None = None  # frontier: the W&B project its table and plots go to (None: not logged)
    saes: list[str] = field(default_factory=list)  # compare, frontier: saved SAE folders judged as frozen rows

    @property
    def folder(self) -> Path:
        return Path(self.out) / self.data

    def header(self) -> dict[str, Any]:
        """The settings every results JSON records."""
        return {
            "data": self.data, "epochs": self.epochs, "seeds": list(self.seeds), "components": self.components,
            "batch_size": self.batch_size, "probe_method": self.probe_method, "command": self.command,
        }  # fmt: skip


def cli_args(s: Settings, name: str, experiment: str, *extra: str, kmeans=False, reconstruction=False) -> list[str]:
    """The ``scripts/train.py`` arguments of one ensemble run: the data config, ``configs/experiment/<experiment>``,
    every configuration once per seed (the same flags a user would type)."""
    configs = [s.configs / "default.yaml", s.configs / "data" / f"{s.data}.yaml",
               s.configs / "experiment" / f"{experiment}.yaml"]  # fmt: skip
    args = [a for c in configs for a in ("--config", str(c))]
    args += [
        "--trainer.default_root_dir", str(s.folder / "runs" / name),
        "--trainer.max_epochs", str(s.epochs),
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--seed_everything", str(s.seeds[0]),  # the data order
        "--model.init_args.seeds", json.dumps(list(s.seeds)),
        "--model.n_components", str(s.components),
        "--report.probe_method", s.probe_method,
        "--report.kmeans", str(kmeans).lower(),
        "--report.reconstruction", str(reconstruction).lower(),
        "--report.sae_metrics", "false",  # the paper's experiments report the paper's numbers
        "--probe.every_n_epochs", "0",
        "--components.every_n_epochs", "0",
        *extra,
    ]  # fmt: skip
    if s.batch_size:
        args += ["--data.batch_size", str(s.batch_size)]
    if s.data_root:
        args += ["--data.root", s.data_root]
    return args


class Runs:
    """Trains each named run once per process, so experiments that share a run (benchmark, components)
    train it once; each is what its fit made (:class:`~implicit_em.run.app.Fitted`: the trained ensemble, its
    DataModule, its run and its metrics), never read back from disk."""

    def __init__(self, settings: Settings, log: Callable[[str], None] = print):
        self.settings, self.log, self._done = settings, log, {}

    def get(self, name: str, experiment: str, *extra: str, **kwargs) -> Fitted:
        if name not in self._done:
            from implicit_em.run.app import fit_module

            s = self.settings
            self.log(f"[{name}] configs/experiment/{experiment}.yaml x seeds {s.seeds}, {s.epochs} epochs on {s.data}")
            self._done[name] = fit_module(cli_args(s, name, experiment, *extra, **kwargs))
        return self._done[name]

    def model(self, kind: str, start: str = "data") -> Fitted:
        """The model (``implicit_em``) or the SAE (``sae``) once per seed, from the data-aware start (``data``)
        or nn.Linear's (``paper``); both with reconstruction errors, the model with KMeans too."""
        extra = ["--model.init_args.member_class", kind]
        if start == "paper":
            extra += ["--model.init_args.defaults", json.dumps({"data_init": False})]
        name = kind if start == "data" else f"{kind}_paper_start"
        return self.get(name, "seeds", *extra, kmeans=kind == "implicit_em", reconstruction=True)


def loss_curves(metrics_csv: str | Path, n_members: int, key: str = "train/loss") -> list[list[float]]:
    """Per-member training loss per epoch from an ensemble run's metrics.csv (``key/m<s>``)."""
    keys = [f"{key}/m{s}" for s in range(n_members)]
    by_epoch: dict[int, list[float]] = {}
    with open(metrics_csv, newline="") as f:
        for row in csv.DictReader(f):
            if row.get(keys[0]) not in (None, ""):
                by_epoch[int(float(row["epoch"]))] = [float(row[k]) for k in keys]
    return [[by_epoch[e][s] for e in sorted(by_epoch)] for s in range(n_members)]


def with_names(runs: Sequence[dict], key: str = "config") -> list[dict]:
    """Each member's result with its configuration name under ``key``."""
    return [{**r, key: r.get("name")} for r in runs]
