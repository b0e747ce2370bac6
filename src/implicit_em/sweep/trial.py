"""One trial of a sweep: an ordinary run of ``scripts/train.py`` (the same CLI and :func:`implicit_em.run.app.fit`),
with the trial's settings on its command line, scored on the validation split, in its own run directory
``<root>/<study>/trial_NNNN`` (never one that exists), as a W&B run in the study's group."""

from __future__ import annotations

import math
import os
import secrets
import shlex
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from jsonargparse import Namespace

from implicit_em.errors import ConfigError
from implicit_em.run.app import fit
from implicit_em.run.cli import ImplicitEMCLI, is_file_logger, loggers_of, option
from implicit_em.run.rundir import RunDir
from implicit_em.run.runtime import training_process
from implicit_em.sweep.pruning import MONITORS, ReportToPruner, ValidationFVU
from implicit_em.sweep.space import as_options

#: settings every trial gets unless the train.py options say otherwise (quiet output from parallel workers)
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
#: what scores a trial on the validation split (never the test split)
ON_VALIDATION = ["--report.split", "val"]


@dataclass
class TrialPlan:
    """What every trial of a study shares: the study, the run root, train.py's options and configs, the metric,
    the torch threads of each trial, the W&B project (None: no W&B run), and whether a pruner watches."""

    study: str
    root: Path
    train_args: list[str]
    default_config_files: list[str] = field(default_factory=list)
    metric: str = "val_probe_accuracy"
    threads: int | None = None
    wandb_project: str | None = "implicit-em"
    prune: bool = True

    def __post_init__(self):
        self.root = Path(self.root).resolve()
        self.check_train_args()

    def check_train_args(self) -> None:
        """Refuse the train.py options that a sweep sets itself."""
        if option(self.train_args, "--ckpt_path") not in (None, "null", "None"):
            raise ConfigError("--ckpt_path: every trial is a new run; drop it from the train.py options")
        if option(self.train_args, "--trainer.default_root_dir") is not None:
            raise ConfigError("--trainer.default_root_dir: the trials' runs go under --root; drop it")
        split = option(self.train_args, "--report.split")
        if split not in (None, "val"):
            raise ConfigError(f"--report.split {split}: a sweep scores trials on the validation split only, "
                              "never the test split; drop it")  # fmt: skip

    def monitor(self) -> str | None:
        """The per-epoch number reported to the pruner (None: this metric has none)."""
        return MONITORS.get(self.metric)

    def args(self, params: dict[str, Any]) -> list[str]:
        """The trial's full train.py command line."""
        extra = ["--trainer.default_root_dir", str(self.root), *ON_VALIDATION]
        if self.prune and self.monitor() == "val/probe_accuracy":  # the pruner's number, after every epoch
            extra += ["--probe.every_n_epochs", "1"]
        if self.threads is not None and option(self.train_args, "--threads") is None:
            extra += ["--threads", str(self.threads)]
        return [*QUIET, *self.train_args, *as_options(params), *extra]

    def reproduce_args(self, params: dict[str, Any]) -> list[str]:
        """The options of ``scripts/train.py`` that train and score the trial's model again, to the last digit:
        with the trial's torch threads (another count sums in another order and ends a few probe answers apart)."""
        threads = (
            [] if self.threads is None or option(self.train_args, "--threads") else ["--threads", str(self.threads)]
        )
        return [*self.train_args, *as_options(params), *ON_VALIDATION, *threads]

    def command(self, params: dict[str, Any]) -> str:
        return shlex.join(["python", "scripts/train.py", *self.reproduce_args(params)])


class Parsed(Exception):
    """Raised by a dry :class:`TrialCLI` once the options are parsed and checked: carries the config."""

    def __init__(self, config: Namespace):
        super().__init__("parsed")
        self.config = config


class TrialCLI(ImplicitEMCLI):
    """train.py's CLI for one trial: the file loggers (CSV, TensorBoard) write into ``<root>/<study>/<version>``
    (a CSV logger is added where the config has none), W&B loggers in the config give way to the trial's own
    (:func:`add_wandb`). ``dry``: stop after parsing and checking the options (raises :class:`Parsed`)."""

    def __init__(self, args: Sequence[str], default_config_files: Sequence[str | Path], study: str, version: str,
                 dry: bool = False):  # fmt: skip
        self.study, self.version, self.dry = study, version, dry
        self.wandb_project = None
        super().__init__(list(args), default_config_files)

    def before_instantiate_classes(self) -> None:
        cfg = self.config
        devices, nodes = cfg.trainer.devices, cfg.trainer.num_nodes or 1
        if str(devices) not in ("1", "auto") or nodes != 1:
            raise ConfigError(f"--trainer.devices {devices} --trainer.num_nodes {nodes}: a trial trains on one "
                              "device; run several workers (--workers, or more machines) instead")  # fmt: skip
        loggers = loggers_of(cfg.trainer)
        for lg in loggers:
            if lg.class_path.endswith("WandbLogger"):
                self.wandb_project = lg.init_args.get("project") or self.wandb_project
        kept = [lg for lg in loggers if not lg.class_path.endswith("WandbLogger")]
        if not any(is_file_logger(lg) for lg in kept):
            kept.insert(
                0, Namespace(class_path="implicit_em.run.loggers.CSVLogger", init_args=Namespace(save_dir=None))
            )
        for lg in kept:
            if is_file_logger(lg):
                lg.init_args.name, lg.init_args.version = self.study, self.version
        cfg.trainer.logger = kept
        super().before_instantiate_classes()
        if self.dry:
            raise Parsed(cfg)


