"""What ``scripts/train.py`` does with the configured objects: fit, evaluate on frozen features, write metrics.json;
resume; evaluate a saved checkpoint (:mod:`implicit_em.run.cli` builds the objects from the command line).

Library callers (the experiments, notebooks) train with :func:`fit_module`, which hands back what the fit made
(:class:`Fitted`: the trained module, its DataModule, its run and the metrics it wrote), and build a command's
objects without training with :func:`configure`.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from implicit_em.core.distributed import close_process_group
from implicit_em.data.memory import rows_of_steps
from implicit_em.errors import ConfigError, check, report_user_error
from implicit_em.run.checkpoints import load_checkpoint
from implicit_em.run.cli import ImplicitEMCLI, saved_config_args
from implicit_em.run.report import ReportConfig, evaluate_run, write_metrics
from implicit_em.run.rundir import RunDir
from implicit_em.run.runtime import training_process
from implicit_em.training.callbacks import EpochTimer


@dataclass
class Fitted:
    """What one fit made: ``module`` (trained, in eval mode), ``datamodule`` (set up: its splits and the
    normalisation fitted once, the one the module trained with), ``run`` (its run directory) and ``metrics``
    (the dict written to metrics.json, non-finite numbers as they are)."""

    module: Any
    datamodule: Any
    run: RunDir
    metrics: dict

    @property
    def metrics_path(self) -> Path:
        """The absolute path of the run's evaluation (``RunDir.metrics_path``: what ``scripts/train.py`` prints)."""
        return self.run.metrics_path.resolve()

    @property
    def members(self) -> list[dict]:
        """The per-member dicts of the metrics (a lone model is its own single member)."""
        return self.metrics.get("members", [self.metrics])


def fit(cli: ImplicitEMCLI) -> Fitted | None:
    """Train, then evaluate on frozen features and write metrics.json; returns what the fit made on rank 0
    (else None)."""
    trainer, module, dm = cli.trainer, cli.model, cli.datamodule
    if cli.config.get("threads") is not None:
        import torch
        from threadpoolctl import threadpool_limits

        check(cli.config.threads >= 1, "threads", "an integer >= 1 or null", cli.config.threads)
        torch.set_num_threads(int(cli.config.threads))
        threadpool_limits(int(cli.config.threads))  # numpy's and scipy's BLAS too (the probes, KMeans)
    if getattr(cli, "resume_state", None) is not None:
        check_resumable(module, cli.resume_state, cli.config.ckpt_path)
    try:
        trainer.fit(module, datamodule=dm, ckpt_path=cli.config.ckpt_path, weights_only=True)
    except BaseException:
        if getattr(cli, "resume_state", None) is None:  # a new run that failed before writing: no empty folders
            RunDir.of_trainer(trainer).remove_if_empty()
        raise
    run = RunDir.of_trainer(trainer)  # every rank: log_dir may broadcast
    if not trainer.interrupted:
        close_process_group()
    if trainer.interrupted or not trainer.is_global_zero:
        return None
    start = time.perf_counter()
    metrics = evaluate_run(module, dm, ReportConfig(**cli.config.report), trainer.callback_metrics, run.path)
    eval_seconds = time.perf_counter() - start
    density = metrics.pop("log10_density", None)
    if "probes_skipped" in metrics:
        print(f"note: {metrics['probes_skipped']}", file=sys.stderr)
    timer = next(c for c in trainer.callbacks if isinstance(c, EpochTimer))
    metrics.update(
        epoch_seconds=timer.epoch_seconds,
        eval_seconds=eval_seconds,
        epochs=trainer.current_epoch,
        model=type(module).__name__ if hasattr(module, "members") else module.model.name,
        data=getattr(dm, "name", type(dm).__name__),
        n_train=len(dm.splits["train"].x),
        train_rows=dm.train_rows,  # one epoch's (a harvest's rows are its tokens)
        rows_trained=rows_of_steps(trainer.global_step, dm.train_rows, dm.batch_size, dm.drop_last),  # its steps'
        peak_memory_mb=peak_memory_mb(module.device),
        device=device_name(module.device),
        n_test=len(dm.splits["test"].x),
        run_dir=str(run.path.resolve()),
        checkpoint=getattr(trainer.checkpoint_callback, "last_model_path", None),
    )
    log_final(trainer, metrics, density)
    write_metrics(metrics, run.metrics_path)
    return Fitted(module.eval(), dm, run, metrics)


