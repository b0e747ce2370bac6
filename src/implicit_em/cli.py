"""The LightningCLI entry behind ``scripts/train.py``: configure, train, evaluate, write metrics.json.

Configs compose with repeated ``--config configs/<group>/<name>.yaml``; any value overrides with
``--section.key value``. Errors in settings or data print one line and exit with code 2.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from jsonargparse import Namespace
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger as _CSVLogger
from lightning.pytorch.loggers import TensorBoardLogger as _TensorBoardLogger

from implicit_em.callbacks import (
    Checkpoint,
    EpochTimer,
    FeatureImages,
    IdentityCheck,
    ProbeDuringTraining,
    UsageHistogram,
)
from implicit_em.checkpoints import find_last_checkpoint, load_checkpoint
from implicit_em.data.memory import ComponentDataModule
from implicit_em.distributed import close_process_group
from implicit_em.errors import ConfigError, exit_with_argument_error, report_user_error
from implicit_em.loggers import WandbLogger
from implicit_em.report import ReportConfig, evaluate_run, write_metrics
from implicit_em.runtime import training_process


class CSVLogger(_CSVLogger):
    """Lightning's CSV logger (per-epoch ``metrics.csv``); ``save_dir`` defaults to the root directory."""

    def __init__(
        self, save_dir: str | None = None, name: str = "implicit_em", version: int | str | None = None, **kwargs: Any
    ):
        super().__init__(save_dir or ".", name=name, version=version, **kwargs)


class TensorBoardLogger(_TensorBoardLogger):
    """Lightning's TensorBoard logger; ``save_dir`` defaults to the root directory."""

    def __init__(
        self, save_dir: str | None = None, name: str = "implicit_em", version: int | str | None = None, **kwargs: Any
    ):
        super().__init__(save_dir or ".", name=name, version=version, **kwargs)