def parse_only(plan: TrialPlan, params: dict[str, Any]) -> Namespace:
    """The trial's options parsed and checked as train.py would, nothing built: a bad option or value exits
    here with train.py's one-line error (code 2), before any trial."""
    try:
        TrialCLI(plan.args(params), plan.default_config_files, plan.study, "parse-only", dry=True)
    except Parsed as done:
        return done.config
    raise AssertionError("TrialCLI(dry=True) returned without raising Parsed")


def claim_run_dir(root: Path, study: str, number: int) -> str:
    """Create ``<root>/<study>/trial_NNNN`` (``trial_NNNN-2``, ... where it exists: a run directory is never
    reused) and return its name; creating it is atomic, so workers never share one."""
    parent = root / study
    parent.mkdir(parents=True, exist_ok=True)
    for i in range(1, 1000):
        name = f"trial_{number:04d}" + (f"-{i}" if i > 1 else "")
        try:
            (parent / name).mkdir()
            return name
        except FileExistsError:
            continue
    raise ConfigError(f"{parent}: no free run directory for trial {number}; use another --root")


def add_wandb(cli: TrialCLI, plan: TrialPlan, trial, params: dict[str, Any]) -> None:
    """The trial's W&B run: in the group named after the study, its parameters in its config (with train.py's
    whole config, which the CLI logs), offline by itself without a key or connection."""
    from implicit_em.run.loggers import WandbLogger

    project = cli.wandb_project or plan.wandb_project
    logger = WandbLogger(
        project=project, group=plan.study, job_type="trial", name=f"{plan.study}/{cli.version}",
        save_dir=str(plan.root), id=secrets.token_hex(6), log_model=False,
        config={"sweep/study": plan.study, "sweep/trial": trial.number, "sweep/metric": plan.metric,
                **{f"sweep/{k}": v for k, v in params.items()}},
    )  # fmt: skip
    cli.trainer.loggers = [*cli.trainer.loggers, logger]


def finish_wandb(outcome: str) -> None:
    """End the trial's W&B run with its outcome (complete, pruned, failed) in its summary; a pruned trial is a
    finished run, not a crashed one."""
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.run.summary["sweep/outcome"] = outcome
        wandb.finish(exit_code=0 if outcome in ("complete", "pruned") else 1)


def run_trial(trial, plan: TrialPlan, params: dict[str, Any]) -> float:
    """Train and evaluate the trial's run (as ``scripts/train.py`` with its options does) and return its
    ``plan.metric`` from metrics.json. Records the user attributes ``run_dir`` and ``command``."""
    version = claim_run_dir(plan.root, plan.study, trial.number)
    trial.set_user_attr("command", plan.command(params))
    trial.set_user_attr("host", socket.gethostname())  # run_dir is a path on this machine
    with training_process():
        try:
            cli = TrialCLI(plan.args(params), plan.default_config_files, plan.study, version)
        except SystemExit:  # train.py's parser printed its one line
            RunDir(plan.root / plan.study / version).remove_if_empty()
            raise ConfigError(f"train.py refused the options of trial {trial.number}: {plan.command(params)}") from None
        run = RunDir.of_trainer(cli.trainer)
        trial.set_user_attr("run_dir", str(run.path.resolve()))
        monitor = plan.monitor() if plan.prune else None
        if monitor == "val/fvu":
            cli.trainer.callbacks.insert(0, ValidationFVU())
        if monitor is not None:
            cli.trainer.callbacks.insert(0, ReportToPruner(trial, monitor))
        if plan.wandb_project is not None:
            add_wandb(cli, plan, trial, params)
        outcome = "failed"
        try:
            fitted = fit(cli)
            outcome = "complete" if fitted is not None else "interrupted"
        except optuna.TrialPruned:
            outcome = "pruned"
            raise
        finally:
            if plan.wandb_project is not None:
                finish_wandb(outcome)
    if fitted is None:
        raise RuntimeError(f"trial {trial.number} was interrupted")
    return metric_value(fitted.metrics, plan.metric, fitted.metrics_path)


def metric_value(metrics: dict, metric: str, path: str | os.PathLike) -> float:
    """``metrics[metric]`` as a float (NaN where metrics.json holds null: Optuna marks the trial FAIL); a key
    metrics.json lacks is a :class:`ConfigError` listing the numbers it has."""
    if metric not in metrics:
        numbers = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
        hint = " (data without labels: --metric val_fvu)" if metric == "val_probe_accuracy" else ""
        raise ConfigError(f"--metric {metric}: {path} has no such number{hint}; it has {', '.join(numbers)}")
    value = metrics[metric]
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"--metric {metric}: {path} holds {value!r}, not a number")
    return float(value)
