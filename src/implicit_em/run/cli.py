"""The command line of ``scripts/train.py``: LightningCLI with the project's sections, defaults and checks.

Configs compose with repeated ``--config configs/<group>/<name>.yaml``; any value overrides with
``--section.key value``. What the command does with the configured objects (fit, evaluate, resume) is
:mod:`implicit_em.run.app`. Errors in settings print one line and exit with code 2.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

import lightning as L
from jsonargparse import Namespace
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from implicit_em.data.memory import ComponentDataModule
from implicit_em.errors import ConfigError, exit_with_argument_error
from implicit_em.models import MODELS
from implicit_em.run.checkpoints import find_last_checkpoint
from implicit_em.run.loggers import CSVLogger, WandbLogger
from implicit_em.run.report import ReportConfig
from implicit_em.run.rundir import WANDB_ID, RunDir
from implicit_em.training.callbacks import (
    ComponentImages,
    EpochTimer,
    IdentityCheck,
    ProbeDuringTraining,
    UsageHistogram,
)
from implicit_em.training.steps import Checkpoint


class SaveAndLogConfig(SaveConfigCallback):
    """Saves the resolved config beside the run (config.yaml) and sends it, flattened, with the model's
    parameter count, to every logger but the CSV one (W&B's run config, TensorBoard's hparams). Notes
    the W&B run id in the run directory, so a resumed run logs to the same W&B run."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        flat = _flatten(self.config.clone().as_dict())
        flat["n_parameters"] = pl_module.n_parameters()
        for logger in trainer.loggers:
            if not isinstance(logger, CSVLogger):
                logger.log_hyperparams(flat)
            if isinstance(logger, WandbLogger):  # --ckpt_path last continues this W&B run
                (RunDir.of_trainer(trainer) / WANDB_ID).write_text(str(logger.version))


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


def _is_file_logger(logger: Namespace) -> bool:
    """A logger whose files make the run directory (CSV, TensorBoard): its name and version are the run's."""
    return logger.class_path.endswith(("CSVLogger", "TensorBoardLogger"))


def _option(args: list[str], name: str) -> str | None:
    """The last value of ``--name VALUE`` or ``--name=VALUE`` among raw command-line ``args``."""
    found = None
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            found = args[i + 1]
        elif arg.startswith(name + "="):
            found = arg.split("=", 1)[1]
    return found


def with_the_runs_config(args: list[str], default_config_files: list[str]) -> list[str]:
    """A resume (``--ckpt_path last`` or a checkpoint's path) starts from the model, data and seed of the run's
    saved config.yaml, so they come back without retyping them; the command's own arguments still override them.
    How long to train (the trainer's settings) stays the command's."""
    import json

    import yaml

    ckpt = _option(args, "--ckpt_path")
    if ckpt in (None, "null", "None"):
        return args
    if ckpt == "last":
        root = _option(args, "--trainer.default_root_dir")
        configs = [*default_config_files, *(args[i + 1] for i, a in enumerate(args[:-1]) if a == "--config")]
        for config in configs if root is None else []:  # the last config that names a root directory wins
            if Path(config).is_file():
                trainer = (yaml.safe_load(Path(config).read_text()) or {}).get("trainer") or {}
                root = trainer.get("default_root_dir", root)
        found = find_last_checkpoint(root or ".")
        if found is None:
            return args
        ckpt = str(found)
    config = RunDir.of_checkpoint(ckpt).config_path
    if not config.is_file():
        return args
    saved = yaml.safe_load(config.read_text()) or {}
    prefix = [a for key in ("seed_everything", "model", "data") if key in saved
              for a in (f"--{key}", json.dumps(saved[key]))]  # fmt: skip
    return [*prefix, *args]