class SaveAndLogConfig(SaveConfigCallback):
    """Saves the resolved config beside the run (config.yaml) and sends it, flattened, with the model's
    parameter count, to every logger but the CSV one (W&B's run config, TensorBoard's hparams). Notes
    the W&B run id in the run directory, so a resumed run logs to the same W&B run."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        flat = _flatten(self.config.clone().as_dict())
        flat["n_parameters"] = pl_module.n_parameters()
        for logger in trainer.loggers:
            if not isinstance(logger, _CSVLogger):
                logger.log_hyperparams(flat)
            if isinstance(logger, WandbLogger):  # --ckpt_path last continues this W&B run
                (Path(trainer.log_dir) / "wandb_id").write_text(str(logger.version))


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) or v is None else str(v)
    return out


class OneLineParser(LightningArgumentParser):
    """Argument errors as a single line on stderr, exit code 2 (no usage dump, no traceback)."""

    def error(self, message: str, ex: Exception | None = None):
        exit_with_argument_error(message)


def _loggers(trainer_cfg: Namespace) -> list[Namespace]:
    logger = trainer_cfg.get("logger")
    if isinstance(logger, Namespace):
        return [logger]
    return [lg for lg in logger if isinstance(lg, Namespace)] if isinstance(logger, list) else []


class ImplicitEMCLI(LightningCLI):
    """LightningCLI with the project's defaults, sections and guarantees (see the module docstring)."""

    def __init__(self, args: Sequence[str] | None = None, default_config_files: Sequence[str | Path] | None = None):
        files = [str(p) for p in default_config_files or []]
        super().__init__(
            model_class=L.LightningModule,
            subclass_mode_model=True,
            datamodule_class=ComponentDataModule,
            subclass_mode_data=True,
            parser_class=OneLineParser,
            parser_kwargs={
                "default_config_files": files,
                "description": (
                    "Train a decoder-free implicit-EM model. The options of each model or data class: "
                    "--model.help ImplicitEM | SparseAutoencoderModule | TopKSparseAutoencoderModule | Ensemble; --data.help DigitsDataModule | "
                    "MNISTDataModule | FashionMNISTDataModule | CIFAR10DataModule | SyntheticMixtureDataModule | "
                    "ActivationsDataModule."
                ),
            },
            save_config_callback=SaveAndLogConfig,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={
                "callbacks": [EpochTimer(), UsageHistogram()],
                "plugins": {"class_path": "implicit_em.checkpoints.SafeCheckpointIO"},
            },
            auto_configure_optimizers=False,
            run=False,
            args=args,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--ckpt_path", type=str | None, default=None,
            help="Resume from this checkpoint; 'last' resumes the newest run under --trainer.default_root_dir.",
        )  # fmt: skip
        parser.add_lightning_class_args(Checkpoint, "checkpoint")
        parser.set_defaults(
            {"checkpoint.save_last": "link", "checkpoint.save_top_k": 1, "checkpoint.every_n_epochs": 1}
        )
        parser.add_lightning_class_args(FeatureImages, "features")
        parser.add_lightning_class_args(ProbeDuringTraining, "probe")
        parser.add_lightning_class_args(IdentityCheck, "identity")
        parser.add_class_arguments(ReportConfig, "report")
        parser.link_arguments("data.dims", "model.init_args.in_features", apply_on="instantiate")
        parser.link_arguments("seed_everything", "model.init_args.seed", compute_fn=_seed)
        parser.link_arguments("seed_everything", "data.init_args.shuffle_seed", compute_fn=_seed)

    # -- before anything is built ---------------------------------------------------------------------
    def before_instantiate_classes(self) -> None:
        cfg = self.config
        root = cfg.trainer.default_root_dir or "."
        self._check_devices(cfg)
        if cfg.ckpt_path == "last":
            self._resume_last(cfg, root)
        if cfg.trainer.enable_progress_bar is not False:
            callbacks = cfg.trainer.callbacks or []
            callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
            if not any("ProgressBar" in getattr(c, "class_path", "") for c in callbacks):
                cfg.trainer.callbacks = [*callbacks, Namespace(class_path="implicit_em.callbacks.ProgressBar",
                                                                init_args=Namespace(refresh_rate=10))]  # fmt: skip
        for lg in _loggers(cfg.trainer):
            if "save_dir" in lg.init_args and lg.init_args.save_dir in (None, "."):
                lg.init_args.save_dir = str(root)
        self._share_version(cfg)

    @staticmethod
    def _share_version(cfg: Namespace) -> None:
        """Give the file loggers (CSV, TensorBoard) one run directory: the next free version_N under their
        name. DDP's worker processes inherit the choice through the environment instead of recounting."""
        dir_loggers = [lg for lg in _loggers(cfg.trainer) if "version" in lg.init_args and "save_dir" in lg.init_args]
        if not dir_loggers or any(lg.init_args.version is not None for lg in dir_loggers):
            return
        inherited = os.environ.get("LOCAL_RANK", "0") != "0"  # a worker launched by rank 0
        version = os.environ.get("IMPLICIT_EM_RUN_VERSION") if inherited else None
        if version is None:
            first = dir_loggers[0].init_args
            taken = [p.name for p in (Path(first.save_dir) / first.name).glob("version_*")]
            numbers = [int(n.split("_")[1]) for n in taken if n.split("_")[1].isdigit()]
            version = os.environ["IMPLICIT_EM_RUN_VERSION"] = f"version_{max(numbers, default=-1) + 1}"
        for lg in dir_loggers:
            lg.init_args.version = version

    @staticmethod
    def _check_devices(cfg: Namespace) -> None:
        devices, nodes = cfg.trainer.devices, cfg.trainer.num_nodes or 1
        if isinstance(devices, str) and devices.isdigit():
            devices = int(devices)
        if isinstance(devices, int) and devices > 0:
            world = devices * nodes
            batch = cfg.data.init_args.batch_size
            if batch % world:
                raise ConfigError(
                    f"data.batch_size {batch} must divide evenly across {world} devices (it is the global batch)"
                )

    @staticmethod
    def _resume_last(cfg: Namespace, root: str) -> None:
        ckpt = find_last_checkpoint(root)
        if ckpt is None:
            print(f"--ckpt_path last: no last.ckpt under {Path(root).resolve()}; starting a new run", file=sys.stderr)
            cfg.ckpt_path = None
            return
        cfg.ckpt_path = str(ckpt)
        run = ckpt.parent.parent  # <root>/<name>/<version>/checkpoints/last.ckpt
        for lg in _loggers(cfg.trainer):
            args = lg.init_args
            if "version" in args and "name" in args:
                args.name, args.version = run.parent.name, run.name
            elif lg.class_path.endswith("WandbLogger") and (run / "wandb_id").is_file():
                args.id, args.resume = (run / "wandb_id").read_text().strip(), "allow"

    # -- the job -------------------------------------------------------------------------------------
    def fit(self) -> Path | None:
        """Train, then evaluate on frozen features; returns metrics.json's path on rank 0 (else None)."""
        trainer, module, dm = self.trainer, self.model, self.datamodule
        trainer.fit(module, datamodule=dm, ckpt_path=self.config.ckpt_path, weights_only=True)
        run = Path(trainer.log_dir or trainer.default_root_dir)  # every rank: log_dir may broadcast
        if not trainer.interrupted:
            close_process_group()
        if trainer.interrupted or not trainer.is_global_zero:
            return None
        metrics = evaluate_run(module, dm, ReportConfig(**self.config.report), trainer.callback_metrics, run)
        timer = next(c for c in trainer.callbacks if isinstance(c, EpochTimer))
        metrics.update(
            epoch_seconds=timer.epoch_seconds,
            epochs=trainer.current_epoch,
            model=type(module).__name__,
            data=getattr(dm, "name", type(dm).__name__),
            n_train=len(dm.splits["train"].x),
            peak_memory_mb=peak_memory_mb(module.device),
            device=device_name(module.device),
            n_test=len(dm.splits["test"].x),
            run_dir=str(run.resolve()),
            checkpoint=getattr(trainer.checkpoint_callback, "last_model_path", None),
        )
        log_final(trainer, metrics, run)
        return write_metrics(metrics, run / "metrics.json")