def check_resumable(module, state: dict, checkpoint: str) -> None:
    """Refuse, before any file of the run is written, a checkpoint whose weights do not fit the model built from
    this command's settings (another K, other data, another model), naming the first mismatch and the fix."""
    ours = module.state_dict()
    theirs = state.get("state_dict") or {}
    for key in sorted(set(ours) | set(theirs), key=lambda k: (not k.startswith("model."), k)):  # weights first
        a, b = theirs.get(key), ours.get(key)
        if a is None or b is None or tuple(a.shape) != tuple(b.shape):
            what = lambda t: "absent" if t is None else list(t.shape)  # noqa: E731
            raise ConfigError(
                f"the checkpoint {checkpoint} does not fit these settings ({key}: {what(a)} in the checkpoint, "
                f"{what(b)} here); resume with the run's own settings: drop the --model/--data options that differ "
                "(its saved config.yaml is used by itself)"
            )


def log_final(trainer, metrics: dict, log10_density=None) -> None:
    """The end-of-run numbers to every logger under ``final/`` (the k-sparse probes as ``..._k<k>``), and the
    component-density histogram to the loggers that draw histograms (W&B, TensorBoard)."""
    numbers = {
        **metrics,
        **{f"sparse_probe_accuracy_k{k}": v for k, v in metrics.get("sparse_probe_accuracy", {}).items()},
    }
    numeric = {f"final/{k}": v for k, v in numbers.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for lg in trainer.loggers:
        lg.log_metrics(numeric, step=trainer.global_step)
        experiment = getattr(lg, "experiment", None)
        if log10_density is not None and hasattr(lg, "log_image"):  # W&B
            import wandb

            experiment.log({"final/log10_component_density": wandb.Histogram(log10_density.numpy())})
        elif log10_density is not None and hasattr(experiment, "add_histogram"):  # TensorBoard
            experiment.add_histogram("final/log10_component_density", log10_density, trainer.global_step)
        lg.save()


def fit_module(args: Sequence[str], default_config_files: Sequence[str | Path] | None = None) -> Fitted:
    """Train and evaluate one run in this process, as ``scripts/train.py ARGS`` would; returns what it made
    (:class:`Fitted`), so the caller judges the trained module as it is, without reading the run back.

    For library callers (experiments, notebooks): errors propagate as exceptions; the process's environment
    and float settings are restored afterwards.
    """
    with quiet_warnings(), training_process():
        fitted = fit(ImplicitEMCLI(list(args), default_config_files))
    if fitted is None:
        raise RuntimeError(f"the run {list(args)} was interrupted or ran on a worker rank")
    return fitted


def fit_run(args: Sequence[str], default_config_files: Sequence[str | Path] | None = None) -> Path:
    """:func:`fit_module`, returning only metrics.json's path (for scripts)."""
    return fit_module(args, default_config_files).metrics_path


def configure(args: Sequence[str], default_config_files: Sequence[str | Path] | None = None) -> ImplicitEMCLI:
    """The objects the command ``scripts/train.py ARGS`` configures (``.model``, ``.datamodule``, ``.config``),
    built without a logger, a resume or a fit: the module as it is before any training (its seeded init), the
    DataModule not set up."""

    quiet = ["--ckpt_path", "null", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]
    return ImplicitEMCLI([*args, *quiet], default_config_files)


def evaluate_checkpoint(
    checkpoint: str | Path, config: str | Path | None = None, overrides: Sequence[str] = ()
) -> dict:
    """The metrics.json numbers of a saved model: rebuilt from its run's config.yaml (or ``config``),
    loaded from ``checkpoint`` (tensors and plain data only: a file carrying code is refused), evaluated on
    frozen features. ``overrides`` are CLI arguments such as ``--report.probe_method torch``."""
    run, checkpoint = RunDir.of(checkpoint)
    state = load_checkpoint(checkpoint)  # refused before anything is built if it carries code
    if config is None and not run.config_path.is_file():
        raise ConfigError(f"no config.yaml beside the run of {checkpoint}; pass the run's config with --config")
    cli = build_cli(run, overrides, config)
    cli.model.load_state_dict(state["state_dict"])
    cli.model.on_load_checkpoint(state)
    cli.datamodule.setup("test")
    metrics = evaluate_run(cli.model, cli.datamodule, ReportConfig(**cli.config.report), {})
    metrics.pop("log10_density", None)
    return {**metrics, "checkpoint": str(Path(checkpoint).resolve()), "global_step": state.get("global_step")}


def build_cli(run: RunDir, overrides: Sequence[str] = (), config: str | Path | None = None) -> ImplicitEMCLI:
    """A run's objects (``.model``, ``.datamodule``, ``.config``), built from its config.yaml (or ``config``) with
    CLI ``overrides``, without a logger or a fit."""
    config = Path(config) if config else run.config_path
    if not config.is_file():
        raise ConfigError(f"no {config.name} in {run.path}; pass the run's config with --config")
    return configure([*saved_config_args(config), *overrides])


def rebuild(run: RunDir | str | Path, trained: bool = True, checkpoint: str | Path | None = None, overrides=()):
    """(module, datamodule) of a run, rebuilt from its config.yaml: the module with the weights of its newest
    checkpoint (or ``checkpoint``) when ``trained``, else as it was built before any training; the DataModule as
    configured. ``overrides``: CLI arguments. For runs on disk (the dashboard, a checkpoint evaluated later);
    experiments judge the module their fit hands back instead."""
    run = run if isinstance(run, RunDir) else RunDir(Path(run))
    cli = build_cli(run, overrides)
    if trained:
        state = load_checkpoint(checkpoint or run.last_checkpoint())
        cli.model.load_state_dict(state["state_dict"])
        cli.model.on_load_checkpoint(state)
    return cli.model, cli.datamodule


def load_run(run_dir: str | Path, data_root: str | Path | None = None):
    """A finished run as the dashboard reads it (:class:`~implicit_em.lm.dashboard.source.LoadedRun`): rebuilt from
    its config.yaml and newest checkpoint (or the checkpoint file given), with the normalisation it was trained
    with and its saved readout; or an SAE folder (:func:`implicit_em.load`: SAELens, sparsify, scripts/export.py)
    over the harvest at ``data_root`` (raw activations in: no normalisation)."""
    from implicit_em.export import find_normalization
    from implicit_em.lm.dashboard.source import LoadedRun, load_sae_folder, quiet_lightning
    from implicit_em.sae_folders import folder_format

    kind = folder_format(run_dir)
    if kind is not None:
        return load_sae_folder(Path(run_dir), kind, data_root)
    if data_root is not None:
        raise ConfigError(f"--data-root is for an SAE folder; {run_dir} is read as a run, which reads its own data")
    run, ckpt = RunDir.of(run_dir)
    run.require_config(given=run_dir)
    with quiet_lightning():
        module, datamodule = rebuild(run, checkpoint=ckpt)
    norm = find_normalization(load_checkpoint(ckpt))
    readout = None
    if run.readout_path.is_file():
        saved = run.readout()
        readout = (saved["R"], saved["c"])
    return LoadedRun(run.path, module.eval(), datamodule, norm, readout)


def peak_memory_mb(device) -> float:
    """Peak memory of the run: allocated GPU memory on a GPU, else the process's peak resident set."""
    import resource

    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # kilobytes on Linux


def device_name(device) -> str:
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


#: Lightning warnings that say nothing about a run of this project
QUIET = (
    r".*isinstance\(treespec, LeafSpec\)",  # Lightning's internal use of a deprecated torch API
    r"The number of training batches .* is smaller than the logging interval",  # chunks count steps, not batches
    r"Your `IterableDataset` has `__len__` defined",  # not ours; chunked loaders have no length
    # every model steps manually and a checkpoint lands between steps: the state after a step is the one to resume
    r"Using ModelCheckpoint with manual optimization and every_n_train_steps",
)


@contextlib.contextmanager
def quiet_warnings():
    """Lightning's warnings of :data:`QUIET` ignored inside, the caller's warning filters restored after."""
    with warnings.catch_warnings():
        for pattern in QUIET:
            warnings.filterwarnings("ignore", message=pattern)
        yield


def main(args: Sequence[str] | None = None, default_config_files: Sequence[str | Path] | None = None) -> int:
    """Run the main job; print metrics.json's absolute path as the last stdout line. Returns the exit code."""
    try:
        with quiet_warnings(), training_process():
            cli = ImplicitEMCLI(args, default_config_files)
            fitted = fit(cli)
    except Exception as e:  # settings or data a user can fix: one line and its exit code
        return report_user_error(e)
    if not cli.trainer.is_global_zero:
        leave_worker()
    if fitted is not None:
        sys.stdout.flush()
        print(fitted.metrics_path, flush=True)
    return 0


def leave_worker() -> None:
    """End a DDP worker process now, skipping the interpreter's shutdown. Rank 0 saves everything; a worker
    that runs C++ static destructors while its peers are alive aborts at random ("terminate called without an
    active exception", 14 of 40 two-process gloo runs with torch 2.14 here, 0 of 40 with this exit), and the
    launcher then kills rank 0 in the middle of its evaluation."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