class ImplicitEMCLI(LightningCLI):
    """LightningCLI with the project's defaults, sections and guarantees (see the module docstring)."""

    def __init__(self, args: Sequence[str] | None = None, default_config_files: Sequence[str | Path] | None = None):
        files = [str(p) for p in default_config_files or []]
        args = with_the_runs_config(list(sys.argv[1:] if args is None else args), files)
        super().__init__(
            model_class=L.LightningModule,
            subclass_mode_model=True,
            datamodule_class=ComponentDataModule,
            subclass_mode_data=True,
            parser_class=OneLineParser,
            parser_kwargs={
                "default_config_files": files,
                "description": (
                    "Train a model. The models (--model.net NAME, options: --model.net.help NAME): "
                    + ", ".join(f"{c.__name__} ({n})" for n, c in sorted(MODELS.items()))
                    + "; several in one run: --model.help Ensemble. The data: --data.help DigitsDataModule | "
                    "MNISTDataModule | FashionMNISTDataModule | CIFAR10DataModule | CIFAR10PatchesDataModule | "
                    "SyntheticMixtureDataModule | ActivationsDataModule."
                ),
            },
            save_config_callback=SaveAndLogConfig,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={
                "callbacks": [EpochTimer(), UsageHistogram()],
                "plugins": {"class_path": "implicit_em.run.checkpoints.SafeCheckpointIO"},
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
        parser.add_argument(
            "--threads", type=int | None, default=None,
            help="torch CPU threads for this run (null: torch's default, one per core). On a shared or busy machine "
            "set it to the cores you may use: oversubscribed threads make each step many times slower.",
        )  # fmt: skip
        parser.add_lightning_class_args(Checkpoint, "checkpoint")
        parser.set_defaults(
            {"checkpoint.save_last": "link", "checkpoint.save_top_k": 1, "checkpoint.every_n_epochs": 1}
        )
        parser.add_lightning_class_args(ComponentImages, "components")
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
        self.resume_state = None
        if cfg.ckpt_path is not None:
            self._resume(cfg, root)
        if self.resume_state is None:
            self._new_wandb_ids(cfg)
        callbacks = cfg.trainer.callbacks or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        if cfg.trainer.enable_progress_bar is False:  # a saved config (a resume, a rebuild) may name one
            cfg.trainer.callbacks = [c for c in callbacks if "ProgressBar" not in getattr(c, "class_path", "")]
        elif not any("ProgressBar" in getattr(c, "class_path", "") for c in callbacks):
            cfg.trainer.callbacks = [*callbacks, Namespace(class_path="implicit_em.training.callbacks.ProgressBar",
                                                            init_args=Namespace(refresh_rate=10))]  # fmt: skip
        for lg in _loggers(cfg.trainer):
            if "save_dir" in lg.init_args and lg.init_args.save_dir in (None, "."):
                lg.init_args.save_dir = str(root)
        self._share_version(cfg)

    @staticmethod
    def _share_version(cfg: Namespace) -> None:
        """Give the file loggers (CSV, TensorBoard) one run directory: the next free version_N under their
        name. DDP's worker processes inherit the choice through the environment instead of recounting."""
        dir_loggers = [lg for lg in _loggers(cfg.trainer) if _is_file_logger(lg)]
        if not dir_loggers or any(lg.init_args.version is not None for lg in dir_loggers):
            return
        inherited = os.environ.get("LOCAL_RANK", "0") != "0"  # a worker launched by rank 0
        version = os.environ.get("IEM_RUN_VERSION") if inherited else None
        if version is None:
            first = dir_loggers[0].init_args
            taken = [p.name for p in (Path(first.save_dir) / first.name).glob("version_*")]
            numbers = [int(n.split("_")[1]) for n in taken if n.split("_")[1].isdigit()]
            version = os.environ["IEM_RUN_VERSION"] = f"version_{max(numbers, default=-1) + 1}"
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

    def _resume(self, cfg: Namespace, root: str) -> None:
        """Point the run at the checkpoint to resume (``last``: the newest under ``root``) and load it safely now,
        before any file of the run is written: a checkpoint that carries code or does not read is refused here.
        Its loggers continue the run's own files: the CSV and TensorBoard history before the checkpoint's step
        is kept (later rows, from after the last checkpoint, are trained again), W&B continues its run id."""
        from implicit_em.run.checkpoints import load_checkpoint

        ckpt = find_last_checkpoint(root) if cfg.ckpt_path == "last" else Path(cfg.ckpt_path)
        if ckpt is None:
            print(f"--ckpt_path last: no last.ckpt under {Path(root).resolve()}; starting a new run", file=sys.stderr)
            cfg.ckpt_path = None
            return
        self.resume_state = load_checkpoint(ckpt)
        cfg.ckpt_path = str(ckpt)
        step = int(self.resume_state.get("global_step") or 0)
        run = RunDir.of(ckpt)[0]  # <root>/<name>/<version>/checkpoints/last.ckpt
        for lg in _loggers(cfg.trainer):
            args = lg.init_args
            if _is_file_logger(lg):
                args.name, args.version = run.path.parent.name, run.path.name
            if lg.class_path.endswith("CSVLogger"):
                args.resume_step = step
            elif lg.class_path.endswith("TensorBoardLogger"):
                args.purge_step = step
            elif lg.class_path.endswith("WandbLogger") and (run / WANDB_ID).is_file():
                args.id, args.resume = (run / WANDB_ID).read_text().strip(), "allow"

    @staticmethod
    def _new_wandb_ids(cfg: Namespace) -> None:
        """A new run's W&B loggers get an id of their own (never another run's), kept in the run folder."""
        import secrets

        for lg in _loggers(cfg.trainer):
            if lg.class_path.endswith("WandbLogger") and not lg.init_args.get("id"):
                lg.init_args.id = secrets.token_hex(6)


def _seed(seed_everything) -> int:
    """The model's seed and the data order from ``--seed_everything`` (an integer, or true/false: 0)."""
    return 0 if isinstance(seed_everything, bool) or seed_everything is None else int(seed_everything)