def log_final(trainer, metrics: dict, run: Path) -> None:
    """The end-of-run numbers to every logger under ``final/`` (the k-sparse probes as ``..._k<k>``), and the
    feature-density histogram to the loggers that draw histograms (W&B, TensorBoard)."""
    numbers = {
        **metrics,
        **{f"sparse_probe_accuracy_k{k}": v for k, v in metrics.get("sparse_probe_accuracy", {}).items()},
    }
    numeric = {f"final/{k}": v for k, v in numbers.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    density = run / "log10_density.npy"
    for lg in trainer.loggers:
        lg.log_metrics(numeric, step=trainer.global_step)
        experiment = getattr(lg, "experiment", None)
        if density.is_file() and hasattr(lg, "log_image"):  # W&B
            import numpy as np
            import wandb

            experiment.log({"final/log10_feature_density": wandb.Histogram(np.load(density))})
        elif density.is_file() and hasattr(experiment, "add_histogram"):  # TensorBoard
            import numpy as np

            experiment.add_histogram("final/log10_feature_density", np.load(density), trainer.global_step)
        lg.save()


def fit_run(args: Sequence[str], default_config_files: Sequence[str | Path] | None = None) -> Path:
    """Train and evaluate one run in this process, as ``scripts/train.py ARGS`` would; returns its metrics.json.

    For library callers (experiments, notebooks): errors propagate as exceptions; the process's environment
    and float settings are restored afterwards.
    """
    import warnings

    with training_process(), warnings.catch_warnings():  # the args are ours, not sys.argv's
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        path = ImplicitEMCLI(list(args), default_config_files).fit()
    if path is None:
        raise RuntimeError(f"the run {list(args)} was interrupted or ran on a worker rank")
    return path


def evaluate_checkpoint(
    checkpoint: str | Path, config: str | Path | None = None, overrides: Sequence[str] = ()
) -> dict:
    """The metrics.json numbers of a saved model: rebuilt from its run's config.yaml (or ``config``),
    loaded from ``checkpoint`` (tensors and plain data only: a file carrying code is refused), evaluated on
    frozen features. ``overrides`` are CLI arguments such as ``--report.probe_method torch``."""
    checkpoint = Path(checkpoint)
    state = load_checkpoint(checkpoint)
    config = Path(config) if config else checkpoint.resolve().parent.parent / "config.yaml"
    if not config.is_file():
        raise ConfigError(f"no config.yaml beside the run of {checkpoint}; pass the run's config with --config")
    cli = ImplicitEMCLI(["--config", str(config), "--ckpt_path", "null", "--trainer.logger", "false", *overrides])
    cli.model.load_state_dict(state["state_dict"])
    cli.model.on_load_checkpoint(state)
    cli.datamodule.setup("test")
    metrics = evaluate_run(cli.model, cli.datamodule, ReportConfig(**cli.config.report), {})
    return {**metrics, "checkpoint": str(checkpoint.resolve()), "global_step": state.get("global_step")}


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
)


def _seed(seed_everything) -> int:
    """The model's seed and the data order from ``--seed_everything`` (an integer, or true/false: 0)."""
    return 0 if isinstance(seed_everything, bool) or seed_everything is None else int(seed_everything)


def main(args: Sequence[str] | None = None, default_config_files: Sequence[str | Path] | None = None) -> int:
    """Run the main job; print metrics.json's absolute path as the last stdout line. Returns the exit code."""
    import warnings

    for pattern in QUIET:
        warnings.filterwarnings("ignore", message=pattern)
    try:
        with training_process():
            cli = ImplicitEMCLI(args, default_config_files)
            path = cli.fit()
    except Exception as e:  # settings or data a user can fix: one line and its exit code
        return report_user_error(e)
    if not cli.trainer.is_global_zero:
        leave_worker()
    if path is not None:
        sys.stdout.flush()
        print(path, flush=True)
    return 0


def leave_worker() -> None:
    """End a DDP worker process now, skipping the interpreter's shutdown. Rank 0 saves everything; a worker
    that runs C++ static destructors while its peers are alive aborts at random ("terminate called without an
    active exception", 14 of 40 two-process gloo runs with torch 2.14 here, 0 of 40 with this exit), and the
    launcher then kills rank 0 in the middle of its evaluation."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
